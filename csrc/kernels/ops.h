// ops.h — the per-token ops of a decoder block, each with one signature for every device, and
// the one place that picks a kernel by device: the engine calls nothing else per token.
// The ATen composites here are the reference (numerics follow Hugging Face's modules: RMSNorm in
// fp32 then cast back, RoPE with rotate-half, SwiGLU). CPU tensors take the kernels of kernels/cpu
// where they apply (CF_CPU_KERNELS=0 turns them off); on a GPU build, CUDA/ROCm tensors take the
// fused kernels of kernels/cuda (CF_GPU_KERNELS=0 turns them off). Linear and attention have no GPU
// kernel of our own: ATen's (cuBLAS/hipBLAS, its SDPA backends) serve there.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>

#include "matrix.h"

namespace cf::ops {

// x [..., K], w [N, K], bias [N] or undefined -> x @ w^T + bias [..., N]. CPU: the skinny GEMM
// for decode-sized fp32/bf16 inputs (cpu/linear.h), packed ggml matrices through cpu/quant.h,
// else at::linear; other devices: at::linear (a packed matrix there is an InputError).
// CF_DENSE_GEMV=1 (opt-in, for benchmarks to compare with cuBLAS; not measured yet): a bf16 / fp16
// weight on a GPU with our kernels, x of its dtype and up to 8 rows, takes our GEMV kernel (its rows
// read as ggml BF16 / F16 blocks) instead of at::linear.
// dense_gemv: whether that route takes this product.
bool dense_gemv(const at::Tensor& x, const at::Tensor& w);
at::Tensor linear(const at::Tensor& x, const Matrix& w, const at::Tensor& bias = at::Tensor());
// Experts' products: x [P, K] rows sorted by expert (experts [P] int64, ascending; ends [E] int32,
// each expert's cumulative row count), w stacked [E, N, K] -> [P, N], each row times its expert's
// matrix. Where grouped_linear_on_device(w, x's device): one GPU kernel reading the routing on the
// device (gpu::linear_packed_grouped, a CUDA graph can hold it); elsewhere a loop over the experts
// that reads ends on the host.
at::Tensor grouped_linear(const at::Tensor& x, const Matrix& w, const at::Tensor& experts, const at::Tensor& ends);
// Whether grouped_linear runs w on `device` without a host sync: a GPU with the GPU kernels, w on
// it, packed or float16 / bfloat16 with each row's elements contiguous.
bool grouped_linear_on_device(const Matrix& w, at::Device device);
// table [V, H], ids [B, T] int64 (in range: the caller checks) -> [B, T, H] in dtype; a packed
// table dequantizes only the rows it reads.
at::Tensor embedding(const Matrix& table, const at::Tensor& ids, at::ScalarType dtype);
// q [B, Hq, T, D], k and v [B, Hkv, S, D] (Hq a multiple of Hkv: query heads j*G .. j*G+G-1 share
// KV head j, G = Hq / Hkv, as in HF's repeat_kv), mask [B, 1, T, S] bool (true = attend) or none
// (T > 1: causal, query t sees keys 0..t, so only for S == T; T == 1: every key) ->
// softmax(q k^T * scale) v over the attended keys, [B, Hq, T, D]. softcap > 0 (Gemma 2): the scores
// become softcap * tanh(scores / softcap) before masking, computed by an ATen composite (scores in
// the compute dtype, softmax in fp32, as transformers' eager attention does). sinks [Hq] (GPT-OSS)
// or undefined: each head's softmax takes one more logit, sinks[h], whose probability is dropped
// (the same composite; GPT-OSS's eager path subtracts the row max in the compute dtype first,
// which measured in bf16 puts us further from the fp32 result than transformers: not done).
// The composite runs queries in blocks of about 4M scores.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, double scale, double softcap = 0.0,
                     const at::Tensor& sinks = at::Tensor());

// x [..., N], weight [N] -> weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype); an fp32 weight
// of lower-precision x (Gemma's 1 + w) multiplies before the cast: (weight * x_f32 * rsqrt(...)).to(x.dtype)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
// (x + residual, rms_norm(x + residual, weight, eps)): the residual add fused with the next norm.
std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                               double eps);
// x [B, T, H, D] (a fresh tensor the op may overwrite), cos/sin [B, 1, T, R] (R <= D rotary dims) ->
// (x * cos + rotate_half(x) * sin) on the first R dims of each head, the rest unchanged, as [B, H, T, D]
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// gate, up [..., I] -> silu(gate) * up
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);
// GPT-OSS's expert activation: g = min(gate, limit); (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)
at::Tensor clamped_swiglu(const at::Tensor& gate, const at::Tensor& up, double alpha, double limit);
// gate, up [..., I] -> act(gate) * up; act "silu" (silu_mul), "gelu_tanh" or "gelu" (exact, erf)
at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, const std::string& act);

// Whether CUDA/ROCm tensors take the fused kernels (a GPU build, CF_GPU_KERNELS not "0").
bool gpu_kernels_enabled();

}  // namespace cf::ops
