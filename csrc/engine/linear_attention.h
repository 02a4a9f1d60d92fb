// linear_attention.h — the Gated DeltaNet token mixer's two recurrences (Qwen3-Next, Qwen3.5), as
// transformers' torch reference computes them: the short causal depthwise convolution over the
// q|k|v channels, and the gated delta rule over the sequence — chunked (64 tokens a chunk, the
// intra-chunk part as matrix products and a unit-triangular solve) for prefill, one token at a time
// for decode. States are updated in place (a KVCache slot's), so a decode step allocates no state
// and syncs nothing with the host (CUDA graphs can capture it).
#pragma once
#include <ATen/ATen.h>

namespace cf::linear {

// silu(depthwise causal conv) of x [B, T, C] with weight [C, K] (no bias), the window of token t
// being the K inputs ending at t. state [B, C, K]: the K inputs before this call (zeros at first);
// replaced by the last K inputs. Null: zero history, nothing kept. Returns [B, T, C] in x's dtype.
at::Tensor causal_conv(const at::Tensor& x, const at::Tensor& weight, at::Tensor* state);

// The gated delta rule. q, k [B, T, Hk, Dk], v [B, T, Hv, Dv] (Hv a multiple of Hk: value head h
// reads key head h / (Hv / Hk)), g (log decay) and beta [B, T, Hv]. q and k are L2-normalised in
// fp32 and q scaled by Dk^-0.5; state [B, Hv, Dk, Dv] fp32 is the recurrent state before this call
// and is replaced by the one after it. recurrent: token by token (decode), else chunked. Returns
// the output [B, T, Hv, Dv] in v's dtype.
at::Tensor gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                            const at::Tensor& beta, at::Tensor& state, bool recurrent);

}  // namespace cf::linear
