// ops.h — the per-token ops of a decoder block, each with one signature for every device.
// These are composed from ATen ops (the reference); numerics follow Hugging Face's modules:
// RMSNorm in fp32 then cast back, RoPE with rotate-half, SwiGLU.
#pragma once
#include <ATen/ATen.h>

namespace cf::ops {

// x [..., N], weight [N] -> weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
// x [B, H, T, D], cos/sin [B, 1, T, D] -> x * cos + rotate_half(x) * sin
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// gate, up [..., I] -> silu(gate) * up
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);

}  // namespace cf::ops
