// weights.h — binds a name->tensor dict (Hugging Face names) to the model's layout. Every tensor
// goes through one checked accessor: name template + layer + dtype + device + shape, and a
// mismatch names the tensor with expected vs actual. A layer's tensors live on one device (the
// device of its input_layernorm.weight); the embedding, final norm and lm_head on the model's main
// device (the embedding's): a split placement is read from where the tensors are, not passed
// separately.
// Tensors are held by handle: never copied,
// except Gemma's norm weights, which are held as (1 + w) (vectors, [H] or [D] each). Fused
// projections (Phi-3's qkv_proj, gate_up_proj) are held as they are and run as one matmul.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

#include "config.h"

namespace cf {

struct LayerWeights {
  at::Tensor input_norm;                  // [H]
  at::Tensor wq, wk, wv, wo;              // [Hq*D, H], [Hkv*D, H], [Hkv*D, H], [H, Hq*D] (wq/wk/wv undefined when fused)
  at::Tensor wqkv;                        // [(Hq + 2 Hkv) * D, H]: q, k, v rows (Phi-3), or undefined
  at::Tensor bq, bk, bv, bo;              // biases or undefined
  at::Tensor q_norm, k_norm;              // [D] (Qwen3, Gemma 3) or undefined
  at::Tensor post_attn_norm;              // [H]: Gemma 2/3's norm of the attention output, or undefined
  at::Tensor post_norm;                   // [H]: the norm before the MLP
  at::Tensor post_ffn_norm;               // [H]: Gemma 2/3's norm of the MLP output, or undefined
  at::Tensor w_gate, w_up, w_down;        // [I, H], [I, H], [H, I] (w_gate/w_up undefined when fused)
  at::Tensor w_gate_up;                   // [2 I, H]: gate rows then up rows (Phi-3), or undefined
  at::Tensor b_gate, b_up, b_down;        // biases or undefined
  // A mixture-of-experts layer (sparse): w_gate/w_up/w_down above are Qwen2-MoE's shared expert
  // (or undefined), shared_gate [1, H] its sigmoid gate. router [E, H]; per expert e, views (no
  // copies) of the stacked tensors transformers v5 writes — e_gate_up[e] [2 I, H] (gate rows then
  // up rows), e_down[e] [H, I] — or the per-expert tensors of published checkpoints (e_gate[e],
  // e_up[e] [I, H]; e_down[e]).
  bool sparse = false;
  at::Tensor router, shared_gate;
  std::vector<at::Tensor> e_gate_up, e_gate, e_up, e_down;
  at::Device device = at::kCPU;           // where every tensor above lives
};

struct Weights {
  at::Tensor embed;       // [V, H]
  at::Tensor final_norm;  // [H]
  at::Tensor lm_head;     // [V, H] (the embedding itself when tied)
  std::vector<LayerWeights> layers;
  at::ScalarType dtype;
  at::Device device = at::kCPU;  // the main device: embedding, final norm, lm_head, inputs and outputs
};

Weights bind_weights(const ModelConfig& cfg, const std::map<std::string, at::Tensor>& tensors);

}  // namespace cf
