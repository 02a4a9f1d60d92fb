// kv_cache.cpp — see kv_cache.h.
#include "kv_cache.h"

#include "../common/errors.h"

namespace cf {

KVCache::KVCache(const std::vector<at::Device>& devices, int64_t batch, int64_t capacity, int64_t kv_heads,
                 int64_t head_dim, at::ScalarType dtype, const KVCache* share, int64_t shared_slots)
    : batch_(batch), capacity_(capacity) {
  const int64_t num_slots = static_cast<int64_t>(devices.size());
  if (num_slots <= 0 || batch <= 0 || capacity <= 0)
    throw InputError(cat("KV cache needs positive slots, batch and capacity, got ", num_slots, ", ", batch, ", ",
                         capacity));
  if (shared_slots < 0 || shared_slots > num_slots || (shared_slots > 0 && share == nullptr))
    throw InputError(cat("shared_slots must be in [0, ", num_slots, "] with a cache to share, got ", shared_slots));
  if (share != nullptr && shared_slots > 0) {
    if (share->batch_ != batch || share->capacity_ != capacity || share->num_slots() < shared_slots)
      throw InputError(cat("the shared cache holds ", share->num_slots(), " slots of batch ", share->batch_,
                           " and capacity ", share->capacity_, "; need ", shared_slots, " slots of batch ", batch,
                           " and capacity ", capacity));
    for (int64_t s = 0; s < shared_slots; ++s) {
      const at::Tensor& k = share->k_[s];
      if (k.size(1) != kv_heads || k.size(3) != head_dim || k.scalar_type() != dtype || k.device() != devices[s])
        throw InputError(cat("the shared cache's slot ", s, " belongs to another model or layer (heads, head size, ",
                             "dtype or device differ)"));
      k_.push_back(k);
      v_.push_back(share->v_[s]);
    }
  }
  for (int64_t s = static_cast<int64_t>(k_.size()); s < num_slots; ++s) {
    auto opts = at::TensorOptions().dtype(dtype).device(devices[s]);
    k_.push_back(at::zeros({batch, kv_heads, capacity, head_dim}, opts));
    v_.push_back(at::zeros({batch, kv_heads, capacity, head_dim}, opts));
  }
}

at::Tensor KVCache::filled_keys(int64_t slot) const { return k_.at(slot).narrow(2, 0, length_); }
at::Tensor KVCache::filled_values(int64_t slot) const { return v_.at(slot).narrow(2, 0, length_); }
at::Device KVCache::device(int64_t slot) const { return k_.at(slot).device(); }

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
  for (int64_t s = 0; s < slots; ++s) {
    const at::Tensor idx = rows.to(k_[s].device());
    out.k_.push_back(k_[s].index_select(0, idx));
    out.v_.push_back(v_[s].index_select(0, idx));
  }
  return out;
}

void KVCache::advance(int64_t t) {
  if (t < 0 || length_ + t > capacity_)
    throw InputError(cat("cannot advance the KV cache by ", t, ": it holds ", length_, " of ", capacity_, " positions"));
  length_ += t;
}

}  // namespace cf
