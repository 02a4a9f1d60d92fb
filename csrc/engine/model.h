// model.h — the decoder forward pass along a layer path. forward() is a loop over the path's
// slots; each slot runs one layer's weights with its own KV cache slot. No weights are copied:
// a layer that appears twice in a path runs the same tensors twice.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <optional>
#include <string>

#include "config.h"
#include "kv_cache.h"
#include "layer_path.h"
#include "weights.h"

namespace cf {

class Engine {
 public:
  Engine(const std::string& config_json, const std::string& config_source,
         const std::map<std::string, at::Tensor>& tensors);

  // input_ids [B, T] int64; positions [B, T] int64; key_mask [B, S] (S = cache length + T; nonzero =
  // attend) or None; cache: one slot per path entry, or None for a one-shot forward.
  // Returns logits [B, T, V] (or [B, 1, V] when last_only).
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& positions,
                     const std::optional<at::Tensor>& key_mask, const LayerPath& path, KVCache* cache,
                     bool last_only) const;

  // Same pass, returning the final hidden state [B, T, H] after the last slot (before the norm).
  at::Tensor hidden(const at::Tensor& input_ids, const at::Tensor& positions,
                    const std::optional<at::Tensor>& key_mask, const LayerPath& path, KVCache* cache) const;

  KVCache new_cache(int64_t num_slots, int64_t batch, int64_t capacity) const;

  const ModelConfig& config() const { return cfg_; }
  std::string config_json() const { return config_to_json(cfg_); }
  const Weights& weights() const { return w_; }
  // The tensors one layer runs with (for tests that check storage sharing).
  std::map<std::string, at::Tensor> layer_tensors(int64_t layer) const;

 private:
  at::Tensor run(const at::Tensor& input_ids, const at::Tensor& positions, const std::optional<at::Tensor>& key_mask,
                 const LayerPath& path, KVCache* cache) const;
  at::Tensor block(const at::Tensor& h, const LayerWeights& L, const at::Tensor& cos, const at::Tensor& sin,
                   const std::optional<at::Tensor>& mask, KVCache* cache, int64_t slot) const;
  at::Tensor attention(const at::Tensor& x, const LayerWeights& L, const at::Tensor& cos, const at::Tensor& sin,
                       const std::optional<at::Tensor>& mask, KVCache* cache, int64_t slot) const;

  ModelConfig cfg_;
  Weights w_;
  at::Tensor inv_freq_;  // [D/2] fp32 on the weights' device
};

}  // namespace cf
