// quant_decode.cuh — packed ggml blocks decoded for every type the GPU reads packed
// (kernels/cpu/quant_blocks.h's CF_BLOCK_TYPES, plus F16 and BF16): ggml's layouts, the same
// formulas as kernels/cpu/quant_impl.cpp's whole-block decoders (which say where each field
// lives). Two forms: `value` (element k of a row: any alignment, any K; the fallback kernels) and
// `decode8` (eight consecutive elements from one header read and wide code loads; what the fast
// kernels read), with `row_chunk` / `lane_sums`, the chunk walks of quant.cu's kernels, and
// `grouped_rows`, the grouped GEMV kernel's plan of which rows each block row takes. Everything
// is __host__ __device__, so the tests run the same code on the host (test_gpu_kernels.py, with
// nvcc and no GPU) against the gguf package's decoding and numpy's products.
#pragma once
#include <cstdint>
#include <cstring>

#include "../cpu/quant_blocks.h"

#if defined(__HIPCC__) || defined(CF_HIP)
#include <hip/hip_fp16.h>
#else
#include <cuda_fp16.h>
#endif

#define CF_HD __host__ __device__

namespace cf::gpu {

CF_HD inline float half_bits(unsigned bits) {  // an fp16 value from its 16 bits
  __half_raw raw;
  raw.x = static_cast<unsigned short>(bits);
  return __half2float(__half(raw));
}
CF_HD inline float bf16_bits(unsigned bits) {
  const unsigned wide = bits << 16;
  float f;
  memcpy(&f, &wide, sizeof f);
  return f;
}
CF_HD inline float half_at(const uint8_t* p) { return half_bits(p[0] | (p[1] << 8)); }
CF_HD inline float bf16_at(const uint8_t* p) { return bf16_bits(p[0] | (p[1] << 8)); }
CF_HD inline int nibble(const uint8_t* q, int j) {  // 32-runs: j < 16 low nibble of q[j], else high of q[j - 16]
  return j < 16 ? (q[j] & 15) : (q[j - 16] >> 4);
}
// IQ4_NL / IQ4_XS's 16 non-uniform levels {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38,
// 53, 69, 89, 113}, as int8 bytes of four words picked by selects: an array indexed at run time
// would live in a GPU thread's local memory.
CF_HD inline int iq4_level(int code) {
  const unsigned q = static_cast<unsigned>(code) >> 2;
  const uint32_t word = q == 0 ? 0xBFAD9881u : q == 1 ? 0xF6EADDCFu : q == 2 ? 0x26190D01u : 0x71594535u;
  return static_cast<int8_t>((word >> (8 * (code & 3))) & 0xffu);
}

// Q4_K / Q5_K's scale and min of sub-block s (ggml's get_scale_min_k4).
CF_HD inline void scale_min_k4(int s, const uint8_t* q, int* sc, int* m) {
  if (s < 4) {
    *sc = q[s] & 63;
    *m = q[s + 4] & 63;
  } else {
    *sc = (q[s + 4] & 15) | ((q[s - 4] >> 6) << 4);
    *m = (q[s + 4] >> 4) | ((q[s] >> 6) << 4);
  }
}

template <int T> struct Block;  // elements and bytes per block
#define CF_GPU_BLOCK(id, name, fn, block, bytes) \
  template <> struct Block<id> { static constexpr int n = block, b = bytes; };
CF_BLOCK_TYPES(CF_GPU_BLOCK)
#undef CF_GPU_BLOCK
template <> struct Block<1> { static constexpr int n = 1, b = 2; };   // F16
template <> struct Block<30> { static constexpr int n = 1, b = 2; };  // BF16

template <int T> CF_HD float decode(const uint8_t* b, int j);  // element j of the block at b

template <> CF_HD inline float decode<1>(const uint8_t* b, int) { return half_at(b); }
template <> CF_HD inline float decode<30>(const uint8_t* b, int) { return bf16_at(b); }
template <> CF_HD inline float decode<2>(const uint8_t* b, int j) { return half_at(b) * (nibble(b + 2, j) - 8); }
template <> CF_HD inline float decode<3>(const uint8_t* b, int j) { return half_at(b) * nibble(b + 4, j) + half_at(b + 2); }
template <> CF_HD inline float decode<6>(const uint8_t* b, int j) {
  const unsigned qh = b[2] | (b[3] << 8) | (b[4] << 16) | (static_cast<unsigned>(b[5]) << 24);
  return half_at(b) * ((nibble(b + 6, j) | (static_cast<int>((qh >> j) & 1) << 4)) - 16);
}
template <> CF_HD inline float decode<7>(const uint8_t* b, int j) {
  const unsigned qh = b[4] | (b[5] << 8) | (b[6] << 16) | (static_cast<unsigned>(b[7]) << 24);
  return half_at(b) * (nibble(b + 8, j) | (static_cast<int>((qh >> j) & 1) << 4)) + half_at(b + 2);
}
template <> CF_HD inline float decode<8>(const uint8_t* b, int j) { return half_at(b) * static_cast<int8_t>(b[2 + j]); }
template <> CF_HD inline float decode<20>(const uint8_t* b, int j) { return half_at(b) * iq4_level(nibble(b + 2, j)); }
// Q2_K: per 128, four 32-runs at shifts 0, 2, 4, 6 of 32 bytes; a (scale, min) nibble pair per 16.
template <> CF_HD inline float decode<10>(const uint8_t* b, int j) {
  const int half = j / 128, r = j % 128, s = r / 32, part = (r % 32) / 16, l = r % 16;
  const int is = half * 8 + s * 2 + part, q = (b[16 + half * 32 + part * 16 + l] >> (2 * s)) & 3;
  return half_at(b + 80) * (b[is] & 15) * q - half_at(b + 82) * (b[is] >> 4);
}
// Q3_K: Q2_K's low bits, a third bit in hmask (clear = minus 4), sixteen 6-bit scales (+32).
template <> CF_HD inline float decode<11>(const uint8_t* b, int j) {
  const int half = j / 128, r = j % 128, s = r / 32, part = (r % 32) / 16, l = r % 16;
  const int is = half * 8 + s * 2 + part, bit = half * 4 + s;
  const int low = (b[32 + half * 32 + part * 16 + l] >> (2 * s)) & 3, high = (b[part * 16 + l] >> bit) & 1;
  const uint8_t* sc = b + 96;
  const int scale = ((is < 8 ? (sc[is] & 15) : (sc[is - 8] >> 4)) | (((sc[8 + is % 4] >> (2 * (is / 4))) & 3) << 4)) - 32;
  return half_at(b + 108) * scale * ((low | (high << 2)) - 4);
}
// Q4_K / Q5_K: per 64, 32 bytes (low nibbles: sub-block 2c, high: 2c + 1); Q5_K's fifth bit is
// bit (sub-block) of qh[l].
template <bool kFifth>
CF_HD inline float q45_k(const uint8_t* b, int j) {
  const int c = j / 64, hi = (j % 64) / 32, l = j % 32, sub = 2 * c + hi;
  const uint8_t byte = b[(kFifth ? 48 : 16) + 32 * c + l];
  int q = hi ? byte >> 4 : byte & 15;
  if (kFifth) q |= ((b[16 + l] >> sub) & 1) << 4;
  int sc, m;
  scale_min_k4(sub, b + 4, &sc, &m);
  return half_at(b) * sc * q - half_at(b + 2) * m;
}
template <> CF_HD inline float decode<12>(const uint8_t* b, int j) { return q45_k<false>(b, j); }
template <> CF_HD inline float decode<13>(const uint8_t* b, int j) { return q45_k<true>(b, j); }
// Q6_K: per 128, byte l of ql (and ql + 32) and of qh serve elements l, l + 32, l + 64, l + 96.
template <> CF_HD inline float decode<14>(const uint8_t* b, int j) {
  const int half = j / 128, r = j % 128, t = r / 32, l = r % 32;
  const uint8_t lq = b[64 * half + l + (t & 1) * 32];
  const int low = t < 2 ? (lq & 15) : (lq >> 4), high = (b[128 + 32 * half + l] >> (2 * t)) & 3;
  const int scale = static_cast<int8_t>(b[192 + half * 8 + l / 16 + 2 * t]);
  return half_at(b + 208) * scale * ((low | (high << 4)) - 32);
}
// IQ4_XS: eight IQ4_NL 32-runs, each scaled by d * (six-bit scale - 32).
template <> CF_HD inline float decode<23>(const uint8_t* b, int j) {
  const int ib = j / 32, scales_h = b[2] | (b[3] << 8);
  const int ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 15) | (((scales_h >> (2 * ib)) & 3) << 4);
  return half_at(b) * (ls - 32) * iq4_level(nibble(b + 8 + 16 * ib, j % 32));
}

template <int T>
CF_HD inline float value(const uint8_t* row, int64_t k) {
  return decode<T>(row + (k / Block<T>::n) * Block<T>::b, static_cast<int>(k % Block<T>::n));
}

// ---------------------------------------------------------------- chunks of eight elements
// Elements j0 .. j0 + 7 (j0 % 8 == 0) of a block share one header read and come from eight
// consecutive code bytes (plus eight bytes of high bits for the 5- and 6-bit K types). A lane reads
// them with the widest loads the fields' alignment allows: code_align(T), the gcd of the block size
// and the offsets of the fields read wide, so it holds in every row (and every expert of stacked
// [E, rows, bytes] blocks) of a matrix whose start is aligned to it (the launchers check that, and
// take the per-element kernels otherwise).

CF_HD constexpr int code_align(int type) {
  switch (type) {
    case 3: case 10: return 4;                                   // Q4_1, Q2_K
    case 1: case 30: case 7: case 12: case 13: case 23: return 8;  // F16, BF16, Q5_1, Q4_K, Q5_K, IQ4_XS
    default: return 2;                                           // Q4_0, Q5_0, Q8_0, Q3_K, Q6_K, IQ4_NL
  }
}

#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define CF_DEVICE_PASS 1
#endif

struct Bytes8 {  // eight bytes, little-endian in two words
  uint32_t lo, hi;
  CF_HD int operator[](int i) const { return static_cast<int>(((i < 4 ? lo : hi) >> (8 * (i & 3))) & 0xffu); }
  CF_HD unsigned half(int i) const { return ((i < 2 ? lo : hi) >> (16 * (i & 1))) & 0xffffu; }  // 16-bit i of 4
};

template <int A>  // p is A-byte aligned (A = 2, 4 or 8)
CF_HD inline Bytes8 load8(const uint8_t* p) {
#ifdef CF_DEVICE_PASS
  if constexpr (A >= 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    return {v.x, v.y};
  } else if constexpr (A == 4) {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(p);
    return {q[0], q[1]};
  } else {
    const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
    return {q[0] | (static_cast<uint32_t>(q[1]) << 16), q[2] | (static_cast<uint32_t>(q[3]) << 16)};
  }
#else
  Bytes8 b;
  memcpy(&b.lo, p, 4);
  memcpy(&b.hi, p + 4, 4);
  return b;
#endif
}

template <int T> CF_HD void decode8(const uint8_t* b, int j0, float* w);  // w[i] = element j0 + i

template <> CF_HD inline void decode8<1>(const uint8_t* b, int, float* w) {  // F16: b is element j0's
  const Bytes8 a = load8<code_align(1)>(b), c = load8<code_align(1)>(b + 8);
  for (int i = 0; i < 4; ++i) w[i] = half_bits(a.half(i)), w[4 + i] = half_bits(c.half(i));
}
template <> CF_HD inline void decode8<30>(const uint8_t* b, int, float* w) {
  const Bytes8 a = load8<code_align(30)>(b), c = load8<code_align(30)>(b + 8);
  for (int i = 0; i < 4; ++i) w[i] = bf16_bits(a.half(i)), w[4 + i] = bf16_bits(c.half(i));
}
// The 32-blocks: elements j0 .. j0 + 7 are the low (j0 < 16) or high nibbles of bytes j0 % 16 ..
template <> CF_HD inline void decode8<2>(const uint8_t* b, int j0, float* w) {
  const float d = half_at(b);
  const Bytes8 q = load8<code_align(2)>(b + 2 + j0 % 16);
  const int s = j0 < 16 ? 0 : 4;
  for (int i = 0; i < 8; ++i) w[i] = d * (((q[i] >> s) & 15) - 8);
}
template <> CF_HD inline void decode8<3>(const uint8_t* b, int j0, float* w) {
  const float d = half_at(b), m = half_at(b + 2);
  const Bytes8 q = load8<code_align(3)>(b + 4 + j0 % 16);
  const int s = j0 < 16 ? 0 : 4;
  for (int i = 0; i < 8; ++i) w[i] = d * ((q[i] >> s) & 15) + m;
}
CF_HD inline unsigned fifth_bits(const uint8_t* qh, int j0) {  // Q5_0 / Q5_1: bits j0 .. j0 + 7 of qh
  const unsigned all = qh[0] | (qh[1] << 8) | (qh[2] << 16) | (static_cast<unsigned>(qh[3]) << 24);
  return all >> j0;
}
template <> CF_HD inline void decode8<6>(const uint8_t* b, int j0, float* w) {
  const float d = half_at(b);
  const unsigned h = fifth_bits(b + 2, j0);
  const Bytes8 q = load8<code_align(6)>(b + 6 + j0 % 16);
  const int s = j0 < 16 ? 0 : 4;
  for (int i = 0; i < 8; ++i) w[i] = d * ((((q[i] >> s) & 15) | (static_cast<int>((h >> i) & 1) << 4)) - 16);
}
template <> CF_HD inline void decode8<7>(const uint8_t* b, int j0, float* w) {
  const float d = half_at(b), m = half_at(b + 2);
  const unsigned h = fifth_bits(b + 4, j0);
  const Bytes8 q = load8<code_align(7)>(b + 8 + j0 % 16);
  const int s = j0 < 16 ? 0 : 4;
  for (int i = 0; i < 8; ++i) w[i] = d * (((q[i] >> s) & 15) | (static_cast<int>((h >> i) & 1) << 4)) + m;
}
template <> CF_HD inline void decode8<8>(const uint8_t* b, int j0, float* w) {
  const float d = half_at(b);
  const Bytes8 q = load8<code_align(8)>(b + 2 + j0);
  for (int i = 0; i < 8; ++i) w[i] = d * static_cast<int8_t>(q[i]);
}
template <> CF_HD inline void decode8<20>(const uint8_t* b, int j0, float* w) {
  const float d = half_at(b);
  const Bytes8 q = load8<code_align(20)>(b + 2 + j0 % 16);
  const int s = j0 < 16 ? 0 : 4;
  for (int i = 0; i < 8; ++i) w[i] = d * iq4_level((q[i] >> s) & 15);
}
// Q2_K / Q3_K: the eight share one 16-element sub-block (scale index `is`) and one shift.
template <> CF_HD inline void decode8<10>(const uint8_t* b, int j0, float* w) {
  const int half = j0 / 128, r = j0 % 128, s = r / 32, part = (r % 32) / 16, l0 = r % 16;
  const int is = half * 8 + s * 2 + part;
  const float dl = half_at(b + 80) * (b[is] & 15), ml = half_at(b + 82) * (b[is] >> 4);
  const Bytes8 q = load8<code_align(10)>(b + 16 + half * 32 + part * 16 + l0);
  for (int i = 0; i < 8; ++i) w[i] = dl * ((q[i] >> (2 * s)) & 3) - ml;
}
template <> CF_HD inline void decode8<11>(const uint8_t* b, int j0, float* w) {
  const int half = j0 / 128, r = j0 % 128, s = r / 32, part = (r % 32) / 16, l0 = r % 16;
  const int is = half * 8 + s * 2 + part, bit = half * 4 + s;
  const uint8_t* sc = b + 96;
  const int scale = ((is < 8 ? (sc[is] & 15) : (sc[is - 8] >> 4)) | (((sc[8 + is % 4] >> (2 * (is / 4))) & 3) << 4)) - 32;
  const float dl = half_at(b + 108) * scale;
  constexpr int A = code_align(11);
  const Bytes8 low = load8<A>(b + 32 + half * 32 + part * 16 + l0), high = load8<A>(b + part * 16 + l0);
  for (int i = 0; i < 8; ++i) w[i] = dl * ((((low[i] >> (2 * s)) & 3) | (((high[i] >> bit) & 1) << 2)) - 4);
}
// Q4_K / Q5_K: the eight share sub-block 2c + hi (one scale and min).
template <bool kFifth>
CF_HD inline void q45_k8(const uint8_t* b, int j0, float* w) {
  const int c = j0 / 64, hi = (j0 % 64) / 32, l0 = j0 % 32, sub = 2 * c + hi;
  int sc, m;
  scale_min_k4(sub, b + 4, &sc, &m);
  const float d = half_at(b) * sc, dm = half_at(b + 2) * m;
  constexpr int A = code_align(kFifth ? 13 : 12);
  const Bytes8 q = load8<A>(b + (kFifth ? 48 : 16) + 32 * c + l0);
  const Bytes8 h = kFifth ? load8<A>(b + 16 + l0) : Bytes8{0, 0};
  for (int i = 0; i < 8; ++i) w[i] = d * ((hi ? q[i] >> 4 : q[i] & 15) | (((h[i] >> sub) & 1) << 4)) - dm;
}
template <> CF_HD inline void decode8<12>(const uint8_t* b, int j0, float* w) { q45_k8<false>(b, j0, w); }
template <> CF_HD inline void decode8<13>(const uint8_t* b, int j0, float* w) { q45_k8<true>(b, j0, w); }
template <> CF_HD inline void decode8<14>(const uint8_t* b, int j0, float* w) {
  const int half = j0 / 128, r = j0 % 128, t = r / 32, l0 = r % 32;
  const float d = half_at(b + 208) * static_cast<int8_t>(b[192 + half * 8 + l0 / 16 + 2 * t]);
  constexpr int A = code_align(14);
  const Bytes8 lq = load8<A>(b + 64 * half + l0 + (t & 1) * 32), hq = load8<A>(b + 128 + 32 * half + l0);
  for (int i = 0; i < 8; ++i) w[i] = d * (((t < 2 ? lq[i] & 15 : lq[i] >> 4) | (((hq[i] >> (2 * t)) & 3) << 4)) - 32);
}
template <> CF_HD inline void decode8<23>(const uint8_t* b, int j0, float* w) {
  const int ib = j0 / 32, scales_h = b[2] | (b[3] << 8);
  const int ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 15) | (((scales_h >> (2 * ib)) & 3) << 4);
  const float d = half_at(b) * (ls - 32);
  const Bytes8 q = load8<code_align(23)>(b + 8 + 16 * ib + j0 % 16);
  const int s = j0 % 32 < 16 ? 0 : 4;
  for (int i = 0; i < 8; ++i) w[i] = d * iq4_level((q[i] >> s) & 15);
}

// Elements k0 .. k0 + 7 (k0 % 8 == 0) of a packed row, into w.
template <int T>
CF_HD inline void row_chunk(const uint8_t* row, int64_t k0, float* w) {
  decode8<T>(row + (k0 / Block<T>::n) * Block<T>::b, static_cast<int>(k0 % Block<T>::n), w);
}

// One lane's share of a packed row's products with R rows of x: chunks lane, lane + lanes, ... of
// the row, acc[m] += w . x_m over them for m < M. X supplies x: X::load8(m, k0, v) sets v[i] =
// x[m][k0 + i] in fp32. Two chunks per step, so each lane has two chunks' loads in flight.
template <int T, int R, class X>
CF_HD inline void lane_sums(const uint8_t* row, const X& x, int M, int64_t K, int lane, int lanes, float* acc) {
  const int64_t step = 8 * static_cast<int64_t>(lanes);
#pragma unroll 2
  for (int64_t k0 = 8 * static_cast<int64_t>(lane); k0 < K; k0 += step) {
    float w[8];
    row_chunk<T>(row, k0, w);
#pragma unroll
    for (int m = 0; m < R; ++m) {
      if (m < M) {
        float v[8];
        x.load8(m, k0, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[m] += w[i] * v[i];
      }
    }
  }
}

// The grouped GEMV kernel's rows for its block row j (rows sorted by expert: experts[j] ascending,
// ends[e] each expert's cumulative row count): sets *expert to row j's and returns how many rows
// [j, j + M) the block row takes, kRows or fewer at the run's end; 0 where j is not a multiple of
// kRows into its expert's run (another block row takes it). Every row is taken exactly once.
template <int kRows>
CF_HD inline int grouped_rows(int64_t j, const int64_t* experts, const int32_t* ends, int64_t* expert) {
  const int64_t e = experts[j], start = e > 0 ? ends[e - 1] : 0, end = ends[e];
  *expert = e;
  if ((j - start) % kRows != 0) return 0;
  return static_cast<int>(end - j < kRows ? end - j : kRows);
}

}  // namespace cf::gpu
