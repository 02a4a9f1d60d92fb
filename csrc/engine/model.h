// model.h — the decoder forward pass along a layer path. forward() is a loop over the path's
// slots; each slot runs one layer's weights with its own KV cache slot. No weights are copied:
// a layer that appears twice in a path runs the same tensors twice. A model may be split over
// devices (each layer's weights on one device, see weights.h): a slot runs where its layer lives,
// with its cache slot there; hidden states move only when consecutive slots sit on different
// devices, and every call takes its inputs and returns its outputs on the main device. A
// mixture-of-experts MLP runs its experts as grouped products with no host sync where the GPU, the
// experts' layout and the batch allow (Engine::expert_route: decode can be a CUDA graph), else loops
// over the experts, reading how many rows each got on the host (one sync per sparse layer). A
// linear-attention (Gated DeltaNet) layer keeps a state per slot in the cache (linear_attention.h)
// instead of keys and values.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <string>

#include "config.h"
#include "kv_cache.h"
#include "layer_path.h"
#include "masks.h"
#include "weights.h"

namespace cf {

// RoPE frequencies of one setup: inv_freq [rotary_dim / 2] fp32; LongRoPE adds the long table,
// used in a call whose largest position + 1 passes original_max.
struct RopeFreqs {
  at::Tensor inv_freq, inv_freq_long;
  double attention_factor = 1.0;
  int64_t original_max = 0;
};

// What one call's positions give every layer: cos/sin [B, 1, T, rotary_dim] per RoPE setup
// (local_* for Gemma 3's sliding layers, else undefined) and Ministral3's query scale [B, 1, T, 1]
// (undefined when the family has none).
struct PositionTables {
  at::Tensor cos, sin, cos_local, sin_local, query_scale;
};

// What one call gives every slot, on one device: position tables, masks by window, the decode
// step's write column (undefined = append at the cache's length), and which of the call's tokens
// are real [B, T] (linear-attention layers zero the others' inputs; undefined = all).
struct SlotInputs {
  at::Device device = at::kCPU;
  PositionTables pt;
  Masks masks;
  at::Tensor write_index;
  at::Tensor tokens;
  // masks as SDPA on a GPU takes them, 0 / -inf in the compute dtype: made by the first slot that
  // needs one (Engine::attention_mask), reused by the others
  mutable std::map<int64_t, at::Tensor> additive;
};

// A call's SlotInputs, made on the main device and copied to another device the first time a slot
// runs there (a one-device model never copies). References stay valid as devices are added.
class CallInputs {
 public:
  explicit CallInputs(SlotInputs main) { on_.push_back(std::move(main)); }
  const SlotInputs& on(at::Device device);

 private:
  std::deque<SlotInputs> on_;
};

class Engine {
 public:
  // packed: {name: ggml type} of the tensors held as packed ggml blocks (see weights.h);
  // q8_activations: their CPU products of few rows round x to 8 bits where the type allows.
  Engine(const std::string& config_json, const std::string& config_source,
         const std::map<std::string, at::Tensor>& tensors, const std::map<std::string, int32_t>& packed = {},
         bool q8_activations = false);

  // input_ids [B, T] int64; positions [B, T] int64; key_mask [B, S] (S = cache length + T; nonzero =
  // a real token) or [B, T, T] (a full pattern, nonzero = attend; empty cache only) or None; cache: one slot per path entry, or None for a one-shot forward.
  // Returns logits [B, T, V] (or [B, 1, V] when last_only).
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& positions,
                     const std::optional<at::Tensor>& key_mask, const LayerPath& path, KVCache* cache,
                     bool last_only) const;

  // Same pass, returning the final hidden state [B, T, H] after the last slot (before the norm).
  at::Tensor hidden(const at::Tensor& input_ids, const at::Tensor& positions,
                    const std::optional<at::Tensor>& key_mask, const LayerPath& path, KVCache* cache) const;

  // The pieces forward() is made of, for callers that reuse work between paths (sweeps):
  // embed: input_ids [B, T] -> h [B, T, H]. run_slots: runs slots [begin, end) of `path` on h
  // [B, T, H] (the output of slots [0, begin)), appending this call's T keys/values to the cache
  // slots it runs at the cache's current length, without advancing it (call KVCache::advance once
  // all slots have run). head: h [B, T, H] -> logits [B, T, V].
  at::Tensor embed(const at::Tensor& input_ids) const;
  at::Tensor run_slots(const at::Tensor& h, const at::Tensor& positions, const std::optional<at::Tensor>& key_mask,
                       const LayerPath& path, KVCache* cache, int64_t begin, int64_t end) const;
  at::Tensor head(const at::Tensor& h) const;

  // One decode step in fixed shapes with no host synchronisation, so a CUDA graph can capture and
  // replay it. token [B, 1] int64 (ids the model sampled itself: not range-checked, which would
  // sync); positions [B, 1] int64; key_mask [B, capacity] bool (true = a real token; the column
  // `index` is set here); index [1] int64, the cache column this step writes. Attention spans the
  // cache's whole capacity under key_mask. Afterwards positions and index are incremented in
  // place (the cache's host-side length is not: call KVCache::advance(1)). Returns logits [B, V].
  at::Tensor decode_step(const at::Tensor& token, const at::Tensor& positions, const at::Tensor& key_mask,
                         const at::Tensor& index, const LayerPath& path, KVCache& cache) const;

  // A cache for `path`: one slot per entry, each on the device of the layer it runs. With `share`,
  // slots [0, shared_slots) are the very tensors of share's first slots (no copy): used when paths
  // agree on their first slots.
  KVCache new_cache(const LayerPath& path, int64_t batch, int64_t capacity, const KVCache* share = nullptr,
                    int64_t shared_slots = 0) const;
  // Where layer `layer`'s weights live; the main device (embedding, head, inputs, outputs).
  at::Device layer_device(int64_t layer) const;
  at::Device device() const { return w_.device; }

  const ModelConfig& config() const { return cfg_; }
  std::string config_json() const { return config_to_json(cfg_); }
  const Weights& weights() const { return w_; }
  // The tensors one layer runs with (for tests that check storage sharing).
  std::map<std::string, at::Tensor> layer_tensors(int64_t layer) const;
  // The embedding, final norm and head as the engine holds them (its own converted copies, or the
  // tensors given; the head is the embedding when tied).
  std::map<std::string, at::Tensor> main_tensors() const;
  // {"qkv": attention layers whose q / k / v run as one product, "gate_up": gated MLPs (experts and
  // shared experts included) whose gate / up do}: a checkpoint's fused tensors or rows laid out so.
  std::map<std::string, int64_t> fused_products() const;
  // The tensors given to the constructor that this model does not use (name order).
  const std::vector<std::string>& unused_tensors() const { return w_.unread; }
  // Whether every mixture-of-experts layer runs a call of `tokens` rows (a decode step: the batch)
  // without reading its routing on the host (its experts as grouped products: expert_route), so
  // that step can be a CUDA graph.
  bool moe_without_host_sync(int64_t tokens = 1) const;

 private:
  void check_cache(const KVCache* cache, const LayerPath& path, int64_t B, int64_t T) const;
  std::pair<at::Tensor, at::Tensor> rope_tables(const at::Tensor& positions, const RopeFreqs& freqs) const;
  PositionTables position_tables(const at::Tensor& positions) const;
  // ids [B, T] -> embeddings (Gemma: times sqrt(hidden_size) in the compute dtype)
  at::Tensor embed_unchecked(const at::Tensor& ids) const;
  at::Tensor real_tokens(const std::optional<at::Tensor>& key_mask, const LayerPath& path, int64_t begin, int64_t end,
                         int64_t T) const;
  // The distinct sliding windows (0 = full attention) of the layers in slots [begin, end).
  std::set<int64_t> windows(const LayerPath& path, int64_t begin, int64_t end) const;
  // Slots [begin, end) of path, each through block() on its layer's device; used by run_slots and
  // decode_step alike. x comes and goes on the main device.
  at::Tensor run_path(at::Tensor x, const LayerPath& path, int64_t begin, int64_t end, CallInputs& inputs,
                      KVCache* cache) const;
  // One layer on `in` (its masks, positions, write column, real tokens); cache slot `slot`.
  at::Tensor block(const at::Tensor& h, int64_t layer, const SlotInputs& in, KVCache* cache, int64_t slot) const;
  std::optional<at::Tensor> attention_mask(const SlotInputs& in, int64_t window) const;
  at::Tensor mlp(const at::Tensor& x, const LayerWeights& L) const;
  at::Tensor moe(const at::Tensor& x, const LayerWeights& L) const;
  enum class ExpertRoute { kLoop, kGroupedMm, kGroupedGemv };
  ExpertRoute expert_route(const LayerWeights& L, at::Device device, at::ScalarType dtype, int64_t tokens) const;
  at::Tensor experts_looped(const at::Tensor& flat, const LayerWeights& L, const at::Tensor& weights,
                            const at::Tensor& experts) const;
  at::Tensor experts_grouped(const at::Tensor& flat, const LayerWeights& L, const at::Tensor& weights,
                             const at::Tensor& experts, bool gemv) const;
  std::pair<at::Tensor, at::Tensor> route(const at::Tensor& flat, const LayerWeights& L) const;
  std::array<at::Tensor, 3> qkv_projections(const at::Tensor& x, const LayerWeights& L) const;
  at::Tensor gated_mlp(const at::Tensor& x, const MlpWeights& w) const;
  // write_index: undefined = append at the cache's length; else KVCache::append_at that column.
  at::Tensor attention(const at::Tensor& x, int64_t layer, const PositionTables& pt,
                       const std::optional<at::Tensor>& mask, KVCache* cache, int64_t slot,
                       const at::Tensor& write_index) const;
  // Gated DeltaNet: tokens [B, T] or undefined (real tokens); the slot's conv and recurrent state
  // in `cache` (none: zero state, nothing kept).
  at::Tensor linear_attention(at::Tensor x, int64_t layer, const at::Tensor& tokens, KVCache* cache, int64_t slot) const;
  // Qwen3-Next's grouped in_proj_qkvz / in_proj_ba, or Qwen3.5's four projections -> (q|k|v
  // channels [B, T, C], z [B, T, Hv, Dv], b, a [B, T, Hv]).
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_projections(const at::Tensor& x,
                                                                                const LayerWeights& L) const;

  ModelConfig cfg_;
  Weights w_;
  RopeFreqs rope_, rope_local_;  // rope_local_ for Gemma 3's sliding layers
};

}  // namespace cf
