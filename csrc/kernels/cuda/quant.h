// quant.h — packed ggml matrices (GGUF blocks copied to the GPU as they are) read by GPU kernels:
// raw-pointer launchers like fused.h (no torch headers: plain nvcc / hipcc compile them).
// A packed matrix is N rows of row_bytes bytes, each K / block blocks of ggml's layout; the types
// are kernels/cpu/quant_blocks.h's CF_BLOCK_TYPES plus F16 (1) and BF16 (30), rows of halves.
// dtype: 0 = float32, 1 = float16, 2 = bfloat16. Every pointer is to contiguous device memory.
// `chunks` false forces the per-element kernels (quant.cu's fallback for unaligned pointers or
// K % 8 != 0; tests and benchmarks compare the two). Returns the launch error as text, or nullptr.
// The reference is the CPU path (kernels/cpu/quant.h), itself checked against the `gguf` package.
#pragma once
#include <cstdint>

namespace cf::gpu {

// Rows a product reads the blocks for directly (one warp per weight row, fp32 sums); more rows
// dequantize the weights to a scratch for the BLAS GEMM.
constexpr int64_t kPackedGemvRows = 8;

// out [rows, K] in dtype = the rows decoded.
const char* dequant_packed(int32_t type, const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, int dtype,
                           void* out, void* stream, bool chunks = true);
// y [M, N] = x [M, K] . W^T (+ bias [N]), M <= kPackedGemvRows, x / bias / y in dtype.
const char* gemv_packed(int32_t type, const void* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes,
                        int64_t N, const void* bias, int dtype, void* y, void* stream, bool chunks = true);

// Experts' products with no host sync: x [P, K] rows sorted by expert (experts [P] int64 ascending,
// ends [E] int32 each expert's cumulative row count, all on the device) times their expert's
// matrix of stacked blocks: expert e's N rows start at w + e * expert_bytes, row_stride bytes
// apart -> y [P, N]. Each kPackedGemvRows rows of an expert's run read its blocks once (as gemv_packed);
// F16 / BF16 rows too (a half-precision weight is its own blocks). P <= 65535.
const char* gemv_packed_grouped(int32_t type, const void* x, int64_t P, int64_t K, const uint8_t* w,
                                int64_t expert_bytes, int64_t row_stride, int64_t N, const int64_t* experts,
                                const int32_t* ends, int dtype, void* y, void* stream, bool chunks = true);

}  // namespace cf::gpu
