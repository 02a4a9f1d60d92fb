// quant_common.h — small helpers the per-ISA block files (quant_impl.cpp, quant_q8_impl.cpp) share:
// reading halves, words and the K-quants' and IQ4_XS's packed scales out of a block, and IQ4's
// levels. Included inside each file's ISA namespace (so each ISA
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

// Q3_K's scale i of 16 (six bits stored with +32, returned signed), from its 12 scale bytes: the
// low 4 bits in bytes 0-7 (scales 0-7 low nibbles, 8-15 high nibbles), the high 2 bits in bytes
// 8-11 (scale i at shift 2 (i / 4) of byte 8 + i % 4).
inline int q3_k_scale(const uint8_t* s, int i) {
  const int low = i < 8 ? (s[i] & 15) : (s[i - 8] >> 4);
  const int high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
  return (low | (high << 4)) - 32;
}

// IQ4_XS's scale of 32-run ib of 8 (six bits stored with +32, returned signed): 4 low bits in
// scales_l (byte 4 + ib / 2, nibble ib % 2), 2 high bits in the u16 scales_h (bytes 2-3, shift 2 ib).
inline int iq4_xs_scale(const uint8_t* b, int ib) {
  const int scales_h = b[2] | (b[3] << 8);
  return (((b[4 + ib / 2] >> (4 * (ib % 2))) & 15) | (((scales_h >> (2 * ib)) & 3) << 4)) - 32;
}

// IQ4_NL / IQ4_XS: the 16 non-uniform levels (signed) a 4-bit code selects.
alignas(16) constexpr int8_t kIq4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                               1,    13,   25,  38,  53,  69,  89,  113};
