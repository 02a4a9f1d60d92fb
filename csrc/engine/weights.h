// weights.h — binds a name->tensor dict (Hugging Face names) to the model's layout. Every tensor
// goes through one checked accessor: name template + layer + dtype + device + shape, and a
// mismatch names the tensor with expected vs actual. A layer's tensors live on one device (the
// device of its input_layernorm.weight); the embedding, final norm and lm_head on the model's main
// device (the embedding's): a split placement is read from where the tensors are, not passed
// separately.
// Matrices (projections, experts, embedding, lm_head) may be packed ggml blocks (a GGUF file's,
// kernels/matrix.h), named with their ggml type in bind_weights' `packed`; any other tensor is float.
// Tensors are held by handle, never copied, except: norm weights of two families (vectors, [H] or
// [D] each), Gemma's held as (1 + w) in fp32 and GPT-OSS's in fp32 (both multiply before the cast to
// the compute dtype); and the biases of fused rows (below) when they do not follow one another in
// memory, concatenated. Fused projections (Phi-3's qkv_proj, gate_up_proj) are held as they are and
// run as one matmul; so are a layer's q / k / v and an MLP's gate / up when their rows follow one
// another in one tensor's memory (a loader laid them out so: layout.lay_out_fused), as views of that
// memory.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

#include "../kernels/matrix.h"
#include "config.h"

namespace cf {

// One gated MLP, down(act(gate x) * up x) (+ biases): separate gate / up [I, H], or one gate_up
// [2 I, H] holding gate rows then up rows (Phi-3, transformers v5's stacked experts) or, when
// interleaved, gate and up rows alternating (GPT-OSS); down [H, I]. Weights may be strided views
// (a transposed stacked expert is run without a copy). Biases optional.
struct MlpWeights {
  Matrix gate_up, gate, up, down;
  at::Tensor b_gate_up, b_gate, b_up, b_down;
  bool interleaved = false;
  // gate and up as one [2I, H] matrix (+ bias) when a loader laid their rows out one after another
  // (layout.lay_out_fused): one product instead of two; else undefined.
  Matrix gate_up_rows;
  at::Tensor b_gate_up_rows;
};

struct LayerWeights {
  at::Tensor input_norm;                  // [H]
  Matrix wq, wk, wv, wo;                  // [Hq*D, H], [Hkv*D, H], [Hkv*D, H], [H, Hq*D] (wq/wk/wv undefined when fused)
  Matrix wqkv;                            // [(Hq + 2 Hkv) * D, H]: q, k, v rows (Phi-3), or undefined
  at::Tensor bq, bk, bv, bo;              // biases or undefined
  Matrix qkv_rows;                        // wq, wk, wv as one matrix when laid out one after another, or undefined
  at::Tensor b_qkv_rows;                  // its bias (bq|bk|bv), or undefined
  at::Tensor q_norm, k_norm;              // [D] (Qwen3, Gemma 3) or undefined
  at::Tensor sinks;                       // [Hq]: GPT-OSS's per-head attention sink logits, or undefined
  // (Qwen3-Next / 3.5's gated attention: wq is [2 Hq*D, H], each head's query rows then its gate rows.)
  // A Gated DeltaNet layer (linear): the attention tensors above are undefined; instead Qwen3-Next's
  // in_proj_qkvz [Hk (2 Dk + 2 r Dv), H] and in_proj_ba [2 Hv, H] (grouped per key head, r = Hv / Hk)
  // or Qwen3.5's in_proj_qkv [2 Hk Dk + Hv Dv, H], in_proj_z [Hv Dv, H], in_proj_b / in_proj_a [Hv, H];
  // the depthwise causal conv over the q|k|v channels [C, K]; A_log, dt_bias [Hv]; the gated norm's
  // weight [Dv]; out_proj [H, Hv Dv].
  bool linear = false;
  Matrix la_qkvz, la_ba, la_qkv, la_z, la_b, la_a, la_out;
  at::Tensor conv, A_log, dt_bias, la_norm;
  at::Tensor post_attn_norm;              // [H]: Gemma 2/3's norm of the attention output, or undefined
  at::Tensor post_norm;                   // [H]: the norm before the MLP
  at::Tensor post_ffn_norm;               // [H]: Gemma 2/3's norm of the MLP output, or undefined
  MlpWeights mlp;                         // the dense MLP; in a sparse layer Qwen2-MoE's shared expert (or empty)
  // A mixture-of-experts layer (sparse): router [E, H] (+ GPT-OSS's bias [E]), one MlpWeights per
  // expert — views (no copies) of stacked tensors (transformers v5's gate_up_proj, GPT-OSS's
  // transposed [E, H, 2 I], GGUF's *_exps) or the hub's per-expert tensors — and Qwen2-MoE's
  // shared expert gate [1, H].
  bool sparse = false;
  at::Tensor router, router_bias, shared_gate;
  std::vector<MlpWeights> experts;
  // The experts' matrices as stacked [E, rows, K] tensors, when they are (a stacked checkpoint or
  // GGUF tensor, or per-expert matrices laid out one after another: layout.lay_out_fused): gate_up
  // (each expert's gate rows then up rows) or gate and up, and down; else undefined.
  MlpWeights stacked;
  at::Device device = at::kCPU;           // where every tensor above lives
};

struct Weights {
  Matrix embed;           // [V, H]
  at::Tensor final_norm;  // [H]
  Matrix lm_head;         // [V, H] (the embedding itself when tied)
  std::vector<LayerWeights> layers;
  at::ScalarType dtype;   // the compute dtype: the embedding's, or the final norm's when the embedding is packed
  at::Device device = at::kCPU;  // the main device: embedding, final norm, lm_head, inputs and outputs
  std::vector<std::string> unread;  // the tensors given that this model does not use (name order)
};

// packed: {name: ggml type} of the tensors that are packed blocks (uint8 [..., rows, row_bytes]);
// q8_activations: those matrices' CPU products of few rows round x to 8 bits (Matrix::q8).
Weights bind_weights(const ModelConfig& cfg, const std::map<std::string, at::Tensor>& tensors,
                     const std::map<std::string, int32_t>& packed = {}, bool q8_activations = false);

}  // namespace cf
