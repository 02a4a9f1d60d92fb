// config.h — config.json -> ModelConfig. Architecture differences are flags here (qkv bias,
// q/k norm, tied embeddings, sliding windows), never separate code paths in the model.
// Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM;
// RoPE types default, linear, llama3, yarn, read from either top-level rope_theta/rope_scaling
// or transformers v5's rope_parameters.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace cf {

struct RopeConfig {
  std::string type = "default";  // default | linear | llama3 | yarn
  double theta = 10000.0;
  double factor = 1.0;
  double low_freq_factor = 1.0;   // llama3
  double high_freq_factor = 4.0;  // llama3
  int64_t original_max_position_embeddings = 0;
  double attention_factor = 1.0;  // multiplies cos/sin (yarn); resolved at parse time
  double beta_fast = 32.0, beta_slow = 1.0;  // yarn
  bool truncate = true;                      // yarn
};

struct ModelConfig {
  std::string architecture;
  int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_layers = 0;
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0, max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  bool qkv_bias = false, o_bias = false, mlp_bias = false, qk_norm = false;
  bool tie_word_embeddings = false;
  std::vector<int64_t> sliding_window;  // per layer; 0 = full attention
  RopeConfig rope;
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
