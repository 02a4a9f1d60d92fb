// quant_decode.cuh — element j of a packed ggml block, for every type the GPU reads packed
// (kernels/cpu/quant_blocks.h's CF_BLOCK_TYPES, plus F16 and BF16): ggml's layouts, the same
// formulas as kernels/cpu/quant_impl.cpp's whole-block decoders (which say where each field
// lives). __host__ __device__, so the tests also run them on the host (test_gpu_kernels.py, with
// nvcc and no GPU) against the gguf package's decoding.
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

CF_HD inline float half_at(const uint8_t* p) {
  __half_raw raw;
  raw.x = static_cast<unsigned short>(p[0] | (p[1] << 8));
  return __half2float(__half(raw));
}
CF_HD inline float bf16_at(const uint8_t* p) {
  const unsigned bits = static_cast<unsigned>(p[0] | (p[1] << 8)) << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}
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

}  // namespace cf::gpu
