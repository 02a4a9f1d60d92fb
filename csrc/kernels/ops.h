// ops.h — the per-token ops of a decoder block, each with one signature for every device.
// The ATen composites here are the reference (numerics follow Hugging Face's modules: RMSNorm in
// fp32 then cast back, RoPE with rotate-half, SwiGLU); on a GPU build, CUDA/ROCm tensors go to the
// fused kernels of kernels/cuda (set CF_GPU_KERNELS=0 to use the composites there too).
#pragma once
#include <ATen/ATen.h>

#include <utility>

namespace cf::ops {

// x [..., N], weight [N] -> weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
// (x + residual, rms_norm(x + residual, weight, eps)): the residual add fused with the next norm.
std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                               double eps);
// x [B, T, H, D] (a fresh tensor the op may overwrite), cos/sin [B, 1, T, D] ->
// (x * cos + rotate_half(x) * sin) as [B, H, T, D]
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// gate, up [..., I] -> silu(gate) * up
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);

// Whether CUDA/ROCm tensors take the fused kernels (a GPU build, CF_GPU_KERNELS not "0").
bool gpu_kernels_enabled();

}  // namespace cf::ops
