// fused.h — fused decoder ops for CUDA/ROCm GPUs, raw-pointer launchers (no torch headers, so this
// and fused.cu compile with plain nvcc/hipcc: the CI compile check builds them without a GPU).
// dtype: 0 = float32, 1 = float16, 2 = bfloat16. Every tensor is contiguous. Returns the launch
// error as text, or nullptr. Numerics: fp32 inside each op, one rounding to dtype at the end.
// The pure-torch references are cf::ops::* (csrc/kernels/ops.cpp) and the tests' own formulas.
#pragma once
#include <cstdint>

namespace cf::gpu {

// sum = x + residual (rounded to dtype, as an unfused add would), out = weight * rms_norm(sum);
// residual may be null (then sum is not written and out = weight * rms_norm(x)). rows x n.
const char* add_rms_norm(int dtype, const void* x, const void* residual, const void* weight, void* sum, void* out,
                         int64_t rows, int64_t n, float eps, void* stream);
// Rotary embedding, rotate-half form, in place on x [B, T, H, D] with cos/sin [B, T, D].
const char* rope(int dtype, void* x, const void* cos, const void* sin, int64_t B, int64_t T, int64_t H, int64_t D,
                 void* stream);
// out = silu(gate) * up over n elements.
const char* silu_mul(int dtype, const void* gate, const void* up, void* out, int64_t n, void* stream);

}  // namespace cf::gpu
