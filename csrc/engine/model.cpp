// model.cpp — see model.h. Numerics follow Hugging Face's modules for every family config.h lists;
// family differences are flags of ModelConfig read in the one block below.
#include "model.h"

#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <set>
#include <string>

#include <torch/version.h>

#include "../common/errors.h"
#include "../kernels/gpu_ops.h"
#include "../kernels/ops.h"
#include "linear_attention.h"
#include "masks.h"

namespace cf {
namespace {

at::Tensor compute_inv_freq(const RopeConfig& r, at::Device device, const std::vector<double>& divisors = {}) {
  const int64_t dim = r.rotary_dim;
  auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor exponent = at::arange(0, dim, 2, at::TensorOptions().dtype(at::kLong).device(device)).to(at::kFloat) / dim;
  at::Tensor pos_freqs = at::pow(r.theta, exponent);
  if (!divisors.empty())  // LongRoPE: one divisor per frequency
    return 1.0 / (at::tensor(divisors, at::TensorOptions().dtype(at::kDouble)).to(f32) * pos_freqs);
  at::Tensor inv = 1.0 / pos_freqs;
  if (r.type == "linear") return inv / r.factor;
  if (r.type == "llama3") {
    const double old_ctx = static_cast<double>(r.original_max_position_embeddings);
    const double low_wavelen = old_ctx / r.low_freq_factor, high_wavelen = old_ctx / r.high_freq_factor;
    at::Tensor wavelen = 2 * M_PI / inv;
    at::Tensor scaled = at::where(wavelen > low_wavelen, inv / r.factor, inv);
    at::Tensor smooth = (old_ctx / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
    at::Tensor smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled;
    at::Tensor medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
    return at::where(medium, smoothed, scaled);
  }
  if (r.type == "yarn") {
    const double orig = static_cast<double>(r.original_max_position_embeddings);
    auto correction_dim = [&](double rotations) {
      return (dim * std::log(orig / (rotations * 2 * M_PI))) / (2 * std::log(r.theta));
    };
    double low = correction_dim(r.beta_fast), high = correction_dim(r.beta_slow);
    if (r.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(dim - 1));
    if (low == high) high += 0.001;
    at::Tensor ramp = ((at::arange(dim / 2, f32) - low) / (high - low)).clamp(0, 1);
    at::Tensor extrapolation = 1 - ramp;
    at::Tensor interpolated = 1.0 / (r.factor * pos_freqs);
    return interpolated * (1 - extrapolation) + inv * extrapolation;
  }
  return inv;
}

RopeFreqs rope_freqs(const RopeConfig& r, at::Device device) {
  RopeFreqs f;
  f.attention_factor = r.attention_factor;
  if (r.type == "longrope") {
    f.inv_freq = compute_inv_freq(r, device, r.short_factor);
    f.inv_freq_long = compute_inv_freq(r, device, r.long_factor);
    f.original_max = r.original_max_position_embeddings;
  } else {
    f.inv_freq = compute_inv_freq(r, device);
  }
  return f;
}

void check_ids(const at::Tensor& t, const char* name, at::Device device) {
  if (t.dim() != 2) throw InputError(cat(name, " must be 2-D [batch, tokens], got ", t.dim(), "-D"));
  if (t.size(0) == 0) throw InputError(cat(name, " has an empty batch: ", shape_str(t.sizes())));
  if (t.scalar_type() != at::kLong) throw InputError(cat(name, " must be int64, got ", c10::toString(t.scalar_type())));
  if (t.device() != device) throw InputError(cat(name, " is on ", t.device().str(), " but the model is on ", device.str()));
}

}  // namespace

Engine::Engine(const std::string& config_json, const std::string& config_source,
               const std::map<std::string, at::Tensor>& tensors, const std::map<std::string, int32_t>& packed,
               bool q8_activations)
    : cfg_(parse_config(config_json, config_source)), w_(bind_weights(cfg_, tensors, packed, q8_activations)) {
  rope_ = rope_freqs(cfg_.rope, w_.device);
  if (cfg_.has_rope_local) rope_local_ = rope_freqs(cfg_.rope_local, w_.device);
}

namespace {
at::Tensor moved(const at::Tensor& t, at::Device device) { return t.defined() ? t.to(device) : t; }
}  // namespace

const SlotInputs& CallInputs::on(at::Device device) {
  for (const SlotInputs& s : on_)
    if (s.device == device) return s;
  const SlotInputs& m = on_.front();
  SlotInputs s;
  s.device = device;
  s.pt = {moved(m.pt.cos, device), moved(m.pt.sin, device), moved(m.pt.cos_local, device),
          moved(m.pt.sin_local, device), moved(m.pt.query_scale, device)};
  for (const auto& [window, mask] : m.masks)
    s.masks[window] = mask ? std::optional<at::Tensor>(mask->to(device)) : std::nullopt;
  s.write_index = moved(m.write_index, device);
  s.tokens = moved(m.tokens, device);
  on_.push_back(std::move(s));
  return on_.back();
}

KVCache Engine::new_cache(const LayerPath& path, int64_t batch, int64_t capacity, const KVCache* share,
                          int64_t shared_slots) const {
  validate_layer_path(path, cfg_.num_layers);
  std::vector<at::Device> devices;
  std::vector<int64_t> linear;
  for (int64_t layer : path) {
    devices.push_back(w_.layers[layer].device);
    linear.push_back(cfg_.linear_layers[layer]);
  }
  const LinearStateShape shape{2 * cfg_.linear_k_heads * cfg_.linear_k_dim + cfg_.linear_v_heads * cfg_.linear_v_dim,
                               cfg_.linear_conv_kernel, cfg_.linear_v_heads, cfg_.linear_k_dim, cfg_.linear_v_dim};
  return KVCache(devices, path, batch, capacity, cfg_.num_kv_heads, cfg_.head_dim, w_.dtype, share, shared_slots, linear,
                 shape);
}

at::Device Engine::layer_device(int64_t layer) const {
  validate_layer_path({layer}, cfg_.num_layers);
  return w_.layers[layer].device;
}

std::map<std::string, at::Tensor> Engine::layer_tensors(int64_t layer) const {
  validate_layer_path({layer}, cfg_.num_layers);
  const LayerWeights& L = w_.layers[layer];
  // Hugging Face's names for what each tensor is in this family (Gemma: post_attention_layernorm
  // normalizes the attention output, pre_feedforward_layernorm comes before the MLP).
  // (A packed matrix is its uint8 blocks.)
  std::map<std::string, at::Tensor> all = {
      {"input_layernorm", L.input_norm}, {"q_proj", L.wq.t}, {"k_proj", L.wk.t}, {"v_proj", L.wv.t},
      {"qkv_proj", L.wqkv.t},            {"o_proj", L.wo.t},
      {"sinks", L.sinks}, {"in_proj_qkvz", L.la_qkvz.t}, {"in_proj_ba", L.la_ba.t}, {"in_proj_qkv", L.la_qkv.t},
      {"in_proj_z", L.la_z.t}, {"in_proj_b", L.la_b.t}, {"in_proj_a", L.la_a.t}, {"conv1d", L.conv}, {"A_log", L.A_log},
      {"dt_bias", L.dt_bias}, {"linear_norm", L.la_norm}, {"out_proj", L.la_out.t},
      {"q_norm", L.q_norm}, {"k_norm", L.k_norm}, {"q_proj.bias", L.bq}, {"k_proj.bias", L.bk}, {"v_proj.bias", L.bv},
      {"o_proj.bias", L.bo}, {"qkv_rows", L.qkv_rows.t}, {"qkv_rows.bias", L.b_qkv_rows},
  };
  auto add_mlp = [&all](const std::string& prefix, const MlpWeights& m) {
    for (const auto& [name, t] : {std::pair{"gate_up_proj", m.gate_up.t}, {"gate_proj", m.gate.t}, {"up_proj", m.up.t},
                                  {"down_proj", m.down.t}, {"gate_up_proj.bias", m.b_gate_up}, {"gate_proj.bias", m.b_gate},
                                  {"up_proj.bias", m.b_up}, {"down_proj.bias", m.b_down},
                                  {"gate_up_rows", m.gate_up_rows.t}, {"gate_up_rows.bias", m.b_gate_up_rows}})
      all[prefix + name] = t;
  };
  add_mlp(L.sparse ? "shared_expert." : "", L.mlp);
  if (cfg_.sandwich_norm) {
    all["post_attention_layernorm"] = L.post_attn_norm;
    all["pre_feedforward_layernorm"] = L.post_norm;
    all["post_feedforward_layernorm"] = L.post_ffn_norm;
  } else {
    all["post_attention_layernorm"] = L.post_norm;
  }
  all["router"] = L.router;
  all["router.bias"] = L.router_bias;
  all["shared_expert_gate"] = L.shared_gate;
  for (size_t e = 0; e < L.experts.size(); ++e) add_mlp(cat("experts.", e, "."), L.experts[e]);
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, t] : all)
    if (t.defined()) out[name] = t;
  return out;
}

std::map<std::string, at::Tensor> Engine::main_tensors() const {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, t] : {std::pair{"embed_tokens", w_.embed.t}, {"norm", w_.final_norm}, {"lm_head", w_.lm_head.t}})
    if (t.defined()) out[name] = t;
  return out;
}

// x's query, key and value projections, each [B, T, rows]: one product when the layer's q / k / v
// rows are one matrix (Phi-3's qkv_proj, or views laid out one after another), else three. (Views
// of one product's output: the rope ops write into a contiguous q or k in place, each in its own
// columns.)
std::array<at::Tensor, 3> Engine::qkv_projections(const at::Tensor& x, const LayerWeights& L) const {
  const Matrix& fused = L.wqkv.defined() ? L.wqkv : L.qkv_rows;
  if (!fused.defined()) return {ops::linear(x, L.wq, L.bq), ops::linear(x, L.wk, L.bk), ops::linear(x, L.wv, L.bv)};
  const at::Tensor all = ops::linear(x, fused, L.b_qkv_rows);
  const int64_t kv = cfg_.num_kv_heads * cfg_.head_dim, nq = all.size(-1) - 2 * kv;
  return {all.narrow(-1, 0, nq), all.narrow(-1, nq, kv), all.narrow(-1, nq + kv, kv)};
}

std::map<std::string, int64_t> Engine::fused_products() const {
  int64_t qkv = 0, gate_up = 0;
  auto count = [&gate_up](const MlpWeights& m) { gate_up += m.gate_up.defined() || m.gate_up_rows.defined(); };
  for (const LayerWeights& L : w_.layers) {
    qkv += L.wqkv.defined() || L.qkv_rows.defined();
    count(L.mlp);
    for (const MlpWeights& e : L.experts) count(e);
  }
  return {{"qkv", qkv}, {"gate_up", gate_up}};
}

at::Tensor Engine::attention(const at::Tensor& x, int64_t layer, const PositionTables& pt,
                             const std::optional<at::Tensor>& mask, KVCache* cache, int64_t slot,
                             const at::Tensor& write_index) const {
  const LayerWeights& L = w_.layers[layer];
  const int64_t B = x.size(0), T = x.size(1), D = cfg_.head_dim, Hq = cfg_.num_heads, Hkv = cfg_.num_kv_heads;
  auto [qp, kp, vp] = qkv_projections(x, L);
  at::Tensor q, gate;
  if (cfg_.attn_output_gate) {  // each head's query, then its output gate
    at::Tensor qg = qp.reshape({B, T, Hq, 2 * D});
    q = qg.narrow(-1, 0, D).contiguous();
    gate = qg.narrow(-1, D, D).reshape({B, T, Hq * D});
  } else {
    q = qp.reshape({B, T, Hq, D});
  }
  at::Tensor k = kp.reshape({B, T, Hkv, D}), v = vp.reshape({B, T, Hkv, D}).transpose(1, 2);
  if (cfg_.qk_norm) {
    q = ops::rms_norm(q, L.q_norm, cfg_.rms_norm_eps);
    k = ops::rms_norm(k, L.k_norm, cfg_.rms_norm_eps);
  }
  const bool local = cfg_.has_rope_local && cfg_.sliding_window[layer] > 0;
  const at::Tensor& cos = local ? pt.cos_local : pt.cos;
  const at::Tensor& sin = local ? pt.sin_local : pt.sin;
  q = ops::apply_rope(q, cos, sin);
  k = ops::apply_rope(k, cos, sin);
  if (pt.query_scale.defined()) q = q * pt.query_scale;
  if (cache != nullptr)
    std::tie(k, v) = write_index.defined() ? cache->append_at(slot, k, v, write_index) : cache->append(slot, k, v);
  at::Tensor o = ops::attention(q, k, v, mask, cfg_.attn_scale, cfg_.attn_softcap, L.sinks).transpose(1, 2);
  o = o.reshape({B, T, Hq * D});
  if (gate.defined()) o = o * at::sigmoid(gate);
  return ops::linear(o, L.wo, L.bo);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> Engine::linear_projections(const at::Tensor& x,
                                                                                      const LayerWeights& L) const {
  const int64_t B = x.size(0), T = x.size(1), Hk = cfg_.linear_k_heads, Hv = cfg_.linear_v_heads;
  const int64_t Dk = cfg_.linear_k_dim, Dv = cfg_.linear_v_dim, r = Hv / Hk;
  if (L.la_qkv.defined())
    return {ops::linear(x, L.la_qkv), ops::linear(x, L.la_z).view({B, T, Hv, Dv}), ops::linear(x, L.la_b),
            ops::linear(x, L.la_a)};
  // Qwen3-Next: per key head g, [q (Dk) | k (Dk) | v (r Dv) | z (r Dv)] and [b (r) | a (r)]; value
  // head g * r + i is the i-th of group g
  at::Tensor qkvz = ops::linear(x, L.la_qkvz).view({B, T, Hk, 2 * Dk + 2 * r * Dv});
  at::Tensor ba = ops::linear(x, L.la_ba).view({B, T, Hk, 2 * r});
  at::Tensor mixed = at::cat({qkvz.narrow(-1, 0, Dk).reshape({B, T, Hk * Dk}),
                              qkvz.narrow(-1, Dk, Dk).reshape({B, T, Hk * Dk}),
                              qkvz.narrow(-1, 2 * Dk, r * Dv).reshape({B, T, Hv * Dv})}, -1);
  return {mixed, qkvz.narrow(-1, 2 * Dk + r * Dv, r * Dv).reshape({B, T, Hv, Dv}),
          ba.narrow(-1, 0, r).reshape({B, T, Hv}), ba.narrow(-1, r, r).reshape({B, T, Hv})};
}

// Gated DeltaNet, as transformers' torch path: padded tokens' inputs zeroed; q|k|v through the
// causal conv; beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias) in fp32; the gated delta
// rule (recurrent for a cached one-token step, else chunked); RMSNorm(o) * silu(z); out_proj.
at::Tensor Engine::linear_attention(at::Tensor x, int64_t layer, const at::Tensor& tokens, KVCache* cache,
                                    int64_t slot) const {
  const LayerWeights& L = w_.layers[layer];
  const int64_t B = x.size(0), T = x.size(1), Hk = cfg_.linear_k_heads, Hv = cfg_.linear_v_heads;
  const int64_t Dk = cfg_.linear_k_dim, Dv = cfg_.linear_v_dim;
  if (tokens.defined() && T > 1) x = x * tokens.unsqueeze(-1).to(x.scalar_type());
  auto [mixed, z, b, a] = linear_projections(x, L);
  mixed = linear::causal_conv(mixed, L.conv, cache ? &cache->conv_state(slot) : nullptr);
  const at::Tensor q = mixed.narrow(-1, 0, Hk * Dk).view({B, T, Hk, Dk});
  const at::Tensor k = mixed.narrow(-1, Hk * Dk, Hk * Dk).view({B, T, Hk, Dk});
  const at::Tensor v = mixed.narrow(-1, 2 * Hk * Dk, Hv * Dv).view({B, T, Hv, Dv});
  const at::Tensor beta = at::sigmoid(b);
  const at::Tensor g = -L.A_log.to(at::kFloat).exp() * at::softplus(a.to(at::kFloat) + L.dt_bias.to(at::kFloat));
  at::Tensor fresh;
  at::Tensor& state = cache ? cache->recurrent_state(slot) : (fresh = at::zeros({B, Hv, Dk, Dv}, x.options().dtype(at::kFloat)));
  const at::Tensor o = linear::gated_delta_rule(q, k, v, g, beta, state, cache != nullptr && T == 1);
  const at::Tensor h = ops::rms_norm(o, L.la_norm, cfg_.rms_norm_eps) * at::silu(z.to(at::kFloat));
  return ops::linear(h.to(x.scalar_type()).reshape({B, T, Hv * Dv}), L.la_out);
}

// down(act(gate x) * up x) (+ biases), from separate gate / up matrices or one fused gate_up
// (halves, or GPT-OSS's alternating rows); act is the family's, or GPT-OSS's clamped SwiGLU.
at::Tensor Engine::gated_mlp(const at::Tensor& x, const MlpWeights& w) const {
  at::Tensor gate, up;
  const Matrix& fused = w.gate_up.defined() ? w.gate_up : w.gate_up_rows;
  if (fused.defined()) {
    at::Tensor both = ops::linear(x, fused, w.gate_up.defined() ? w.b_gate_up : w.b_gate_up_rows);
    const int64_t I = fused.rows() / 2;
    gate = w.interleaved ? both.slice(-1, 0, 2 * I, 2) : both.narrow(-1, 0, I);
    up = w.interleaved ? both.slice(-1, 1, 2 * I, 2) : both.narrow(-1, I, I);
  } else {
    gate = ops::linear(x, w.gate, w.b_gate);
    up = ops::linear(x, w.up, w.b_up);
  }
  at::Tensor act = cfg_.swiglu_limit > 0 ? ops::clamped_swiglu(gate, up, cfg_.swiglu_alpha, cfg_.swiglu_limit)
                                         : ops::gated_activation(gate, up, cfg_.hidden_act);
  return ops::linear(act, w.down, w.b_down);
}

at::Tensor Engine::mlp(const at::Tensor& x, const LayerWeights& L) const { return L.sparse ? moe(x, L) : gated_mlp(x, L.mlp); }

// The router's top k experts per token and their mixing weights [N, k], as transformers computes
// them: an fp32 softmax over all logits, then the top k (renormalised when norm_topk_prob); or
// (GPT-OSS) the top k of the biased logits, softmaxed among themselves in the compute dtype.
std::pair<at::Tensor, at::Tensor> Engine::route(const at::Tensor& flat, const LayerWeights& L) const {
  const int64_t k = cfg_.experts_per_tok;
  at::Tensor logits = ops::linear(flat, L.router, L.router_bias);
  if (cfg_.softmax_after_topk) {
    auto [top, experts] = logits.topk(k, -1);
    return {at::softmax(top, -1, at::kFloat).to(flat.scalar_type()), experts};
  }
  auto [weights, experts] = at::softmax(logits.to(at::kFloat), -1).topk(k, -1);
  if (cfg_.norm_topk_prob) weights = weights / weights.sum(-1, true);
  if (!cfg_.router_weights_fp32) weights = weights.to(flat.scalar_type());
  return {weights, experts};
}

namespace {

// at::_grouped_mm: in torch since 2.8, with a CPU kernel since 2.9 (CF_MOE_GROUPED=1 runs it there).
#if __has_include(<ATen/ops/_grouped_mm.h>)
#define CF_GROUPED_MM 1
#else
#define CF_GROUPED_MM 0
#endif
constexpr bool kGroupedMmCpu = CF_GROUPED_MM && (TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 9);

// The stacked experts' matrices (gate / up, or gate_up; down).
std::vector<const Matrix*> stacked_matrices(const MlpWeights& s) {
  std::vector<const Matrix*> out;
  for (const Matrix* m : {&s.gate_up, &s.gate, &s.up, &s.down})
    if (m->defined()) out.push_back(m);
  return out;
}

// Stacked float experts whose matrices at::_grouped_mm takes: rows and columns multiples of 8 and
// starts 16-byte aligned (its strides and pointers must be), none packed.
bool grouped_mm_fits(const MlpWeights& s) {
  for (const Matrix* m : stacked_matrices(s))
    if (m->packed() || m->t.size(-1) % 8 != 0 || m->t.size(-2) % 8 != 0 ||
        reinterpret_cast<uintptr_t>(m->t.data_ptr()) % 16 != 0)
      return false;
  return true;
}

// CF_MOE_GROUPED / CF_MOE_GEMV: 1 forces that route on (where it fits), 0 off, unset: the default.
int route_override(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || *v == '\0' ? -1 : std::string(v) != "0";
}

// Whether the grouped GEMV kernel runs every stacked matrix of s on `device` (no host sync).
bool gemv_on_device(const MlpWeights& s, at::Device device) {
  for (const Matrix* m : stacked_matrices(s))
    if (!ops::grouped_linear_on_device(*m, device)) return false;
  return true;
}

// Rows per expert, on average, up to which the grouped GEMV kernel takes a layer's experts by
// default: it reads an expert's blocks once per this many of its rows (cuda/quant.h's
// kPackedGemvRows) and sums in fp32 on CUDA cores, so past decode-sized batches the loop's
// dequantize-and-BLAS products win.
constexpr int64_t kGemvRowsPerExpert = 8;
constexpr int64_t kGemvMaxPairs = 65535;  // the kernel's grid rows (one per (token, expert) pair)

}  // namespace

// How a sparse layer's experts run for `tokens` rows on `device` in `dtype`:
// - kGroupedMm: at::_grouped_mm over stacked float experts without biases, on a GPU where it runs
//   without a host sync (Hopper / datacenter Blackwell, bf16: gpu::grouped_mm_without_sync); on the
//   CPU only when CF_MOE_GROUPED=1 forces it (the tests; slower than the loop there).
// - kGroupedGemv: our grouped GEMV kernel over stacked packed or half-precision experts on a GPU
//   (ops::grouped_linear; any GPU the kernels build for), for decode-sized batches (at most
//   kGemvRowsPerExpert rows per expert on average); CF_MOE_GEMV=1 forces it anywhere up to
//   kGemvMaxPairs pairs (on the CPU its products loop over the experts: the tests' way to check the
//   route), 0 turns it off.
// - kLoop: each expert on its rows, their counts read on the host.
Engine::ExpertRoute Engine::expert_route(const LayerWeights& L, at::Device device, at::ScalarType dtype,
                                         int64_t tokens) const {
  if (!L.stacked.down.defined() || cfg_.swiglu_limit > 0) return ExpertRoute::kLoop;
  const int grouped = route_override("CF_MOE_GROUPED"), gemv = route_override("CF_MOE_GEMV");
  const bool mm_here = device.is_cuda() ? dtype == at::kBFloat16 && gpu::grouped_mm_without_sync(device)
                                        : grouped == 1 && kGroupedMmCpu;
  if (CF_GROUPED_MM && grouped != 0 && mm_here && grouped_mm_fits(L.stacked)) return ExpertRoute::kGroupedMm;
  const int64_t pairs = tokens * cfg_.experts_per_tok;
  if (gemv == 0 || pairs > kGemvMaxPairs) return ExpertRoute::kLoop;
  if (gemv == 1) return ExpertRoute::kGroupedGemv;
  if (pairs > kGemvRowsPerExpert * cfg_.num_experts) return ExpertRoute::kLoop;
  return gemv_on_device(L.stacked, device) ? ExpertRoute::kGroupedGemv : ExpertRoute::kLoop;
}

bool Engine::moe_without_host_sync(int64_t tokens) const {
  for (const LayerWeights& L : w_.layers) {
    if (!L.sparse) continue;
    const ExpertRoute r = expert_route(L, L.device, w_.dtype, tokens);
    // forced where the kernel does not run, the grouped GEMV route's products loop and sync
    if (r == ExpertRoute::kLoop || (r == ExpertRoute::kGroupedGemv && !gemv_on_device(L.stacked, L.device)))
      return false;
  }
  return true;
}

// Each expert once on the rows routed to it (tokens grouped by expert on the host: no expert sees
// a token it was not picked for); returns fp32 [N, H], each token's k weighted expert outputs
// summed in fp32 and rounded once by the caller (as transformers' grouped_mm experts sum them).
at::Tensor Engine::experts_looped(const at::Tensor& flat, const LayerWeights& L, const at::Tensor& weights,
                                  const at::Tensor& experts) const {
  const int64_t k = cfg_.experts_per_tok, E = cfg_.num_experts;
  at::Tensor pairs = experts.reshape(-1), order = pairs.argsort(/*stable=*/true);
  at::Tensor rows = order.div(k, "floor"), row_weights = weights.reshape(-1).index_select(0, order);
  const at::Tensor counts = at::bincount(pairs, {}, E).cpu();  // how many rows each expert takes
  const int64_t* n = counts.data_ptr<int64_t>();
  at::Tensor out = at::zeros_like(flat, flat.options().dtype(at::kFloat));
  for (int64_t e = 0, off = 0; e < E; off += n[e], ++e) {
    if (n[e] == 0) continue;
    at::Tensor r = rows.narrow(0, off, n[e]);
    at::Tensor y = gated_mlp(flat.index_select(0, r), L.experts[e]);
    out.index_add_(0, r, (y * row_weights.narrow(0, off, n[e]).unsqueeze(1)).to(at::kFloat));
  }
  return out;
}

// The same with no host synchronisation (a CUDA graph can hold it): the (token, expert) pairs
// sorted by expert, each expert's row count and the offsets counted on the device, each projection
// one grouped product over the stacked experts (at::_grouped_mm, or with `gemv` ops::grouped_linear),
// the weighted outputs put back in token order and summed over each token's k in fp32.
at::Tensor Engine::experts_grouped(const at::Tensor& flat, const LayerWeights& L, const at::Tensor& weights,
                                   const at::Tensor& experts, bool gemv) const {
  const int64_t k = cfg_.experts_per_tok, E = cfg_.num_experts, N = flat.size(0);
  const MlpWeights& s = L.stacked;
  const at::Tensor pairs = experts.reshape(-1);
  const auto by_expert = pairs.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor &sorted = std::get<0>(by_expert), &order = std::get<1>(by_expert);
  const at::Tensor counts = at::zeros({E}, pairs.options()).scatter_add_(0, sorted, at::ones_like(sorted));
  const at::Tensor offsets = counts.cumsum(0, at::kInt);
  auto grouped = [&](const at::Tensor& a, const Matrix& w) {
    if (gemv) return ops::grouped_linear(a, w, sorted, offsets);
#if CF_GROUPED_MM
    return at::_grouped_mm(a, w.t.transpose(-2, -1), offsets);
#else
    throw InputError("grouped experts need torch >= 2.8 (at::_grouped_mm)");
    return a;
#endif
  };
  const at::Tensor x = flat.index_select(0, order.div(k, "floor"));
  at::Tensor gate, up;
  if (s.gate_up.defined()) {
    const at::Tensor both = grouped(x, s.gate_up);
    const int64_t I = both.size(-1) / 2;
    gate = both.narrow(-1, 0, I), up = both.narrow(-1, I, I);
  } else {
    gate = grouped(x, s.gate), up = grouped(x, s.up);
  }
  const at::Tensor y = grouped(ops::gated_activation(gate, up, cfg_.hidden_act).contiguous(), s.down);
  const at::Tensor weighted = (y * weights.reshape(-1).index_select(0, order).unsqueeze(1)).to(at::kFloat);
  return at::empty_like(weighted).index_copy_(0, order, weighted).view({N, k, -1}).sum(1);
}

// Mixture of experts: the router's top k experts per token, their weighted outputs (grouped
// products or a loop over the experts, as expert_route says), plus the sigmoid-gated shared expert.
at::Tensor Engine::moe(const at::Tensor& x, const LayerWeights& L) const {
  at::Tensor flat = x.reshape({-1, cfg_.hidden_size});
  auto [weights, experts] = route(flat, L);
  const ExpertRoute r = expert_route(L, flat.device(), flat.scalar_type(), flat.size(0));
  at::Tensor out = r == ExpertRoute::kLoop ? experts_looped(flat, L, weights, experts)
                                           : experts_grouped(flat, L, weights, experts, r == ExpertRoute::kGroupedGemv);
  out = out.to(flat.scalar_type());
  if (L.shared_gate.defined()) out = out + at::sigmoid(ops::linear(flat, L.shared_gate)) * gated_mlp(flat, L.mlp);
  return out.view(x.sizes());
}

// The mask of a window's attention: bool, or where SDPA runs on a GPU (no soft-capping or sinks,
// which take the eager route) additive, 0 / -inf in the compute dtype, made once per call and
// device; SDPA would otherwise turn the bool mask into that in every slot (two more launches each).
// CF_ADDITIVE_MASKS makes them additive on the CPU too (its SDPA takes
// them; the one-query kernel does not, so decode steps run SDPA): the tests' way to check them.
std::optional<at::Tensor> Engine::attention_mask(const SlotInputs& in, int64_t window) const {
  const std::optional<at::Tensor>& allowed = in.masks.at(window);
  if (!allowed || cfg_.attn_softcap > 0 || cfg_.attn_sinks) return allowed;
  if (!in.device.is_cuda() && std::getenv("CF_ADDITIVE_MASKS") == nullptr) return allowed;  // tests force it on the CPU
  auto it = in.additive.find(window);
  if (it == in.additive.end()) {
    at::Tensor additive = at::zeros(allowed->sizes(), allowed->options().dtype(w_.dtype))
                              .masked_fill_(allowed->logical_not(), -std::numeric_limits<double>::infinity());
    it = in.additive.emplace(window, additive).first;
  }
  return it->second;
}

// One decoder layer. Llama-style: x = h + mixer(norm(h)); x + mlp(norm(x)), the mixer being
// attention or (a linear layer) Gated DeltaNet. Gemma 2/3 (sandwich) also normalizes the
// attention and MLP outputs before each residual add.
at::Tensor Engine::block(const at::Tensor& h, int64_t layer, const SlotInputs& in, KVCache* cache, int64_t slot) const {
  const LayerWeights& L = w_.layers[layer];
  const double eps = cfg_.rms_norm_eps;
  const at::Tensor normed = ops::rms_norm(h, L.input_norm, eps);
  at::Tensor a = L.linear ? linear_attention(normed, layer, in.tokens, cache, slot)
                          : attention(normed, layer, in.pt, attention_mask(in, cfg_.sliding_window[layer]), cache, slot,
                                      in.write_index);
  if (cfg_.sandwich_norm) a = ops::rms_norm(a, L.post_attn_norm, eps);
  auto [x, n] = ops::add_rms_norm(h, a, L.post_norm, eps);
  at::Tensor m = mlp(n, L);
  if (cfg_.sandwich_norm) m = ops::rms_norm(m, L.post_ffn_norm, eps);
  return x + m;
}

at::Tensor Engine::embed(const at::Tensor& input_ids) const {
  check_ids(input_ids, "input_ids", w_.device);
  if (input_ids.size(1) == 0) throw InputError("input_ids has no tokens");
  if (input_ids.max().item<int64_t>() >= cfg_.vocab_size || input_ids.min().item<int64_t>() < 0)
    throw InputError(cat("input_ids holds a token id outside the vocabulary [0, ", cfg_.vocab_size, ")"));
  return embed_unchecked(input_ids);
}

at::Tensor Engine::embed_unchecked(const at::Tensor& ids) const {
  at::Tensor x = ops::embedding(w_.embed, ids, w_.dtype);
  if (cfg_.embed_scale != 1.0) x = x * at::scalar_tensor(cfg_.embed_scale, x.options());
  return x;
}

at::Tensor Engine::head(const at::Tensor& h) const {
  if (h.dim() < 1 || h.size(-1) != cfg_.hidden_size)
    throw InputError(cat("hidden states must end in the hidden size ", cfg_.hidden_size, ", got ", shape_str(h.sizes())));
  at::Tensor logits = ops::linear(ops::rms_norm(h, w_.final_norm, cfg_.rms_norm_eps), w_.lm_head);
  if (cfg_.final_softcap > 0) logits = at::tanh(logits / cfg_.final_softcap) * cfg_.final_softcap;
  return logits;
}

void Engine::check_cache(const KVCache* cache, const LayerPath& path, int64_t B, int64_t T) const {
  if (cache == nullptr) return;
  if (cache->num_slots() != static_cast<int64_t>(path.size()))
    throw InputError(cat("the KV cache has ", cache->num_slots(), " slots but the layer path has ", path.size()));
  if (cache->batch() != B) throw InputError(cat("the KV cache holds batch ", cache->batch(), ", input has ", B));
  if (cache->length() + T > cache->capacity())
    throw InputError(cat("the KV cache holds ", cache->capacity(), " positions; this call needs ", cache->length() + T));
  for (int64_t slot = 0; slot < cache->num_slots(); ++slot) {
    if (cache->linear(slot) != static_cast<bool>(cfg_.linear_layers[path[slot]]))
      throw InputError(cat("the KV cache's slot ", slot, " holds ", cache->linear(slot) ? "a linear-attention state" : "keys and values",
                           " but layer ", path[slot], " is ", cfg_.linear_layers[path[slot]] ? "a linear-attention" : "an attention",
                           " layer (make the cache for this path)"));
    if (cache->device(slot) != w_.layers[path[slot]].device)
      throw InputError(cat("the KV cache's slot ", slot, " is on ", cache->device(slot).str(), " but layer ", path[slot],
                           " runs on ", w_.layers[path[slot]].device.str(), " (make the cache for this path)"));
    if (!cache->linear(slot)) {  // another model's cache: other heads, head size or dtype
      const at::Tensor& k = cache->keys(slot);
      if (k.size(1) != cfg_.num_kv_heads || k.size(3) != cfg_.head_dim || k.scalar_type() != w_.dtype)
        throw InputError(cat("the KV cache's slot ", slot, " holds ", k.size(1), " key/value heads of ", k.size(3), " (",
                             c10::toString(k.scalar_type()), "); this model has ", cfg_.num_kv_heads, " of ",
                             cfg_.head_dim, " (", c10::toString(w_.dtype), "): a cache of another model"));
    }
    if (cache->layer(slot) != path[slot])  // same kind and device, another layer's keys: silently wrong logits
      throw InputError(cat("the KV cache's slot ", slot, " was made for layer ", cache->layer(slot), " but the layer path runs ",
                           "layer ", path[slot], " there (make the cache for this path)"));
  }
}

std::pair<at::Tensor, at::Tensor> Engine::rope_tables(const at::Tensor& positions, const RopeFreqs& f) const {
  // fp32 like the reference, then the compute dtype; [B, 1, T, rotary_dim] to broadcast over heads.
  at::Tensor inv = f.inv_freq;
  if (f.inv_freq_long.defined())  // LongRoPE picks a table by the call's largest position, on the device
    inv = at::where(positions.max() + 1 > f.original_max, f.inv_freq_long, f.inv_freq);
  at::Tensor freqs = positions.to(at::kFloat).unsqueeze(-1) * inv;
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  return {(emb.cos() * f.attention_factor).to(w_.dtype).unsqueeze(1),
          (emb.sin() * f.attention_factor).to(w_.dtype).unsqueeze(1)};
}

PositionTables Engine::position_tables(const at::Tensor& positions) const {
  PositionTables pt;
  std::tie(pt.cos, pt.sin) = rope_tables(positions, rope_);
  if (cfg_.has_rope_local) std::tie(pt.cos_local, pt.sin_local) = rope_tables(positions, rope_local_);
  if (cfg_.query_scale_beta != 0.0) {
    // Ministral3: 1 + beta * log(1 + floor(position / original_max)), fp32 then the compute dtype
    at::Tensor steps = at::floor(positions.to(at::kFloat) / static_cast<double>(cfg_.query_scale_original_max));
    pt.query_scale = (1 + cfg_.query_scale_beta * at::log(1 + steps)).to(w_.dtype).unsqueeze(1).unsqueeze(-1);
  }
  return pt;
}

std::set<int64_t> Engine::windows(const LayerPath& path, int64_t begin, int64_t end) const {
  std::set<int64_t> out;
  for (int64_t slot = begin; slot < end; ++slot) out.insert(cfg_.sliding_window[path[slot]]);
  return out;
}

at::Tensor Engine::run_slots(const at::Tensor& h, const at::Tensor& positions, const std::optional<at::Tensor>& key_mask,
                             const LayerPath& path, KVCache* cache, int64_t begin, int64_t end) const {
  validate_layer_path(path, cfg_.num_layers);
  if (begin < 0 || begin > end || end > static_cast<int64_t>(path.size()))
    throw InputError(cat("slots [", begin, ", ", end, ") are not a range of the ", path.size(), "-slot path"));
  if (h.dim() != 3 || h.size(2) != cfg_.hidden_size)
    throw InputError(cat("hidden states must be [batch, tokens, ", cfg_.hidden_size, "], got ", shape_str(h.sizes())));
  if (h.scalar_type() != w_.dtype || h.device() != w_.device)
    throw InputError(cat("hidden states are ", c10::toString(h.scalar_type()), " on ", h.device().str(), "; the model is ",
                         c10::toString(w_.dtype), " on ", w_.device.str()));
  check_ids(positions, "positions", w_.device);
  const int64_t B = h.size(0), T = h.size(1);
  if (T == 0) throw InputError("hidden states hold no tokens");
  if (positions.size(0) != B || positions.size(1) != T)
    throw InputError(cat("positions must be [", B, ", ", T, "], got ", shape_str(positions.sizes())));
  check_cache(cache, path, B, T);
  const int64_t past = cache ? cache->length() : 0;
  CallInputs inputs({w_.device, position_tables(positions), build_masks(key_mask, positions, windows(path, begin, end), past),
                     at::Tensor(), real_tokens(key_mask, path, begin, end, T)});
  return run_path(h, path, begin, end, inputs, cache);
}

// Which of a call's T tokens are real [B, T] bool, for the linear-attention slots among [begin,
// end): the last T columns of a key mask [B, S]; undefined without a mask or such slots. A full
// [B, T, T] pattern (packed sequences) has no meaning for a recurrence: refused.
at::Tensor Engine::real_tokens(const std::optional<at::Tensor>& key_mask, const LayerPath& path, int64_t begin,
                               int64_t end, int64_t T) const {
  bool linear = false;
  for (int64_t slot = begin; slot < end; ++slot) linear = linear || cfg_.linear_layers[path[slot]];
  if (!linear || !key_mask.has_value()) return at::Tensor();
  if (key_mask->dim() != 2)
    throw InputError("a [batch, tokens, tokens] attention pattern (packed sequences) cannot run linear-attention "
                     "layers: their state runs over every token in order; use one sequence per row");
  return key_mask->narrow(1, key_mask->size(1) - T, T) != 0;
}

// The one loop over a path's slots: slot s runs layer path[s] with its own cache slot s, under the
// mask of that layer's attention kind (a sliding layer keeps its window in every slot it runs in),
// on the device its layer lives on.
at::Tensor Engine::run_path(at::Tensor x, const LayerPath& path, int64_t begin, int64_t end, CallInputs& inputs,
                            KVCache* cache) const {
  for (int64_t slot = begin; slot < end; ++slot) {
    const int64_t layer = path[slot];
    const at::Device device = w_.layers[layer].device;
    if (x.device() != device) x = x.to(device);
    const SlotInputs& in = inputs.on(device);
    x = block(x, layer, in, cache, slot);
  }
  return x.device() == w_.device ? x : x.to(w_.device);
}

at::Tensor Engine::decode_step(const at::Tensor& token, const at::Tensor& positions, const at::Tensor& key_mask,
                               const at::Tensor& index, const LayerPath& path, KVCache& cache) const {
  validate_layer_path(path, cfg_.num_layers);
  check_ids(token, "token", w_.device);
  check_ids(positions, "positions", w_.device);
  const int64_t B = token.size(0), C = cache.capacity();
  if (token.size(1) != 1 || positions.sizes() != token.sizes())
    throw InputError(cat("decode_step takes token and positions [batch, 1], got ", shape_str(token.sizes()), " and ",
                         shape_str(positions.sizes())));
  check_cache(&cache, path, B, 1);
  if (key_mask.scalar_type() != at::kBool || key_mask.device() != w_.device || key_mask.dim() != 2 ||
      key_mask.size(0) != B || key_mask.size(1) != C)
    throw InputError(cat("decode_step's key_mask must be bool [", B, ", ", C, "] on ", w_.device.str(), ", got ",
                         c10::toString(key_mask.scalar_type()), " ", shape_str(key_mask.sizes())));
  if (index.scalar_type() != at::kLong || index.device() != w_.device || index.numel() != 1 || index.dim() != 1)
    throw InputError("decode_step's index must be a 1-element int64 tensor on the model's device");
  // checked before anything changes: it writes key_mask, the cache, positions and index in place
  if (at::has_internal_overlap(positions) == at::MemOverlap::Yes ||
      at::has_internal_overlap(key_mask) == at::MemOverlap::Yes)  // an expanded view: one element for several
    throw InputError("decode_step writes positions and key_mask in place: pass tensors whose elements are their own, "
                     "not expanded views");
  if (w_.device.is_cpu()) {  // (on a GPU these reads would sync every step: the caller's loop keeps them in range)
    const int64_t column = index.item<int64_t>(), low = token.min().item<int64_t>(), high = token.max().item<int64_t>();
    if (column < 0 || column >= C)
      throw InputError(cat("decode_step's index ", column, " is outside the KV cache's ", C, " columns"));
    if (low < 0 || high >= cfg_.vocab_size)
      throw InputError(cat("decode_step's token id ", low < 0 ? low : high, " is outside the vocabulary (0..",
                           cfg_.vocab_size - 1, ")"));
  }
  at::Tensor x = embed_unchecked(token);
  key_mask.index_fill_(1, index, true);
  const int64_t n = static_cast<int64_t>(path.size());
  CallInputs inputs({w_.device, position_tables(positions), decode_step_masks(key_mask, index, windows(path, 0, n)),
                     index});
  x = run_path(x, path, 0, n, inputs, &cache);
  at::Tensor logits = head(x).select(1, 0);
  positions.add_(1);
  index.add_(1);
  return logits;
}

at::Tensor Engine::hidden(const at::Tensor& input_ids, const at::Tensor& positions,
                          const std::optional<at::Tensor>& key_mask, const LayerPath& path, KVCache* cache) const {
  check_ids(input_ids, "input_ids", w_.device);
  check_ids(positions, "positions", w_.device);
  if (positions.sizes() != input_ids.sizes()) throw InputError("positions must have the shape of input_ids");
  at::Tensor h = run_slots(embed(input_ids), positions, key_mask, path, cache, 0, static_cast<int64_t>(path.size()));
  if (cache != nullptr) cache->advance(input_ids.size(1));
  return h;
}

at::Tensor Engine::forward(const at::Tensor& input_ids, const at::Tensor& positions,
                           const std::optional<at::Tensor>& key_mask, const LayerPath& path, KVCache* cache,
                           bool last_only) const {
  at::Tensor h = hidden(input_ids, positions, key_mask, path, cache);
  if (last_only) h = h.narrow(1, h.size(1) - 1, 1);
  return head(h);
}

}  // namespace cf
