// linear.h — the linear layer on CPU (the engine reaches it through ops::linear): skinny_gemm for
// decode-sized inputs (few rows, fp32 or bf16, weights contiguous [N, K] or K-major: a transposed
// contiguous [K, N], as GPT-OSS's experts are held), ATen's at::linear for
// everything else, and for all inputs when CF_CPU_KERNELS=0.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace cf::cpu {

// Rows of x up to which linear() runs the skinny kernels: measured on a 2-core AVX-512 machine
// (benchmarks/RESULTS.md), ours beat ATen's fp32 GEMM up to ~64 rows; for bf16, ATen's oneDNN path
// (AVX512-BF16 dot products) wins above a few rows.
constexpr int64_t kSkinnyMaxRowsF32 = 32;
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
};
// The best instruction set this CPU has (chosen once); false when CF_CPU_KERNELS=0.
const Isa& active();
// The kernels of instruction set `name` ("" = active()); InputError when this CPU lacks it.
Isa isa_for(const std::string& name);
bool kernels_enabled();

// The instruction set linear() uses here, or "off" when CF_CPU_KERNELS=0 disables the kernels.
std::string active_isa();

}  // namespace cf::cpu
