// skinny_gemm_impl.cpp — see skinny_gemm.h. Compiled once per ISA with CF_ISA_NS naming the
// namespace and CF_LANES the floats per vector register (4 SSE/NEON, 8 AVX2, 16 AVX-512).
// Written with GCC/Clang vector extensions: the compiler maps them to the ISA's registers.
#include "skinny_gemm.h"

#ifndef CF_ISA_NS
#define CF_ISA_NS base
#endif
#ifndef CF_LANES
#define CF_LANES 4
#endif
#ifndef CF_MAX_MR  // rows of x per register tile: accumulators = MR x NR vectors
#define CF_MAX_MR 2
#endif

namespace cf::cpu::CF_ISA_NS {
namespace {

constexpr int L = CF_LANES;
constexpr int NR = 4;  // weight rows per tile
typedef float vf __attribute__((vector_size(L * 4)));
typedef uint32_t vu32 __attribute__((vector_size(L * 4)));
typedef uint16_t vu16 __attribute__((vector_size(L * 2)));

inline vf load(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline vf load(const uint16_t* p) {  // bfloat16 bits -> fp32: the bits are the high half
  vu16 h;
  __builtin_memcpy(&h, p, sizeof h);
  vu32 u = __builtin_convertvector(h, vu32) << 16;
  vf v;
  __builtin_memcpy(&v, &u, sizeof v);
  return v;
}
inline float scalar(float v) { return v; }
inline float scalar(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

// Sum of a vector's lanes, folding halves (lanes l and l + n/2) until one is left: a fixed order,
// and independent adds the CPU overlaps across a tile's outputs (a lane-by-lane chain does not).
template <int N>
inline float fold(const float* p) {
  if constexpr (N == 1) {
    return p[0];
  } else {
    typedef float half __attribute__((vector_size(N * 2)));
    half a, b;
    __builtin_memcpy(&a, p, sizeof a);
    __builtin_memcpy(&b, p + N / 2, sizeof b);
    a += b;
    float out[N / 2];
    __builtin_memcpy(out, &a, sizeof a);
    return fold<N / 2>(out);
  }
}
inline float hsum(const vf& v) {
  float lanes[L];
  __builtin_memcpy(lanes, &v, sizeof v);
  return fold<L>(lanes);
}

// One tile: MR rows of x against nr (<= NR) weight rows starting at w, over all K.
template <int MR, typename W>
inline void tile(const float* x, int64_t K, const W* w, int nr, const float* bias, float* y, int64_t ldy) {
  vf acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = vf{};
  const W* wr[NR];
  for (int j = 0; j < NR; ++j) wr[j] = w + (j < nr ? j : 0) * K;  // short tiles repeat row 0, unused
  const int64_t kv = K - K % L;
  // The next tile's rows follow this tile's in memory; fetching them ahead keeps the loads of
  // short rows (K of a few hundred) from waiting on memory at every tile start.
  const char* ahead = reinterpret_cast<const char*>(w + NR * K);
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(W));
  for (int64_t k = 0; k < kv; k += L) {
    vf wv[NR];
    for (int j = 0; j < NR; ++j) {
      wv[j] = load(wr[j] + k);
      __builtin_prefetch(ahead + j * row_bytes + k * static_cast<int64_t>(sizeof(W)));
    }
    for (int i = 0; i < MR; ++i) {
      const vf xv = load(x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < nr; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t k = kv; k < K; ++k) s += x[i * K + k] * scalar(wr[j][k]);
      if (bias != nullptr) s += bias[j];
      y[i * ldy + j] = s;
    }
  }
}

template <typename W>
void gemm(const float* x, int64_t M, int64_t K, const W* w, const float* bias, float* y, int64_t ldy, int64_t n0,
          int64_t n1) {
  for (int64_t n = n0; n < n1; n += NR) {
    const int nr = static_cast<int>(n1 - n < NR ? n1 - n : NR);
    const W* wn = w + n * K;
    const float* bn = bias != nullptr ? bias + n : nullptr;
    for (int64_t m = 0; m < M; m += CF_MAX_MR) {
      const float* xm = x + m * K;
      float* ym = y + m * ldy + n;
      switch (M - m < CF_MAX_MR ? M - m : CF_MAX_MR) {
        case 1: tile<1>(xm, K, wn, nr, bn, ym, ldy); break;
        case 2: tile<2>(xm, K, wn, nr, bn, ym, ldy); break;
#if CF_MAX_MR >= 3
        case 3: tile<3>(xm, K, wn, nr, bn, ym, ldy); break;
#endif
#if CF_MAX_MR >= 4
        default: tile<4>(xm, K, wn, nr, bn, ym, ldy); break;
#endif
      }
    }
  }
}

// K-major weights: MR rows of x (row stride ldx) against NC vectors of columns [n, n + NC * L),
// over K rows of w (each row's NC vectors loaded once, every x value broadcast against them). Each
// output's sum runs over k in order from 0 (or from y's value when accumulate: a K range continued
// from an earlier call gives the same sums as one call over the whole range).
template <int MR, int NC, typename W>
inline void tile_kn(const float* x, int64_t ldx, int64_t K, const W* w, int64_t ldw, const float* bias, float* y,
                    int64_t ldy, bool accumulate) {
  vf acc[MR][NC];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NC; ++j) acc[i][j] = accumulate ? load(y + i * ldy + j * L) : vf{};
  for (int64_t k = 0; k < K; ++k) {
    const W* wk = w + k * ldw;
    __builtin_prefetch(wk + 8 * ldw);
    vf wv[NC];
    for (int j = 0; j < NC; ++j) wv[j] = load(wk + j * L);
    for (int i = 0; i < MR; ++i) {
      const vf xv = vf{} + x[i * ldx + k];
      for (int j = 0; j < NC; ++j) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NC; ++j) {
      vf out = acc[i][j];
      if (bias != nullptr) out += load(bias + j * L);
      __builtin_memcpy(y + i * ldy + j * L, &out, sizeof out);
    }
}

// Rows of x per K-major register tile (MR x NC accumulators): with 32 vector registers (AVX-512)
// 6 against 4 vectors of columns or 12 against 2, else (16 registers) 2 against 4 or 6 against 2.
template <int NC>
constexpr int kn_rows() {
  return L < 16 ? (NC >= 4 ? 2 : 6) : NC >= 4 ? 6 : 12;
}

template <int NC, typename W>
void gemm_kn(const float* x, int64_t ldx, int64_t M, int64_t K, const W* w, int64_t ldw, const float* bias, float* y,
             int64_t ldy, int64_t n0, int64_t n1, bool accumulate) {
  constexpr int MR = kn_rows<NC>();
  int64_t n = n0;
  for (; n + NC * L <= n1; n += NC * L) {
    const float* bn = bias != nullptr ? bias + n : nullptr;
    int64_t m = 0;
    for (; m + MR <= M; m += MR) tile_kn<MR, NC>(x + m * ldx, ldx, K, w + n, ldw, bn, y + m * ldy + n, ldy, accumulate);
    if constexpr (MR > 4)
      for (; m + 4 <= M; m += 4) tile_kn<4, NC>(x + m * ldx, ldx, K, w + n, ldw, bn, y + m * ldy + n, ldy, accumulate);
    for (; m + 2 <= M; m += 2) tile_kn<2, NC>(x + m * ldx, ldx, K, w + n, ldw, bn, y + m * ldy + n, ldy, accumulate);
    for (; m < M; ++m) tile_kn<1, NC>(x + m * ldx, ldx, K, w + n, ldw, bn, y + m * ldy + n, ldy, accumulate);
  }
  for (; n < n1; ++n)  // columns past the last whole tile, one at a time (same k order)
    for (int64_t m = 0; m < M; ++m) {
      float s = accumulate ? y[m * ldy + n] : 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[m * ldx + k] * scalar(w[k * ldw + n]);
      y[m * ldy + n] = s + (bias != nullptr ? bias[n] : 0.0f);
    }
}

// exp(x) for |x| < 88: x = n ln2 + r with |r| <= ln2/2, exp(r) by its degree-7 Taylor polynomial
// (relative error < 2e-7 on that interval), times 2^n put into the exponent bits.
inline vf vexp(vf x) {
  typedef int32_t vi32 __attribute__((vector_size(L * 4)));
  x = x < 88.0f ? x : 88.0f;
  x = x > -87.0f ? x : -87.0f;
  const vf t = x * 1.44269504088896341f;
  const vf half = t < 0.0f ? vf{} - 0.5f : vf{} + 0.5f;
  const vi32 n = __builtin_convertvector(t + half, vi32);  // round to nearest
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187045e-06f;
  vf p = vf{} + (1.0f / 5040.0f);
  p = p * r + (1.0f / 720.0f);
  p = p * r + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi32 bits = (n + 127) << 23;
  vf scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline void store(float* p, const vf& v) { __builtin_memcpy(p, &v, sizeof v); }

}  // namespace

void add_rms_norm_f32(const float* x, const float* residual, const float* weight, float* sum, float* out, int64_t r0,
                      int64_t r1, int64_t n, float eps) {
  const int64_t nv = n - n % L;
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * n;
    const float* src = xr;
    if (residual != nullptr) {
      const float* rr = residual + r * n;
      float* sr = sum + r * n;
      int64_t i = 0;
      for (; i < nv; i += L) store(sr + i, load(xr + i) + load(rr + i));
      for (; i < n; ++i) sr[i] = xr[i] + rr[i];
      src = sr;
    }
    vf acc{};
    int64_t i = 0;
    for (; i < nv; i += L) {
      const vf v = load(src + i);
      acc += v * v;
    }
    float ss = hsum(acc);
    for (; i < n; ++i) ss += src[i] * src[i];
    const float inv = 1.0f / __builtin_sqrtf(ss / static_cast<float>(n) + eps);
    float* o = out + r * n;
    for (i = 0; i < nv; i += L) store(o + i, load(weight + i) * (load(src + i) * inv));
    for (; i < n; ++i) o[i] = weight[i] * (src[i] * inv);
  }
}

void rope_f32(const float* x, const float* cos, const float* sin, float* out, int64_t r0, int64_t r1, int64_t heads,
              int64_t D) {
  const int64_t half = D / 2, hv = half - half % L;
  for (int64_t r = r0; r < r1; ++r) {
    const float* v = x + r * D;
    const float* c = cos + (r / heads) * D;
    const float* s = sin + (r / heads) * D;
    float* o = out + r * D;
    int64_t d = 0;
    for (; d < hv; d += L) {
      const vf a = load(v + d), b = load(v + d + half);
      store(o + d, a * load(c + d) - b * load(s + d));
      store(o + d + half, b * load(c + d + half) + a * load(s + d + half));
    }
    for (; d < half; ++d) {
      const float a = v[d], b = v[d + half];
      o[d] = a * c[d] - b * s[d];
      o[d + half] = b * c[d + half] + a * s[d + half];
    }
  }
}

void silu_mul_f32(const float* gate, const float* up, float* out, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + L <= i1; i += L) {
    const vf g = load(gate + i);
    store(out + i, g / (1.0f + vexp(vf{} - g)) * load(up + i));
  }
  for (; i < i1; ++i) {
    vf g{};
    g[0] = gate[i];
    out[i] = g[0] / (1.0f + vexp(vf{} - g)[0]) * up[i];
  }
}

void attend_one_f32(const float* q, const float* k, int64_t ks, const float* v, int64_t vs, const uint8_t* mask,
                    int64_t S, int64_t D, float scale, float* scores, float* out) {
  const int64_t dv = D - D % L;
  float top = -__builtin_inff();
  bool attended = false;  // apart from top: NaN scores must come out NaN, not as "no key"
  for (int64_t s = 0; s < S; ++s) {
    if (mask != nullptr && mask[s] == 0) {
      scores[s] = -__builtin_inff();
      continue;
    }
    attended = true;
    const float* kr = k + s * ks;
    vf acc = vf{};
    for (int64_t d = 0; d < dv; d += L) acc += load(q + d) * load(kr + d);
    float dot = hsum(acc);
    for (int64_t d = dv; d < D; ++d) dot += q[d] * kr[d];
    scores[s] = dot * scale;
    top = scores[s] > top ? scores[s] : top;
  }
  for (int64_t d = 0; d < D; ++d) out[d] = 0.0f;
  if (!attended) return;
  float total = 0.0f;
  for (int64_t s = 0; s < S; ++s) {
    scores[s] = (mask != nullptr && mask[s] == 0) ? 0.0f : __builtin_expf(scores[s] - top);
    total += scores[s];
  }
  const float inv = 1.0f / total;
  for (int64_t s = 0; s < S; ++s) {
    if (mask != nullptr && mask[s] == 0) continue;
    const float p = scores[s] * inv;
    const float* vr = v + s * vs;
    for (int64_t d = 0; d < dv; d += L) {
      vf o = load(out + d) + p * load(vr + d);
      __builtin_memcpy(out + d, &o, sizeof o);
    }
    for (int64_t d = dv; d < D; ++d) out[d] += p * vr[d];
  }
}

void gemm_f32(const float* x, int64_t M, int64_t K, const float* w, const float* bias, float* y, int64_t ldy,
              int64_t n0, int64_t n1) {
  gemm(x, M, K, w, bias, y, ldy, n0, n1);
}
void gemm_bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias, float* y, int64_t ldy,
               int64_t n0, int64_t n1) {
  gemm(x, M, K, w, bias, y, ldy, n0, n1);
}
void gemm_kn_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t ldw, const float* bias, float* y,
                 int64_t ldy, int64_t n0, int64_t n1) {
  gemm_kn<4>(x, K, M, K, w, ldw, bias, y, ldy, n0, n1, false);
}
void gemm_kn_bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t ldw, const float* bias, float* y,
                  int64_t ldy, int64_t n0, int64_t n1) {
  gemm_kn<4>(x, K, M, K, w, ldw, bias, y, ldy, n0, n1, false);
}
void gemm_kn_part_f32(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t ldw,
                      const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1, bool accumulate) {
  gemm_kn<kKnPartVectors>(x, ldx, M, K, w, ldw, bias, y, ldy, n0, n1, accumulate);
}

}  // namespace cf::cpu::CF_ISA_NS
