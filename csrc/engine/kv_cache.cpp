// kv_cache.cpp — see kv_cache.h.
#include "kv_cache.h"

#include "error.h"

namespace cf {

KVCache::KVCache(int64_t num_slots, int64_t batch, int64_t capacity, int64_t kv_heads, int64_t head_dim,
                 at::ScalarType dtype, at::Device device)
    : batch_(batch), capacity_(capacity) {
  if (num_slots <= 0 || batch <= 0 || capacity <= 0)
    throw InputError(cat("KV cache needs positive slots, batch and capacity, got ", num_slots, ", ", batch, ", ",
                         capacity));
  auto opts = at::TensorOptions().dtype(dtype).device(device);
  for (int64_t s = 0; s < num_slots; ++s) {
    k_.push_back(at::zeros({batch, kv_heads, capacity, head_dim}, opts));
    v_.push_back(at::zeros({batch, kv_heads, capacity, head_dim}, opts));
  }
}

std::pair<at::Tensor, at::Tensor> KVCache::append(int64_t slot, const at::Tensor& k, const at::Tensor& v) {
  const int64_t t = k.size(2);
  k_[slot].narrow(2, length_, t).copy_(k);
  v_[slot].narrow(2, length_, t).copy_(v);
  return {k_[slot].narrow(2, 0, length_ + t), v_[slot].narrow(2, 0, length_ + t)};
}

void KVCache::advance(int64_t t) { length_ += t; }

void KVCache::copy_prefix_from(const KVCache& other, int64_t n) {
  if (other.batch_ != batch_ || other.capacity_ < other.length_ || capacity_ < other.length_ || n > num_slots() ||
      n > other.num_slots())
    throw InputError("copy_prefix_from: caches differ in batch or are too small");
  for (int64_t s = 0; s < n; ++s) {
    k_[s].narrow(2, 0, other.length_).copy_(other.k_[s].narrow(2, 0, other.length_));
    v_[s].narrow(2, 0, other.length_).copy_(other.v_[s].narrow(2, 0, other.length_));
  }
  length_ = other.length_;
}

}  // namespace cf
