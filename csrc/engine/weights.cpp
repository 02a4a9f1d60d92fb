// weights.cpp — see weights.h.
#include "weights.h"

#include <functional>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/errors.h"
#include "../kernels/cpu/quant.h"
#include "../kernels/gpu_ops.h"

namespace cf {
namespace {

class Accessor {
 public:
  Accessor(const std::map<std::string, at::Tensor>& t, const std::map<std::string, int32_t>& packed, bool q8)
      : t_(t), packed_(packed), q8_(q8) {
    auto e = t_.find("model.embed_tokens.weight");
    if (e == t_.end()) throw WeightError("missing tensor 'model.embed_tokens.weight'");
    for (const auto& [name, type] : packed_)
      if (!t_.count(name)) throw WeightError(cat("packed tensor '", name, "' is not among the tensors"));
    // The compute dtype: the embedding's, or (a packed embedding) the final norm's.
    auto d = packed_.count(e->first) ? t_.find("model.norm.weight") : e;
    if (d == t_.end()) throw WeightError("missing tensor 'model.norm.weight'");
    dtype_ = d->second.scalar_type();
    device_ = e->second.device();
    main_ = device_;
    if (!at::isFloatingType(dtype_))
      throw WeightError(cat("tensor '", d->first, "' has non-floating dtype ", c10::toString(dtype_)));
  }

  // name_template may contain "{}", replaced by the layer index.
  at::Tensor get(const std::string& name_template, int64_t layer, std::vector<int64_t> shape,
                 bool optional = false) const {
    const std::string name = resolve(name_template, layer);
    if (packed_.count(name))
      throw WeightError(cat("tensor '", name, "' is packed (", cpu::packed_type_name(packed_.at(name)),
                            ") but the engine reads it as float: only matrices may be packed"));
    return fetch(name, shape, dtype_, optional);
  }
  // A matrix [..., N, K]: a float tensor as get() checks it, or a packed one: uint8 [..., N, row_bytes].
  Matrix mat(const std::string& name_template, int64_t layer, std::vector<int64_t> shape) const {
    const std::string name = resolve(name_template, layer);
    auto p = packed_.find(name);
    if (p == packed_.end()) return fetch(name, shape, dtype_, false);
    const int64_t K = shape.back();
    shape.back() = cpu::packed_row_bytes(p->second, K, cat("tensor '", name, "'"));
    at::Tensor blocks = fetch(name, shape, at::kByte, false);
    if (!blocks.is_contiguous()) throw WeightError(cat("tensor '", name, "' is packed but not contiguous"));
    Matrix m(blocks, p->second, K);
    m.q8 = q8_;
    return m;
  }
  // Tensors fetched from now on must sit where layer `layer`'s input_layernorm.weight does (the
  // embedding's device when it is missing: get() then names the missing tensor).
  void expect_layer(int64_t layer) {
    device_ = main_;
    owner_ = "the embedding";
    const std::string name = cat("model.layers.", layer, ".input_layernorm.weight");
    auto it = t_.find(name);
    if (it == t_.end()) return;
    device_ = it->second.device();
    owner_ = cat("layer ", layer, "'s input_layernorm.weight");
  }
  bool has(const std::string& name) const { return t_.count(name) != 0; }
  // The tensors no get() / mat() read, in name order.
  std::vector<std::string> unread() const {
    std::vector<std::string> out;
    for (const auto& [name, _] : t_)
      if (!read_.count(name)) out.push_back(name);
    return out;
  }
  at::ScalarType dtype() const { return dtype_; }
  at::Device device() const { return device_; }

 private:
  static std::string resolve(const std::string& name_template, int64_t layer) {
    std::string name = name_template;
    const auto at = name.find("{}");
    if (at != std::string::npos) name.replace(at, 2, std::to_string(layer));
    return name;
  }
  at::Tensor fetch(const std::string& name, const std::vector<int64_t>& shape, at::ScalarType dtype, bool optional) const {
    auto it = t_.find(name);
    if (it == t_.end()) {
      if (optional) return at::Tensor();
      throw WeightError(cat("missing tensor '", name, "'"));
    }
    read_.insert(name);
    const at::Tensor& x = it->second;
    if (x.sizes() != at::IntArrayRef(shape))
      throw WeightError(cat("tensor '", name, "': expected shape ", shape_str(shape), ", got ", shape_str(x.sizes()),
                            dtype == at::kByte ? cat(" (packed ", cpu::packed_type_name(packed_.at(name)), ")") : ""));
    if (x.scalar_type() != dtype)
      throw WeightError(cat("tensor '", name, "': dtype ", c10::toString(x.scalar_type()),
                            dtype == at::kByte ? " but a packed tensor is uint8"
                                               : cat(" differs from the embedding's ", c10::toString(dtype),
                                                     " (load converts all weights to one dtype)")));
    if (x.device() != device_)
      throw WeightError(cat("tensor '", name, "': on ", x.device().str(), " but ", owner_, " is on ", device_.str(),
                            " (a layer's tensors live on one device; the embedding, final norm and lm_head on one)"));
    if (dtype == at::kByte && !x.device().is_cpu() && !(x.is_cuda() && gpu::available()))
      throw WeightError(cat("tensor '", name, "' is packed and on ", x.device().str(),
                            ": packed matrices run on the CPU, or on a GPU in a build with GPU kernels (load with "
                            "dequantize=True)"));
    return x;
  }

  const std::map<std::string, at::Tensor>& t_;
  const std::map<std::string, int32_t>& packed_;
  bool q8_;  // packed matrices round x to 8 bits (Matrix::q8)
  at::ScalarType dtype_;
  at::Device device_ = at::kCPU, main_ = at::kCPU;
  std::string owner_ = "the embedding";
  mutable std::set<std::string> read_;
};

}  // namespace

namespace {

// Gemma's RMSNorm scales by (1 + w) in fp32 and casts once: held as that fp32 sum, which
// ops::rms_norm multiplies in fp32 (a weight in the activations' dtype multiplies after the cast).
// GPT-OSS's multiplies w in fp32 before the cast too: held as fp32.
at::Tensor norm_weight(const at::Tensor& w, const ModelConfig& c) {
  if (c.norm_plus_one) return w.to(at::kFloat) + 1.0;
  return c.norm_fp32 ? w.to(at::kFloat) : w;
}

// Whether the tensors follow one another in one storage, in order: each contiguous, of one dtype and
// device, the next starting where the previous ends.
bool follow_one_another(const std::vector<const at::Tensor*>& parts) {
  const char* next = nullptr;
  for (const at::Tensor* t : parts) {
    if (!t->defined() || !t->is_contiguous() || t->scalar_type() != parts[0]->scalar_type() ||
        t->device() != parts[0]->device() || !t->storage().is_alias_of(parts[0]->storage()))
      return false;
    const char* start = static_cast<const char*>(t->data_ptr());
    if (next != nullptr && start != next) return false;
    next = start + t->nbytes();
  }
  return true;
}

// `parts` as one matrix, a view, when their rows follow one another in one tensor's memory (same
// type and row length, each 2-D): one product instead of several; with their biases as one (a view
// when they follow one another too, else a copy). Undefined otherwise, and when some parts have a
// bias and others not.
std::pair<Matrix, at::Tensor> rows_in_sequence(const std::vector<const Matrix*>& parts,
                                               const std::vector<at::Tensor>& biases) {
  const Matrix& first = *parts[0];
  std::vector<const at::Tensor*> blocks;
  int64_t rows = 0;
  for (const Matrix* m : parts) {
    if (!m->defined() || m->t.dim() != 2 || m->type != first.type || m->cols != first.cols ||
        m->t.size(1) != first.t.size(1))
      return {};
    blocks.push_back(&m->t);
    rows += m->t.size(0);
  }
  size_t with_bias = 0;
  std::vector<const at::Tensor*> bias_parts;
  for (const at::Tensor& b : biases) with_bias += b.defined(), bias_parts.push_back(&b);
  if (!follow_one_another(blocks) || (with_bias != 0 && with_bias != biases.size())) return {};
  const at::Tensor whole = first.t.as_strided({rows, first.t.size(1)}, {first.t.size(1), 1});
  Matrix out = first.packed() ? Matrix(whole, first.type, first.cols) : Matrix(whole);
  out.q8 = first.q8;
  if (with_bias == 0) return {out, at::Tensor()};
  return {out, follow_one_another(bias_parts) ? biases[0].as_strided({rows}, {1}) : at::cat(biases)};
}

// The experts' `member` matrices as one stacked [E, rows, K] matrix when they follow one another
// in memory (rows_in_sequence), else undefined.
Matrix stacked_experts(const std::vector<MlpWeights>& experts,
                       const std::function<const Matrix&(const MlpWeights&)>& member) {
  std::vector<const Matrix*> parts;
  for (const MlpWeights& e : experts) parts.push_back(&member(e));
  if (parts.empty()) return Matrix();
  for (const Matrix* m : parts)
    if (!m->defined() || m->rows() != parts[0]->rows()) return Matrix();
  Matrix all = rows_in_sequence(parts, {}).first;
  if (!all.defined()) return all;
  all.t = all.t.view({static_cast<int64_t>(parts.size()), parts[0]->rows(), all.t.size(1)});
  return all;
}

// L.stacked from the bound experts: each expert's gate / up as one matrix (its own, or rows laid
// out so) stacked, else gate and up stacked apart; down stacked. Experts with biases (GPT-OSS) or
// transposed views are left unstacked.
void stack_experts(LayerWeights& L) {
  MlpWeights& s = L.stacked;
  if (L.experts.empty() || L.experts[0].b_down.defined()) return;
  s.gate_up = stacked_experts(L.experts, [](const MlpWeights& m) -> const Matrix& {
    return m.gate_up.defined() ? m.gate_up : m.gate_up_rows;
  });
  if (!s.gate_up.defined() && !L.experts[0].interleaved) {
    s.gate = stacked_experts(L.experts, [](const MlpWeights& m) -> const Matrix& { return m.gate; });
    s.up = stacked_experts(L.experts, [](const MlpWeights& m) -> const Matrix& { return m.up; });
  }
  s.down = stacked_experts(L.experts, [](const MlpWeights& m) -> const Matrix& { return m.down; });
  if (!s.down.defined() || !(s.gate_up.defined() || (s.gate.defined() && s.up.defined()))) s = MlpWeights();
}

void bind_attention(const Accessor& a, const ModelConfig& c, const std::string& p, int64_t l, LayerWeights& L) {
  const int64_t H = c.hidden_size, D = c.head_dim, QD = c.num_heads * D, KD = c.num_kv_heads * D;
  if (c.fused_qkv) {
    L.wqkv = a.mat(p + "self_attn.qkv_proj.weight", l, {QD + 2 * KD, H});
  } else {
    L.wq = a.mat(p + "self_attn.q_proj.weight", l, {c.attn_output_gate ? 2 * QD : QD, H});
    L.wk = a.mat(p + "self_attn.k_proj.weight", l, {KD, H});
    L.wv = a.mat(p + "self_attn.v_proj.weight", l, {KD, H});
  }
  L.wo = a.mat(p + "self_attn.o_proj.weight", l, {H, QD});
  if (c.qkv_bias) {
    L.bq = a.get(p + "self_attn.q_proj.bias", l, {c.attn_output_gate ? 2 * QD : QD});
    L.bk = a.get(p + "self_attn.k_proj.bias", l, {KD});
    L.bv = a.get(p + "self_attn.v_proj.bias", l, {KD});
  }
  if (c.o_bias) L.bo = a.get(p + "self_attn.o_proj.bias", l, {H});
  if (c.qk_norm) {
    L.q_norm = norm_weight(a.get(p + "self_attn.q_norm.weight", l, {D}), c);
    L.k_norm = norm_weight(a.get(p + "self_attn.k_norm.weight", l, {D}), c);
  }
  if (c.attn_sinks) L.sinks = a.get(p + "self_attn.sinks", l, {c.num_heads});
  if (!c.fused_qkv) std::tie(L.qkv_rows, L.b_qkv_rows) = rows_in_sequence({&L.wq, &L.wk, &L.wv}, {L.bq, L.bk, L.bv});
}

// A Gated DeltaNet layer's tensors (see LayerWeights), Qwen3-Next's grouped projections or Qwen3.5's.
void bind_linear_attention(const Accessor& a, const ModelConfig& c, const std::string& p, int64_t l, LayerWeights& L) {
  const int64_t H = c.hidden_size, Hk = c.linear_k_heads, Hv = c.linear_v_heads, Dk = c.linear_k_dim;
  const int64_t Dv = c.linear_v_dim, C = 2 * Hk * Dk + Hv * Dv;
  const std::string m = p + "linear_attn.";
  L.linear = true;
  if (a.has(cat("model.layers.", l, ".linear_attn.in_proj_qkvz.weight"))) {
    L.la_qkvz = a.mat(m + "in_proj_qkvz.weight", l, {C + Hv * Dv, H});
    L.la_ba = a.mat(m + "in_proj_ba.weight", l, {2 * Hv, H});
  } else {
    L.la_qkv = a.mat(m + "in_proj_qkv.weight", l, {C, H});
    L.la_z = a.mat(m + "in_proj_z.weight", l, {Hv * Dv, H});
    L.la_b = a.mat(m + "in_proj_b.weight", l, {Hv, H});
    L.la_a = a.mat(m + "in_proj_a.weight", l, {Hv, H});
  }
  L.conv = a.get(m + "conv1d.weight", l, {C, 1, c.linear_conv_kernel}).select(1, 0);
  L.A_log = a.get(m + "A_log", l, {Hv});
  L.dt_bias = a.get(m + "dt_bias", l, {Hv});
  L.la_norm = a.get(m + "norm.weight", l, {Dv});
  L.la_out = a.mat(m + "out_proj.weight", l, {H, Hv * Dv});
}

// A gated MLP of I units under prefix m ("mlp.", "mlp.shared_expert.", "mlp.experts.3."):
// gate_proj / up_proj / down_proj (or Phi-3's fused gate_up_proj), with biases when `bias`.
MlpWeights bind_gated(const Accessor& a, const ModelConfig& c, const std::string& m, int64_t l, int64_t I, bool bias,
                      const char* const names[3]) {
  const int64_t H = c.hidden_size;
  MlpWeights w;
  if (c.fused_gate_up) {
    w.gate_up = a.mat(m + "gate_up_proj.weight", l, {2 * I, H});
  } else {
    w.gate = a.mat(m + names[0] + ".weight", l, {I, H});
    w.up = a.mat(m + names[1] + ".weight", l, {I, H});
  }
  w.down = a.mat(m + names[2] + ".weight", l, {H, I});
  if (bias) {
    w.b_gate = a.get(m + names[0] + ".bias", l, {I});
    w.b_up = a.get(m + names[1] + ".bias", l, {I});
    w.b_down = a.get(m + names[2] + ".bias", l, {H});
  }
  if (!c.fused_gate_up)
    std::tie(w.gate_up_rows, w.b_gate_up_rows) = rows_in_sequence({&w.gate, &w.up}, {w.b_gate, w.b_up});
  return w;
}

const char* const kHubNames[3] = {"gate_proj", "up_proj", "down_proj"};
const char* const kMixtralNames[3] = {"w1", "w3", "w2"};

// Stacked experts sliced into per-expert views (no copies): transformers v5's gate_up_proj
// [E, 2I, H] (gate rows then up rows) with down_proj [E, H, I], or GGUF's gate_proj / up_proj
// [E, I, H] with down_proj [E, H, I]; GPT-OSS's (with biases) further below.
std::vector<MlpWeights> bind_stacked(const Accessor& a, const ModelConfig& c, const std::string& m, int64_t l) {
  const int64_t H = c.hidden_size, I = c.moe_intermediate_size, E = c.num_experts;
  std::vector<MlpWeights> out(E);
  Matrix down = a.mat(m + "experts.down_proj", l, {E, H, I});
  if (a.has(cat("model.layers.", l, ".mlp.experts.gate_up_proj"))) {
    Matrix gate_up = a.mat(m + "experts.gate_up_proj", l, {E, 2 * I, H});
    for (int64_t e = 0; e < E; ++e) out[e].gate_up = gate_up[e];
  } else {
    Matrix gate = a.mat(m + "experts.gate_proj", l, {E, I, H}), up = a.mat(m + "experts.up_proj", l, {E, I, H});
    for (int64_t e = 0; e < E; ++e) out[e].gate = gate[e], out[e].up = up[e];
  }
  for (int64_t e = 0; e < E; ++e) out[e].down = down[e];
  return out;
}

// GPT-OSS: router weight and bias at mlp.router; experts with biases, either as transformers holds
// them — gate_up_proj [E, H, 2I] (gate and up columns alternating) and down_proj [E, I, H], run
// through transposed views — or GGUF's gate_proj / up_proj [E, I, H] and down_proj [E, H, I].
std::vector<MlpWeights> bind_gpt_oss(const Accessor& a, const ModelConfig& c, const std::string& m, int64_t l) {
  const int64_t H = c.hidden_size, I = c.moe_intermediate_size, E = c.num_experts;
  std::vector<MlpWeights> out(E);
  const std::string x = m + "experts.";
  at::Tensor down_bias = a.get(x + "down_proj_bias", l, {E, H});
  if (a.has(cat("model.layers.", l, ".mlp.experts.gate_up_proj"))) {
    at::Tensor gate_up = a.get(x + "gate_up_proj", l, {E, H, 2 * I}), down = a.get(x + "down_proj", l, {E, I, H});
    at::Tensor bias = a.get(x + "gate_up_proj_bias", l, {E, 2 * I});
    for (int64_t e = 0; e < E; ++e) {
      out[e].gate_up = gate_up[e].t(), out[e].b_gate_up = bias[e], out[e].interleaved = true;
      out[e].down = down[e].t();
    }
  } else {
    Matrix gate = a.mat(x + "gate_proj", l, {E, I, H}), up = a.mat(x + "up_proj", l, {E, I, H});
    at::Tensor gate_bias = a.get(x + "gate_proj_bias", l, {E, I}), up_bias = a.get(x + "up_proj_bias", l, {E, I});
    Matrix down = a.mat(x + "down_proj", l, {E, H, I});
    for (int64_t e = 0; e < E; ++e) {
      out[e].gate = gate[e], out[e].up = up[e], out[e].b_gate = gate_bias[e], out[e].b_up = up_bias[e];
      out[e].down = down[e];
    }
  }
  for (int64_t e = 0; e < E; ++e) out[e].b_down = down_bias[e];
  return out;
}

// A mixture-of-experts MLP: the router, the experts (stacked views, or the hub's per-expert
// tensors: Mixtral's block_sparse_moe w1/w3/w2, Qwen's mlp.experts.{e}.*_proj), and Qwen2-MoE's
// shared expert with its gate.
void bind_moe(const Accessor& a, const ModelConfig& c, const std::string& p, int64_t l, LayerWeights& L) {
  const int64_t H = c.hidden_size, E = c.num_experts;
  L.sparse = true;
  if (c.expert_bias) {
    L.router = a.get(p + "mlp.router.weight", l, {E, H});
    L.router_bias = a.get(p + "mlp.router.bias", l, {E});
    L.experts = bind_gpt_oss(a, c, p + "mlp.", l);
    return;
  }
  const bool hub_mixtral = a.has(cat("model.layers.", l, ".block_sparse_moe.gate.weight"));
  const std::string m = p + (hub_mixtral ? "block_sparse_moe." : "mlp.");
  L.router = a.get(m + "gate.weight", l, {E, H});
  if (a.has(cat("model.layers.", l, ".mlp.experts.down_proj"))) {
    L.experts = bind_stacked(a, c, m, l);
  } else {
    for (int64_t e = 0; e < E; ++e)
      L.experts.push_back(bind_gated(a, c, cat(m, "experts.", e, "."), l, c.moe_intermediate_size, false,
                                     hub_mixtral ? kMixtralNames : kHubNames));
  }
  if (c.shared_expert_intermediate_size > 0) {
    L.mlp = bind_gated(a, c, p + "mlp.shared_expert.", l, c.shared_expert_intermediate_size, false, kHubNames);
    L.shared_gate = a.get(p + "mlp.shared_expert_gate.weight", l, {1, H});
  }
  stack_experts(L);
}

// Llama-style: input_layernorm before attention, post_attention_layernorm before the MLP. Gemma 2/3
// (sandwich): post_attention_layernorm normalizes the attention output, pre_feedforward_layernorm
// comes before the MLP and post_feedforward_layernorm after it.
void bind_norms(const Accessor& a, const ModelConfig& c, const std::string& p, int64_t l, LayerWeights& L) {
  const int64_t H = c.hidden_size;
  L.input_norm = norm_weight(a.get(p + "input_layernorm.weight", l, {H}), c);
  if (c.sandwich_norm) {
    L.post_attn_norm = norm_weight(a.get(p + "post_attention_layernorm.weight", l, {H}), c);
    L.post_norm = norm_weight(a.get(p + "pre_feedforward_layernorm.weight", l, {H}), c);
    L.post_ffn_norm = norm_weight(a.get(p + "post_feedforward_layernorm.weight", l, {H}), c);
  } else {
    L.post_norm = norm_weight(a.get(p + "post_attention_layernorm.weight", l, {H}), c);
  }
}

}  // namespace

Weights bind_weights(const ModelConfig& c, const std::map<std::string, at::Tensor>& tensors,
                     const std::map<std::string, int32_t>& packed, bool q8_activations) {
  Accessor a(tensors, packed, q8_activations);
  const int64_t H = c.hidden_size;
  Weights w;
  w.dtype = a.dtype();
  w.device = a.device();
  w.embed = a.mat("model.embed_tokens.weight", -1, {c.vocab_size, H});
  w.final_norm = norm_weight(a.get("model.norm.weight", -1, {H}), c);
  // The checkpoint's lm_head whenever it has one: transformers (>= 5) unties a tied config whose
  // stored head differs from the embedding (an equal one loading.py drops). Without one, the head
  // is the embedding where the config ties it, or a multimodal wrapper (it ties by its own
  // top-level flag, which the text config does not carry); otherwise a missing-tensor error.
  const bool tied = !a.has("lm_head.weight") && (c.tie_word_embeddings || !c.wrapper.empty());
  w.lm_head = tied ? w.embed : a.mat("lm_head.weight", -1, {c.vocab_size, H});
  const std::string p = "model.layers.{}.";
  for (int64_t l = 0; l < c.num_layers; ++l) {
    a.expect_layer(l);
    LayerWeights L;
    L.device = a.device();
    bind_norms(a, c, p, l, L);
    if (c.linear_layers[l])
      bind_linear_attention(a, c, p, l, L);
    else
      bind_attention(a, c, p, l, L);
    if (c.sparse_layers[l])
      bind_moe(a, c, p, l, L);
    else
      L.mlp = bind_gated(a, c, p + "mlp.", l, c.intermediate_size, c.mlp_bias, kHubNames);
    w.layers.push_back(std::move(L));
  }
  w.unread = a.unread();
  return w;
}

}  // namespace cf
