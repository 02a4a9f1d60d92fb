// linear.h — the linear layer on CPU (the engine reaches it through ops::linear): skinny_gemm for
// decode-sized inputs (few rows, fp32 or bf16, weights contiguous [N, K] or K-major: a transposed
// contiguous [K, N], as GPT-OSS's experts are held), ATen's at::linear for
// everything else, and for all inputs when CF_CPU_KERNELS=0.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

#include <optional>
#include <string>

namespace cf::cpu {

struct Q8Rows;  // quant_blocks.h
struct Q8Tiles;

// Rows of x up to which linear() runs the skinny kernels. fp32: while x holds at most
// kSkinnyMaxXElems floats (4 MB, cache-resident: each weight tile is multiplied by all of x), and
// always up to kSkinnyMinRowsF32 rows. Measured on a 2-core AVX-512 machine (benchmarks/RESULTS.md,
// 2026-11-24): ours beat ATen's fp32 GEMM below that size for K from 576 to 14336 (1.7x at 64
// rows, 1.1-1.8x at 256) and lost above it with large K (0.4x at 1024 rows of K = 14336). For
// bf16, ATen's oneDNN path (AVX512-BF16 dot products) wins above a few rows.
constexpr int64_t kSkinnyMinRowsF32 = 32;
constexpr int64_t kSkinnyMaxXElems = int64_t{1} << 20;
inline int64_t skinny_max_rows_f32(int64_t K) { return std::max(kSkinnyMinRowsF32, kSkinnyMaxXElems / std::max<int64_t>(K, 1)); }
constexpr int64_t kSkinnyMaxRowsBF16 = 4;

// x [..., K], w [N, K], b [N] or undefined -> [..., N]; tensors not on the CPU go to at::linear.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b = at::Tensor());

// The skinny kernel itself (any number of rows) on a chosen instruction set ("base", "avx2",
// "avx512"; "" = the best this CPU has), for tests and benchmarks; throws InputError when x/w are
// not what it takes or the ISA is unavailable.
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                         const std::string& isa);
// The kernels of one instruction set (see skinny_gemm.h).
struct Isa {
  const char* name;
  void (*gemm_f32)(const float*, int64_t, int64_t, const float*, const float*, float*, int64_t, int64_t, int64_t);
  void (*gemm_bf16)(const float*, int64_t, int64_t, const uint16_t*, const float*, float*, int64_t, int64_t, int64_t);
  void (*gemm_kn_f32)(const float*, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t,
                      int64_t);
  void (*gemm_kn_bf16)(const float*, int64_t, int64_t, const uint16_t*, int64_t, const float*, float*, int64_t,
                       int64_t, int64_t);
  void (*add_rms_norm_f32)(const float*, const float*, const float*, float*, float*, int64_t, int64_t, int64_t, float);
  void (*rope_f32)(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
  void (*silu_mul_f32)(const float*, const float*, float*, int64_t, int64_t);
  void (*attend_one_f32)(const float*, const float*, int64_t, const float*, int64_t, const uint8_t*, int64_t, int64_t,
                         float, float*, float*);
  // packed ggml blocks (quant_blocks.h)
  void (*dequant_rows)(int32_t, const uint8_t*, int64_t, int64_t, int64_t, float*);
  void (*gemm_q)(int32_t, const float*, int64_t, int64_t, const uint8_t*, int64_t, const float*, float*, int64_t,
                 int64_t, int64_t, float*);
  bool (*gemm_q_k_major)(int32_t, int64_t, int64_t);
  void (*quantize_q8)(const float*, int64_t, int64_t, int64_t, int8_t*, int16_t*, float*);
  void (*gemm_q8)(int32_t, const Q8Rows&, const uint8_t*, int64_t, const float*, float*, int64_t, int64_t, int64_t);
  bool (*q8_vectorized)();
  int64_t (*q8_rows)(int32_t);
  void (*quantize_q8_tiles)(const float*, int64_t, int64_t, int64_t, uint8_t*, int32_t*, float*, int64_t, int64_t);
  void (*gemm_q8_tiled)(int32_t, const Q8Tiles&, const uint8_t*, int64_t, const float*, float*, int64_t, int64_t,
                        int64_t, uint8_t*);  // VNNI's where the CPU has it (quant_blocks.h)
  int64_t (*q8_tiled_rows)(int32_t);
};
// The best instruction set this CPU has, or the one CF_CPU_ISA names (chosen once; InputError when
// the CPU lacks that one). The kernels are off when CF_CPU_KERNELS=0 (kernels_enabled).
const Isa& active();
// The kernels of instruction set `name` ("" = active()); InputError when this CPU lacks it.
Isa isa_for(const std::string& name);
bool kernels_enabled();

// The instruction set linear() uses here, or "off" when CF_CPU_KERNELS=0 disables the kernels.
std::string active_isa();

}  // namespace cf::cpu
