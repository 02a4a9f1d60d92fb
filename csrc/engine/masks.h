// masks.h — which keys each query attends to in one engine call: causal order, padding (a key
// mask), packed patterns, and each layer's sliding window. The window rule lives in one function,
// in_window, used by the dynamic path and the fixed-shape decode step alike. Masks are bool
// (true = attend), [B, 1, T, S] to broadcast over heads. Only full and sliding-window attention.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <optional>
#include <set>

namespace cf {

// sliding window (0 = full attention) -> mask [B, 1, T, S], or nullopt for plain causal attention.
using Masks = std::map<int64_t, std::optional<at::Tensor>>;

// The sliding-window rule, transformers' semantics: a sliding layer with window W > 0 lets a query
// at position p see keys at positions > p - W (with causal order: the W keys p-W+1 .. p). Positions
// are int64 tensors that broadcast against each other (cache columns, or position ids where packed
// segments restart them); returns the broadcast bool "key within the query's window".
at::Tensor in_window(const at::Tensor& query_pos, const at::Tensor& key_pos, int64_t window);

// One mask per window in `windows`, for T new tokens after `past` cached ones (S = past + T).
// positions [B, T] int64 on the model's device (checked by the caller). key_mask: [B, S] (nonzero =
// a real token; causal order and windows by cache column added here), or [B, T, T] (the complete
// pattern, e.g. several continuations packed after one shared context; empty cache only; windows
// by position-id distance), or none. A query left with no key (a left-pad position) sees itself,
// so no NaN is made. Throws InputError on a key_mask of the wrong shape or device.
Masks build_masks(const std::optional<at::Tensor>& key_mask, const at::Tensor& positions,
                  const std::set<int64_t>& windows, int64_t past);

// The masks of one fixed-shape decode step, by cache column: key_mask [B, C] bool (true = a real
// token, the step's own column already set), index [1] int64, the step's column (on the device:
// no host synchronisation). Causal order is key_mask's: later columns are not real yet.
Masks decode_step_masks(const at::Tensor& key_mask, const at::Tensor& index, const std::set<int64_t>& windows);

}  // namespace cf
