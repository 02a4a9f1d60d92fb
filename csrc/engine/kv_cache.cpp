// kv_cache.cpp — see kv_cache.h.
#include "kv_cache.h"

#include "../common/errors.h"

namespace cf {

KVCache::KVCache(const std::vector<at::Device>& devices, const std::vector<int64_t>& layers, int64_t batch, int64_t capacity, int64_t kv_heads,
                 int64_t head_dim, at::ScalarType dtype, const KVCache* share, int64_t shared_slots,
                 const std::vector<int64_t>& linear, const LinearStateShape& shape)
    : layers_(layers), batch_(batch), capacity_(capacity), shared_slots_(share != nullptr ? shared_slots : 0) {
  const int64_t num_slots = static_cast<int64_t>(devices.size());
  if (static_cast<int64_t>(layers.size()) != num_slots)
    throw InputError(cat("KV cache: ", layers.size(), " layers for ", num_slots, " slots"));
  if (num_slots <= 0 || batch <= 0 || capacity <= 0)
    throw InputError(cat("KV cache needs positive slots, batch and capacity, got ", num_slots, ", ", batch, ", ",
                         capacity));
  if (shared_slots < 0 || shared_slots > num_slots || (shared_slots > 0 && share == nullptr))
    throw InputError(cat("shared_slots must be in [0, ", num_slots, "] with a cache to share, got ", shared_slots));
  if (!linear.empty() && static_cast<int64_t>(linear.size()) != num_slots)
    throw InputError(cat("KV cache: ", linear.size(), " linear-slot flags for ", num_slots, " slots"));
  if (share != nullptr && shared_slots > 0 &&
      (share->batch_ != batch || share->capacity_ != capacity || share->num_slots() < shared_slots))
    throw InputError(cat("the shared cache holds ", share->num_slots(), " slots of batch ", share->batch_,
                         " and capacity ", share->capacity_, "; need ", shared_slots, " slots of batch ", batch,
                         " and capacity ", capacity));
  for (int64_t s = 0; s < num_slots; ++s) {
    const bool lin = !linear.empty() && linear[s];
    auto opts = at::TensorOptions().dtype(dtype).device(devices[s]);
    if (s < shared_slots) {
      const bool other_lin = share->linear(s);
      const at::Tensor& probe = other_lin ? share->conv_[s] : share->k_[s];
      const bool fits = other_lin == lin && probe.scalar_type() == dtype && probe.device() == devices[s] &&
                        (lin ? probe.size(1) == shape.channels && probe.size(2) == shape.kernel
                             : probe.size(1) == kv_heads && probe.size(3) == head_dim);
      if (!fits)
        throw InputError(cat("the shared cache's slot ", s, " belongs to another model or layer (kind, heads, head ",
                             "size, dtype or device differ)"));
      if (share->layers_[s] != layers[s])
        throw InputError(cat("the shared cache's slot ", s, " holds layer ", share->layers_[s], " but this path runs layer ",
                             layers[s], " there: only a common prefix of two paths can be shared"));
      share->lent_ = true;
      k_.push_back(share->k_[s]);
      v_.push_back(share->v_[s]);
      conv_.push_back(lin ? share->conv_[s].clone() : at::Tensor());  // a state is copied, never aliased
      state_.push_back(lin ? share->state_[s].clone() : at::Tensor());
    } else if (lin) {
      k_.emplace_back();
      v_.emplace_back();
      conv_.push_back(at::zeros({batch, shape.channels, shape.kernel}, opts));
      state_.push_back(at::zeros({batch, shape.v_heads, shape.k_dim, shape.v_dim}, opts.dtype(at::kFloat)));
    } else {
      k_.push_back(at::zeros({batch, kv_heads, capacity, head_dim}, opts));
      v_.push_back(at::zeros({batch, kv_heads, capacity, head_dim}, opts));
      conv_.emplace_back();
      state_.emplace_back();
    }
  }
}

void KVCache::reset() {
  length_ = 0;
  for (size_t s = 0; s < conv_.size(); ++s)
    if (conv_[s].defined()) {
      conv_[s].zero_();
      state_[s].zero_();
    }
}

at::Tensor& KVCache::conv_state(int64_t slot) {
  if (!linear(slot)) throw InputError(cat("KV cache slot ", slot, " is an attention slot: it has no linear state"));
  return conv_[slot];
}

at::Tensor& KVCache::recurrent_state(int64_t slot) {
  if (!linear(slot)) throw InputError(cat("KV cache slot ", slot, " is an attention slot: it has no linear state"));
  return state_[slot];
}

at::Tensor KVCache::filled_keys(int64_t slot) const {
  if (linear(slot)) throw InputError(cat("KV cache slot ", slot, " is a linear-attention slot: it holds no keys"));
  return k_.at(slot).narrow(2, 0, length_);
}
at::Tensor KVCache::filled_values(int64_t slot) const {
  if (linear(slot)) throw InputError(cat("KV cache slot ", slot, " is a linear-attention slot: it holds no values"));
  return v_.at(slot).narrow(2, 0, length_);
}
at::Device KVCache::device(int64_t slot) const { return linear(slot) ? state_[slot].device() : k_.at(slot).device(); }

int64_t KVCache::checked(int64_t slot) const {
  if (slot < 0 || slot >= num_slots())
    throw InputError(cat("KV cache slot ", slot, " is out of range: the cache has ", num_slots(), " slots"));
  return slot;
}

std::pair<at::Tensor, at::Tensor> KVCache::append(int64_t slot, const at::Tensor& k, const at::Tensor& v) {
  const int64_t t = k.size(2);
  k_[slot].narrow(2, length_, t).copy_(k);
  v_[slot].narrow(2, length_, t).copy_(v);
  return {k_[slot].narrow(2, 0, length_ + t), v_[slot].narrow(2, 0, length_ + t)};
}

std::pair<at::Tensor, at::Tensor> KVCache::append_at(int64_t slot, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& index) {
  k_[slot].index_copy_(2, index, k);
  v_[slot].index_copy_(2, index, v);
  return {k_[slot], v_[slot]};
}

KVCache KVCache::select_rows(const at::Tensor& rows, int64_t slots) const {
  if (slots < 0 || slots > num_slots())
    throw InputError(cat("select_rows: slots must be in [0, ", num_slots(), "], got ", slots));
  if (rows.dim() != 1 || rows.scalar_type() != at::kLong || rows.numel() == 0)
    throw InputError("select_rows: rows must be a non-empty 1-D int64 tensor of batch indices");
  const int64_t lo = rows.min().item<int64_t>(), hi = rows.max().item<int64_t>();
  if (lo < 0 || hi >= batch_)
    throw InputError(cat("select_rows: row index ", lo < 0 ? lo : hi, " is outside the cache's batch of ", batch_));
  KVCache out;
  out.batch_ = rows.numel();
  out.capacity_ = capacity_;
  out.length_ = length_;
  out.layers_.assign(layers_.begin(), layers_.begin() + slots);
  for (int64_t s = 0; s < slots; ++s) {
    const at::Tensor idx = rows.to(device(s));
    const bool lin = linear(s);
    out.k_.push_back(lin ? at::Tensor() : k_[s].index_select(0, idx));
    out.v_.push_back(lin ? at::Tensor() : v_[s].index_select(0, idx));
    out.conv_.push_back(lin ? conv_[s].index_select(0, idx) : at::Tensor());
    out.state_.push_back(lin ? state_[s].index_select(0, idx) : at::Tensor());
  }
  return out;
}

void KVCache::place(const KVCache& src, int64_t row, int64_t column, int64_t first_slot, int64_t length,
                    int64_t rows, int64_t end_slot) {
  const int64_t n = length < 0 ? src.length_ : length, count = rows < 0 ? src.batch_ : rows;
  const int64_t end = end_slot < 0 ? num_slots() : end_slot;
  if (src.num_slots() != num_slots())
    throw InputError(cat("place: the source cache has ", src.num_slots(), " slots, this one ", num_slots()));
  if (first_slot < shared_slots_ || first_slot > end || end > num_slots())
    throw InputError(cat("place: slots [", first_slot, ", ", end, ") must lie in [", shared_slots_, ", ", num_slots(),
                         "] (the slots before ", shared_slots_, " are another cache's)"));
  if (n > src.capacity_) throw InputError(cat("place: ", n, " positions asked of a cache of capacity ", src.capacity_));
  if (count != src.batch_ && src.batch_ != 1)
    throw InputError(cat("place: ", count, " rows from a source of batch ", src.batch_, " (only a batch of 1 fills several)"));
  if (&src == this) throw InputError("place: a cache cannot be placed into itself (copy it first: select_rows)");
  if (row < 0 || count > batch_ - row || column < 0 || n > capacity_ - column)
    throw InputError(cat("place: ", count, " rows x ", n, " positions at row ", row, ", column ", column,
                         " do not fit a cache of batch ", batch_, " and capacity ", capacity_));
  for (int64_t s = first_slot; s < end; ++s) {
    if (src.layers_[s] != layers_[s])
      throw InputError(cat("place: slot ", s, " of the source cache holds layer ", src.layers_[s], ", this one layer ",
                           layers_[s], " (caches of different paths)"));
    const bool lin = linear(s);
    const at::Tensor& mine = lin ? state_[s] : k_[s];
    const at::Tensor& theirs = src.linear(s) ? src.state_[s] : src.k_[s];
    const bool same = lin == src.linear(s) && mine.device() == theirs.device() &&
                      mine.scalar_type() == theirs.scalar_type() &&
                      (lin ? mine.sizes().slice(1) == theirs.sizes().slice(1) &&
                                 conv_[s].sizes().slice(1) == src.conv_[s].sizes().slice(1)
                           : mine.size(1) == theirs.size(1) && mine.size(3) == theirs.size(3));
    if (!same) throw InputError(cat("place: slot ", s, " differs in kind, shape, dtype or device between the two caches"));
    if (mine.is_alias_of(theirs))  // one lends the slot to the other: the copy would overlap itself
      throw InputError(cat("place: slot ", s, " of the source shares its memory with this cache's (one lends it to the ",
                           "other): copy the source first (select_rows)"));
    if (lin) {  // copy_ broadcasts a batch-1 source over the rows
      conv_[s].narrow(0, row, count).copy_(src.conv_[s]);
      state_[s].narrow(0, row, count).copy_(src.state_[s]);
    } else {
      k_[s].narrow(0, row, count).narrow(2, column, n).copy_(src.k_[s].narrow(2, 0, n));
      v_[s].narrow(0, row, count).narrow(2, column, n).copy_(src.v_[s].narrow(2, 0, n));
    }
  }
}

void KVCache::keep_rows(const std::vector<int64_t>& rows) {
  const int64_t n = static_cast<int64_t>(rows.size());
  if (n == 0) throw InputError("keep_rows: keep at least one row");
  std::vector<bool> seen(batch_, false);
  bool in_place = true;
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i] < 0 || rows[i] >= batch_ || seen[rows[i]])
      throw InputError(cat("keep_rows: rows must be distinct indices into the batch of ", batch_, "; got ", rows[i],
                           " at ", i));
    seen[rows[i]] = true;
    in_place = in_place && (rows[i] == i || rows[i] >= n);  // a source is never a destination
  }
  const at::Tensor index = at::tensor(rows, at::kLong);
  for (int64_t s = 0; s < num_slots(); ++s)
    for (at::Tensor* t : {&k_[s], &v_[s], &conv_[s], &state_[s]}) {
      if (!t->defined()) continue;
      if (!in_place || s < shared_slots_ || lent_) {
        *t = t->index_select(0, index.to(t->device()));
        continue;
      }
      for (int64_t i = 0; i < n; ++i)
        if (rows[i] != i) t->select(0, i).copy_(t->select(0, rows[i]));
      *t = t->narrow(0, 0, n);
    }
  shared_slots_ = 0;
  lent_ = false;
  batch_ = n;
}

void KVCache::advance(int64_t t) {
  if (t < 0 || t > capacity_ - length_)  // (not length_ + t: it can overflow)
    throw InputError(cat("cannot advance the KV cache by ", t, ": it holds ", length_, " of ", capacity_, " positions"));
  length_ += t;
}

}  // namespace cf
