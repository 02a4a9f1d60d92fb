// weights.cpp — see weights.h.
#include "weights.h"

#include "../common/errors.h"

namespace cf {
namespace {

class Accessor {
 public:
  explicit Accessor(const std::map<std::string, at::Tensor>& t) : t_(t) {
    auto e = t_.find("model.embed_tokens.weight");
    if (e == t_.end()) throw WeightError("missing tensor 'model.embed_tokens.weight'");
    dtype_ = e->second.scalar_type();
    device_ = e->second.device();
    main_ = device_;
    if (!at::isFloatingType(dtype_))
      throw WeightError(cat("tensor 'model.embed_tokens.weight' has non-floating dtype ", c10::toString(dtype_)));
  }

  // name_template may contain "{}", replaced by the layer index.
  at::Tensor get(const std::string& name_template, int64_t layer, std::vector<int64_t> shape,
                 bool optional = false) const {
    std::string name = name_template;
    const auto at = name.find("{}");
    if (at != std::string::npos) name.replace(at, 2, std::to_string(layer));
    auto it = t_.find(name);
    if (it == t_.end()) {
      if (optional) return at::Tensor();
      throw WeightError(cat("missing tensor '", name, "'"));
    }
    const at::Tensor& x = it->second;
    if (x.sizes() != at::IntArrayRef(shape))
      throw WeightError(cat("tensor '", name, "': expected shape ", shape_str(shape), ", got ", shape_str(x.sizes())));
    if (x.scalar_type() != dtype_)
      throw WeightError(cat("tensor '", name, "': dtype ", c10::toString(x.scalar_type()), " differs from the embedding's ", c10::toString(dtype_),
                            " (load converts all weights to one dtype)"));
    if (x.device() != device_)
      throw WeightError(cat("tensor '", name, "': on ", x.device().str(), " but ", owner_, " is on ", device_.str(),
                            " (a layer's tensors live on one device; the embedding, final norm and lm_head on one)"));
    return x;
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
  at::ScalarType dtype() const { return dtype_; }
  at::Device device() const { return device_; }

 private:
  const std::map<std::string, at::Tensor>& t_;
  at::ScalarType dtype_;
  at::Device device_ = at::kCPU, main_ = at::kCPU;
  std::string owner_ = "the embedding";
};

}  // namespace

namespace {

// Gemma's RMSNorm scales by (1 + w) in fp32 and casts once: held as that fp32 sum, which
// ops::rms_norm multiplies in fp32 (a weight in the activations' dtype multiplies after the cast).
at::Tensor norm_weight(const at::Tensor& w, const ModelConfig& c) {
  if (!c.norm_plus_one) return w;
  return w.to(at::kFloat) + 1.0;
}

void bind_attention(const Accessor& a, const ModelConfig& c, const std::string& p, int64_t l, LayerWeights& L) {
  const int64_t H = c.hidden_size, D = c.head_dim, QD = c.num_heads * D, KD = c.num_kv_heads * D;
  if (c.fused_qkv) {
    L.wqkv = a.get(p + "self_attn.qkv_proj.weight", l, {QD + 2 * KD, H});
  } else {
    L.wq = a.get(p + "self_attn.q_proj.weight", l, {QD, H});
    L.wk = a.get(p + "self_attn.k_proj.weight", l, {KD, H});
    L.wv = a.get(p + "self_attn.v_proj.weight", l, {KD, H});
  }
  L.wo = a.get(p + "self_attn.o_proj.weight", l, {H, QD});
  if (c.qkv_bias) {
    L.bq = a.get(p + "self_attn.q_proj.bias", l, {QD});
    L.bk = a.get(p + "self_attn.k_proj.bias", l, {KD});
    L.bv = a.get(p + "self_attn.v_proj.bias", l, {KD});
  }
  if (c.o_bias) L.bo = a.get(p + "self_attn.o_proj.bias", l, {H});
  if (c.qk_norm) {
    L.q_norm = norm_weight(a.get(p + "self_attn.q_norm.weight", l, {D}), c);
    L.k_norm = norm_weight(a.get(p + "self_attn.k_norm.weight", l, {D}), c);
  }
}

void bind_mlp(const Accessor& a, const ModelConfig& c, const std::string& p, int64_t l, LayerWeights& L) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  if (c.fused_gate_up) {
    L.w_gate_up = a.get(p + "mlp.gate_up_proj.weight", l, {2 * I, H});
  } else {
    L.w_gate = a.get(p + "mlp.gate_proj.weight", l, {I, H});
    L.w_up = a.get(p + "mlp.up_proj.weight", l, {I, H});
  }
  L.w_down = a.get(p + "mlp.down_proj.weight", l, {H, I});
  if (c.mlp_bias) {
    L.b_gate = a.get(p + "mlp.gate_proj.bias", l, {I});
    L.b_up = a.get(p + "mlp.up_proj.bias", l, {I});
    L.b_down = a.get(p + "mlp.down_proj.bias", l, {H});
  }
}

// A mixture-of-experts MLP: the router, each expert's gate/up/down (stacked v5 tensors, sliced
// into per-expert views — gate_up_proj as transformers v5 holds it, or gate_proj / up_proj as GGUF
// stacks them — or the hub's per-expert tensors: Mixtral's block_sparse_moe w1/w3/w2,
// Qwen's mlp.experts.{e}.*_proj), and Qwen2-MoE's shared expert with its gate.
void bind_moe(const Accessor& a, const ModelConfig& c, const std::string& p, int64_t l, LayerWeights& L) {
  const int64_t H = c.hidden_size, I = c.moe_intermediate_size, E = c.num_experts, S = c.shared_expert_intermediate_size;
  L.sparse = true;
  const bool hub_mixtral = a.has(cat("model.layers.", l, ".block_sparse_moe.gate.weight"));
  const std::string m = p + (hub_mixtral ? "block_sparse_moe." : "mlp.");
  L.router = a.get(m + "gate.weight", l, {E, H});
  if (a.has(cat("model.layers.", l, ".mlp.experts.gate_up_proj"))) {
    at::Tensor gate_up = a.get(m + "experts.gate_up_proj", l, {E, 2 * I, H});
    at::Tensor down = a.get(m + "experts.down_proj", l, {E, H, I});
    for (int64_t e = 0; e < E; ++e) {
      L.e_gate_up.push_back(gate_up[e]);
      L.e_down.push_back(down[e]);
    }
  } else if (a.has(cat("model.layers.", l, ".mlp.experts.gate_proj"))) {  // GGUF's ffn_{gate,up,down}_exps
    at::Tensor gate = a.get(m + "experts.gate_proj", l, {E, I, H}), up = a.get(m + "experts.up_proj", l, {E, I, H});
    at::Tensor down = a.get(m + "experts.down_proj", l, {E, H, I});
    for (int64_t e = 0; e < E; ++e) {
      L.e_gate.push_back(gate[e]);
      L.e_up.push_back(up[e]);
      L.e_down.push_back(down[e]);
    }
  } else {
    const char* names[3] = {"gate_proj", "up_proj", "down_proj"};
    if (hub_mixtral) names[0] = "w1", names[1] = "w3", names[2] = "w2";
    for (int64_t e = 0; e < E; ++e) {
      const std::string x = cat(m, "experts.", e, ".");
      L.e_gate.push_back(a.get(x + names[0] + ".weight", l, {I, H}));
      L.e_up.push_back(a.get(x + names[1] + ".weight", l, {I, H}));
      L.e_down.push_back(a.get(x + names[2] + ".weight", l, {H, I}));
    }
  }
  if (S > 0) {
    L.w_gate = a.get(p + "mlp.shared_expert.gate_proj.weight", l, {S, H});
    L.w_up = a.get(p + "mlp.shared_expert.up_proj.weight", l, {S, H});
    L.w_down = a.get(p + "mlp.shared_expert.down_proj.weight", l, {H, S});
    L.shared_gate = a.get(p + "mlp.shared_expert_gate.weight", l, {1, H});
  }
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

Weights bind_weights(const ModelConfig& c, const std::map<std::string, at::Tensor>& tensors) {
  Accessor a(tensors);
  const int64_t H = c.hidden_size;
  Weights w;
  w.dtype = a.dtype();
  w.device = a.device();
  w.embed = a.get("model.embed_tokens.weight", -1, {c.vocab_size, H});
  w.final_norm = norm_weight(a.get("model.norm.weight", -1, {H}), c);
  // A multimodal wrapper ties by its own top-level flag, which the text config does not carry:
  // there, as transformers' loader ends up doing, lm_head is used when the checkpoint has one.
  const bool tied = c.wrapper.empty() ? c.tie_word_embeddings : !a.has("lm_head.weight");
  w.lm_head = tied ? w.embed : a.get("lm_head.weight", -1, {c.vocab_size, H});
  const std::string p = "model.layers.{}.";
  for (int64_t l = 0; l < c.num_layers; ++l) {
    a.expect_layer(l);
    LayerWeights L;
    L.device = a.device();
    bind_norms(a, c, p, l, L);
    bind_attention(a, c, p, l, L);
    if (c.sparse_layers[l])
      bind_moe(a, c, p, l, L);
    else
      bind_mlp(a, c, p, l, L);
    w.layers.push_back(std::move(L));
  }
  return w;
}

}  // namespace cf
