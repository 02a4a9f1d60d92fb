// config.cpp — see config.h.
#include "config.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <tuple>
#include <nlohmann/json.hpp>

#include "../common/errors.h"

namespace cf {
namespace {

using json = nlohmann::json;

// Gemma: (1 + w) RMSNorm, embeddings scaled by sqrt(hidden); PlusOne: (1 + w) RMSNorm alone (Qwen3-Next, 3.5)
enum class Norms { kLlama, kGemma, kPlusOne };
// Qwen: Qwen2-MoE, Qwen3-MoE and Qwen3-Next's keys and layer rule; Qwen35: every layer, top k renormalised
enum class Moe { kNone, kMixtral, kQwen, kGptOss, kQwen35 };

struct ArchFlags {
  bool qkv_bias_always = false;  // Qwen2: q/k/v carry biases whatever attention_bias says
  bool o_bias_follows_attention_bias = false;
  bool qk_norm = false;
  bool sliding_from_window = false;  // Mistral, Phi3, Ministral3: sliding_window applies to every layer
  bool sliding_when_used = false;    // Qwen3-MoE: every layer slides iff use_sliding_window (no layer_types rule)
  bool qkv_bias_key = false;         // Qwen2-MoE: q/k/v biases follow qkv_bias (default on)
  bool fused = false;                // Phi3: qkv_proj and gate_up_proj
  Norms norms = Norms::kLlama;
  bool sandwich_norm = false;        // Gemma 2/3
  int64_t sliding_pattern = 0;       // Gemma: without layer_types, layer i slides unless (i + 1) % pattern == 0
  bool local_rope = false;           // Gemma 3: sliding layers have their own RoPE
  bool query_scale = false;          // Ministral3: llama_4_scaling_beta
  bool attn_softcap = false;         // Gemma 2 applies attn_logit_softcapping (Gemma 3 stores it, unused)
  bool sinks = false;                // GPT-OSS: attention sinks, fp32 norm weights
  bool linear_attention = false;     // Qwen3-Next / 3.5: Gated DeltaNet layers by layer_types, gated attention
  bool shared_expert = false;        // Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE: a sigmoid-gated shared expert
  bool num_experts_key = false;      // the expert count is num_experts (not num_local_experts)
  Moe moe = Moe::kNone;
  double theta_default = 10000.0, local_theta_default = 10000.0;  // rope_theta when the config has none
};

const std::map<std::string, ArchFlags>& arch_table() {
  static const std::map<std::string, ArchFlags> table = [] {
    ArchFlags llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3, ministral3, mixtral, qwen2_moe, qwen3_moe, gpt_oss,
        qwen3_5, qwen3_next, qwen3_5_moe;
    llama.o_bias_follows_attention_bias = true;
    mistral.sliding_from_window = true;
    qwen2.qkv_bias_always = true;
    qwen3.o_bias_follows_attention_bias = qwen3.qk_norm = true;
    phi3.sliding_from_window = phi3.fused = true;
    gemma2.norms = Norms::kGemma;
    gemma2.o_bias_follows_attention_bias = true;
    gemma2.sandwich_norm = true;
    gemma2.sliding_pattern = 2;
    gemma2.attn_softcap = true;
    gemma3 = gemma2;
    gemma3.qk_norm = gemma3.local_rope = true;
    gemma3.attn_softcap = false;
    gemma3.sliding_pattern = 6;
    gemma3.theta_default = 1000000.0;
    ministral3.sliding_from_window = ministral3.query_scale = true;
    mixtral = mistral;
    mixtral.moe = Moe::kMixtral;
    qwen2_moe = qwen2;
    qwen2_moe.moe = Moe::kQwen;
    qwen2_moe.qkv_bias_key = qwen2_moe.shared_expert = qwen2_moe.num_experts_key = true;
    qwen3_moe = qwen3;
    qwen3_moe.moe = Moe::kQwen;
    qwen3_moe.sliding_when_used = true;
    gpt_oss.o_bias_follows_attention_bias = true;
    gpt_oss.sliding_pattern = 2;  // without layer_types: even layers slide
    gpt_oss.sinks = true;
    gpt_oss.moe = Moe::kGptOss;
    gpt_oss.theta_default = 150000.0;
    qwen3_5.norms = Norms::kPlusOne;
    qwen3_5.qk_norm = qwen3_5.linear_attention = true;
    qwen3_5.o_bias_follows_attention_bias = true;
    qwen3_next = qwen3_5;
    qwen3_next.moe = Moe::kQwen;
    qwen3_next.shared_expert = qwen3_next.num_experts_key = true;
    qwen3_5_moe = qwen3_next;
    qwen3_5_moe.moe = Moe::kQwen35;
    return std::map<std::string, ArchFlags>{
        {"MixtralForCausalLM", mixtral},  {"Qwen2MoeForCausalLM", qwen2_moe}, {"Qwen3MoeForCausalLM", qwen3_moe},
        {"LlamaForCausalLM", llama},      {"MistralForCausalLM", mistral},   {"Qwen2ForCausalLM", qwen2},
        {"Qwen3ForCausalLM", qwen3},      {"Phi3ForCausalLM", phi3},         {"Gemma2ForCausalLM", gemma2},
        {"Gemma3ForCausalLM", gemma3},    {"Ministral3ForCausalLM", ministral3}, {"GptOssForCausalLM", gpt_oss},
        {"Qwen3NextForCausalLM", qwen3_next}, {"Qwen3_5ForCausalLM", qwen3_5}, {"Qwen3_5MoeForCausalLM", qwen3_5_moe},
    };
  }();
  return table;
}

// Multimodal wrappers whose text decoder (config "text_config") is what a layer path runs.
const std::map<std::string, std::string>& wrapper_to_text_arch() {
  static const std::map<std::string, std::string> table = {
      {"Gemma3ForConditionalGeneration", "Gemma3ForCausalLM"},
      {"Mistral3ForConditionalGeneration", "MistralForCausalLM"},  // transformers' default text model_type
      {"Qwen3_5ForConditionalGeneration", "Qwen3_5ForCausalLM"},
      {"Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM"},
  };
  return table;
}

std::string supported_archs() {
  std::string out;
  for (const auto& [name, _] : arch_table()) out += (out.empty() ? "" : ", ") + name;
  for (const auto& [name, _] : wrapper_to_text_arch()) out += ", " + name + " (text decoder)";
  return out;
}

const std::map<std::string, std::string>& model_type_to_arch() {
  static const std::map<std::string, std::string> table = {
      {"llama", "LlamaForCausalLM"},       {"mistral", "MistralForCausalLM"},   {"qwen2", "Qwen2ForCausalLM"},
      {"qwen3", "Qwen3ForCausalLM"},       {"phi3", "Phi3ForCausalLM"},         {"gemma2", "Gemma2ForCausalLM"},
      {"gemma3_text", "Gemma3ForCausalLM"}, {"ministral3", "Ministral3ForCausalLM"},
      {"gemma3", "Gemma3ForConditionalGeneration"}, {"mistral3", "Mistral3ForConditionalGeneration"},
      {"mixtral", "MixtralForCausalLM"},   {"qwen2_moe", "Qwen2MoeForCausalLM"}, {"qwen3_moe", "Qwen3MoeForCausalLM"},
      {"gpt_oss", "GptOssForCausalLM"},    {"qwen3_next", "Qwen3NextForCausalLM"},
      {"qwen3_5_text", "Qwen3_5ForCausalLM"}, {"qwen3_5_moe_text", "Qwen3_5MoeForCausalLM"},
      {"qwen3_5", "Qwen3_5ForConditionalGeneration"}, {"qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration"},
  };
  return table;
}

class Reader {
 public:
  Reader(const json& j, std::string source) : j_(j), source_(std::move(source)) {}

  bool has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }

  int64_t integer(const char* key) const {
    if (!has(key)) throw ConfigError(cat(source_, ": missing required field '", key, "'"));
    return integer_value(key, j_[key]);
  }
  int64_t integer(const char* key, int64_t fallback) const {
    return has(key) ? integer_value(key, j_[key]) : fallback;
  }
  double number(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    if (!j_[key].is_number()) throw ConfigError(cat(source_, ": field '", key, "' must be a number"));
    return j_[key].get<double>();
  }
  bool boolean(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    if (!j_[key].is_boolean()) throw ConfigError(cat(source_, ": field '", key, "' must be true or false"));
    return j_[key].get<bool>();
  }
  std::string string(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    if (!j_[key].is_string()) throw ConfigError(cat(source_, ": field '", key, "' must be a string"));
    return j_[key].get<std::string>();
  }
  std::vector<int64_t> int_list(const char* key) const {
    std::vector<int64_t> out;
    if (!has(key)) return out;
    if (j_[key].is_array()) {
      for (const auto& v : j_[key]) out.push_back(integer_value(key, v));
    } else {
      out.push_back(integer_value(key, j_[key]));
    }
    return out;
  }
  const json& raw() const { return j_; }
  const std::string& source() const { return source_; }

 private:
  int64_t integer_value(const char* key, const json& v) const {
    if (v.is_number_integer()) return v.get<int64_t>();
    // A whole float within +-2^53 (larger ones are not exact, and casting past int64 is undefined).
    if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() && std::fabs(v.get<double>()) <= 0x1p53)
      return static_cast<int64_t>(v.get<double>());
    throw ConfigError(cat(source_, ": field '", key, "' must be an integer"));
  }
  const json& j_;
  std::string source_;
};

// Reads a list of numbers (longrope's short_factor / long_factor): exactly `count` positive finite values.
std::vector<double> factor_list(const Reader& r, const char* key, size_t count, const std::string& source) {
  if (!r.has(key) || !r.raw()[key].is_array())
    throw ConfigError(cat(source, ": longrope RoPE scaling needs '", key, "' (a list of numbers)"));
  std::vector<double> out;
  for (const auto& v : r.raw()[key]) {
    if (!v.is_number() || !(v.get<double>() > 0) || !std::isfinite(v.get<double>()))
      throw ConfigError(cat(source, ": '", key, "' must hold positive finite numbers"));
    out.push_back(v.get<double>());
  }
  if (out.size() != count)
    throw ConfigError(cat(source, ": '", key, "' has ", out.size(), " entries; the rotary dimension needs ", count));
  return out;
}

void parse_yarn(const Reader& r, int64_t max_pos, RopeConfig& rope) {
  if (!r.has("factor"))
    rope.factor = static_cast<double>(max_pos) / static_cast<double>(rope.original_max_position_embeddings);
  auto mscale_of = [](double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
  const double mscale = r.number("mscale", 0.0), mscale_all = r.number("mscale_all_dim", 0.0);
  if (r.has("attention_factor")) {
    rope.attention_factor = r.number("attention_factor", 1.0);
  } else if (mscale != 0.0 && mscale_all != 0.0) {
    rope.attention_factor = mscale_of(rope.factor, mscale) / mscale_of(rope.factor, mscale_all);
  } else {
    rope.attention_factor = mscale_of(rope.factor, 1.0);
  }
  rope.beta_fast = r.has("beta_fast") && r.number("beta_fast", 0) != 0 ? r.number("beta_fast", 32) : 32.0;
  rope.beta_slow = r.has("beta_slow") && r.number("beta_slow", 0) != 0 ? r.number("beta_slow", 1) : 1.0;
  rope.truncate = r.boolean("truncate", true);
}

// LongRoPE (Phi-3): factor defaults to max / original context, attention factor to
// sqrt(1 + ln(factor) / ln(original)); the short or long divisors are picked per call by position.
void parse_longrope(const Reader& r, int64_t max_pos, const std::string& source, RopeConfig& rope) {
  if (!r.has("factor"))
    rope.factor = static_cast<double>(max_pos) / static_cast<double>(rope.original_max_position_embeddings);
  const double orig = static_cast<double>(rope.original_max_position_embeddings);
  rope.attention_factor = r.has("attention_factor") ? r.number("attention_factor", 1.0)
                          : rope.factor <= 1.0      ? 1.0
                                                    : std::sqrt(1 + std::log(rope.factor) / std::log(orig));
  rope.short_factor = factor_list(r, "short_factor", rope.rotary_dim / 2, source);
  rope.long_factor = factor_list(r, "long_factor", rope.rotary_dim / 2, source);
}

// One RoPE setup from a parameters object (rope_parameters, one of its per-layer-type entries, or
// rope_scaling). top: the whole config, for top-level rope_theta / partial_rotary_factor /
// original_max_position_embeddings (Phi3 saves the latter outside and it wins there).
RopeConfig parse_rope_params(const json& params, const Reader& top, const ModelConfig& c, double theta_fallback,
                             bool phi3) {
  const std::string source = top.source() + " (rope parameters)";
  if (!params.is_object()) throw ConfigError(cat(top.source(), ": rope_parameters / rope_scaling must be an object"));
  Reader r(params, source);
  RopeConfig rope;
  rope.theta = r.number("rope_theta", top.number("rope_theta", theta_fallback));
  if (!std::isfinite(rope.theta) || rope.theta <= 1.0)
    throw ConfigError(cat(top.source(), ": rope_theta must be a finite number above 1, got ", rope.theta));
  rope.type = r.string("rope_type", r.string("type", "default"));
  if (phi3 && (rope.type == "su" || rope.type == "yarn")) rope.type = "longrope";  // transformers' Phi3 rule
  const double partial = r.number("partial_rotary_factor", top.number("partial_rotary_factor", 1.0));
  if (partial > 0 && partial <= 1) rope.rotary_dim = static_cast<int64_t>(static_cast<double>(c.head_dim) * partial);
  if (!(partial > 0 && partial <= 1) || rope.rotary_dim < 2 || rope.rotary_dim % 2 != 0)
    throw ConfigError(cat(top.source(), ": partial_rotary_factor ", partial, " gives ", rope.rotary_dim,
                          " rotary dims of head_dim ", c.head_dim, "; need an even count in [2, head_dim]"));
  if (rope.type == "default") return rope;
  rope.factor = r.number("factor", 1.0);
  rope.original_max_position_embeddings = r.integer("original_max_position_embeddings", c.max_position_embeddings);
  if (phi3 && top.has("original_max_position_embeddings"))
    rope.original_max_position_embeddings = top.integer("original_max_position_embeddings");
  if (rope.original_max_position_embeddings <= 1)
    throw ConfigError(cat(top.source(), ": original_max_position_embeddings must be above 1"));
  if (rope.type == "linear") {
    if (!r.has("factor")) throw ConfigError(cat(top.source(), ": linear RoPE scaling needs 'factor'"));
  } else if (rope.type == "llama3") {
    for (const char* k : {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"})
      if (!r.has(k)) throw ConfigError(cat(top.source(), ": llama3 RoPE scaling needs '", k, "'"));
    rope.low_freq_factor = r.number("low_freq_factor", 1.0);
    rope.high_freq_factor = r.number("high_freq_factor", 4.0);
  } else if (rope.type == "yarn") {
    parse_yarn(r, c.max_position_embeddings, rope);
  } else if (rope.type == "longrope") {
    parse_longrope(r, c.max_position_embeddings, top.source(), rope);
  } else {
    throw ConfigError(cat(top.source(), ": RoPE type '", rope.type,
                          "' is not supported (supported: default, linear, llama3, yarn, longrope)"));
  }
  if (!(rope.factor > 0) || !std::isfinite(rope.factor))
    throw ConfigError(cat(top.source(), ": RoPE 'factor' must be a positive finite number"));
  return rope;
}

// c.rope, and for Gemma 3 c.rope_local (sliding layers). transformers v5 writes rope_parameters
// (rope_theta inside; Gemma 3: one entry per layer type); older checkpoints put rope_theta at the
// top level, scaling in rope_scaling, and Gemma 3's local base in rope_local_base_freq.
void read_rope(const Reader& top, const ArchFlags& f, ModelConfig& c) {
  json params = json::object();
  if (top.has("rope_scaling")) params = top.raw()["rope_scaling"];
  if (top.has("rope_parameters")) params = top.raw()["rope_parameters"];
  const bool phi3 = c.architecture == "Phi3ForCausalLM";
  const bool per_type = params.is_object() && (params.contains("full_attention") || params.contains("sliding_attention"));
  if (per_type && !f.local_rope)
    throw ConfigError(cat(top.source(), ": per-layer-type rope_parameters are not supported for ", c.architecture));
  if (!f.local_rope) {
    c.rope = parse_rope_params(params, top, c, f.theta_default, phi3);
    return;
  }
  c.has_rope_local = true;
  auto entry = [&](const char* kind) {
    return params.contains(kind) && params[kind].is_object() ? params[kind] : json::object();
  };
  if (per_type) {
    c.rope = parse_rope_params(entry("full_attention"), top, c, f.theta_default, false);
    c.rope_local = parse_rope_params(entry("sliding_attention"), top, c, f.local_theta_default, false);
  } else {
    c.rope = parse_rope_params(params, top, c, f.theta_default, false);
    json local = {{"rope_type", "default"}, {"rope_theta", top.number("rope_local_base_freq", f.local_theta_default)}};
    c.rope_local = parse_rope_params(local, top, c, f.local_theta_default, false);
  }
}

json parse_json_object(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw ConfigError(cat(source, ": invalid JSON: ", e.what()));
  }
  if (!j.is_object()) throw ConfigError(cat(source, ": config is not a JSON object"));
  return j;
}

// architectures[0], else the architecture model_type names.
std::string architecture_name(const Reader& r) {
  if (r.has("architectures")) {
    const json& names = r.raw()["architectures"];
    if (!names.is_array() || names.empty() || !names[0].is_string())
      throw ConfigError(cat(r.source(), ": 'architectures' must be a list of names"));
    return names[0].get<std::string>();
  }
  auto mt = model_type_to_arch().find(r.string("model_type", ""));
  if (mt == model_type_to_arch().end())
    throw ConfigError(cat(r.source(), ": no 'architectures' and an unknown 'model_type' (supported: ", supported_archs(),
                          ")"));
  return mt->second;
}

// transformers' config-class defaults for the keys these families' published configs may leave
// out (Gemma 3's multimodal text_config lists only a few); applied only where a key is absent.
const json& arch_defaults(const std::string& arch) {
  static const std::map<std::string, json> table = {
      {"Gemma2ForCausalLM", json::parse(R"({"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": true,
        "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0})")},
      {"Gemma3ForCausalLM", json::parse(R"({"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": true,
        "query_pre_attn_scalar": 256, "sliding_window": 4096})")},
      {"Ministral3ForCausalLM", json::parse(R"({"vocab_size": 131072, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 34, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 262144, "rms_norm_eps": 1e-5, "pad_token_id": 11, "bos_token_id": 1,
        "eos_token_id": 2, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
        "original_max_position_embeddings": 16384, "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0,
        "mscale": 1.0, "llama_4_scaling_beta": 0.1}})")},
      {"MixtralForCausalLM", json::parse(R"({"num_experts_per_tok": 2})")},
      {"Qwen2MoeForCausalLM", json::parse(R"({"num_experts": 60, "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "norm_topk_prob": false,
        "decoder_sparse_step": 1})")},
      {"Qwen3MoeForCausalLM", json::parse(R"({"num_experts_per_tok": 8,
        "moe_intermediate_size": 768, "norm_topk_prob": false, "decoder_sparse_step": 1})")},
      {"Qwen3_5ForCausalLM", json::parse(R"({"vocab_size": 248320, "hidden_size": 4096, "intermediate_size": 12288,
        "num_hidden_layers": 32, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 256,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "partial_rotary_factor": 0.25,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_num_key_heads": 16, "linear_num_value_heads": 32})")},
      {"Qwen3NextForCausalLM", json::parse(R"({"num_experts": 512, "num_experts_per_tok": 10,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "norm_topk_prob": true,
        "decoder_sparse_step": 1, "head_dim": 256, "partial_rotary_factor": 0.25, "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32})")},
      // Qwen3.5-MoE: every layer is a mixture, so intermediate_size (which its config lacks) is unused
      {"Qwen3_5MoeForCausalLM", json::parse(R"({"vocab_size": 248320, "hidden_size": 2048, "num_hidden_layers": 40,
        "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "partial_rotary_factor": 0.25, "num_experts": 256, "num_experts_per_tok": 8,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "intermediate_size": 512,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_num_key_heads": 16, "linear_num_value_heads": 32})")},
      {"GptOssForCausalLM", json::parse(R"({"num_local_experts": 128, "num_experts_per_tok": 4, "head_dim": 64,
        "sliding_window": 128, "attention_bias": true, "rms_norm_eps": 1e-5, "swiglu_alpha": 1.702,
        "swiglu_limit": 7.0, "rope_parameters": {"rope_type": "yarn", "factor": 32.0,
        "beta_fast": 32.0, "beta_slow": 1.0, "truncate": false, "original_max_position_embeddings": 4096}})")},
  };
  static const json none = json::object();
  auto it = table.find(arch);
  return it == table.end() ? none : it->second;
}

// The decoder config a layer path runs: a multimodal wrapper's text_config (with the wrapper's
// token ids and dtype where the text config has none), then the family's defaults under it.
// Sets c.architecture (the text decoder's) and c.wrapper (the wrapper's name, or empty).
json decoder_config(const json& top, const std::string& source, ModelConfig& c) {
  Reader r(top, source);
  c.architecture = architecture_name(r);
  // GPT-OSS's published MXFP4 experts, fine-grained FP8 weights (quant_method "fp8"), compressed-tensors,
  // GPTQ, AWQ and bitsandbytes checkpoints are dequantized by the loader (circuit_finder.quants,
  // .compressed, .gptq, .bnb);
  // no other quantization_config is supported.
  for (const json* q : {&top, top.contains("text_config") ? &top["text_config"] : &top}) {
    if (!q->is_object() || !q->contains("quantization_config") || (*q)["quantization_config"].is_null()) continue;
    const json& qc = (*q)["quantization_config"];
    const json method = qc.is_object() && qc.contains("quant_method") ? qc["quant_method"] : json();
    const bool mxfp4 = c.architecture == "GptOssForCausalLM" && method == "mxfp4";
    auto flag = [&](const char* key) { return qc.is_object() && qc.contains(key) && qc[key] == true; };
    const bool old_bnb = method.is_null() && (flag("load_in_4bit") || flag("load_in_8bit"));  // transformers < 4.32
    const bool dequantized = method == "fp8" || method == "compressed-tensors" || method == "gptq" || method == "awq" ||
                             method == "bitsandbytes" || old_bnb;
    if (!mxfp4 && !dequantized)
      throw ConfigError(cat(source, ": a quantized checkpoint (quantization_config: ",
                            method.is_string() ? method.get<std::string>() : std::string("?"),
                            ") is not supported (fine-grained FP8, compressed-tensors, GPTQ, AWQ, bitsandbytes and "
                            "GPT-OSS's MXFP4 are; not HQQ, torchao, ...); use its bf16/fp16 weights or a GGUF file"));
  }
  json j = top;
  auto wrapper = wrapper_to_text_arch().find(c.architecture);
  if (wrapper != wrapper_to_text_arch().end()) {
    if (!r.has("text_config") || !top["text_config"].is_object())
      throw ConfigError(cat(source, ": ", c.architecture, " needs a 'text_config' object (its text decoder)"));
    c.wrapper = c.architecture;
    j = top["text_config"];
    Reader text(j, source + " (text_config)");
    c.architecture = text.has("model_type") ? architecture_name(Reader(json{{"model_type", j["model_type"]}}, source))
                                            : wrapper->second;
    for (const char* key : {"eos_token_id", "bos_token_id", "pad_token_id", "torch_dtype", "dtype"})
      if (!text.has(key) && r.has(key)) j[key] = top[key];
  }
  const json& defaults = arch_defaults(c.architecture);
  for (const auto& [key, value] : defaults.items()) {
    if (key == "rope_parameters" && j.contains("rope_scaling") && !j["rope_scaling"].is_null()) continue;
    if (!j.contains(key)) j[key] = value;
  }
  return j;
}

const ArchFlags& arch_flags(const ModelConfig& c, const std::string& source) {
  auto arch = arch_table().find(c.architecture);
  if (arch == arch_table().end())
    throw ConfigError(cat(source, ": architecture '", c.architecture, "' is not supported (supported: ",
                          supported_archs(), ")"));
  return arch->second;
}

// Vocabulary, hidden, MLP and head sizes, layer count, context length: each positive and under a bound.
void read_sizes(const Reader& r, ModelConfig& c) {
  const std::string& source = r.source();
  c.vocab_size = r.integer("vocab_size");
  c.hidden_size = r.integer("hidden_size");
  c.intermediate_size = r.integer("intermediate_size");
  c.num_layers = r.integer("num_hidden_layers");
  c.num_heads = r.integer("num_attention_heads");
  c.num_kv_heads = r.integer("num_key_value_heads", c.num_heads);
  c.max_position_embeddings = r.integer("max_position_embeddings", 2048);
  for (auto [name, v] : {std::pair{"vocab_size", c.vocab_size}, {"hidden_size", c.hidden_size},
                         {"intermediate_size", c.intermediate_size}, {"num_hidden_layers", c.num_layers},
                         {"num_attention_heads", c.num_heads}, {"num_key_value_heads", c.num_kv_heads}})
    if (v <= 0) throw ConfigError(cat(source, ": '", name, "' must be positive, got ", v));
  // Upper bounds far above any real model: a corrupt file must not make us allocate per-layer
  // tables of 2^62 entries.
  for (auto [name, v, limit] : {std::tuple{"vocab_size", c.vocab_size, int64_t{1} << 24},
                                {"hidden_size", c.hidden_size, int64_t{1} << 20},
                                {"intermediate_size", c.intermediate_size, int64_t{1} << 22},
                                {"num_hidden_layers", c.num_layers, int64_t{1} << 12},
                                {"num_attention_heads", c.num_heads, int64_t{1} << 12},
                                {"num_key_value_heads", c.num_kv_heads, int64_t{1} << 12},
                                {"max_position_embeddings", c.max_position_embeddings, int64_t{1} << 30}})
    if (v > limit) throw ConfigError(cat(source, ": '", name, "' = ", v, " is over the supported maximum ", limit));
  if (c.num_heads % c.num_kv_heads != 0)
    throw ConfigError(cat(source, ": num_attention_heads (", c.num_heads, ") is not a multiple of num_key_value_heads (",
                          c.num_kv_heads, ")"));
  c.head_dim = r.integer("head_dim", 0);
  if (c.head_dim == 0) {
    if (c.hidden_size % c.num_heads != 0)
      throw ConfigError(cat(source, ": hidden_size is not divisible by num_attention_heads and no head_dim is given"));
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim <= 0 || c.head_dim > (int64_t{1} << 14) || c.head_dim % 2 != 0)
    throw ConfigError(cat(source, ": head_dim must be even, positive and at most 16384 (RoPE), got ", c.head_dim));
}

// The MLP's activation: hidden_activation (Gemma) or hidden_act, as transformers' ACT2FN names it.
std::string read_activation(const Reader& r) {
  const std::string act = r.string("hidden_activation", r.string("hidden_act", "silu"));
  if (act == "silu" || act == "swish") return "silu";
  if (act == "gelu_pytorch_tanh" || act == "gelu_new") return "gelu_tanh";  // the same tanh formula
  if (act == "gelu") return "gelu";
  throw ConfigError(cat(r.source(), ": activation '", act,
                        "' is not supported (supported: silu, gelu_pytorch_tanh, gelu_new, gelu)"));
}

double softcap(const Reader& r, const char* key) {
  const double cap = r.number(key, 0.0);
  if (!std::isfinite(cap) || cap < 0) throw ConfigError(cat(r.source(), ": ", key, " must be a positive number or null"));
  return cap;
}

// The block's flags: norm epsilon and kind, activation, biases, q/k norm, fused projections,
// attention scale and soft-capping, query scaling, tied embeddings.
void read_block_flags(const Reader& r, const ArchFlags& f, ModelConfig& c) {
  c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
  if (!std::isfinite(c.rms_norm_eps) || c.rms_norm_eps < 0)
    throw ConfigError(cat(r.source(), ": rms_norm_eps must be a finite non-negative number"));
  c.hidden_act = read_activation(r);
  const bool attention_bias = r.boolean("attention_bias", false);
  c.qkv_bias = f.qkv_bias_key ? r.boolean("qkv_bias", true) : f.qkv_bias_always || attention_bias;
  c.o_bias = f.o_bias_follows_attention_bias && attention_bias;
  c.mlp_bias = r.boolean("mlp_bias", false);
  c.qk_norm = f.qk_norm;
  c.fused_qkv = c.fused_gate_up = f.fused;
  if (f.fused) c.qkv_bias = c.o_bias = c.mlp_bias = false;  // Phi3's projections carry no biases
  c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  c.norm_plus_one = f.norms == Norms::kGemma || f.norms == Norms::kPlusOne;
  c.norm_fp32 = c.attn_sinks = f.sinks;
  c.attn_output_gate = f.linear_attention;
  c.sandwich_norm = f.sandwich_norm;
  c.embed_scale = f.norms == Norms::kGemma ? std::sqrt(static_cast<double>(c.hidden_size)) : 1.0;
  const double scalar = r.number("query_pre_attn_scalar", static_cast<double>(c.head_dim));
  if (!(scalar > 0) || !std::isfinite(scalar))
    throw ConfigError(cat(r.source(), ": query_pre_attn_scalar must be a positive number"));
  c.attn_scale = 1.0 / std::sqrt(f.norms == Norms::kGemma ? scalar : static_cast<double>(c.head_dim));
  c.attn_softcap = f.attn_softcap ? softcap(r, "attn_logit_softcapping") : 0.0;
  // Gemma3ForConditionalGeneration never applies its text config's final soft-cap
  c.final_softcap = c.wrapper.empty() ? softcap(r, "final_logit_softcapping") : 0.0;
  if (r.boolean("use_bidirectional_attention", false))
    throw ConfigError(cat(r.source(), ": use_bidirectional_attention (an encoder) is not supported"));
}

// Ministral3: queries are scaled by 1 + beta * log(1 + floor(position / original_max)), with
// llama_4_scaling_beta and original_max_position_embeddings from rope_parameters (or rope_scaling).
void read_query_scale(const Reader& r, const ArchFlags& f, ModelConfig& c) {
  const char* key = r.has("rope_parameters") ? "rope_parameters" : "rope_scaling";
  if (!f.query_scale || !r.has(key) || !r.raw()[key].is_object()) return;
  Reader p(r.raw()[key], r.source() + " (rope parameters)");
  c.query_scale_beta = p.number("llama_4_scaling_beta", 0.0);
  if (c.query_scale_beta == 0.0) return;
  c.query_scale_original_max = p.integer("original_max_position_embeddings");
  if (!std::isfinite(c.query_scale_beta) || c.query_scale_original_max <= 0)
    throw ConfigError(cat(r.source(), ": llama_4_scaling_beta needs a finite beta and a positive original_max_position_embeddings"));
}

// Sliding window per layer (0 = full attention). Mistral's, Phi3's and Ministral3's sliding_window
// applies to every layer; otherwise an explicit layer_types list wins, else Gemma's pattern, else
// Qwen2's use_sliding_window for layers from max_window_layers.
std::vector<int64_t> read_sliding_windows(const Reader& r, const ArchFlags& f, int64_t num_layers) {
  std::vector<int64_t> windows(num_layers, 0);
  const int64_t window = r.integer("sliding_window", 0);
  if (f.sliding_from_window) {  // Mistral, Phi3, Ministral3: transformers ignores layer_types here
    if (window > 0) windows.assign(num_layers, window);
  } else if (f.sliding_when_used) {  // Qwen3-MoE: all layers or none, layer_types ignored
    if (r.boolean("use_sliding_window", false) && window > 0) windows.assign(num_layers, window);
  } else if (r.has("layer_types")) {
    const json& lt = r.raw()["layer_types"];
    if (!lt.is_array() || static_cast<int64_t>(lt.size()) != num_layers)
      throw ConfigError(cat(r.source(), ": layer_types must list one type per layer (", num_layers, ")"));
    for (int64_t i = 0; i < num_layers; ++i) {
      const std::string t = lt[i].is_string() ? lt[i].get<std::string>() : "";
      if (t == "sliding_attention") {
        if (window <= 0)
          throw ConfigError(cat(r.source(), ": layer ", i, " uses sliding attention but sliding_window is not set"));
        windows[i] = window;
      } else if (t != "full_attention" && !(f.linear_attention && t == "linear_attention")) {
        throw ConfigError(cat(r.source(), ": layer_types[", i, "] = '", t,
                              "' is not supported (supported: full_attention, sliding_attention",
                              f.linear_attention ? ", linear_attention)" : ")"));
      }
    }
  } else if (f.sliding_pattern > 0) {
    // Gemma: layer i slides unless (i + 1) is a multiple of the pattern (Gemma 2: every other layer;
    // Gemma 3: sliding_window_pattern, 6 by default).
    const int64_t pattern = f.sliding_pattern == 2 ? 2 : r.integer("sliding_window_pattern", f.sliding_pattern);
    if (pattern <= 0) throw ConfigError(cat(r.source(), ": sliding_window_pattern must be positive"));
    if (window <= 0) throw ConfigError(cat(r.source(), ": sliding_window must be set for the sliding layers"));
    for (int64_t i = 0; i < num_layers; ++i) windows[i] = (i + 1) % pattern != 0 ? window : 0;
  } else if (r.boolean("use_sliding_window", false) && window > 0) {
    // transformers: layer i slides when i >= max_window_layers (so a negative value means every layer);
    // Qwen2Config and Qwen3Config default max_window_layers to 28 when the config leaves it out.
    const int64_t first = std::max<int64_t>(r.integer("max_window_layers", 28), 0);
    for (int64_t i = first; i < num_layers; ++i) windows[i] = window;
  }
  return windows;
}

// Gated DeltaNet layers: layer_types' linear_attention entries, else every layer but each
// full_attention_interval-th (default 4); head counts and sizes, conv kernel, each positive.
void read_linear_attention(const Reader& r, const ArchFlags& f, ModelConfig& c) {
  c.linear_layers.assign(c.num_layers, 0);
  if (!f.linear_attention) return;
  if (r.has("layer_types")) {
    for (int64_t i = 0; i < c.num_layers; ++i)
      c.linear_layers[i] = r.raw()["layer_types"][i] == "linear_attention";
  } else {
    const int64_t interval = r.integer("full_attention_interval", 4);
    if (interval <= 0) throw ConfigError(cat(r.source(), ": full_attention_interval must be positive"));
    for (int64_t i = 0; i < c.num_layers; ++i) c.linear_layers[i] = (i + 1) % interval != 0;
  }
  c.linear_k_heads = r.integer("linear_num_key_heads");
  c.linear_v_heads = r.integer("linear_num_value_heads");
  c.linear_k_dim = r.integer("linear_key_head_dim");
  c.linear_v_dim = r.integer("linear_value_head_dim");
  c.linear_conv_kernel = r.integer("linear_conv_kernel_dim");
  for (auto [name, v] : {std::pair{"linear_num_key_heads", c.linear_k_heads}, {"linear_num_value_heads", c.linear_v_heads},
                         {"linear_key_head_dim", c.linear_k_dim}, {"linear_value_head_dim", c.linear_v_dim},
                         {"linear_conv_kernel_dim", c.linear_conv_kernel}})
    if (v <= 0 || v > (int64_t{1} << 14))
      throw ConfigError(cat(r.source(), ": '", name, "' = ", v, " must be in [1, 16384]"));
  if (c.linear_v_heads % c.linear_k_heads != 0)
    throw ConfigError(cat(r.source(), ": linear_num_value_heads (", c.linear_v_heads,
                          ") is not a multiple of linear_num_key_heads (", c.linear_k_heads, ")"));
}

// GPT-OSS's routing and expert activation: softmax over the top k biased logits, biased experts,
// the clamped SwiGLU's alpha and limit.
void read_gpt_oss_experts(const Reader& r, ModelConfig& c) {
  c.norm_topk_prob = c.softmax_after_topk = c.expert_bias = true;
  c.swiglu_alpha = r.number("swiglu_alpha", 1.702);
  c.swiglu_limit = r.number("swiglu_limit", 7.0);
  for (auto [name, v] : {std::pair{"swiglu_alpha", c.swiglu_alpha}, {"swiglu_limit", c.swiglu_limit}})
    if (!(v > 0) || !std::isfinite(v)) throw ConfigError(cat(r.source(), ": ", name, " must be a positive number"));
}

// Mixture of experts: expert count, top k, sizes, the top-k renormalisation, and which layers are
// sparse (Mixtral, GPT-OSS: all; Qwen: (i + 1) % decoder_sparse_step == 0 unless i is in mlp_only_layers).
void read_moe(const Reader& r, const ArchFlags& f, ModelConfig& c) {
  c.sparse_layers.assign(c.num_layers, 0);
  if (f.moe == Moe::kNone) return;
  const bool expert_is_intermediate = f.moe == Moe::kMixtral || f.moe == Moe::kGptOss;  // the expert's size
  const bool every_layer = expert_is_intermediate || f.moe == Moe::kQwen35;
  const std::string& source = r.source();
  // the expert count: num_experts (Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE), else num_local_experts
  // (what transformers v5 saves) with num_experts as its alias (Qwen3's published configs)
  const bool qwen2 = c.architecture == "Qwen2MoeForCausalLM";
  c.num_experts = f.num_experts_key ? r.integer("num_experts")
                                    : r.integer("num_local_experts", r.integer("num_experts", f.moe == Moe::kMixtral ? 8 : 128));
  c.experts_per_tok = r.integer("num_experts_per_tok");
  c.moe_intermediate_size = expert_is_intermediate ? c.intermediate_size : r.integer("moe_intermediate_size");
  c.shared_expert_intermediate_size = f.shared_expert ? r.integer("shared_expert_intermediate_size", 0) : 0;
  c.norm_topk_prob = f.moe == Moe::kMixtral || f.moe == Moe::kQwen35 || r.boolean("norm_topk_prob", false);
  c.router_weights_fp32 = f.moe == Moe::kMixtral;
  if (f.moe == Moe::kGptOss) read_gpt_oss_experts(r, c);
  if (c.num_experts < (every_layer ? 1 : 0) || c.num_experts > 4096)
    throw ConfigError(cat(source, ": the expert count must be in [", every_layer ? 1 : 0, ", 4096], got ", c.num_experts));
  if (c.experts_per_tok <= 0 || (c.num_experts > 0 && c.experts_per_tok > c.num_experts))
    throw ConfigError(cat(source, ": num_experts_per_tok (", c.experts_per_tok, ") must be in [1, the expert count ",
                          c.num_experts, "]"));
  for (auto [name, v, low] : {std::tuple{expert_is_intermediate ? "intermediate_size" : "moe_intermediate_size",
                                         c.moe_intermediate_size, int64_t{1}},
                              {"shared_expert_intermediate_size", c.shared_expert_intermediate_size, int64_t{0}}})
    if (v < low || v > (int64_t{1} << 22))
      throw ConfigError(cat(source, ": '", name, "' = ", v, " must be in [", low, ", 2^22]"));
  const int64_t step = every_layer ? 1 : r.integer("decoder_sparse_step", 1);
  if (step <= 0) throw ConfigError(cat(source, ": decoder_sparse_step must be positive, got ", step));
  std::vector<int64_t> dense = every_layer || !r.has("mlp_only_layers") ? std::vector<int64_t>{} : r.int_list("mlp_only_layers");
  for (int64_t i = 0; i < c.num_layers; ++i)
    c.sparse_layers[i] = c.num_experts > 0 && (i + 1) % step == 0 &&
                         std::find(dense.begin(), dense.end(), i) == dense.end();
  if (qwen2 && r.boolean("use_sliding_window", false) && !r.has("layer_types"))
    throw ConfigError(cat(source, ": use_sliding_window without layer_types is not supported for ", c.architecture,
                          " (transformers writes layer_types when it saves the config)"));
}

}  // namespace

ModelConfig parse_config(const std::string& json_text, const std::string& source) {
  ModelConfig c;
  const json j = decoder_config(parse_json_object(json_text, source), source, c);
  Reader r(j, c.wrapper.empty() ? source : source + " (text_config)");
  const ArchFlags& f = arch_flags(c, source);
  read_sizes(r, c);
  read_block_flags(r, f, c);
  read_query_scale(r, f, c);
  c.sliding_window = read_sliding_windows(r, f, c.num_layers);
  read_moe(r, f, c);
  read_linear_attention(r, f, c);
  read_rope(r, f, c);
  c.torch_dtype = r.string("torch_dtype", r.string("dtype", ""));
  c.eos_token_ids = r.int_list("eos_token_id");
  c.bos_token_id = r.integer("bos_token_id", -1);
  c.pad_token_id = r.integer("pad_token_id", -1);
  return c;
}

json rope_json(const RopeConfig& r) {
  return {{"type", r.type},
          {"theta", r.theta},
          {"factor", r.factor},
          {"low_freq_factor", r.low_freq_factor},
          {"high_freq_factor", r.high_freq_factor},
          {"original_max_position_embeddings", r.original_max_position_embeddings},
          {"attention_factor", r.attention_factor},
          {"beta_fast", r.beta_fast},
          {"beta_slow", r.beta_slow},
          {"truncate", r.truncate},
          {"short_factor", r.short_factor},
          {"long_factor", r.long_factor},
          {"rotary_dim", r.rotary_dim}};
}

std::string config_to_json(const ModelConfig& c) {
  json j = {
      {"architecture", c.architecture},
      {"wrapper", c.wrapper},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_layers", c.num_layers},
      {"num_heads", c.num_heads},
      {"num_kv_heads", c.num_kv_heads},
      {"head_dim", c.head_dim},
      {"max_position_embeddings", c.max_position_embeddings},
      {"rms_norm_eps", c.rms_norm_eps},
      {"qkv_bias", c.qkv_bias},
      {"o_bias", c.o_bias},
      {"mlp_bias", c.mlp_bias},
      {"qk_norm", c.qk_norm},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"fused_qkv", c.fused_qkv},
      {"fused_gate_up", c.fused_gate_up},
      {"hidden_act", c.hidden_act},
      {"norm_plus_one", c.norm_plus_one},
      {"norm_fp32", c.norm_fp32},
      {"attn_sinks", c.attn_sinks},
      {"sandwich_norm", c.sandwich_norm},
      {"embed_scale", c.embed_scale},
      {"attn_scale", c.attn_scale},
      {"attn_softcap", c.attn_softcap},
      {"final_softcap", c.final_softcap},
      {"query_scale_beta", c.query_scale_beta},
      {"query_scale_original_max", c.query_scale_original_max},
      {"sliding_window", c.sliding_window},
      {"num_experts", c.num_experts},
      {"experts_per_tok", c.experts_per_tok},
      {"moe_intermediate_size", c.moe_intermediate_size},
      {"shared_expert_intermediate_size", c.shared_expert_intermediate_size},
      {"norm_topk_prob", c.norm_topk_prob},
      {"router_weights_fp32", c.router_weights_fp32},
      {"softmax_after_topk", c.softmax_after_topk},
      {"expert_bias", c.expert_bias},
      {"swiglu_alpha", c.swiglu_alpha},
      {"swiglu_limit", c.swiglu_limit},
      {"sparse_layers", c.sparse_layers},
      {"attn_output_gate", c.attn_output_gate},
      {"linear_layers", c.linear_layers},
      {"linear_k_heads", c.linear_k_heads},
      {"linear_v_heads", c.linear_v_heads},
      {"linear_k_dim", c.linear_k_dim},
      {"linear_v_dim", c.linear_v_dim},
      {"linear_conv_kernel", c.linear_conv_kernel},
      {"rope", rope_json(c.rope)},
      {"rope_local", c.has_rope_local ? rope_json(c.rope_local) : json(nullptr)},
      {"torch_dtype", c.torch_dtype},
      {"eos_token_ids", c.eos_token_ids},
      {"bos_token_id", c.bos_token_id},
      {"pad_token_id", c.pad_token_id},
  };
  return j.dump();
}

std::string normalize_config(const std::string& json_text, const std::string& source) {
  return config_to_json(parse_config(json_text, source));
}

}  // namespace cf
