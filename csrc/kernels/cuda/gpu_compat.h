// gpu_compat.h — one spelling for CUDA and HIP (ROCm): the kernels in this folder compile with nvcc
// or hipcc unchanged. Only what the kernels use is mapped.
#pragma once

#if defined(__HIPCC__) || defined(CF_HIP)
#include <hip/hip_bf16.h>
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
using gpuStream_t = hipStream_t;
using gpuError_t = hipError_t;
using cf_bf16 = __hip_bfloat16;
#define gpuSuccess hipSuccess
#define gpuGetLastError hipGetLastError
#define gpuGetErrorString hipGetErrorString
#define CF_WARP 64
#define CF_SHFL_XOR(v, m) __shfl_xor((v), (m))
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
using gpuStream_t = cudaStream_t;
using gpuError_t = cudaError_t;
using cf_bf16 = __nv_bfloat16;
#define gpuSuccess cudaSuccess
#define gpuGetLastError cudaGetLastError
#define gpuGetErrorString cudaGetErrorString
#define CF_WARP 32
#define CF_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#endif
