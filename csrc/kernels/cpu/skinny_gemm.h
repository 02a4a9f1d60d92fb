// skinny_gemm.h — y = x @ w^T for few rows of x (decode steps), CPU, raw pointers.
//
// torch's CPU linear reaches about a third of the memory bandwidth when x has 1..16 rows (a
// decode step), so the decode step is bound by that instead of by the bytes of weights read.
// These kernels stream each weight row once per call and keep a small tile of x rows against a
// few weight rows in vector registers.
//
// skinny_gemm_impl.cpp is compiled once per instruction set (the namespaces below) and
// linear.cpp picks one at run time, so a wheel runs on any x86-64 and uses AVX-512 where there
// is one. The ISA-specific files include no ATen or standard-library templates, so no inline
// function compiled for a wider ISA can leak into the rest of the module.
#pragma once
#include <cstdint>

namespace cf::cpu {

// Vectors of columns in gemm_kn_part_f32's register tiles (columns past whole tiles: one at a time).
constexpr int kKnPartVectors = 2;

// Also the elementwise ops of a block, fp32, fused (one pass each), over row ranges [r0, r1):
// add_rms_norm_f32: sum = x + residual (residual may be null: then sum is unused and x is normed),
//   out = weight * (sum * rsqrt(mean(sum^2) + eps)); rows of n.
// rope_f32: x, out [rows = B*T*heads, D] rows of [B, T, heads, D]; cos/sin [B*T, D]; rotate-half.
// silu_mul_f32: out = gate / (1 + exp(-gate)) * up over [i0, i1).
// attend_one_f32: one query q [D] against S keys (row s of k at k + s * ks, of v at v + s * vs),
//   mask [S] (nonzero = attend) or null: out [D] = softmax(scale * q.k over attended keys) . v, in
//   fp32 (zeros when no key is attended, as SDPA gives); scores: scratch of S floats.
//
// y[m * ldy + n] = sum_k x[m * K + k] * w[n * K + k] (+ bias[n]) for m in [0, M), n in [n0, n1).
// x and y are fp32; w is fp32 (gemm_f32) or bfloat16 bits (gemm_bf16); bias is fp32 or null.
// gemm_kn_*: the same product with w stored K-major (a transposed view, as GPT-OSS's experts
// are held): y[m * ldy + n] = sum_k x[m * K + k] * w[k * ldw + n] (+ bias[n]).
// gemm_kn_part_f32: the K-major product over part of K, x's rows ldx apart, in tiles of
//   kKnPartVectors vectors of columns; accumulate: y += (continues y's sums), else y =; bias null
//   except on the last part. Each output is summed over k in order, so parts give one call's sums.
// Sums are fp32, in a fixed order for a given (M, K): results do not depend on threading.
#define CF_SKINNY_GEMM_DECLS                                                                        \
  void gemm_f32(const float* x, int64_t M, int64_t K, const float* w, const float* bias, float* y, \
                int64_t ldy, int64_t n0, int64_t n1);                                               \
  void gemm_bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias, float* y, \
                 int64_t ldy, int64_t n0, int64_t n1);                                               \
  void gemm_kn_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t ldw, const float* bias, \
                   float* y, int64_t ldy, int64_t n0, int64_t n1);                                     \
  void gemm_kn_bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t ldw, const float* bias, \
                    float* y, int64_t ldy, int64_t n0, int64_t n1);                                        \
  void gemm_kn_part_f32(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t ldw,         \
                        const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1, bool accumulate);   \
  void add_rms_norm_f32(const float* x, const float* residual, const float* weight, float* sum, float* out,       \
                        int64_t r0, int64_t r1, int64_t n, float eps);                                        \
  void rope_f32(const float* x, const float* cos, const float* sin, float* out, int64_t r0, int64_t r1,         \
                int64_t heads, int64_t D);                                                                    \
  void silu_mul_f32(const float* gate, const float* up, float* out, int64_t i0, int64_t i1);                   \
  void attend_one_f32(const float* q, const float* k, int64_t ks, const float* v, int64_t vs, const uint8_t* mask, \
                      int64_t S, int64_t D, float scale, float* scores, float* out);

namespace base { CF_SKINNY_GEMM_DECLS }
#if defined(__x86_64__) && defined(CF_CPU_ISA_VARIANTS)
namespace avx2 { CF_SKINNY_GEMM_DECLS }
namespace avx512 { CF_SKINNY_GEMM_DECLS }
#endif
#undef CF_SKINNY_GEMM_DECLS

}  // namespace cf::cpu
