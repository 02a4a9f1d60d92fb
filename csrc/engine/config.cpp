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

struct ArchFlags {
  bool qkv_bias_always;  // Qwen2: q/k/v carry biases whatever attention_bias says
  bool o_bias_follows_attention_bias;
  bool qk_norm;
  bool sliding_from_window;  // Mistral: sliding_window applies to every layer when set
};

const std::map<std::string, ArchFlags>& arch_table() {
  static const std::map<std::string, ArchFlags> table = {
      {"LlamaForCausalLM", {false, true, false, false}},
      {"MistralForCausalLM", {false, false, false, true}},
      {"Qwen2ForCausalLM", {true, false, false, false}},
      {"Qwen3ForCausalLM", {false, true, true, false}},
  };
  return table;
}

std::string supported_archs() {
  std::string out;
  for (const auto& [name, _] : arch_table()) out += (out.empty() ? "" : ", ") + name;
  return out;
}

const std::map<std::string, std::string>& model_type_to_arch() {
  static const std::map<std::string, std::string> table = {
      {"llama", "LlamaForCausalLM"},
      {"mistral", "MistralForCausalLM"},
      {"qwen2", "Qwen2ForCausalLM"},
      {"qwen3", "Qwen3ForCausalLM"},
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

RopeConfig parse_rope(const Reader& top, int64_t max_pos) {
  // transformers v5 writes rope_parameters (with rope_theta inside); older checkpoints put
  // rope_theta at the top level and scaling in rope_scaling. Either may be absent or null.
  json params = json::object();
  if (top.has("rope_scaling")) params = top.raw()["rope_scaling"];
  if (top.has("rope_parameters")) params = top.raw()["rope_parameters"];
  if (!params.is_object()) throw ConfigError(cat(top.source(), ": rope_parameters / rope_scaling must be an object"));
  Reader r(params, top.source() + " (rope parameters)");
  RopeConfig rope;
  rope.theta = r.number("rope_theta", top.number("rope_theta", 10000.0));
  if (!std::isfinite(rope.theta) || rope.theta <= 1.0)
    throw ConfigError(cat(top.source(), ": rope_theta must be a finite number above 1, got ", rope.theta));
  rope.type = r.string("rope_type", r.string("type", "default"));
  if (r.number("partial_rotary_factor", top.number("partial_rotary_factor", 1.0)) != 1.0)
    throw ConfigError(cat(top.source(), ": partial_rotary_factor != 1 is not supported"));
  if (rope.type == "default") return rope;
  rope.factor = r.number("factor", 1.0);
  rope.original_max_position_embeddings =
      r.integer("original_max_position_embeddings", top.integer("original_max_position_embeddings", max_pos));
  if (rope.type == "linear") {
    if (!r.has("factor")) throw ConfigError(cat(top.source(), ": linear RoPE scaling needs 'factor'"));
  } else if (rope.type == "llama3") {
    for (const char* k : {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"})
      if (!r.has(k)) throw ConfigError(cat(top.source(), ": llama3 RoPE scaling needs '", k, "'"));
    rope.low_freq_factor = r.number("low_freq_factor", 1.0);
    rope.high_freq_factor = r.number("high_freq_factor", 4.0);
  } else if (rope.type == "yarn") {
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
  } else {
    throw ConfigError(cat(top.source(), ": RoPE type '", rope.type,
                          "' is not supported (supported: default, linear, llama3, yarn)"));
  }
  if (!(rope.factor > 0) || !std::isfinite(rope.factor))
    throw ConfigError(cat(top.source(), ": RoPE 'factor' must be a positive finite number"));
  return rope;
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

// c.architecture (architectures[0], else from model_type) and that architecture's flags.
const ArchFlags& read_architecture(const Reader& r, ModelConfig& c) {
  const std::string& source = r.source();
  if (r.has("architectures")) {
    const json& names = r.raw()["architectures"];
    if (!names.is_array() || names.empty() || !names[0].is_string())
      throw ConfigError(cat(source, ": 'architectures' must be a list of names"));
    c.architecture = names[0].get<std::string>();
  } else {
    auto mt = model_type_to_arch().find(r.string("model_type", ""));
    if (mt == model_type_to_arch().end())
      throw ConfigError(cat(source, ": no 'architectures' and an unknown 'model_type' (supported: ",
                            supported_archs(), ")"));
    c.architecture = mt->second;
  }
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

// The block's flags: norm epsilon, activation, biases, q/k norm, tied embeddings.
void read_block_flags(const Reader& r, const ArchFlags& f, ModelConfig& c) {
  c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
  if (!std::isfinite(c.rms_norm_eps) || c.rms_norm_eps < 0)
    throw ConfigError(cat(r.source(), ": rms_norm_eps must be a finite non-negative number"));
  const std::string act = r.string("hidden_act", "silu");
  if (act != "silu") throw ConfigError(cat(r.source(), ": hidden_act '", act, "' is not supported (supported: silu)"));
  const bool attention_bias = r.boolean("attention_bias", false);
  c.qkv_bias = f.qkv_bias_always || attention_bias;
  c.o_bias = f.o_bias_follows_attention_bias && attention_bias;
  c.mlp_bias = r.boolean("mlp_bias", false);
  c.qk_norm = f.qk_norm;
  c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
}

// Sliding window per layer (0 = full attention). An explicit layer_types list wins; else Mistral's
// sliding_window applies to every layer, and Qwen2's use_sliding_window to layers from max_window_layers.
std::vector<int64_t> read_sliding_windows(const Reader& r, const ArchFlags& f, int64_t num_layers) {
  std::vector<int64_t> windows(num_layers, 0);
  const int64_t window = r.integer("sliding_window", 0);
  if (r.has("layer_types")) {
    const json& lt = r.raw()["layer_types"];
    if (!lt.is_array() || static_cast<int64_t>(lt.size()) != num_layers)
      throw ConfigError(cat(r.source(), ": layer_types must list one type per layer (", num_layers, ")"));
    for (int64_t i = 0; i < num_layers; ++i) {
      const std::string t = lt[i].is_string() ? lt[i].get<std::string>() : "";
      if (t == "sliding_attention") {
        if (window <= 0)
          throw ConfigError(cat(r.source(), ": layer ", i, " uses sliding attention but sliding_window is not set"));
        windows[i] = window;
      } else if (t != "full_attention") {
        throw ConfigError(cat(r.source(), ": layer_types[", i, "] = '", t,
                              "' is not supported (supported: full_attention, sliding_attention)"));
      }
    }
  } else if (f.sliding_from_window) {
    if (window > 0) windows.assign(num_layers, window);
  } else if (r.boolean("use_sliding_window", false) && window > 0) {
    // transformers: layer i slides when i >= max_window_layers (so a negative value means every layer);
    // Qwen2Config and Qwen3Config default max_window_layers to 28 when the config leaves it out.
    const int64_t first = std::max<int64_t>(r.integer("max_window_layers", 28), 0);
    for (int64_t i = first; i < num_layers; ++i) windows[i] = window;
  }
  return windows;
}

}  // namespace

ModelConfig parse_config(const std::string& json_text, const std::string& source) {
  const json j = parse_json_object(json_text, source);
  Reader r(j, source);
  ModelConfig c;
  const ArchFlags& f = read_architecture(r, c);
  read_sizes(r, c);
  read_block_flags(r, f, c);
  c.sliding_window = read_sliding_windows(r, f, c.num_layers);
  c.rope = parse_rope(r, c.max_position_embeddings);
  c.torch_dtype = r.string("torch_dtype", r.string("dtype", ""));
  c.eos_token_ids = r.int_list("eos_token_id");
  c.bos_token_id = r.integer("bos_token_id", -1);
  c.pad_token_id = r.integer("pad_token_id", -1);
  return c;
}

std::string config_to_json(const ModelConfig& c) {
  json j = {
      {"architecture", c.architecture},
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
      {"sliding_window", c.sliding_window},
      {"rope",
       {{"type", c.rope.type},
        {"theta", c.rope.theta},
        {"factor", c.rope.factor},
        {"low_freq_factor", c.rope.low_freq_factor},
        {"high_freq_factor", c.rope.high_freq_factor},
        {"original_max_position_embeddings", c.rope.original_max_position_embeddings},
        {"attention_factor", c.rope.attention_factor},
        {"beta_fast", c.rope.beta_fast},
        {"beta_slow", c.rope.beta_slow},
        {"truncate", c.rope.truncate}}},
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
