// gpu_compat.h — one spelling for CUDA and HIP (ROCm): the kernels in this folder compile with nvcc
// or hipcc unchanged. Only what the kernels use is mapped.
#pragma once

// Warps: 32 lanes on NVIDIA and AMD RDNA (wave32), 64 on AMD CDNA; kernels read the device's
// `warpSize` at run time, never a constant.

#if defined(__HIPCC__) || defined(CF_HIP)
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
#if __has_include(<hip/hip_bf16.h>)  // ROCm >= 5.7 (what torch's ROCm builds use)
#include <hip/hip_bf16.h>
using cf_bf16 = __hip_bfloat16;
__device__ __forceinline__ float cf_bf16_to_float(cf_bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ cf_bf16 cf_float_to_bf16(float v) { return __float2bfloat16(v); }
#else  // older ROCm (Debian's hipcc 5.2): the hip_bfloat16 struct, round to nearest even
#include <hip/hip_bfloat16.h>
using cf_bf16 = hip_bfloat16;
__device__ __forceinline__ float cf_bf16_to_float(cf_bf16 v) { return static_cast<float>(v); }
__device__ __forceinline__ cf_bf16 cf_float_to_bf16(float v) { return hip_bfloat16(v); }
#endif
using gpuStream_t = hipStream_t;
using gpuError_t = hipError_t;
#define gpuSuccess hipSuccess
#define gpuGetLastError hipGetLastError
#define gpuGetErrorString hipGetErrorString
#define CF_SHFL_XOR(v, m) __shfl_xor((v), (m))
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
using gpuStream_t = cudaStream_t;
using gpuError_t = cudaError_t;
using cf_bf16 = __nv_bfloat16;
__device__ __forceinline__ float cf_bf16_to_float(cf_bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ cf_bf16 cf_float_to_bf16(float v) { return __float2bfloat16(v); }
#define gpuSuccess cudaSuccess
#define gpuGetLastError cudaGetLastError
#define gpuGetErrorString cudaGetErrorString
#define CF_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#endif

// Shared by the kernel files: element conversions (fp32 inside every kernel), the launch check,
// and the dtype switch of the launchers (0 = float32, 1 = float16, 2 = bfloat16).
namespace cf::gpu {
template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<cf_bf16>(cf_bf16 v) { return cf_bf16_to_float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ cf_bf16 from_f<cf_bf16>(float v) { return cf_float_to_bf16(v); }

inline const char* launched() {
  const gpuError_t e = gpuGetLastError();
  return e == gpuSuccess ? nullptr : gpuGetErrorString(e);
}

}  // namespace cf::gpu

#define CF_DISPATCH(fn, ...)                                              \
  switch (dtype) {                                                        \
    case 0: return fn<float>(__VA_ARGS__);                                \
    case 1: return fn<__half>(__VA_ARGS__);                               \
    case 2: return fn<cf_bf16>(__VA_ARGS__);                              \
    default: return "unsupported dtype (float32, float16, bfloat16)";    \
  }
