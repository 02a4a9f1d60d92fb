// quant_q8_impl.cpp — the opt-in 8-bit activation products of quant_blocks.h (quantize_q8,
// gemm_q8; quantize_q8_tiles, gemm_q8_tiled), compiled once per ISA like quant_impl.cpp: weight
// rows of the q8 types against x rows quantized to int8 per block of x (256 columns for the
// 256-blocks, 32 for the others), summed in integers. gemm_q8 takes a few rows of x (decode),
// gemm_q8_tiled any number in tiles of 16 (quant_q8_tiled.h, included at the end).
//
// Every 16 weights g of these blocks are w_i = D * s_g * c_i - M * m_g with integer codes c,
// scales s and offsets m: Q4_K / Q5_K: D = d, M = dmin, s / m the 32-run's six-bit scale and min;
// Q6_K: D = M = d, s its int8 scale, m = 32 s; Q3_K: D = M = d, s its signed six-bit scale, m = 4 s;
// Q2_K: D = d, M = dmin, s / m the low / high nibble of its scale byte; IQ4_XS: D = d, M = 0, s the
// 32-run's signed six-bit scale, c the signed level its 4-bit code selects; Q4_0 / Q5_0: D = M = d,
// s = 1, m = 8 / 16; Q4_1 / Q5_1: D = d, M = -m (the block's min), s = m = 1; Q8_0: D = d, M = 0,
// s = 1, signed codes; IQ4_NL: as Q8_0 with IQ4's levels as codes.
// Against x_i ~ dx * q_i one block's sum is dx * (D * sum_g s_g sum_i c_i q_i - M * sum_g m_g
// sum_i q_i): integer dot products, two float multiplies per block. The result is exactly the
// dequantized matrix times x rounded to 8 bits, up to the order of the float sums
// (tests/test_quant.py checks that against the `gguf` package's decoders). AVX-512BW builds
// multiply 64 codes by 64 activations per instruction (vpmaddubsw, then vpmaddwd by the scales),
// AVX2 builds 32 (the same instructions on 256 bits; signed codes through vpsignb); the base build
// runs the same sums as plain loops (correct, not fast).
#include <cmath>

#include "quant_blocks.h"

#ifdef __F16C__
#include <immintrin.h>
#endif
#if defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#define CF_Q8_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CF_Q8_AVX2 1
#endif
#if defined(CF_Q8_AVX512) || defined(CF_Q8_AVX2)
#define CF_Q8_VECTOR 1
#endif

#ifndef CF_ISA_NS
#define CF_ISA_NS base
#endif

namespace cf::cpu::CF_ISA_NS {
namespace {

#include "quant_common.h"  // half, half_at, u32_at, k4_scales

// One block's scales per 16 elements: w_i = D * s[i / 16] * c_i - M * m[i / 16].
struct Scales16 {
  float D, M;
  int16_t s[16], m[16];
};
inline void scales16(int32_t type, const uint8_t* b, Scales16& out) {
  for (int g = 0; g < 16; ++g) out.s[g] = 1, out.m[g] = type == kQ4_0 ? 8 : type == kQ5_0 ? 16 : 1;
  out.D = out.M = half_at(b);
  if (type == kQ4_1 || type == kQ5_1) out.M = -half_at(b + 2);
  if (type == kQ8_0) out.M = 0.0f;
  if (type == kQ6K) {
    out.D = out.M = half_at(b + 208);
    for (int g = 0; g < 16; ++g) {
      out.s[g] = static_cast<int8_t>(b[192 + g]);
      out.m[g] = static_cast<int16_t>(32 * out.s[g]);
    }
  } else if (type == kQ4K || type == kQ5K) {
    const K4Scales k = k4_scales(b + 4);
    out.M = half_at(b + 2);
    for (int g = 0; g < 16; ++g)
      out.s[g] = static_cast<int16_t>(k.scale(g / 2)), out.m[g] = static_cast<int16_t>(k.min(g / 2));
  } else if (type == kQ3K) {
    out.D = out.M = half_at(b + 108);
    for (int g = 0; g < 16; ++g)
      out.s[g] = static_cast<int16_t>(q3_k_scale(b + 96, g)), out.m[g] = static_cast<int16_t>(4 * out.s[g]);
  } else if (type == kQ2K) {
    out.D = half_at(b + 80), out.M = half_at(b + 82);
    for (int g = 0; g < 16; ++g) out.s[g] = b[g] & 15, out.m[g] = b[g] >> 4;
  } else if (type == kIQ4XS || type == kIQ4NL) {
    out.M = 0.0f;
    if (type == kIQ4XS)
      for (int g = 0; g < 16; ++g) out.s[g] = static_cast<int16_t>(iq4_xs_scale(b, g / 2));
  }
}

// Where a 32-block's 16 nibble bytes start: after d (Q4_0, IQ4_NL), d and m (Q4_1), d and qh
// (Q5_0), d, m and qh (Q5_1); Q5's qh is the 4 bytes before them.
constexpr int nibbles_at(int32_t type) {
  return type == kQ4_0 || type == kIQ4NL ? 2 : type == kQ4_1 ? 4 : type == kQ5_0 ? 6 : 8;
}

// Element i's code of a block of a q8 type, by ggml's layouts (see quant_impl.cpp).
inline int code_at(int32_t type, const uint8_t* b, int i) {
  if (type == kQ8_0) return static_cast<int8_t>(b[2 + i]);
  if (!q8_k_type(type)) {  // the other 32-blocks: nibbles after the header
    const int head = nibbles_at(type);
    const int c = i < 16 ? b[head + i] & 15 : b[head + i - 16] >> 4;
    if (type == kIQ4NL) return kIq4Values[c];
    return type == kQ5_0 || type == kQ5_1 ? c | (((u32_at(b + head - 4) >> i) & 1) << 4) : c;
  }
  if (type == kIQ4XS) {  // 32-run i / 32: 16 bytes of nibbles, low the first 16 elements
    const uint8_t v = b[8 + 16 * (i / 32) + i % 16];
    return kIq4Values[i % 32 < 16 ? v & 15 : v >> 4];
  }
  if (type == kQ2K || type == kQ3K) {  // 32-run k: bits 2 (k % 4) of qs byte i % 32 (per 128); Q3_K's bit k of hmask
    const int k = i / 32, l = i % 32;
    const int low = (b[(type == kQ2K ? 16 : 32) + 32 * (k / 4) + l] >> (2 * (k % 4))) & 3;
    return type == kQ2K ? low : low | (((b[l] >> k) & 1) << 2);
  }
  const int chunk = i / 64, l = i % 32, upper = (i / 32) % 2;
  if (type == kQ6K) {  // per 128: ql byte l (+ 32) low / high nibble, qh byte l's bit pair
    const int h128 = i / 128, j = i % 128, quarter = j / 32;
    const uint8_t ql = b[64 * h128 + l + 32 * (quarter % 2)], qh = b[128 + 32 * h128 + l];
    return ((quarter < 2 ? ql & 15 : ql >> 4)) | (((qh >> (2 * quarter)) & 3) << 4);
  }
  const uint8_t* q = b + (type == kQ5K ? 48 : 16) + 32 * chunk;
  int c = upper ? q[l] >> 4 : q[l] & 15;
  if (type == kQ5K) c |= ((b[16 + l] >> (2 * chunk + upper)) & 1) << 4;
  return c;
}

// The portable route: one block's integer sums, then its two float terms.
float block_dot_plain(int32_t type, int64_t block, const uint8_t* b, const int8_t* q, const int16_t* sums, float dx) {
  Scales16 s;
  scales16(type, b, s);
  int32_t dot = 0, off = 0;
  for (int g = 0; g < block / 16; ++g) {
    int32_t part = 0;
    for (int i = 16 * g; i < 16 * g + 16; ++i) part += code_at(type, b, i) * q[i];
    dot += s.s[g] * part;
    off += s.m[g] * sums[g];
  }
  return dx * (s.D * static_cast<float>(dot) - s.M * static_cast<float>(off));
}

#ifdef CF_Q8_VECTOR
// One K-quant block's scales and offsets per 16 elements as 16-bit lanes (see Scales16).
struct VScales {
  float D, M;
  __m256i s, m;  // lane g: s_g, m_g
};
template <int32_t Type>
inline VScales vscales(const uint8_t* b) {
  const __m128i nibble = _mm_set1_epi8(15);
  if constexpr (Type == kQ6K) {
    const float d = half_at(b + 208);
    const __m256i s = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192)));
    return {d, d, s, _mm256_slli_epi16(s, 5)};
  } else if constexpr (Type == kQ3K) {  // q3_k_scale for all 16: low nibbles of bytes 0-7 then
    // their high nibbles; the bit pairs of bytes 8-11 at shift 2 (i / 4), one 32-bit lane per i / 4
    const float d = half_at(b + 108);
    const __m128i a = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 96));
    const __m128i low = _mm_and_si128(_mm_unpacklo_epi64(a, _mm_srli_epi16(a, 4)), nibble);
    const __m128i high = _mm_and_si128(
        _mm_srlv_epi32(_mm_set1_epi32(static_cast<int>(u32_at(b + 104))), _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(3));
    const __m256i s = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_or_si128(low, _mm_slli_epi16(high, 4))),
                                       _mm256_set1_epi16(32));
    return {d, d, s, _mm256_slli_epi16(s, 2)};
  } else if constexpr (Type == kQ2K) {  // scale byte g: low nibble s_g, high nibble m_g
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
    return {half_at(b + 80), half_at(b + 82), _mm256_cvtepu8_epi16(_mm_and_si128(sc, nibble)),
            _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc, 4), nibble))};
  } else if constexpr (Type == kIQ4XS) {  // iq4_xs_scale of run ib in 32-bit lane ib: nibble ib of
    // scales_l's word, bit pair ib of scales_h; then in both 16-bit halves (groups 2 ib, 2 ib + 1)
    const __m256i low = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(u32_at(b + 4))),
                                                           _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                                         _mm256_set1_epi32(15));
    const __m256i high = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(b[2] | (b[3] << 8)),
                                                            _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                                          _mm256_set1_epi32(3));
    const __m256i ls = _mm256_or_si256(low, _mm256_slli_epi32(high, 4));
    const __m256i s = _mm256_sub_epi16(_mm256_or_si256(ls, _mm256_slli_epi32(ls, 16)), _mm256_set1_epi16(32));
    return {half_at(b), 0.0f, s, _mm256_setzero_si256()};
  } else {
    const K4Scales k = k4_scales(b + 4);
    const __m128i sc = _mm_cvtsi64_si128(static_cast<long long>(k.sc)), mn = _mm_cvtsi64_si128(static_cast<long long>(k.mn));
    return {half_at(b), half_at(b + 2), _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(sc, sc)),
            _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn, mn))};
  }
}

inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// IQ4's 16 levels in both 128-bit lanes (for vpshufb by 4-bit codes).
inline __m256i iq4_table() {
  return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kIq4Values)));
}

// The 32 codes of a 32-block, in element order: signed for Q4_0 / Q5_0 (c - 8, c - 16), Q8_0 and
// IQ4_NL (its levels), unsigned for Q4_1 / Q5_1.
template <int32_t Type>
inline __m256i codes32(const uint8_t* b) {
  if constexpr (Type == kQ8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
  } else {
    constexpr int kHead = nibbles_at(Type);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kHead));
    __m256i c = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(15));
    if constexpr (Type == kQ5_0 || Type == kQ5_1) {  // fifth bit of element j: bit j of qh
#ifdef CF_Q8_AVX512
      c = _mm256_mask_add_epi8(c, static_cast<__mmask32>(u32_at(b + kHead - 4)), c, _mm256_set1_epi8(16));
#else  // byte j of the word's 32 bits spread: byte j / 8, tested against bit j % 8
      const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                              3, 3, 3, 3, 3, 3, 3, 3);
      const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
      const __m256i qh = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(u32_at(b + kHead - 4))), spread);
      c = _mm256_or_si256(c, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), _mm256_set1_epi8(16)));
#endif
    }
    if constexpr (Type == kQ4_0 || Type == kQ5_0) return _mm256_sub_epi8(c, _mm256_set1_epi8(Type == kQ4_0 ? 8 : 16));
    if constexpr (Type == kIQ4NL) return _mm256_shuffle_epi8(iq4_table(), c);
    return c;
  }
}
// Signed codes (Q4_0, Q5_0, Q8_0, IQ4_NL; of the 256-blocks IQ4_XS) go through vpmaddubsw as |c|
// times q with c's sign (no offset term); Q4_1 / Q5_1 keep unsigned codes and add m times the sum
// of q.
template <int32_t Type>
constexpr bool kSignedCodes = Type == kQ4_0 || Type == kQ5_0 || Type == kQ8_0 || Type == kIQ4NL || Type == kIQ4XS;
template <int32_t Type>
constexpr bool kOffsets = Type != kIQ4XS;  // of the 256-blocks

// The 32 codes of elements [32 k, 32 k + 32) of a 256-block, in element order (IQ4_XS's signed).
template <int32_t Type>
inline __m256i codes32k(const uint8_t* b, int k) {
  const __m256i nibble = _mm256_set1_epi8(15);
  if constexpr (Type == kQ6K) {  // half k / 4, its quarter k % 4: ql's nibbles, qh's bit pair 2 (k % 4)
    const int h = k / 4, quarter = k % 4;
    const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32 * (quarter % 2)));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
    const __m256i low = _mm256_and_si256(quarter < 2 ? ql : _mm256_srli_epi16(ql, 4), nibble);
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * quarter), _mm256_set1_epi8(3));
    return _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
  } else if constexpr (Type == kQ2K || Type == kQ3K) {  // bits 2 (k % 4) of 32 qs bytes per 128; Q3_K's bit k of hmask
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (Type == kQ2K ? 16 : 32) + 32 * (k / 4)));
    __m256i c = _mm256_and_si256(_mm256_srli_epi16(v, 2 * (k % 4)), _mm256_set1_epi8(3));
    if constexpr (Type == kQ3K) {
      const __m256i hm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
      c = _mm256_or_si256(c, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, k), _mm256_set1_epi8(1)), 2));
    }
    return c;
  } else if constexpr (Type == kIQ4XS) {  // 16 bytes of nibbles per run, low the first 16 elements
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 8 + 16 * k));
    return _mm256_shuffle_epi8(iq4_table(), _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), nibble));
  } else {  // Q4_K / Q5_K: 32 bytes per 64 elements, low nibbles the first 32, high nibbles the next
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (Type == kQ5K ? 48 : 16) + 32 * (k / 2)));
    __m256i c = _mm256_and_si256(k % 2 == 0 ? v : _mm256_srli_epi16(v, 4), nibble);
    if constexpr (Type == kQ5K) {  // fifth bits: bit k of qh[l]
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
      c = _mm256_or_si256(c, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, k), _mm256_set1_epi8(1)), 4));
    }
    return c;
  }
}
#endif

#ifdef CF_Q8_AVX512
// 16-bit lanes: the first 16 of value a, the next 16 of value b.
inline __m512i halves16(short a, short b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16(a)), _mm256_set1_epi16(b), 1);
}

// The 64 codes of elements [64 k, 64 k + 64) of a block, in element order.
template <int32_t Type>
inline __m512i codes64(const uint8_t* b, int k) {
  if constexpr (Type == kQ6K) {
    // half k / 2: ql's 64 bytes (elements l, l + 32: low nibbles; l + 64, l + 96: high nibbles), qh's
    // 32 bytes hold their bit pairs at shifts 0, 2 (low nibbles' elements), 4, 6 (high nibbles')
    const __m512i ql = _mm512_loadu_si512(b + 64 * (k / 2));
    const __m512i qh =
        _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * (k / 2))));
    const __m512i low = k % 2 == 0 ? ql : _mm512_srli_epi16(ql, 4);
    const __m512i high = k % 2 == 0 ? _mm512_sllv_epi16(qh, halves16(4, 2)) : _mm512_srlv_epi16(qh, halves16(0, 2));
    return _mm512_or_si512(_mm512_and_si512(low, _mm512_set1_epi8(15)), _mm512_and_si512(high, _mm512_set1_epi8(48)));
  } else if constexpr (Type == kQ2K || Type == kQ3K || Type == kIQ4XS) {  // two 32-runs
    return _mm512_inserti64x4(_mm512_castsi256_si512(codes32k<Type>(b, 2 * k)), codes32k<Type>(b, 2 * k + 1), 1);
  } else {  // 32 bytes: low nibbles elements 64 k.., high nibbles the next 32
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (Type == kQ5K ? 48 : 16) + 32 * k));
    const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi8(15));
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15));
    __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    if constexpr (Type == kQ5K) {  // fifth bits: bit 2k (first 32) / 2k + 1 (next 32) of qh[l]
      const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)));
      const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8(static_cast<char>(1 << (2 * k))),
                                             _mm256_set1_epi8(static_cast<char>(2 << (2 * k))), 1);
      c = _mm512_mask_add_epi8(c, _mm512_test_epi8_mask(qh, bit), c, _mm512_set1_epi8(16));
    }
    return c;
  }
}

// Weight rows [n0, n1) of type Type against x rows [m0, m0 + R): each block's codes decoded once
// (64 at a time) and multiplied by the R rows' int8 activations; int32 sums per block, float
// sums across blocks.
template <int32_t Type, int R>
void rows_k_avx512(const Q8Rows& x, int64_t m0, const uint8_t* w, int64_t row_bytes, const float* bias, float* y,
                   int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int64_t kBytes = block_bytes(Type);
  const int64_t blocks = x.K / 256;
  // vpmaddubsw's 16-bit lane j sums elements 64 k + 2 j and + 1, of group 4 k + j / 8: the lanes'
  // groups for k = 0 (two lanes per 32-bit constant); + 4 k for chunk k
  const __m512i g0 = _mm512_set_epi32(0x30003, 0x30003, 0x30003, 0x30003, 0x20002, 0x20002, 0x20002, 0x20002,
                                      0x10001, 0x10001, 0x10001, 0x10001, 0, 0, 0, 0);
  const __m512i pick[4] = {g0, _mm512_add_epi16(g0, _mm512_set1_epi16(4)), _mm512_add_epi16(g0, _mm512_set1_epi16(8)),
                           _mm512_add_epi16(g0, _mm512_set1_epi16(12))};
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m512 acc[R];
    __m256 off[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), off[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < blocks; ++i) {
      const uint8_t* blk = row + i * kBytes;
      const VScales s = vscales<Type>(blk);
      const __m512i s16 = _mm512_castsi256_si512(s.s);  // lanes 16-31 never picked
      __m512i dot[R];
      for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        __m512i c = codes64<Type>(blk, k);
        __mmask64 negative = 0;
        if constexpr (kSignedCodes<Type>) negative = _mm512_movepi8_mask(c), c = _mm512_abs_epi8(c);
        const __m512i sk = _mm512_permutexvar_epi16(pick[k], s16);
        for (int r = 0; r < R; ++r) {
          __m512i q = _mm512_loadu_si512(x.q + (m0 + r) * x.K + i * 256 + 64 * k);
          if constexpr (kSignedCodes<Type>) q = _mm512_mask_sub_epi8(q, negative, _mm512_setzero_si512(), q);
          dot[r] = _mm512_add_epi32(dot[r], _mm512_madd_epi16(_mm512_maddubs_epi16(c, q), sk));
        }
      }
      for (int r = 0; r < R; ++r) {
        const float dx = x.d[(m0 + r) * blocks + i];
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(s.D * dx), acc[r]);
        if constexpr (kOffsets<Type>) {
          const __m256i sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.sums + ((m0 + r) * blocks + i) * 16));
          off[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s.m, sums)), _mm256_set1_ps(s.M * dx), off[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      y[(m0 + r) * ldy + n] = _mm512_reduce_add_ps(acc[r]) - hsum256(off[r]) + (bias != nullptr ? bias[n] : 0.0f);
  }
}

// Weight rows [n0, n1) of a 32-block type against x rows [m0, m0 + R): two blocks per vector (a
// float scale per block of each product's int32 sums); a last odd block by the portable route.
template <int32_t Type, int R>
void rows_32_avx512(const Q8Rows& x, int64_t m0, const uint8_t* w, int64_t row_bytes, const float* bias, float* y,
                    int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int64_t kBytes = block_bytes(Type);
  const int64_t blocks = x.K / 32;
  const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);  // lanes 8-15: block 2
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m512 acc[R];
    float off[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), off[r] = 0.0f;
    int64_t i = 0;
    for (; i + 2 <= blocks; i += 2) {
      const uint8_t* a = row + i * kBytes;
      __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(codes32<Type>(a)), codes32<Type>(a + kBytes), 1);
      const __m512 d = _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(_mm_setr_ps(half_at(a), half_at(a + kBytes), 0, 0)));
      __mmask64 negative = 0;
      if constexpr (kSignedCodes<Type>) negative = _mm512_movepi8_mask(c), c = _mm512_abs_epi8(c);
      for (int r = 0; r < R; ++r) {
        const int64_t xb = (m0 + r) * blocks + i;
        __m512i q = _mm512_loadu_si512(x.q + 32 * xb);
        if constexpr (kSignedCodes<Type>) q = _mm512_mask_sub_epi8(q, negative, _mm512_setzero_si512(), q);
        const __m512i dot = _mm512_madd_epi16(_mm512_maddubs_epi16(c, q), _mm512_set1_epi16(1));
        const __m512 dx = _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(_mm_setr_ps(x.d[xb], x.d[xb + 1], 0, 0)));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, dx), acc[r]);
        if constexpr (!kSignedCodes<Type>) {  // w = d c + m: minus (-m) dx sum(q)
          const int16_t* sums = x.sums + 2 * xb;
          off[r] -= half_at(a + 2) * x.d[xb] * static_cast<float>(sums[0] + sums[1]) +
                    half_at(a + kBytes + 2) * x.d[xb + 1] * static_cast<float>(sums[2] + sums[3]);
        }
      }
    }
    for (; i < blocks; ++i)
      for (int r = 0; r < R; ++r) {
        const int64_t xb = (m0 + r) * blocks + i;
        off[r] -= block_dot_plain(Type, 32, row + i * kBytes, x.q + 32 * xb, x.sums + 2 * xb, x.d[xb]);
      }
    for (int r = 0; r < R; ++r)
      y[(m0 + r) * ldy + n] = _mm512_reduce_add_ps(acc[r]) - off[r] + (bias != nullptr ? bias[n] : 0.0f);
  }
}
#endif

#ifdef CF_Q8_AVX2
// Weight rows [n0, n1) of type Type against x rows [m0, m0 + R): each block's codes decoded once
// (32 at a time) and multiplied by the R rows' int8 activations; int32 sums per block, float
// sums across blocks (scales and offsets into one accumulator).
template <int32_t Type, int R>
void rows_k_avx2(const Q8Rows& x, int64_t m0, const uint8_t* w, int64_t row_bytes, const float* bias, float* y,
                 int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int64_t kBytes = block_bytes(Type);
  const int64_t blocks = x.K / 256;
  // vpmaddubsw's 16-bit lane j of 32 codes sums elements 2 j, 2 j + 1: group 2 k for lanes 0-7,
  // 2 k + 1 for 8-15; the pair (s_2k, s_2k+1) broadcast, then spread to those lanes
  const __m256i spread = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3,
                                          2, 3, 2, 3, 2, 3);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < blocks; ++i) {
      const uint8_t* blk = row + i * kBytes;
      const VScales s = vscales<Type>(blk);
      __m256i dot[R];
      for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const __m256i c = codes32k<Type>(blk, k);
        const __m256i magnitude = kSignedCodes<Type> ? _mm256_sign_epi8(c, c) : c;
        const __m256i sk = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(s.s, _mm256_set1_epi32(k)), spread);
        for (int r = 0; r < R; ++r) {
          __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + (m0 + r) * x.K + i * 256 + 32 * k));
          if constexpr (kSignedCodes<Type>) q = _mm256_sign_epi8(q, c);
          dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, q), sk));
        }
      }
      for (int r = 0; r < R; ++r) {
        const float dx = x.d[(m0 + r) * blocks + i];
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_set1_ps(s.D * dx), acc[r]);
        if constexpr (kOffsets<Type>) {
          const __m256i sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.sums + ((m0 + r) * blocks + i) * 16));
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s.m, sums)), _mm256_set1_ps(-s.M * dx), acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) y[(m0 + r) * ldy + n] = hsum256(acc[r]) + (bias != nullptr ? bias[n] : 0.0f);
  }
}

// Weight rows [n0, n1) of a 32-block type against x rows [m0, m0 + R): a block per vector, its
// float scale times each row's block scale on the int32 sums; signed codes as |c| and q with c's
// sign (vpsignb).
template <int32_t Type, int R>
void rows_32_avx2(const Q8Rows& x, int64_t m0, const uint8_t* w, int64_t row_bytes, const float* bias, float* y,
                  int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int64_t kBytes = block_bytes(Type);
  const int64_t blocks = x.K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m256 acc[R];
    float off[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), off[r] = 0.0f;
    for (int64_t i = 0; i < blocks; ++i) {
      const uint8_t* a = row + i * kBytes;
      const __m256i c = codes32<Type>(a);
      const __m256i magnitude = kSignedCodes<Type> ? _mm256_sign_epi8(c, c) : c;
      const float d = half_at(a);
      for (int r = 0; r < R; ++r) {
        const int64_t xb = (m0 + r) * blocks + i;
        __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + 32 * xb));
        if constexpr (kSignedCodes<Type>) q = _mm256_sign_epi8(q, c);
        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, q), ones);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * x.d[xb]), acc[r]);
        if constexpr (!kSignedCodes<Type>)  // w = d c + m: minus (-m) dx sum(q)
          off[r] -= half_at(a + 2) * x.d[xb] * static_cast<float>(x.sums[2 * xb] + x.sums[2 * xb + 1]);
      }
    }
    for (int r = 0; r < R; ++r)
      y[(m0 + r) * ldy + n] = hsum256(acc[r]) - off[r] + (bias != nullptr ? bias[n] : 0.0f);
  }
}
#endif

#ifdef CF_Q8_VECTOR
// This ISA's kernel for weight rows [n0, n1) against x rows [m0, m0 + R).
template <int32_t Type, int R>
void rows_vec(const Q8Rows& x, int64_t m0, const uint8_t* w, int64_t row_bytes, const float* bias, float* y,
              int64_t ldy, int64_t n0, int64_t n1) {
#ifdef CF_Q8_AVX512
  if constexpr (q8_k_type(Type))
    rows_k_avx512<Type, R>(x, m0, w, row_bytes, bias, y, ldy, n0, n1);
  else
    rows_32_avx512<Type, R>(x, m0, w, row_bytes, bias, y, ldy, n0, n1);
#else
  if constexpr (q8_k_type(Type))
    rows_k_avx2<Type, R>(x, m0, w, row_bytes, bias, y, ldy, n0, n1);
  else
    rows_32_avx2<Type, R>(x, m0, w, row_bytes, bias, y, ldy, n0, n1);
#endif
}
#endif

// One block of x (block values, a multiple of 16) rounded to int8 as quant_blocks.h says: codes q,
// the sums of each 16 codes, returns the scale d. inf / NaN: d is inf / NaN and the codes 0, so the
// products are NaN, as the float route's are; a block too small for 127 / max|x| (below ~4e-37) or
// all zeros: d 0, codes 0. AVX-512 builds take 16 values a step (the same float products, rounded
// to nearest even as rintf).
inline float quantize_block(const float* xb, int64_t block, int8_t* q, int16_t* sums) {
  float amax = 0.0f;
  bool nan = false;
#ifdef CF_Q8_AVX512
  __m512 top = _mm512_setzero_ps();
  __mmask16 unordered = 0;
  for (int64_t i = 0; i < block; i += 16) {
    const __m512 v = _mm512_loadu_ps(xb + i);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    top = _mm512_max_ps(top, _mm512_abs_ps(v));
  }
  amax = _mm512_reduce_max_ps(top), nan = unordered != 0;
#else
  for (int64_t i = 0; i < block; ++i) {
    const float a = std::fabs(xb[i]);
    nan |= a != a;
    amax = a > amax ? a : amax;
  }
#endif
  const bool finite = !nan && amax <= __FLT_MAX__, coded = finite && amax >= 1e-36f;
  const float id = coded ? 127.0f / amax : 0.0f;
  for (int64_t g = 0; g < block / 16; ++g) {
#ifdef CF_Q8_AVX512
    __m512i c = _mm512_setzero_si512();
    if (coded)
      c = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + 16 * g), _mm512_set1_ps(id))),
                                            _mm512_set1_epi32(127)),
                           _mm512_set1_epi32(-127));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * g), _mm512_cvtepi32_epi8(c));
    sums[g] = static_cast<int16_t>(_mm512_reduce_add_epi32(c));
#else
    int sum = 0;
    for (int64_t i = 16 * g; i < 16 * g + 16; ++i) {
      const float v = coded ? __builtin_rintf(xb[i] * id) : 0.0f;
      const int c = static_cast<int>(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
      q[i] = static_cast<int8_t>(c);
      sum += c;
    }
    sums[g] = static_cast<int16_t>(sum);
#endif
  }
  return nan ? __builtin_nanf("") : !finite ? amax : coded ? amax / 127.0f : 0.0f;
}

// The portable route over the same rows (any R).
void rows_plain(int32_t type, const Q8Rows& x, int64_t m0, int64_t R, const uint8_t* w, int64_t row_bytes,
                const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const BlockFormat& f = *block_format(type);
  const int64_t blocks = x.K / f.block;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = m0; m < m0 + R; ++m) {
      float sum = 0.0f;
      for (int64_t i = 0; i < blocks; ++i)
        sum += block_dot_plain(type, f.block, w + n * row_bytes + i * f.bytes, x.q + m * x.K + i * f.block,
                               x.sums + (m * x.K + i * f.block) / 16, x.d[m * blocks + i]);
      y[m * ldy + n] = sum + (bias != nullptr ? bias[n] : 0.0f);
    }
}

#ifdef CF_Q8_VECTOR
template <int32_t Type>
void rows_by4(const Q8Rows& x, const uint8_t* w, int64_t row_bytes, const float* bias, float* y, int64_t ldy,
              int64_t n0, int64_t n1) {
  const int64_t step = x.M <= 4 ? n1 - n0 : 1;  // more than 4 rows of x: each weight row by all of them
  for (int64_t n = n0; n < n1; n += step)
    for (int64_t m = 0; m < x.M; m += 4) {
      const int64_t e = n + step;
      switch (x.M - m < 4 ? x.M - m : 4) {
        case 1: rows_vec<Type, 1>(x, m, w, row_bytes, bias, y, ldy, n, e); break;
        case 2: rows_vec<Type, 2>(x, m, w, row_bytes, bias, y, ldy, n, e); break;
        case 3: rows_vec<Type, 3>(x, m, w, row_bytes, bias, y, ldy, n, e); break;
        default: rows_vec<Type, 4>(x, m, w, row_bytes, bias, y, ldy, n, e); break;
      }
    }
}
#endif

}  // namespace

void quantize_q8(const float* x, int64_t M, int64_t K, int64_t block, int8_t* q, int16_t* sums, float* d) {
  for (int64_t b = 0; b < M * K / block; ++b) d[b] = quantize_block(x + block * b, block, q + block * b, sums + block / 16 * b);
}

void quantize_q8_tiles(const float* x, int64_t M, int64_t K, int64_t block, uint8_t* q, int32_t* sums, float* d,
                       int64_t t0, int64_t t1) {
  const int64_t blocks = K / block, pairs = block / 32;
  alignas(64) int8_t codes[256];
  int16_t groups[16];
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t l = 0; l < kQ8Lanes; ++l) {
      const int64_t m = t * kQ8Lanes + l;
      for (int64_t i = 0; i < blocks; ++i) {
        float di = 0.0f;  // padding rows: codes 0 (bytes 128), sums and scale 0
        if (m < M)
          di = quantize_block(x + m * K + i * block, block, codes, groups);
        else
          __builtin_memset(codes, 0, sizeof codes), __builtin_memset(groups, 0, sizeof groups);
        d[(t * blocks + i) * kQ8Lanes + l] = di;
        for (int64_t p = 0; p < pairs; ++p)
          sums[((t * blocks + i) * pairs + p) * kQ8Lanes + l] = static_cast<int32_t>(
              static_cast<uint16_t>(groups[2 * p]) | (static_cast<uint32_t>(static_cast<uint16_t>(groups[2 * p + 1])) << 16));
        uint8_t* out = q + (t * K + i * block) * kQ8Lanes + 4 * l;
        for (int64_t j = 0; j < block / 4; ++j) {  // c + 128 as a byte: c ^ 0x80
          uint32_t v;
          __builtin_memcpy(&v, codes + 4 * j, 4);
          v ^= 0x80808080u;
          __builtin_memcpy(out + j * 4 * kQ8Lanes, &v, 4);
        }
      }
    }
}

bool q8_vectorized() {
#ifdef CF_Q8_VECTOR
  return true;
#else
  return false;
#endif
}

int64_t q8_rows(int32_t type) {
#ifdef CF_Q8_AVX2
  return q8_max_rows(type, true);
#else
  return q8_max_rows(type, false);
#endif
}

void gemm_q8(int32_t type, const Q8Rows& x, const uint8_t* w, int64_t row_bytes, const float* bias, float* y,
             int64_t ldy, int64_t n0, int64_t n1) {
#ifdef CF_Q8_VECTOR
  switch (type) {
    case kQ4_0: return rows_by4<kQ4_0>(x, w, row_bytes, bias, y, ldy, n0, n1);
    case kQ4_1: return rows_by4<kQ4_1>(x, w, row_bytes, bias, y, ldy, n0, n1);
    case kQ5_0: return rows_by4<kQ5_0>(x, w, row_bytes, bias, y, ldy, n0, n1);
    case kQ5_1: return rows_by4<kQ5_1>(x, w, row_bytes, bias, y, ldy, n0, n1);
    case kQ8_0: return rows_by4<kQ8_0>(x, w, row_bytes, bias, y, ldy, n0, n1);
    case kIQ4NL: return rows_by4<kIQ4NL>(x, w, row_bytes, bias, y, ldy, n0, n1);
    case kQ2K: return rows_by4<kQ2K>(x, w, row_bytes, bias, y, ldy, n0, n1);
    case kQ3K: return rows_by4<kQ3K>(x, w, row_bytes, bias, y, ldy, n0, n1);
    case kQ4K: return rows_by4<kQ4K>(x, w, row_bytes, bias, y, ldy, n0, n1);
    case kQ5K: return rows_by4<kQ5K>(x, w, row_bytes, bias, y, ldy, n0, n1);
    case kQ6K: return rows_by4<kQ6K>(x, w, row_bytes, bias, y, ldy, n0, n1);
    case kIQ4XS: return rows_by4<kIQ4XS>(x, w, row_bytes, bias, y, ldy, n0, n1);
    default: break;
  }
#endif
  rows_plain(type, x, 0, x.M, w, row_bytes, bias, y, ldy, n0, n1);
}

// The tiled kernels (quant_q8_tiled.h), with VNNI and without.
namespace vnni {
#define CF_TILED_VNNI 1
#include "quant_q8_tiled.h"
#undef CF_TILED_VNNI
}  // namespace vnni
namespace plain {
#define CF_TILED_VNNI 0
#include "quant_q8_tiled.h"
#undef CF_TILED_VNNI
}  // namespace plain

}  // namespace cf::cpu::CF_ISA_NS
