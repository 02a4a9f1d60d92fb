// config.h — config.json -> ModelConfig. Architecture differences are flags here (qkv bias,
// q/k norm, fused projections, Gemma's norms, soft-capping, tied embeddings, sliding windows,
// per-kind RoPE), never separate code paths in the model.
// Supported: Llama, Mistral, Qwen2, Qwen3, Phi3, Gemma2, Gemma3 (and Gemma3ForConditionalGeneration's
// text decoder), Ministral3 (and Mistral3ForConditionalGeneration's text decoder), and the
// mixture-of-experts Mixtral, Qwen2-MoE (with its shared expert), Qwen3-MoE and GPT-OSS (attention
// sinks, biased router and experts, clamped SwiGLU; MXFP4 experts are dequantized by the loader); the
// hybrids Qwen3-Next, Qwen3.5 and Qwen3.5-MoE (Gated DeltaNet layers between gated full-attention
// ones; Qwen3.5's ...ForConditionalGeneration text decoders too); RoPE types
// default, linear, llama3, yarn, longrope, read from top-level rope_theta/rope_scaling or
// transformers v5's rope_parameters (flat, or one entry per layer type).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace cf {

struct RopeConfig {
  std::string type = "default";  // default | linear | llama3 | yarn | longrope
  double theta = 10000.0;
  double factor = 1.0;
  double low_freq_factor = 1.0;   // llama3
  double high_freq_factor = 4.0;  // llama3
  int64_t original_max_position_embeddings = 0;
  double attention_factor = 1.0;  // multiplies cos/sin (yarn); resolved at parse time
  double beta_fast = 32.0, beta_slow = 1.0;  // yarn
  bool truncate = true;                      // yarn
  std::vector<double> short_factor, long_factor;  // longrope: per-frequency divisors (rotary_dim / 2 each)
  int64_t rotary_dim = 0;  // dims each head rotates (head_dim * partial_rotary_factor); the rest pass
};

struct ModelConfig {
  std::string architecture;  // the decoder's (a wrapper's text decoder: Gemma3ForCausalLM, Ministral3ForCausalLM...)
  std::string wrapper;       // the multimodal wrapper whose text_config this is, or empty
  int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_layers = 0;
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0, max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  bool qkv_bias = false, o_bias = false, mlp_bias = false, qk_norm = false;
  bool tie_word_embeddings = false;
  bool fused_qkv = false, fused_gate_up = false;  // Phi3: qkv_proj [q; k; v] and gate_up_proj [gate; up]
  std::string hidden_act = "silu";                // silu | gelu_tanh | gelu: the gated MLP's activation
  bool norm_plus_one = false;   // Gemma: every RMSNorm scales by (1 + w)
  bool norm_fp32 = false;       // GPT-OSS: norm weights multiply in fp32, before the cast to the compute dtype
  bool attn_sinks = false;      // GPT-OSS: a learned logit per head joins every softmax (and takes no value)
  bool attn_output_gate = false;  // Qwen3-Next / Qwen3.5: q_proj also yields a gate per head; output * sigmoid(gate)
  bool sandwich_norm = false;   // Gemma 2/3: attention and MLP outputs are normed before the residual add
  double embed_scale = 1.0;     // Gemma: embeddings times sqrt(hidden_size), in the compute dtype
  double attn_scale = 0.0;      // softmax scale: query_pre_attn_scalar^-0.5, else head_dim^-0.5
  double attn_softcap = 0.0, final_softcap = 0.0;  // Gemma 2: cap * tanh(x / cap); 0 = none
  // Ministral3 / Llama 4: queries times 1 + beta * log(1 + floor(position / original_max)); 0 = none
  double query_scale_beta = 0.0;
  int64_t query_scale_original_max = 0;
  std::vector<int64_t> sliding_window;  // per layer; 0 = full attention
  // Mixture of experts (num_experts 0 = dense): a sparse layer's MLP routes each token to its top
  // experts_per_tok of num_experts gated MLPs (moe_intermediate_size each), mixed by their softmax
  // weights (renormalised over the top k when norm_topk_prob; Mixtral mixes with the fp32 weights,
  // Qwen casts them to the compute dtype first), plus Qwen2-MoE's sigmoid-gated shared expert.
  int64_t num_experts = 0, experts_per_tok = 0, moe_intermediate_size = 0, shared_expert_intermediate_size = 0;
  bool norm_topk_prob = false, router_weights_fp32 = false;
  // GPT-OSS: the router has a bias and softmaxes only the top k logits (in the compute dtype); the
  // experts have biases and compute (clamp(up, +-limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
  bool softmax_after_topk = false, expert_bias = false;
  double swiglu_alpha = 0.0, swiglu_limit = 0.0;  // limit 0 = the plain gated activation
  std::vector<int64_t> sparse_layers;  // per layer: 1 = a mixture-of-experts MLP, 0 = a dense one
  // Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5): which layers (1 = linear attention, its
  // own conv + recurrent state per slot instead of a KV cache), key / value heads and sizes, the
  // short causal convolution's kernel.
  std::vector<int64_t> linear_layers;
  int64_t linear_k_heads = 0, linear_v_heads = 0, linear_k_dim = 0, linear_v_dim = 0, linear_conv_kernel = 0;
  RopeConfig rope;                      // every layer's RoPE, or full-attention layers' when rope_local is set
  bool has_rope_local = false;          // Gemma 3: sliding layers use rope_local
  RopeConfig rope_local;
  std::string torch_dtype;  // the checkpoint's dtype name ("float32", "bfloat16", ...), may be empty
  std::vector<int64_t> eos_token_ids;
  int64_t bos_token_id = -1, pad_token_id = -1;
};

// Parses config.json text; `source` names the file in error messages.
ModelConfig parse_config(const std::string& json_text, const std::string& source);
// The normalized config as JSON (what Python shows as Model.config).
std::string config_to_json(const ModelConfig& cfg);
// parse_config then config_to_json: validates config.json text and returns its normalized form.
std::string normalize_config(const std::string& json_text, const std::string& source);

}  // namespace cf
