// weights.h — binds a name->tensor dict (Hugging Face names) to the model's layout. Every tensor
// goes through one checked accessor: name template + layer + dtype + device + shape, and a
// mismatch names the tensor with expected vs actual. Tensors are held by handle: never copied.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

#include "config.h"

namespace cf {

struct LayerWeights {
  at::Tensor input_norm;                  // [H]
  at::Tensor wq, wk, wv, wo;              // [Hq*D, H], [Hkv*D, H], [Hkv*D, H], [H, Hq*D]
  at::Tensor bq, bk, bv, bo;              // biases or undefined
  at::Tensor q_norm, k_norm;              // [D] (Qwen3) or undefined
  at::Tensor post_norm;                   // [H]
  at::Tensor w_gate, w_up, w_down;        // [I, H], [I, H], [H, I]
  at::Tensor b_gate, b_up, b_down;        // biases or undefined
};

struct Weights {
  at::Tensor embed;       // [V, H]
  at::Tensor final_norm;  // [H]
  at::Tensor lm_head;     // [V, H] (the embedding itself when tied)
  std::vector<LayerWeights> layers;
  at::ScalarType dtype;
  at::Device device = at::kCPU;
};

Weights bind_weights(const ModelConfig& cfg, const std::map<std::string, at::Tensor>& tensors);

}  // namespace cf
