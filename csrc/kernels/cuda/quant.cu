// quant.cu — see quant.h. HIP-portable through gpu_compat.h. The per-element decoders are
// quant_decode.cuh's; lanes of a warp read consecutive elements, so a block's header is one
// broadcast read.
#include "quant.h"

#include <type_traits>

#include "gpu_compat.h"
#include "quant_decode.cuh"

namespace cf::gpu {
namespace {

constexpr int kThreads = 256;

// Rows strided over the grid's blocks, each row's elements over the block's threads (no division
// by K per element).
template <int T, typename O>
__global__ void dequant_kernel(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, O* out) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const uint8_t* row = w + r * row_bytes;
    O* o = out + r * K;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) o[k] = from_f<O>(value<T>(row, k));
  }
}

// One warp per weight row n (rows strided over the grid, so any grid size covers them; a warp
// leaves the loop as a whole, so its shuffles never miss a lane): lanes stride over k, the M
// activation rows summed in fp32, then one reduction per row of x.
template <int T, typename O>
__global__ void gemv_kernel(const O* x, int M, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t N,
                            const O* bias, O* y) {
  const int lane = threadIdx.x % warpSize, warps = blockDim.x / warpSize;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / warpSize; n < N;
       n += static_cast<int64_t>(gridDim.x) * warps) {
    const uint8_t* row = w + n * row_bytes;
    float acc[kPackedGemvRows];
#pragma unroll
    for (int m = 0; m < kPackedGemvRows; ++m) acc[m] = 0.f;
    for (int64_t k = lane; k < K; k += warpSize) {
      const float v = value<T>(row, k);
#pragma unroll
      for (int m = 0; m < kPackedGemvRows; ++m)
        if (m < M) acc[m] += v * to_f(x[m * K + k]);
    }
#pragma unroll
    for (int m = 0; m < kPackedGemvRows; ++m) {
      if (m < M) {  // the same for every lane
        float s = acc[m];
        for (int off = warpSize / 2; off > 0; off /= 2) s += CF_SHFL_XOR(s, off);
        if (lane == 0) y[m * N + n] = from_f<O>(s + (bias != nullptr ? to_f(bias[n]) : 0.f));
      }
    }
  }
}

// Calls f(std::integral_constant<int, type>) for a packed type (a kernel launch), then checks it.
template <class F>
const char* with_type(int32_t type, F&& f) {
  switch (type) {
#define CF_CASE(id, ...) \
  case id: f(std::integral_constant<int, id>{}); break;
    CF_BLOCK_TYPES(CF_CASE)
    CF_CASE(1)
    CF_CASE(30)
#undef CF_CASE
    default: return "not a packed type the GPU kernels decode";
  }
  return launched();
}

template <typename O>
const char* dequant_t(int32_t type, const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, void* out,
                      gpuStream_t stream) {
  if (rows == 0 || K == 0) return nullptr;
  const unsigned grid = static_cast<unsigned>(rows < 65535 ? rows : 65535);
  return with_type(type, [&](auto t) {
    dequant_kernel<decltype(t)::value, O><<<grid, kThreads, 0, stream>>>(w, row_bytes, rows, K, static_cast<O*>(out));
  });
}

template <typename O>
const char* gemv_t(int32_t type, const void* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t N,
                   const void* bias, void* y, gpuStream_t stream) {
  if (M == 0 || N == 0) return nullptr;
  if (M > kPackedGemvRows) return "gemv_packed takes at most kPackedGemvRows rows of x";
  const int64_t per_block = kThreads / 32, want = (N + per_block - 1) / per_block;  // 32-lane warps; 64 loop twice
  const unsigned grid = static_cast<unsigned>(want < 65535 ? want : 65535);
  return with_type(type, [&](auto t) {
    gemv_kernel<decltype(t)::value, O><<<grid, kThreads, 0, stream>>>(
        static_cast<const O*>(x), static_cast<int>(M), K, w, row_bytes, N, static_cast<const O*>(bias), static_cast<O*>(y));
  });
}

}  // namespace

const char* dequant_packed(int32_t type, const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, int dtype,
                           void* out, void* stream) {
  CF_DISPATCH(dequant_t, type, w, row_bytes, rows, K, out, static_cast<gpuStream_t>(stream))
}

const char* gemv_packed(int32_t type, const void* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes,
                        int64_t N, const void* bias, int dtype, void* y, void* stream) {
  CF_DISPATCH(gemv_t, type, x, M, K, w, row_bytes, N, bias, y, static_cast<gpuStream_t>(stream))
}

}  // namespace cf::gpu
