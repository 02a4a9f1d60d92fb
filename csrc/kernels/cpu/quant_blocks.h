// quant_blocks.h — ggml's block formats (GGUF tensor types) read packed by the CPU linear layers:
// the format table and the raw-pointer kernels, compiled once per instruction set like
// skinny_gemm.h's (quant_impl.cpp; no ATen or standard-library templates there).
//
// A packed matrix [N, K] is N rows of row_bytes = K / block * bytes, each row K / block blocks in
// ggml's layout (llama.cpp's ggml-common.h documents every field; the formulas are in
// quant_impl.cpp). Types: F16 and BF16 (block 1), the legacy 32-blocks Q4_0, Q4_1, Q5_0, Q5_1,
// Q8_0, the 256-blocks Q2_K..Q6_K, and the non-linear IQ4_NL (32) / IQ4_XS (256).
#pragma once
#include <cstdint>

namespace cf::cpu {

struct BlockFormat {
  int32_t type;      // ggml's type id (GGMLQuantizationType)
  const char* name;  // "Q4_K"
  int64_t block;     // elements per block
  int64_t bytes;     // bytes per block
};
// The block types, the one list the format table (quant.cpp) and the decoders (quant_impl.cpp)
// are built from: ggml type id, name, decoder, elements and bytes per block. (F16 and BF16, block
// 1, are rows of halves, not blocks: listed by the table alone.)
#define CF_BLOCK_TYPES(X)                                                                             \
  X(2, Q4_0, q4_0, 32, 18) X(3, Q4_1, q4_1, 32, 20) X(6, Q5_0, q5_0, 32, 22) X(7, Q5_1, q5_1, 32, 24) \
  X(8, Q8_0, q8_0, 32, 34) X(10, Q2_K, q2_k, 256, 84) X(11, Q3_K, q3_k, 256, 110)                      \
  X(12, Q4_K, q4_k, 256, 144) X(13, Q5_K, q5_k, 256, 176) X(14, Q6_K, q6_k, 256, 210)                  \
  X(20, IQ4_NL, iq4_nl, 32, 18) X(23, IQ4_XS, iq4_xs, 256, 136)

// The format of ggml type `type`, or nullptr when it is not read packed.
const BlockFormat* block_format(int32_t type);
// Bytes per block of a block type, at compile time (0 for any other type).
#define CF_BYTES_OF(id, name, fn, block, bytes) type == id ? int64_t{bytes}:
constexpr int64_t block_bytes(int32_t type) { return CF_BLOCK_TYPES(CF_BYTES_OF) 0; }
#undef CF_BYTES_OF

// Weight rows a decode-shaped product dequantizes at a time (into a scratch of that many rows):
// the skinny GEMM's own tile height, so the decoded rows stay in L1 while every row of x passes
// them (8 rows of K = 1536 are 48 KB; 4 took the default model's down_proj at 64 rows of x from
// 1.17x to 1.04x the fp32 product's time).
constexpr int64_t kQuantTileRows = 4;

// Where quant_k_major(M, K) says, the AVX-512 and AVX2 builds (compiled with GCC) take block types
// (not F16 / BF16) K-major instead (gemm_q_k_major): kQuantKnCols weight rows at a time, K in equal
// parts of at most kQuantKnDepth columns (whole blocks), each part's columns decoded 16 rows at a
// time, transposed into scratch [depth, cols] and multiplied by gemm_kn_part_f32 (x values
// broadcast against vectors of weights: no horizontal sums, a 12 x 32 register tile on AVX-512, 6
// x 16 on AVX2, instead of 4 x 4). AVX-512: at 64 rows 1.05-1.33x our fp32 skinny GEMM on the
// dequantized matrix, against 0.92-0.96x for the 4-row tiles; the default model's prefill went from
// 5-7% slower than its dequantized fp32 to 4-7% faster (2026-11-24; results/2026-11-25-products-cpu.json
// has Q4_1 1536 x 576 at 0.82x). AVX2 (2026-11-25, same file): at 64 rows 0.96-1.41x (0.96x: Q4_1
// 1536 x 576), against 0.74-0.97x for its 4-row tiles (the same rule; at 12-32 rows the two are
// within noise).
constexpr int64_t kQuantKnCols = 32;
constexpr int64_t kQuantKnDepth = 256;
// Whether M rows of x against K columns take the K-major tiles, by measurement on the default
// model's shapes (2 threads, AVX-512): at K = 576 they lose below ~24 rows and tie at 24-32 (the
// rule starts at 29), at K = 1536 they win from 12 rows.
constexpr bool quant_k_major(int64_t M, int64_t K) { return M >= 12 && M * K >= 16384; }
// Floats of scratch gemm_q needs for K columns (k_major: what gemm_q_k_major said).
constexpr int64_t quant_scratch_floats(int64_t K, bool k_major) {
  return !k_major || kQuantTileRows * K > (16 + kQuantKnCols) * kQuantKnDepth ? kQuantTileRows * K
                                                                              : (16 + kQuantKnCols) * kQuantKnDepth;
}

// Opt-in 8-bit activations (quant_q8_impl.cpp): rows of the q8 types (the 256-blocks Q2_K, Q3_K,
// Q4_K, Q5_K, Q6_K, IQ4_XS and the 32-blocks Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) against x rows
// rounded to int8 per block of x (256 columns for the 256-blocks, 32 for the others; as ggml's
// q8_K / q8_0: d = max|x| / 127, q = rint(x * 127 / max|x|), with the sum of each 16 codes), summed
// in integers. Every q8 type's weights, per 16 elements g, are
// w_i = D * s_g * c_i - M * m_g with integer codes c (quant_q8_impl.cpp has each type's terms).
constexpr int32_t kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ2K = 10, kQ3K = 11, kQ4K = 12, kQ5K = 13,
                  kQ6K = 14, kIQ4NL = 20, kIQ4XS = 23;
constexpr bool q8_k_type(int32_t type) {
  return type == kQ2K || type == kQ3K || type == kQ4K || type == kQ5K || type == kQ6K || type == kIQ4XS;
}
constexpr bool q8_activation_type(int32_t type) {
  return q8_k_type(type) || type == kQ4_0 || type == kQ4_1 || type == kQ5_0 || type == kQ5_1 || type == kQ8_0 ||
         type == kIQ4NL;
}
// Columns of x per scale d for a weight type's products.
constexpr int64_t q8_x_block(int32_t type) { return q8_k_type(type) ? 256 : 32; }
// Rows of x up to which linear_packed takes them (more: float, the prefill's K-major tiles, or the
// tiled kernels from q8_tiled_from, which win before this where they take the type): where
// they beat the float kernels of the same ISA, measured on 2 cores (benchmarks/RESULTS.md). AVX-512
// (2026-11-25): 256-blocks 1.0-5x up to 16 rows (IQ4_XS 1.18x at 16); Q8_0 2.0x at 1-4 rows, 1.5x
// at 8, 1.1x at 16; the other 32-blocks 1.1-1.9x at 1-3 rows, 0.73-0.85x at 4 (IQ4_NL: the rule
// extended to it, 1.5x at one row, not measured at 2-4). AVX2 (2026-11-25, with its faster float
// decoding): 1.2-4.3x at 1-16 rows but Q4_1 at K = 576 and 16 rows (0.94x), capped at 16 as for the
// 256-blocks. A row count, not a phase: a short
// prompt takes it too. (The base build's test loops follow the AVX-512 rule.)
constexpr int64_t q8_max_rows(int32_t type, bool avx2) {
  return avx2 || q8_k_type(type) ? 16 : type == kQ8_0 ? 8 : 3;
}
// Rows of x from which linear_packed takes gemm_q8_tiled instead (any number of rows: a prefill
// too), by kernel: vnni (AVX-512 VNNI / AVX-VNNI) or plain (vpmaddubsw; the types it sums), wide
// (AVX-512 builds) or not. Measured on 2 cores, where the tiled products first beat what the same
// ISA runs otherwise (the row kernels up to q8_rows, else float; benchmarks/RESULTS.md, "q8 for
// many rows" and "... without AVX-512 VNNI"), 2026-11-25/26:
// - AVX-512 VNNI: the 256-blocks tie at 8 rows (0.82-1.05x) and win 1.08-1.5x from 10-12; Q8_0
//   1.0-1.2x at 6, Q4_1 0.8x at 4 and 1.1-1.2x at 6; at 64 rows 1.9-3.0x the float K-major tiles.
// - AVX-512BW without VNNI: Q4_K 0.94x at 8 and 1.21x at 10, Q6_K 0.85x at 10 and 1.05x at 12;
//   Q4_1 1.1-1.25x at 6 (against float).
// - AVX-VNNI (AVX2): Q4_K / Q6_K 0.85-0.90x at 8, 1.12-1.18x at 10; Q8_0 0.81-0.88x at 6,
//   1.05-1.10x at 8; Q4_1 / Q5_0 1.0-1.1x at 6, 1.3x at 8.
// - AVX2 without VNNI: Q4_K 0.98x and Q6_K 0.91x at 12, 1.28x / 1.22x at 16; Q4_1 / Q5_0
//   1.04-1.12x at 8; at 24 rows (float) 1.9-2.4x.
constexpr int64_t q8_tiled_from(int32_t type, bool vnni, bool wide) {
  if (q8_k_type(type)) return vnni ? (wide ? 9 : 10) : (wide ? 12 : 14);
  return wide ? 6 : 8;
}
// x rows [M, K] (K a multiple of block) as quantize_q8 writes them: codes [M, K], the sums of each
// 16 codes [M, K / 16], and per block of columns the scale d [M, K / block].
struct Q8Rows {
  const int8_t* q;
  const int16_t* sums;
  const float* d;
  int64_t M, K, block;
};

// Many rows of x (prefill; gemm_q8_tiled): x in tiles of kQ8Lanes rows (the last padded with zero
// rows), each tile's codes + 128 as unsigned bytes, four columns of each row together, so that one
// vpdpbusd (or vpmaddubsw) multiplies four columns of 16 rows by a weight row's four codes
// (broadcast): q [tiles][K / 4][16][4]; per block of columns the sums of each two 16-code
// groups as int16 pairs, sums [tiles][K / block][block / 32][16], and the scales d [tiles][K /
// block][16]. Weight rows are decoded kQ8TileRows at a time into a scratch of
// q8_tiled_scratch_bytes(K, block) (codes, and per block 128 bytes of scales, offsets and the +128's
// correction), then multiplied by every tile of x.
constexpr int64_t kQ8Lanes = 16, kQ8TileRows = 4;
struct Q8Tiles {
  const uint8_t* q;
  const int32_t* sums;
  const float* d;
  int64_t tiles, M, K, block;
};
constexpr int64_t q8_tiled_scratch_bytes(int64_t K, int64_t block) { return kQ8TileRows * (K + K / block * 128); }
// Bytes of a Q8Tiles' arrays for M rows: q, sums, d.
constexpr int64_t q8_tile_q_bytes(int64_t M, int64_t K) { return (M + kQ8Lanes - 1) / kQ8Lanes * kQ8Lanes * K; }
constexpr int64_t q8_tile_sums_bytes(int64_t M, int64_t K) { return q8_tile_q_bytes(M, K) / 32 * 4; }
constexpr int64_t q8_tile_d_bytes(int64_t M, int64_t K, int64_t block) { return q8_tile_q_bytes(M, K) / block * 4; }

// dequant_rows: rows packed rows of `type` (each row_bytes, K elements) -> out [rows, K] fp32.
// gemm_q: y[m * ldy + n] = sum_k x[m * K + k] * W[n, k] (+ bias[n]) for m < M, n in [n0, n1), W
//   the packed matrix w: kQuantTileRows rows at a time dequantized into scratch
//   [kQuantTileRows * K] fp32 and multiplied by the same ISA's gemm_f32 (fp32 sums, fixed order),
//   or K-major as said above; scratch holds quant_scratch_floats(K, gemm_q_k_major(type, M, K)).
// gemm_q_k_major: whether this ISA's gemm_q takes whole kQuantKnCols-row tiles K-major (callers
//   then split rows in tasks of such tiles).
// quantize_q8: x [M, K] fp32 -> the arrays of Q8Rows (q [M * K], sums [M * K / 16], d [M * K / block]).
// gemm_q8: y[m * ldy + n] = the Q8Rows x's row m (d times the codes) . W[n] (+ bias[n]) for every m,
//   n in [n0, n1), W packed of a q8_activation_type, x quantized by its q8_x_block.
// q8_vectorized: whether this ISA's gemm_q8 has vector kernels (AVX2, AVX-512BW); the base build's
//   plain loops are for tests (linear_packed does not take them unless asked for by name).
// q8_rows: q8_max_rows for this ISA.
// quantize_q8_tiles: x [M, K] fp32 -> tiles [t0, t1) of the arrays of Q8Tiles (sized by
//   q8_tile_*_bytes; rows past M padded), rounded as quantize_q8.
// Then, per ISA, namespaces vnni (kernels compiled for AVX-512 VNNI / AVX-VNNI: call them only where
// the CPU has it) and plain (quant_q8_tiled.h):
// gemm_q8_tiled: as gemm_q8 for x in tiles; scratch of q8_tiled_scratch_bytes, 16-byte aligned.
//   Only for types with q8_tiled_rows > 0 (others write nothing).
// q8_tiled_rows: the rows of x from which linear_packed takes gemm_q8_tiled for `type` (its
//   q8_tiled_from), 0 where these kernels do not take the type (the base build: none).
#define CF_QUANT_DECLS                                                                                       \
  void dequant_rows(int32_t type, const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, float* out); \
  void gemm_q(int32_t type, const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes,       \
              const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1, float* scratch);  \
  bool gemm_q_k_major(int32_t type, int64_t M, int64_t K);                                                  \
  void quantize_q8(const float* x, int64_t M, int64_t K, int64_t block, int8_t* q, int16_t* sums, float* d); \
  void gemm_q8(int32_t type, const Q8Rows& x, const uint8_t* w, int64_t row_bytes, const float* bias, float* y, \
               int64_t ldy, int64_t n0, int64_t n1);                                                             \
  bool q8_vectorized();                                                                                     \
  int64_t q8_rows(int32_t type);                                                                            \
  void quantize_q8_tiles(const float* x, int64_t M, int64_t K, int64_t block, uint8_t* q, int32_t* sums, float* d, \
                         int64_t t0, int64_t t1);                                                               \
  namespace vnni { CF_TILED_DECLS }                                                                         \
  namespace plain { CF_TILED_DECLS }
#define CF_TILED_DECLS                                                                                      \
  void gemm_q8_tiled(int32_t type, const Q8Tiles& x, const uint8_t* w, int64_t row_bytes, const float* bias,  \
                     float* y, int64_t ldy, int64_t n0, int64_t n1, uint8_t* scratch);                        \
  int64_t q8_tiled_rows(int32_t type);

namespace base { CF_QUANT_DECLS }
#if defined(__x86_64__) && defined(CF_CPU_ISA_VARIANTS)
namespace avx2 { CF_QUANT_DECLS }
namespace avx512 { CF_QUANT_DECLS }
#endif
#undef CF_QUANT_DECLS
#undef CF_TILED_DECLS

}  // namespace cf::cpu
