// masks.cpp — see masks.h.
#include "masks.h"

#include "../common/errors.h"

namespace cf {

at::Tensor in_window(const at::Tensor& query_pos, const at::Tensor& key_pos, int64_t window) {
  return key_pos > query_pos - window;
}

Masks build_masks(const std::optional<at::Tensor>& key_mask, const at::Tensor& positions,
                  const std::set<int64_t>& windows, int64_t past) {
  const int64_t B = positions.size(0), T = positions.size(1), S = past + T;
  const at::Device device = positions.device();
  std::optional<at::Tensor> padding, pattern;
  if (key_mask.has_value()) {
    const at::Tensor& km = *key_mask;
    if (km.device() != device)
      throw InputError(cat("attention_mask is on ", km.device().str(), ", model on ", device.str()));
    // 1 = a token, 0 = padding; an additive float mask (0 / -inf, transformers' 4-D kind) would read
    // inverted, so a float one must hold only 0 and 1 (checked on the host: float masks only)
    if (at::isFloatingType(km.scalar_type()) && km.numel() > 0 && ((km != 0).logical_and(km != 1)).any().item<bool>())
      throw InputError("attention_mask must hold 1 (token) and 0 (padding); this float mask holds other values "
                       "(an additive 0 / -inf mask?)");
    if (km.dim() == 3) {
      if (past != 0) throw InputError("a [batch, tokens, tokens] attention_mask needs an empty KV cache");
      if (km.size(0) != B || km.size(1) != T || km.size(2) != T)
        throw InputError(cat("attention_mask must be [", B, ", ", T, ", ", T, "], got ", shape_str(km.sizes())));
      pattern = (km != 0).view({B, 1, T, T});
    } else if (km.dim() == 2 && km.size(0) == B && km.size(1) == S) {
      padding = (km != 0).view({B, 1, 1, S});
    } else {
      throw InputError(
          cat("attention_mask must be [", B, ", ", S, "] (cached + new tokens), got ", shape_str(km.sizes())));
    }
  }
  Masks masks;
  auto dev_long = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor q_idx = at::arange(past, S, dev_long).view({T, 1});
  at::Tensor k_idx = at::arange(0, S, dev_long).view({1, S});
  for (int64_t window : windows) {
    if (!padding && !pattern && window == 0 && (past == 0 || T == 1)) {
      masks[window] = std::nullopt;  // plain causal (or a single query seeing everything)
      continue;
    }
    at::Tensor allowed;
    if (pattern) {
      allowed = *pattern;
      if (window > 0) {  // by position ids: packed segments restart their positions
        at::Tensor near = in_window(positions.unsqueeze(2), positions.unsqueeze(1), window);  // [B, T, T]
        allowed = allowed.logical_and(near.view({B, 1, T, T}));
      }
    } else {
      allowed = k_idx <= q_idx;
      if (window > 0) allowed = allowed.logical_and(in_window(q_idx, k_idx, window));
      allowed = allowed.view({1, 1, T, S});
      if (padding) allowed = allowed.logical_and(*padding);
    }
    // A query that may see nothing (a left-pad position) sees itself instead, so no NaN is made.
    at::Tensor empty = allowed.any(-1, /*keepdim=*/true).logical_not();
    allowed = allowed.logical_or(empty.logical_and((k_idx == q_idx).view({1, 1, T, S})));
    masks[window] = allowed;
  }
  return masks;
}

Masks decode_step_masks(const at::Tensor& key_mask, const at::Tensor& index, const std::set<int64_t>& windows) {
  const int64_t B = key_mask.size(0), C = key_mask.size(1);
  const at::Tensor base = key_mask.view({B, 1, 1, C});
  Masks masks;
  for (int64_t window : windows) {
    if (window == 0) {
      masks[window] = base;
    } else {
      at::Tensor cols = at::arange(C, index.options());
      masks[window] = base.logical_and(in_window(index, cols, window).view({1, 1, 1, C}));
    }
  }
  return masks;
}

}  // namespace cf
