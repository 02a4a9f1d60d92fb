// kv_cache.h — one key/value cache per slot of a layer path: a layer that runs twice has two.
// Preallocated to a fixed capacity; appends copy into place, so decoding allocates nothing.
// A cache may share its first slots' tensors with another cache (paths with a common prefix):
// sharing is safe while the two are used one after the other, never interleaved. Each slot lives
// on its own device (the device of the layer it runs, when a model is split over devices).
// A slot of a linear-attention layer (Gated DeltaNet) holds that slot's state instead of keys and
// values: its causal conv's last inputs and its recurrent state, updated in place as tokens run.
// Such a state summarises everything the slot has seen, so a shared linear slot is copied, not
// aliased: the two caches then go on from the same state without overwriting each other's. The
// copy is taken when the sharing cache is made, so make it after the shared slots have run.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace cf {

// A Gated DeltaNet slot's state: conv [B, channels, kernel] (the compute dtype), recurrent
// [B, v_heads, k_dim, v_dim] (fp32, as transformers keeps it).
struct LinearStateShape {
  int64_t channels = 0, kernel = 0, v_heads = 0, k_dim = 0, v_dim = 0;
};

class KVCache {
 public:
  // devices: one per slot. layers: the layer each slot runs (the path the cache is for), checked
  // against every path it is used with, shared with or placed from. A shared slot must sit on the
  // device asked for it. linear: one flag per slot (empty = none), 1 for a linear-attention slot
  // with the state `shape` says.
  KVCache(const std::vector<at::Device>& devices, const std::vector<int64_t>& layers, int64_t batch, int64_t capacity, int64_t kv_heads,
          int64_t head_dim, at::ScalarType dtype, const KVCache* share = nullptr, int64_t shared_slots = 0,
          const std::vector<int64_t>& linear = {}, const LinearStateShape& shape = {});

  // Stores k, v [B, Hkv, T, D] for `slot` at positions [length, length+T) and returns views of
  // the slot's keys and values over [0, length+T).
  std::pair<at::Tensor, at::Tensor> append(int64_t slot, const at::Tensor& k, const at::Tensor& v);
  // Stores k, v [B, Hkv, 1, D] at the column held by `index` (a 1-element int64 tensor on the
  // cache's device: no host sync, so a CUDA graph can replay it) and returns the slot's whole
  // keys and values [B, Hkv, capacity, D]; unwritten columns must be masked by the caller.
  std::pair<at::Tensor, at::Tensor> append_at(int64_t slot, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& index);
  // Called once per forward, after every slot appended T new positions.
  void advance(int64_t t);
  // Back to empty: length 0, linear slots' states zeroed.
  void reset();
  // A new cache holding copies of rows `rows` (1-D int64 batch indices) of the first `slots`
  // slots, at this cache's length and capacity: a sub-batch that goes on along its own path.
  KVCache select_rows(const at::Tensor& rows, int64_t slots) const;
  // Copies src's positions [0, length) (length < 0: src.length) of slots [first_slot, end_slot)
  // (end_slot < 0: all) into `rows` rows from `row` (rows < 0: src.batch; a batch-1 source may fill
  // several) and columns [column, column + length) of this cache (a linear slot's state rows as
  // they are): caches of several batches, right-aligned, become one batch; a prompt head computed
  // once goes into every row. Refuses slots this cache borrows from another (shared_slots); the
  // length is unchanged.
  void place(const KVCache& src, int64_t row, int64_t column, int64_t first_slot = 0, int64_t length = -1,
             int64_t rows = -1, int64_t end_slot = -1);
  // Shrinks the batch to rows.size() rows: row i becomes row rows[i] (distinct indices). Where
  // each rows[i] is i or at least rows.size(), the rows move in place (no allocation, only the
  // moved rows copied); otherwise, and for slots shared with another cache either way, the kept
  // rows are copied into new tensors, so no other cache sees a change.
  void keep_rows(const std::vector<int64_t>& rows);

  int64_t length() const { return length_; }
  int64_t capacity() const { return capacity_; }
  int64_t num_slots() const { return static_cast<int64_t>(k_.size()); }
  int64_t batch() const { return batch_; }
  const at::Tensor& keys(int64_t slot) const { return k_[checked(slot)]; }
  // The slot's filled keys / values [B, Hkv, length, D] (views, for tests and inspection).
  at::Tensor filled_keys(int64_t slot) const;
  at::Tensor filled_values(int64_t slot) const;
  at::Device device(int64_t slot) const;
  // The layer slot `slot` runs: the path's layer at that slot when the cache was made.
  int64_t layer(int64_t slot) const { return layers_[checked(slot)]; }
  bool linear(int64_t slot) const { return conv_[checked(slot)].defined(); }
  // slot, or InputError naming it when it is not one of this cache's
  int64_t checked(int64_t slot) const;
  // A linear slot's conv inputs and recurrent state, updated in place by the engine.
  at::Tensor& conv_state(int64_t slot);
  at::Tensor& recurrent_state(int64_t slot);

 private:
  KVCache() = default;
  std::vector<at::Tensor> k_, v_;  // each [B, Hkv, capacity, D]; undefined for a linear slot
  std::vector<at::Tensor> conv_, state_;  // a linear slot's state; undefined for an attention slot
  std::vector<int64_t> layers_;  // the layer each slot runs
  int64_t batch_ = 0, capacity_ = 0, length_ = 0;
  int64_t shared_slots_ = 0;  // the first slots' tensors are another cache's
  mutable bool lent_ = false;  // another cache shares some of this one's slots
};

}  // namespace cf
