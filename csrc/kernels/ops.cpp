// ops.cpp — see ops.h.
#include "ops.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/fused.h"
#include "cpu/linear.h"
#include "cpu/quant.h"
#include "cuda/quant.h"
#include "../common/errors.h"
#include "gpu_ops.h"

namespace cf::ops {
namespace {

bool fused(const at::Tensor& x) { return x.is_cuda() && gpu_kernels_enabled(); }

// A weight of the activations' dtype multiplies after the cast back (Llama's order); an fp32 weight
// of lower-precision activations (Gemma's 1 + w) multiplies in fp32 and the product is cast once.
at::Tensor rms_norm_ref(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor h = x.to(at::kFloat);
  at::Tensor var = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(var + eps);
  if (weight.scalar_type() != x.scalar_type()) return (h * weight.to(at::kFloat)).to(x.scalar_type());
  return weight * h.to(x.scalar_type());
}

bool same_dtype(const at::Tensor& x, const at::Tensor& weight) { return x.scalar_type() == weight.scalar_type(); }

}  // namespace

bool gpu_kernels_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("CF_GPU_KERNELS");
    return gpu::available() && (v == nullptr || std::strcmp(v, "0") != 0);
  }();
  return enabled;
}

bool dense_gemv(const at::Tensor& x, const at::Tensor& w) {
  if (!x.is_cuda() || !gpu_kernels_enabled()) return false;  // before the environment: CPU products never read it
  const char* v = std::getenv("CF_DENSE_GEMV");
  if (v == nullptr || std::strcmp(v, "1") != 0) return false;
  const bool half = w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf;
  // beyond kPackedGemvRows rows linear_packed would copy w to a scratch for cuBLAS
  return half && x.scalar_type() == w.scalar_type() && w.device() == x.device() && w.dim() == 2 && w.is_contiguous() &&
         x.size(-1) == w.size(1) && x.numel() / std::max<int64_t>(1, x.size(-1)) <= gpu::kPackedGemvRows;
}

at::Tensor linear(const at::Tensor& x, const Matrix& w, const at::Tensor& bias) {
  if (!w.packed() && dense_gemv(x, w.t)) {
    const int32_t type = w.t.scalar_type() == at::kBFloat16 ? 30 : 1;  // ggml's BF16 / F16: rows of halves
    return gpu::linear_packed(x, w.t.view(at::kByte), type, w.t.size(1), bias);
  }
  if (w.packed()) {
    if (x.is_cuda() && w.t.is_cuda() && gpu::available()) return gpu::linear_packed(x, w.t, w.type, w.cols, bias);
    if (!x.device().is_cpu() || !w.t.device().is_cpu())
      throw InputError(cat("a packed ", cpu::packed_type_name(w.type), " matrix runs on the CPU or (a build with GPU kernels) ",
                           "a GPU, with x on its device; got x on ", x.device().str(), " and the matrix on ",
                           w.t.device().str(), " (load with dequantize=True)"));
    return cpu::linear_packed(x, w.t, w.type, w.cols, bias, "", w.q8);
  }
  if (x.device().is_cpu()) return cpu::linear(x, w.t, bias);
  return at::linear(x, w.t, bias);
}

bool grouped_linear_on_device(const Matrix& w, at::Device device) {
  if (!device.is_cuda() || !gpu_kernels_enabled() || !w.defined() || w.t.device() != device || w.t.dim() != 3 ||
      w.t.stride(-1) != 1)
    return false;
  return w.packed() || w.t.scalar_type() == at::kBFloat16 || w.t.scalar_type() == at::kHalf;
}

at::Tensor grouped_linear(const at::Tensor& x, const Matrix& w, const at::Tensor& experts, const at::Tensor& ends) {
  if (grouped_linear_on_device(w, x.device())) {
    if (w.packed()) return gpu::linear_packed_grouped(x, w.t, w.type, w.cols, experts, ends);
    const int32_t type = w.t.scalar_type() == at::kBFloat16 ? 30 : 1;  // ggml's BF16 / F16: rows of halves
    return gpu::linear_packed_grouped(x, w.t.view(at::kByte), type, w.t.size(-1), experts, ends);
  }
  const at::Tensor counted = ends.to(at::kCPU, at::kLong);
  const int64_t* end = counted.data_ptr<int64_t>();
  at::Tensor y = at::empty({x.size(0), w.rows()}, x.options());
  for (int64_t e = 0, start = 0; e < counted.size(0); start = end[e], ++e)
    if (end[e] > start) y.narrow(0, start, end[e] - start).copy_(linear(x.narrow(0, start, end[e] - start), w[e]));
  return y;
}

at::Tensor embedding(const Matrix& table, const at::Tensor& ids, at::ScalarType dtype) {
  if (!table.packed()) return at::embedding(table.t, ids);
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(table.cols);
  const at::Tensor rows = table.t.index_select(0, ids.reshape(-1).to(table.t.device()));
  if (rows.is_cuda()) return gpu::dequantize_packed(rows, table.type, table.cols, dtype).view(shape).to(ids.device());
  return cpu::dequantize(rows, table.type, table.cols, dtype).view(shape).to(ids.device());
}

namespace {

// One block of queries q [B, Hq, T, D] against all keys, mask [B or 1, 1, T, S] / [T, S] or undefined
// (then causal from `row0`: query t is position row0 + t of S keys). See eager_attention.
at::Tensor eager_block(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed,
                       double scale, double softcap, const at::Tensor& sinks) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  const int64_t G = Hq / Hkv;
  at::Tensor scores = at::matmul(q.reshape({B, Hkv, G * T, D}), k.transpose(-2, -1)).view({B, Hq, T, S}) * scale;
  if (softcap > 0) scores = at::tanh(scores / softcap) * softcap;
  if (allowed.defined()) scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
  if (sinks.defined())  // GPT-OSS: the sink column (the softmax takes its row max off in fp32 itself)
    scores = at::cat({scores, sinks.to(scores.scalar_type()).view({1, Hq, 1, 1}).expand({B, Hq, T, 1})}, -1);
  at::Tensor probs = at::softmax(scores, -1, at::kFloat);
  if (sinks.defined()) probs = probs.narrow(-1, 0, S);
  return at::matmul(probs.to(q.scalar_type()).reshape({B, Hkv, G * T, S}), v).view({B, Hq, T, D});
}

// transformers' eager attention, for what SDPA cannot do: Gemma 2's soft-capping (scores capped
// before masking) and GPT-OSS's sinks (one more logit per head in the softmax, whose probability
// is dropped). Scores in the compute dtype, softmax in fp32 and back. The G query heads sharing a
// KV head are stacked as G * T queries
// of it, so the cache is not repeated per query head; queries go in blocks so the scores of a long
// prompt are never all materialised at once.
at::Tensor eager_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& mask, double scale, double softcap, const at::Tensor& sinks) {
  const int64_t T = q.size(2), S = k.size(2);
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(S * q.size(1) * q.size(0), 1));
  std::vector<at::Tensor> parts;
  for (int64_t t0 = 0; t0 < T; t0 += rows) {
    const int64_t n = std::min(rows, T - t0);
    at::Tensor allowed;
    if (mask.has_value()) {
      allowed = mask->size(-2) == 1 ? *mask : mask->narrow(-2, t0, n);
    } else if (T > 1) {  // causal, S == T
      allowed = at::ones({T, S}, q.options().dtype(at::kBool)).tril().narrow(0, t0, n);
    }
    parts.push_back(eager_block(q.narrow(2, t0, n), k, v, allowed, scale, softcap, sinks));
  }
  return parts.size() == 1 ? parts[0] : at::cat(parts, 2);
}

}  // namespace

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, double scale, double softcap, const at::Tensor& sinks) {
  if (softcap > 0 || sinks.defined()) return eager_attention(q, k, v, mask, scale, softcap, sinks);
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
  if (T == 1 && cpu::attend_one_takes(q, k, v, mask)) return cpu::attend_one(q, k, v, mask, scale);
  if (T == 1 && Hq != Hkv) {
    // One query per head: the G query heads sharing a KV head become G queries of that KV head. No
    // copy of the cache; the mask [B, 1, 1, S] applies to each of them alike.
    // (reshape: CUDA's kernels may hand the output back in another memory layout)
    return at::scaled_dot_product_attention(q.reshape({B, Hkv, Hq / Hkv, D}), k, v, mask, 0.0, false, scale)
        .reshape({B, Hq, 1, D});
  }
  const bool causal = !mask.has_value() && T > 1;
  return at::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale, /*enable_gqa=*/Hq != Hkv);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (fused(x) && same_dtype(x, weight)) return gpu::add_rms_norm(x, std::nullopt, weight, eps).second;
  if (cpu::fused_takes(x) && cpu::fused_takes(weight)) return cpu::add_rms_norm(x, std::nullopt, weight, eps).second;
  return rms_norm_ref(x, weight, eps);
}

std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                               double eps) {
  if (fused(x) && same_dtype(x, weight)) return gpu::add_rms_norm(x, residual, weight, eps);
  if (cpu::fused_takes(x) && cpu::fused_takes(residual) && cpu::fused_takes(weight))
    return cpu::add_rms_norm(x, residual, weight, eps);
  at::Tensor sum = x + residual;
  return {sum, rms_norm_ref(sum, weight, eps)};
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t R = cos.size(-1), D = x.size(-1);
  if (R < D) {  // partial rotary: rotate the first R dims of each head, pass the rest
    at::Tensor rotated = apply_rope(x.narrow(-1, 0, R).contiguous(), cos, sin);
    return at::cat({rotated, x.narrow(-1, R, D - R).transpose(1, 2)}, -1);
  }
  if (fused(x)) return gpu::rope_bthd(x, cos, sin).transpose(1, 2);
  if (cpu::fused_takes(x) && cpu::fused_takes(cos) && cpu::fused_takes(sin))
    return cpu::rope_bthd(x, cos, sin).transpose(1, 2);
  at::Tensor t = x.transpose(1, 2);
  const int64_t half = t.size(-1) / 2;
  at::Tensor rotated = at::cat({-t.narrow(-1, half, half), t.narrow(-1, 0, half)}, -1);
  return t * cos + rotated * sin;
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  if (fused(gate)) return gpu::silu_mul(gate, up);
  if (cpu::fused_takes(gate) && cpu::fused_takes(up) && gate.sizes() == up.sizes()) return cpu::silu_mul(gate, up);
  return at::silu(gate) * up;
}

at::Tensor clamped_swiglu(const at::Tensor& gate, const at::Tensor& up, double alpha, double limit) {
  at::Tensor g = gate.clamp_max(limit);
  return (up.clamp(-limit, limit) + 1) * (g * at::sigmoid(g * alpha));
}

at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, const std::string& act) {
  if (act == "silu") return silu_mul(gate, up);
  return at::gelu(gate, act == "gelu_tanh" ? "tanh" : "none") * up;
}

}  // namespace cf::ops
