// fused.h — the elementwise ops of a decoder block fused into one pass each, on CPU fp32
// (skinny_gemm_impl.cpp's kernels, threaded over rows). takes() says whether a call qualifies;
// cf::ops falls back to the ATen composites otherwise (other dtypes, CF_CPU_KERNELS=0).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <utility>

namespace cf::cpu {

bool fused_takes(const at::Tensor& x);
// (x + residual, weight * rms_norm(x + residual)); without residual (x, weight * rms_norm(x)).
std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                               const at::Tensor& weight, double eps);
// x [B, T, H, D], cos/sin [B, 1, T, D] -> rotated [B, T, H, D] (a new tensor).
at::Tensor rope_bthd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);

}  // namespace cf::cpu
