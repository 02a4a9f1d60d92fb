// quant_impl.cpp — see quant_blocks.h. Compiled once per ISA (CF_ISA_NS) like skinny_gemm_impl.cpp;
// the block decoders are plain loops over a block the compiler vectorizes for that ISA.
// Each decoder follows ggml's reference dequantization (value = scale * quant (+ or - min), the
// fields in ggml-common.h's order); tests/test_quant.py checks every type against the `gguf`
// package's independent numpy decoders.
#include "quant_blocks.h"
#include "skinny_gemm.h"

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef CF_ISA_NS
#define CF_ISA_NS base
#endif

namespace cf::cpu::CF_ISA_NS {
namespace {

#include "quant_common.h"  // bits_to_float, half, half_at, u32_at, k4_scales

// Blocks decode 16 elements at a time: the codes as 16 unsigned bytes (byte ops work on every
// ISA), then widened to int32 and float in vectors of the ISA's width (CF_LANES; GCC widens 16
// bytes at once well only on AVX-512, 8 of 16 on AVX2 (see widen), and signed bytes badly
// everywhere, hence the bias form).
#ifndef CF_LANES
#define CF_LANES 4
#endif
constexpr int L = CF_LANES;
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef uint8_t u8xL __attribute__((vector_size(L)));
typedef int32_t i32xL __attribute__((vector_size(4 * L)));
typedef float f32xL __attribute__((vector_size(4 * L)));

inline u8x16 bytes16(const uint8_t* p) {
  u8x16 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
// Codes [c, c + L) of 16 as int32 lanes. AVX2 builds shift the upper 8 down and widen them with one
// vpmovzxbd: for them GCC extracts and inserts the bytes one at a time (8 vpextrb per 16 codes,
// which held AVX2's decoding to a third of AVX-512's speed).
inline i32xL widen(u8x16 codes, int c) {
#if defined(__AVX2__) && CF_LANES == 8
  __m128i v;
  __builtin_memcpy(&v, &codes, sizeof v);
  const __m256i w = _mm256_cvtepu8_epi32(c == 0 ? v : _mm_srli_si128(v, 8));
  i32xL out;
  __builtin_memcpy(&out, &w, sizeof out);
  return out;
#else
  u8xL part;
  __builtin_memcpy(&part, reinterpret_cast<const uint8_t*>(&codes) + c, L);
  return __builtin_convertvector(part, i32xL);
#endif
}
// y[j] = scale * (codes[j] - bias) + offset, j < 16.
inline void put16(float* y, u8x16 codes, int bias, float scale, float offset = 0.0f) {
  for (int c = 0; c < 16; c += L) {
    const f32xL v = __builtin_convertvector(widen(codes, c) - bias, f32xL) * scale + offset;
    __builtin_memcpy(y + c, &v, sizeof v);
  }
}
// Lane j: 1 when bit (first + j) of bits is set, else 0.
inline u8x16 bit_lanes(uint32_t bits, int first) {
  const uint32_t b = bits >> first;
  const u8x16 bytes = {uint8_t(b), uint8_t(b), uint8_t(b), uint8_t(b), uint8_t(b), uint8_t(b), uint8_t(b), uint8_t(b),
                       uint8_t(b >> 8), uint8_t(b >> 8), uint8_t(b >> 8), uint8_t(b >> 8), uint8_t(b >> 8),
                       uint8_t(b >> 8), uint8_t(b >> 8), uint8_t(b >> 8)};
  const u8x16 mask = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
  return ((bytes & mask) != 0) & 1;
}

// IQ4_NL / IQ4_XS: the 16 non-uniform levels a 4-bit code selects, here + 128 (so they are bytes).
inline u8x16 iq4_levels(u8x16 codes) {
  u8x16 levels;
  for (int j = 0; j < 16; ++j) levels[j] = static_cast<uint8_t>(kIq4Values[j] + 128);
#if defined(__GNUC__) && !defined(__clang__)
  return __builtin_shuffle(levels, codes);
#else
  u8x16 out;
  for (int j = 0; j < 16; ++j) out[j] = levels[codes[j]];
  return out;
#endif
}

// Where a decoder's values go: Store writes them out (y is the output row); Dot multiplies them
// with an activation row as they come (y points into that row, the element the value multiplies),
// never storing them: scale * (u - bias) + offset summed against x is scale * sum(u x) +
// (offset - scale * bias) * sum(x), with sum(x) per 16 elements computed once per row of x.
struct Store {
  inline void put(float* y, u8x16 codes, int bias, float scale, float offset = 0.0f) {
    put16(y, codes, bias, scale, offset);
  }
};
struct Dot {
  const float* x0;      // the activation row
  const float* sums16;  // sum of each 16 elements of x0
  f32xL acc = {};
  float corr = 0.0f;
  inline void put(const float* y, u8x16 codes, int bias, float scale, float offset = 0.0f) {
    f32xL t = {};
    for (int c = 0; c < 16; c += L) {
      f32xL xv;
      __builtin_memcpy(&xv, y + c, sizeof xv);
      t += __builtin_convertvector(widen(codes, c), f32xL) * xv;
    }
    acc += scale * t;
    corr += (offset - scale * bias) * sums16[static_cast<uint64_t>(y - x0) / 16];
  }
};
// The sum of four Dots' partial sums (one horizontal add).
inline float total(const Dot* d) {
  const f32xL v = (d[0].acc + d[1].acc) + (d[2].acc + d[3].acc);
  float lanes[L];
  __builtin_memcpy(lanes, &v, sizeof v);
  float sum = (d[0].corr + d[1].corr) + (d[2].corr + d[3].corr);
  for (int i = 0; i < L; ++i) sum += lanes[i];
  return sum;
}

// The decoders are inlined into their block loops (decode_rows, dot_rows): called out of line,
// the K-quants' Dot kept its sums in memory (a store and reload per 16 elements, since x's floats
// may alias them), which held their one-row products to 35-65% of Q4_0's weights per second.
#define CF_DECODER __attribute__((always_inline)) inline

// 32-blocks: d (f16) [, m (f16)] [, qh (4 bytes)], 16 bytes of nibbles: element j in the low
// nibble of byte j, element j + 16 in its high nibble; Q5's fifth bits are bit j of qh.
template <class Out>
CF_DECODER void q4_0(const uint8_t* b, float* y, Out& out) {
  const float d = half_at(b);
  const u8x16 q = bytes16(b + 2);
  out.put(y, q & 15, 8, d);
  out.put(y + 16, q >> 4, 8, d);
}
template <class Out>
CF_DECODER void q4_1(const uint8_t* b, float* y, Out& out) {
  const float d = half_at(b), m = half_at(b + 2);
  const u8x16 q = bytes16(b + 4);
  out.put(y, q & 15, 0, d, m);
  out.put(y + 16, q >> 4, 0, d, m);
}
template <class Out>
CF_DECODER void q5_0(const uint8_t* b, float* y, Out& out) {
  const float d = half_at(b);
  const uint32_t qh = u32_at(b + 2);
  const u8x16 q = bytes16(b + 6);
  out.put(y, (q & 15) | (bit_lanes(qh, 0) << 4), 16, d);
  out.put(y + 16, (q >> 4) | (bit_lanes(qh, 16) << 4), 16, d);
}
template <class Out>
CF_DECODER void q5_1(const uint8_t* b, float* y, Out& out) {
  const float d = half_at(b), m = half_at(b + 2);
  const uint32_t qh = u32_at(b + 4);
  const u8x16 q = bytes16(b + 8);
  out.put(y, (q & 15) | (bit_lanes(qh, 0) << 4), 0, d, m);
  out.put(y + 16, (q >> 4) | (bit_lanes(qh, 16) << 4), 0, d, m);
}
template <class Out>
CF_DECODER void q8_0(const uint8_t* b, float* y, Out& out) {  // int8 codes, read as unsigned + 128
  const float d = half_at(b);
  out.put(y, bytes16(b + 2) ^ 0x80, 128, d);
  out.put(y + 16, bytes16(b + 18) ^ 0x80, 128, d);
}
template <class Out>
CF_DECODER void iq4_nl(const uint8_t* b, float* y, Out& out) {
  const float d = half_at(b);
  const u8x16 q = bytes16(b + 2);
  out.put(y, iq4_levels(q & 15), 128, d);
  out.put(y + 16, iq4_levels(q >> 4), 128, d);
}

// Q2_K (84 bytes): scales[16] (low nibble scale, high nibble min, per 16 elements), qs[64] (2-bit
// quants: byte l of a 32-byte group holds elements at shifts 0, 2, 4, 6 of four 32-runs), d, dmin.
template <class Out>
CF_DECODER void q2_k(const uint8_t* b, float* y, Out& out) {
  const uint8_t* sc = b;
  const uint8_t* q = b + 16;
  const float d = half_at(b + 80), dmin = half_at(b + 82);
  int is = 0;
  for (int half128 = 0; half128 < 2; ++half128, q += 32)
    for (int shift = 0; shift < 8; shift += 2)
      for (int part = 0; part < 2; ++part, ++is, y += 16)
        out.put(y, (bytes16(q + 16 * part) >> shift) & 3, 0, d * (sc[is] & 15), -dmin * (sc[is] >> 4));
}

// Q3_K (110 bytes): hmask[32] (the third bit; clear = subtract 4), qs[64] (low 2 bits, laid out
// as Q2_K's), scales[12], d.
template <class Out>
CF_DECODER void q3_k(const uint8_t* b, float* y, Out& out) {
  const uint8_t* hm = b;
  const uint8_t* q = b + 32;
  const float d = half_at(b + 108);
  int scales[16];
  for (int i = 0; i < 16; ++i) scales[i] = q3_k_scale(b + 96, i);
  int is = 0, bit = 0;
  for (int half128 = 0; half128 < 2; ++half128, q += 32)
    for (int shift = 0; shift < 8; shift += 2, ++bit)
      for (int part = 0; part < 2; ++part, ++is, y += 16) {
        const u8x16 low = (bytes16(q + 16 * part) >> shift) & 3, high = (bytes16(hm + 16 * part) >> bit) & 1;
        out.put(y, low | (high << 2), 4, d * scales[is]);
      }
}

// Q4_K (144 bytes): d, dmin, scales[12], qs[128]: per 64 elements, 32 bytes whose low nibbles are
// the first 32 (scale pair 2i) and high nibbles the next 32 (pair 2i + 1); value = d sc q - dmin m.
// Q5_K (176 bytes): d, dmin, scales[12], qh[32], qs[128]: the same plus a fifth bit, bit 2i (low
// nibbles) and 2i + 1 (high nibbles) of qh[l] for the i-th 64 elements.
template <bool kFifthBit, class Out>
CF_DECODER void q4_or_q5_k(const uint8_t* b, float* y, Out& out) {
  const float d = half_at(b), dmin = half_at(b + 2);
  const K4Scales s = k4_scales(b + 4);
  const uint8_t* qh = b + 16;  // Q5_K only
  const uint8_t* q = b + (kFifthBit ? 48 : 16);
  for (int j = 0; j < 8; j += 2, q += 32, y += 64) {
    const int sc0 = s.scale(j), m0 = s.min(j), sc1 = s.scale(j + 1), m1 = s.min(j + 1);
    for (int h = 0; h < 32; h += 16) {
      const u8x16 v = bytes16(q + h);
      u8x16 lo = v & 15, hi = v >> 4;
      if constexpr (kFifthBit) {
        const u8x16 hb = bytes16(qh + h);
        lo |= ((hb & uint8_t(1 << j)) != 0) & 16;  // a mask test: bytes have no shift instructions
        hi |= ((hb & uint8_t(2 << j)) != 0) & 16;
      }
      out.put(y + h, lo, 0, d * sc0, -dmin * m0);
      out.put(y + 32 + h, hi, 0, d * sc1, -dmin * m1);
    }
  }
}
template <class Out>
CF_DECODER void q4_k(const uint8_t* b, float* y, Out& out) {
  q4_or_q5_k<false>(b, y, out);
}
template <class Out>
CF_DECODER void q5_k(const uint8_t* b, float* y, Out& out) {
  q4_or_q5_k<true>(b, y, out);
}
// Q6_K (210 bytes): ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16] (per 16), d;
// per 128 elements, byte l of ql / qh serves elements l, l + 32, l + 64, l + 96; stored with +32.
template <class Out>
CF_DECODER void q6_k(const uint8_t* b, float* y, Out& out) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half_at(b + 208);
  for (int half128 = 0; half128 < 2; ++half128, ql += 64, qh += 32, sc += 8, y += 128)
    for (int h = 0; h < 32; h += 16) {
      const int is = h / 16;
      const u8x16 lo = bytes16(ql + h), lo2 = bytes16(ql + 32 + h), hi = bytes16(qh + h);
      // each pair of high bits moved to bits 4-5 in one shift (none for the third pair)
      out.put(y + h, (lo & 15) | ((hi << 4) & 48), 32, d * sc[is]);
      out.put(y + 32 + h, (lo2 & 15) | ((hi << 2) & 48), 32, d * sc[is + 2]);
      out.put(y + 64 + h, (lo >> 4) | (hi & 48), 32, d * sc[is + 4]);
      out.put(y + 96 + h, (lo2 >> 4) | ((hi >> 2) & 48), 32, d * sc[is + 6]);
    }
}
// IQ4_XS (136 bytes): d, scales_h (u16: 2 high bits per 32), scales_l[4] (4 low bits per 32),
// qs[128]: eight IQ4_NL-style 32-runs, each scaled by d * (six-bit scale - 32).
template <class Out>
CF_DECODER void iq4_xs(const uint8_t* b, float* y, Out& out) {
  const float d = half_at(b);
  const uint8_t* q = b + 8;
  for (int ib = 0; ib < 8; ++ib, q += 16, y += 32) {
    const float scale = d * static_cast<float>(iq4_xs_scale(b, ib));
    const u8x16 v = bytes16(q);
    out.put(y, iq4_levels(v & 15), 128, scale);
    out.put(y + 16, iq4_levels(v >> 4), 128, scale);
  }
}

void f16_row(const uint8_t* b, float* y, int64_t K) {
  for (int64_t k = 0; k < K; ++k) y[k] = half_at(b + 2 * k);
}
void bf16_row(const uint8_t* b, float* y, int64_t K) {
  for (int64_t k = 0; k < K; ++k) y[k] = bits_to_float(static_cast<uint32_t>(b[2 * k] | (b[2 * k + 1] << 8)) << 16);
}

// All rows of one type: the decoder is a template argument, so it is inlined into the block loop.
template <void (*Decode)(const uint8_t*, float*, Store&), int64_t Block, int64_t Bytes>
void decode_rows(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, float* out) {
  Store store;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = w + r * row_bytes;
    float* y = out + r * K;
    for (int64_t i = 0; i < K / Block; ++i) Decode(row + i * Bytes, y + i * Block, store);
  }
}

// y[n] = row n of w . x (+ bias[n]) for n in [n0, n1): each row read once, front to back (one
// memory stream), its blocks summed in four interleaved partial sums (four independent chains in
// flight), the blocks decoded straight into the products.
template <void (*Decode)(const uint8_t*, float*, Dot&), int64_t Block, int64_t Bytes>
void dot_rows(const float* x, const float* sums16, int64_t K, const uint8_t* w, int64_t row_bytes, const float* bias,
              float* y, int64_t n0, int64_t n1) {
  float* xp = const_cast<float*>(x);  // the decoders' position pointer; Dot only reads through it
  const int64_t blocks = K / Block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    Dot d[4] = {{x, sums16}, {x, sums16}, {x, sums16}, {x, sums16}};
    int64_t i = 0;
    for (; i + 4 <= blocks; i += 4)
      for (int j = 0; j < 4; ++j) Decode(row + (i + j) * Bytes, xp + (i + j) * Block, d[j]);
    for (; i < blocks; ++i) Decode(row + i * Bytes, xp + i * Block, d[i % 4]);
    y[n] = total(d) + (bias != nullptr ? bias[n] : 0.0f);
  }
}

}  // namespace

void dequant_rows(int32_t type, const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, float* out) {
  switch (type) {  // callers check the type first
    case 1:
    case 30:
      for (int64_t r = 0; r < rows; ++r) (type == 1 ? f16_row : bf16_row)(w + r * row_bytes, out + r * K, K);
      return;
#define CF_DECODE_CASE(id, name, fn, block, bytes) \
  case id: return decode_rows<fn<Store>, block, bytes>(w, row_bytes, rows, K, out);
      CF_BLOCK_TYPES(CF_DECODE_CASE)
#undef CF_DECODE_CASE
    default: return;
  }
}

namespace {

// One row of x against packed rows [n0, n1) by dot_rows; false for types without a block decoder
// (F16 / BF16), which take the tile path.
bool dot_packed(int32_t type, const float* x, const float* sums16, int64_t K, const uint8_t* w, int64_t row_bytes,
                const float* bias, float* y, int64_t n0, int64_t n1) {
  switch (type) {
#define CF_DOT_CASE(id, name, fn, block, bytes) \
  case id: dot_rows<fn<Dot>, block, bytes>(x, sums16, K, w, row_bytes, bias, y, n0, n1); return true;
    CF_BLOCK_TYPES(CF_DOT_CASE)
#undef CF_DOT_CASE
    default: return false;
  }
}

}  // namespace

#if CF_LANES >= 8 && defined(__GNUC__) && !defined(__clang__)
#define CF_QUANT_KN 1
namespace {

// The shuffle of an L x L transpose's step B: rows i and i + B (i without bit B) swap bit B of
// their lane index with bit B of their row index (low: row i's new lanes, high: row i + B's).
template <int B, bool High>
inline i32xL swap_mask() {
  i32xL m;
  for (int j = 0; j < L; ++j) m[j] = (j & B) ? (High ? L + j : L + j - B) : (High ? j + B : j);
  return m;
}
template <int B>
inline void swap_bit(f32xL* v) {
  const i32xL lo = swap_mask<B, false>(), hi = swap_mask<B, true>();
  for (int i = 0; i < L; ++i)
    if ((i & B) == 0) {
      const f32xL a = v[i], b = v[i + B];
      v[i] = __builtin_shuffle(a, b, lo);
      v[i + B] = __builtin_shuffle(a, b, hi);
    }
}
// out[c * ld_out + r] = in[r * ld_in + c] for r, c < L.
inline void transpose(const float* in, int64_t ld_in, float* out, int64_t ld_out) {
  f32xL v[L];
  for (int r = 0; r < L; ++r) __builtin_memcpy(&v[r], in + r * ld_in, sizeof v[r]);
  swap_bit<1>(v);
  swap_bit<2>(v);
  swap_bit<4>(v);
  if constexpr (L > 8) swap_bit<L / 2>(v);
  for (int c = 0; c < L; ++c) __builtin_memcpy(out + c * ld_out, &v[c], sizeof v[c]);
}

// kQuantKnCols packed rows (a block type) against M rows of x, K-major (quant_blocks.h): per
// kQuantKnDepth columns, 16 rows at a time decoded then transposed (L x L at a time) into the
// [depth, cols] tile.
void gemm_q_kn(int32_t type, const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes,
               const float* bias, float* y, int64_t ldy, float* scratch) {
  float* staging = scratch;                    // [16, depth]
  float* tile = scratch + 16 * kQuantKnDepth;  // [depth, cols]
  const BlockFormat& format = *block_format(type);  // a block type (gemm_q_k_major)
  // parts of equal depth (whole 32-blocks; K-quants' K is a multiple of 256 = kQuantKnDepth)
  const int64_t parts = (K + kQuantKnDepth - 1) / kQuantKnDepth;
  const int64_t even = (K / 32 + parts - 1) / parts * 32;
  for (int64_t k0 = 0; k0 < K; k0 += even) {
    const int64_t depth = K - k0 < even ? K - k0 : even;
    const uint8_t* part = w + k0 / format.block * format.bytes;
    for (int64_t g = 0; g < kQuantKnCols; g += 16) {
      dequant_rows(type, part + g * row_bytes, row_bytes, 16, depth, staging);
      for (int64_t r = 0; r < 16; r += L)
        for (int64_t k = 0; k < depth; k += L)
          transpose(staging + r * depth + k, depth, tile + k * kQuantKnCols + g + r, kQuantKnCols);
    }
    gemm_kn_part_f32(x + k0, K, M, depth, tile, kQuantKnCols, k0 + depth == K ? bias : nullptr, y, ldy, 0,
                     kQuantKnCols, k0 > 0);
  }
}

}  // namespace
#endif

bool gemm_q_k_major(int32_t type, int64_t M, int64_t K) {
#ifdef CF_QUANT_KN
  return quant_k_major(M, K) && type != 1 && type != 30;  // block types, not F16 / BF16 rows
#else
  (void)type, (void)M, (void)K;
  return false;
#endif
}

void gemm_q(int32_t type, const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes,
            const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1, float* scratch) {
  if (M == 1) {  // one activation row: the blocks decoded straight into the dot products
    for (int64_t g = 0; g < K / 16; ++g) {
      float sum = 0.0f;
      for (int j = 0; j < 16; ++j) sum += x[16 * g + j];
      scratch[g] = sum;
    }
    if (dot_packed(type, x, scratch, K, w, row_bytes, bias, y, n0, n1)) return;
  }
  int64_t n = n0;
#ifdef CF_QUANT_KN
  if (gemm_q_k_major(type, M, K))
    for (; n + kQuantKnCols <= n1; n += kQuantKnCols)
      gemm_q_kn(type, x, M, K, w + n * row_bytes, row_bytes, bias != nullptr ? bias + n : nullptr, y + n, ldy, scratch);
#endif
  for (; n < n1; n += kQuantTileRows) {
    const int64_t rows = n1 - n < kQuantTileRows ? n1 - n : kQuantTileRows;
    dequant_rows(type, w + n * row_bytes, row_bytes, rows, K, scratch);
    gemm_f32(x, M, K, scratch, bias != nullptr ? bias + n : nullptr, y + n, ldy, 0, rows);
  }
}

}  // namespace cf::cpu::CF_ISA_NS
