// linear_attention.cpp — see linear_attention.h.
#include "linear_attention.h"

#include <cmath>

namespace cf::linear {
namespace {

constexpr int64_t kChunk = 64;

at::Tensor l2norm(const at::Tensor& x) { return x * at::rsqrt((x * x).sum(-1, true) + 1e-6); }

// Token by token: S = S * exp(g_t); S += k_t (x) (v_t - S^T k_t) * beta_t; o_t = S^T q_t.
at::Tensor recurrent_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                          const at::Tensor& beta, at::Tensor& S) {
  at::Tensor out = at::empty_like(v);
  for (int64_t t = 0; t < q.size(2); ++t) {
    const at::Tensor q_t = q.select(2, t), k_t = k.select(2, t), v_t = v.select(2, t);
    S = S * g.select(2, t).exp().unsqueeze(-1).unsqueeze(-1);
    const at::Tensor kv = (S * k_t.unsqueeze(-1)).sum(-2);
    const at::Tensor delta = (v_t - kv) * beta.select(2, t).unsqueeze(-1);
    S = S + k_t.unsqueeze(-1) * delta.unsqueeze(-2);
    out.select(2, t).copy_((S * q_t.unsqueeze(-1)).sum(-2));
  }
  return out;
}

// Chunks of kChunk tokens (zero-padded at the end: decay 0, beta 0): within a chunk the updates
// are matrix products and one unit-lower-triangular solve; the state passes from chunk to chunk.
at::Tensor chunked_rule(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor g, at::Tensor beta, at::Tensor& S) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Dk = q.size(3), Dv = v.size(3);
  const int64_t pad = (kChunk - T % kChunk) % kChunk, N = (T + pad) / kChunk;
  q = at::constant_pad_nd(q, {0, 0, 0, pad}).reshape({B, H, N, kChunk, Dk});
  k = at::constant_pad_nd(k, {0, 0, 0, pad}).reshape({B, H, N, kChunk, Dk});
  v = at::constant_pad_nd(v, {0, 0, 0, pad}).reshape({B, H, N, kChunk, Dv});
  beta = at::constant_pad_nd(beta, {0, pad}).reshape({B, H, N, kChunk, 1});
  const at::Tensor cum = at::constant_pad_nd(g, {0, pad}).reshape({B, H, N, kChunk}).cumsum(-1);
  const at::Tensor upper = at::ones({kChunk, kChunk}, q.options().dtype(at::kBool)).triu(1);
  const at::Tensor decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(upper, -INFINITY).exp();
  const at::Tensor k_beta = k * beta, v_beta = v * beta;
  const at::Tensor system = at::matmul(k_beta, k.transpose(-1, -2)) * decay;
  const at::Tensor intra = at::matmul(q, k.transpose(-1, -2)) * decay;
  const at::Tensor values = at::linalg_solve_triangular(system, v_beta, false, true, true);
  const at::Tensor k_cum = at::linalg_solve_triangular(system, k_beta * cum.exp().unsqueeze(-1), false, true, true);
  const at::Tensor last = cum.narrow(-1, kChunk - 1, 1);
  const at::Tensor q_dec = q * cum.exp().unsqueeze(-1), k_dec = k * (last - cum).exp().unsqueeze(-1);
  const at::Tensor chunk_decay = last.exp().unsqueeze(-1);  // [B, H, N, 1, 1]
  at::Tensor out = at::empty({B, H, N, kChunk, Dv}, v.options());
  for (int64_t n = 0; n < N; ++n) {
    const at::Tensor v_new = values.select(2, n) - at::matmul(k_cum.select(2, n), S);
    out.select(2, n).copy_(at::matmul(q_dec.select(2, n), S) + at::matmul(intra.select(2, n), v_new));
    S = S * chunk_decay.select(2, n) + at::matmul(k_dec.select(2, n).transpose(-1, -2), v_new);
  }
  return out.reshape({B, H, N * kChunk, Dv}).narrow(2, 0, T);
}

}  // namespace

at::Tensor causal_conv(const at::Tensor& x, const at::Tensor& weight, at::Tensor* state) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), K = weight.size(1);
  const at::Tensor prev = state != nullptr ? state->to(x.scalar_type()) : at::zeros({B, C, K}, x.options());
  const at::Tensor buf = at::cat({prev, x.transpose(1, 2)}, 2);  // [B, C, K + T]
  at::Tensor y = at::conv1d(buf, weight.unsqueeze(1), std::optional<at::Tensor>(), at::IntArrayRef{1}, at::IntArrayRef{0},
                            at::IntArrayRef{1}, C)
                     .narrow(2, 1, T);
  if (state != nullptr) state->copy_(buf.narrow(2, T, K));
  return at::silu(y).transpose(1, 2);
}

at::Tensor gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                            const at::Tensor& beta, at::Tensor& state, bool recurrent) {
  const int64_t r = v.size(2) / k.size(2), Dk = q.size(3);
  auto heads_first = [](const at::Tensor& x) { return x.transpose(1, 2).to(at::kFloat).contiguous(); };
  at::Tensor qf = heads_first(r > 1 ? q.repeat_interleave(r, 2) : q);
  at::Tensor kf = heads_first(r > 1 ? k.repeat_interleave(r, 2) : k);
  qf = l2norm(qf);
  kf = l2norm(kf);
  at::Tensor S = state;
  at::Tensor out = recurrent ? recurrent_rule(qf / std::sqrt(static_cast<double>(Dk)), kf, heads_first(v), heads_first(g),
                                              heads_first(beta), S)
                             : chunked_rule(qf * std::pow(static_cast<double>(Dk), -0.5), kf, heads_first(v),
                                            heads_first(g), heads_first(beta), S);
  state.copy_(S);
  return out.transpose(1, 2).to(v.scalar_type());
}

}  // namespace cf::linear
