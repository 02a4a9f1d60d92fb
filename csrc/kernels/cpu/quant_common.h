// quant_common.h — small helpers the per-ISA block files (quant_impl.cpp, quant_q8_impl.cpp) share:
// reading halves, words and the K-quants' packed six-bit scales out of a block. Included inside each file's ISA namespace (so each ISA
// gets its own copies and none leaks into another's code): no includes here; the includer brings
// <immintrin.h> where the ISA has F16C.
#pragma once

inline float bits_to_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

// IEEE half -> float: one instruction where the ISA has F16C; else the half's exponent and
// mantissa moved into a float's and rescaled by 2^112 (exact for normals and subnormals),
// infinities and NaNs keeping an all-ones exponent.
#ifdef __F16C__
inline float half(uint16_t h) { return _cvtsh_ss(h); }
#else
inline float half(uint16_t h) {
  const uint32_t em = h & 0x7fffu, sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  float f = bits_to_float(em << 13) * 0x1p112f;
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  if (em >= 0x7c00u) u = (em << 13) | 0x7f800000u;
  return bits_to_float(u | sign);
}
#endif
inline float half_at(const uint8_t* p) { return half(static_cast<uint16_t>(p[0] | (p[1] << 8))); }
// A little-endian 32-bit word.
inline uint32_t u32_at(const uint8_t* p) { return p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24); }

// Q4_K / Q5_K's twelve scale bytes -> eight six-bit scales and eight mins, a byte each, in two
// words (the fields of ggml-common.h: pairs 0-3 in the low six bits of bytes 0-3 / 4-7, pairs 4-7
// four bits from bytes 8-11 and two from the top of bytes 0-3 / 4-7).
struct K4Scales {
  uint64_t sc, mn;
  int scale(int j) const { return static_cast<int>((sc >> (8 * j)) & 63); }
  int min(int j) const { return static_cast<int>((mn >> (8 * j)) & 63); }
};
inline K4Scales k4_scales(const uint8_t* s) {
  const uint32_t w0 = u32_at(s), w1 = u32_at(s + 4), w2 = u32_at(s + 8);
  const uint32_t sc_lo = w0 & 0x3f3f3f3fu, mn_lo = w1 & 0x3f3f3f3fu;
  const uint32_t sc_hi = (w2 & 0x0f0f0f0fu) | (((w0 >> 6) & 0x03030303u) << 4);
  const uint32_t mn_hi = ((w2 >> 4) & 0x0f0f0f0fu) | (((w1 >> 6) & 0x03030303u) << 4);
  return {sc_lo | (uint64_t{sc_hi} << 32), mn_lo | (uint64_t{mn_hi} << 32)};
}
