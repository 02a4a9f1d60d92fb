// quant.h — packed (ggml block) weights on the CPU at the ATen level: the checks that name a bad
// tensor, dequantization, and the linear layer that reads the blocks (quant_blocks.h's kernels).
// linear_packed: one row of x decodes the blocks straight into the dot products; up to
// skinny_max_rows_f32(K) rows (linear.h: x within 4 MB) dequantize kQuantTileRows weight rows at a
// time into a small scratch (L1) and run the skinny fp32 GEMM of every x row against them (the
// matrix is never dequantized whole; on the default model this beats the BLAS GEMM on the
// dequantized matrix, benchmarks/RESULTS.md), or on AVX2 / AVX-512 from quant_k_major's rows decode 32
// weight rows K-major in parts of K (quant_blocks.h); more rows dequantize chunks of about
// kPackedChunkBytes (on all threads, into a per-thread scratch kept between calls) and multiply
// each with ATen's GEMM.
// Activations stay in float: results equal the dequantized matrix's up to the order of the sums.
// Opt-in (q8_activations): x against the q8 types (quant_blocks.h: every block type but F16 /
// BF16) is rounded to int8 per block of columns and summed in integers (quant_q8_impl.cpp): the
// dequantized matrix times that rounded x. Up to the ISA's q8_rows(type) rows of x; from the ISA's
// q8_tiled_rows(type) any number (q8_tiled_rows_here: with VNNI every q8 type, without it those
// whose codes vpmaddubsw can sum). Other types, other
// row counts, and CPUs without AVX2 or with CF_CPU_KERNELS=0 (q8_activations_here) stay in float.
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace cf::cpu {

constexpr int64_t kPackedChunkBytes = int64_t{16} << 20;

// Bytes of one packed row of K elements; WeightError naming `what` when `type` is not read packed
// or K is not a whole number of its blocks.
int64_t packed_row_bytes(int32_t type, int64_t K, const std::string& what);
// The name of a packed type ("Q4_K"), or "type <id>" for one that is not.
std::string packed_type_name(int32_t type);
// w packed uint8 [..., N, row_bytes] on the CPU -> [..., N, K] in dtype (float32, bfloat16, float16),
// decoded by instruction set `isa` ("" = the best here; see linear.h).
at::Tensor dequantize(const at::Tensor& w, int32_t type, int64_t K, at::ScalarType dtype, const std::string& isa = "");
// x [..., K] float (fp32 / bf16 / fp16, CPU), w packed [N, row_bytes], b [N] or undefined -> [..., N]
// in x's dtype; isa: the instruction set's kernels ("" = the best here; tests run each).
// Whether this CPU runs q8_activations (the best ISA here has the int8 vector kernels, and
// CF_CPU_KERNELS=0 does not turn the kernels off).
bool q8_activations_here();
// The rows of x from which q8_activations takes products of `type` in tiles (any number: a
// prefill), on instruction set `isa` ("" = the best here, as q8_activations_here); 0: never.
int64_t q8_tiled_rows_here(int32_t type, const std::string& isa = "");
at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& w, int32_t type, int64_t K, const at::Tensor& b,
                         const std::string& isa = "", bool q8_activations = false);

}  // namespace cf::cpu
