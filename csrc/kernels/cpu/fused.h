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
// One query per head (decode): q [B, Hq, 1, D], k / v [B, Hkv, S, D] (any strides with D
// contiguous; Hq a multiple of Hkv, query head h reads KV head h / (Hq / Hkv)), mask [B, 1, 1, S]
// bool or none -> [B, Hq, 1, D]; the exact softmax in fp32 (SDPA's result up to rounding).
bool attend_one_takes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& mask);
at::Tensor attend_one(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& mask, double scale);

}  // namespace cf::cpu
