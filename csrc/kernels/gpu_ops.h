// gpu_ops.h — the fused GPU ops and packed-matrix products as ATen functions (cuda/dispatch.cpp), or, in a build without
// CUDA/ROCm, stubs that say so (gpu_stubs.cpp). cf::ops routes CUDA tensors here.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <utility>

namespace cf::gpu {

bool available();  // built with the GPU kernels
// Whether at::_grouped_mm runs on `device` without a host sync (bf16): compute capability 9.x / 10.x;
// elsewhere torch falls back to a loop that reads the offsets on the host. False on ROCm and in
// builds without the GPU kernels.
bool grouped_mm_without_sync(at::Device device);
// (x + residual, weight * rms_norm(x + residual)); without residual: (x, weight * rms_norm(x)).
std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                               const at::Tensor& weight, double eps);
// x [B, T, H, D] (rotated in place when contiguous), cos/sin [B, 1, T, D] or [B, T, D] -> x rotated.
at::Tensor rope_bthd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);
// Packed ggml matrices on the GPU (cuda/quant.h): blocks uint8 [..., rows, row_bytes] -> float rows,
// and x [..., K] . W^T (+ bias) reading the blocks.
// chunks false: the per-element kernels (cuda/quant.h), for tests and benchmarks. direct_rows: up
// to that many rows of x (at least kPackedGemvRows, the default) read the blocks directly, 8 rows
// per launch, rather than dequantizing them for cuBLAS (benchmarks compare the two).
at::Tensor dequantize_packed(const at::Tensor& blocks, int32_t type, int64_t K, at::ScalarType dtype, bool chunks = true);
at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& blocks, int32_t type, int64_t K, const at::Tensor& bias,
                         bool chunks = true, int64_t direct_rows = 0);
// Experts' products without a host sync (cuda/quant.h's gemv_packed_grouped): x [P, K] rows sorted by
// expert (experts [P] int64, ascending; ends [E] int32, cumulative rows per expert) times their
// expert's matrix of stacked blocks uint8 [E, N, row_bytes] (a float16 / bfloat16 weight viewed as
// bytes is type 1 / 30) -> [P, N] in x's dtype.
at::Tensor linear_packed_grouped(const at::Tensor& x, const at::Tensor& blocks, int32_t type, int64_t K,
                                 const at::Tensor& experts, const at::Tensor& ends, bool chunks = true);

}  // namespace cf::gpu
