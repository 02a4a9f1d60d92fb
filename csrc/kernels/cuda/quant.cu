// quant.cu — see quant.h. HIP-portable through gpu_compat.h. Two kernels per job: the chunk
// kernels (quant_decode.cuh's decode8: a lane decodes eight consecutive elements from one header
// read and wide code loads, x read 16 bytes at a time), taken when the blocks start aligned to
// their type's code_align, x / out 16-byte aligned and K % 8 == 0 (every block type; F16 / BF16
// rows of K % 8 == 0); otherwise the element kernels (quant_decode.cuh's value: any alignment, any
// K; lanes of a warp read consecutive elements, so a block's header is one broadcast read).
#include "quant.h"

#include <cstring>
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

// Eight fp32 values stored as O at o (16-byte aligned: two float4 or one 16-byte store).
template <typename O>
__device__ void store8(O* o, const float* v) {
  if constexpr (std::is_same_v<O, float>) {
    reinterpret_cast<float4*>(o)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(o)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    O h[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = from_f<O>(v[i]);
    uint4 u;
    memcpy(&u, h, sizeof u);
    *reinterpret_cast<uint4*>(o) = u;
  }
}

// dequant_kernel's layout (rows strided over the grid's blocks) a chunk of eight elements per
// thread, stored 16 bytes at a time (K % 8 == 0 and out 16-byte aligned).
template <int T, typename O>
__global__ void dequant_chunks_kernel(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, O* out) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const uint8_t* row = w + r * row_bytes;
    for (int64_t k0 = 8 * static_cast<int64_t>(threadIdx.x); k0 < K; k0 += 8 * static_cast<int64_t>(blockDim.x)) {
      float v[8];
      row_chunk<T>(row, k0, v);
      store8(out + r * K + k0, v);
    }
  }
}

// x's rows for lane_sums: 16-byte loads (x and K * sizeof(O) are 16-byte aligned).
template <typename O>
struct XRows {
  const O* x;
  int64_t K;
  __device__ void load8(int m, int64_t k0, float* v) const {
    const O* p = x + m * K + k0;
    if constexpr (std::is_same_v<O, float>) {
      const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
      const uint4 u = *reinterpret_cast<const uint4*>(p);
      O h[8];
      memcpy(h, &u, sizeof u);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = to_f(h[i]);
    }
  }
};

// One weight row against M <= kPackedGemvRows rows of x (x [M, K]), by one warp: lanes walk the
// row's chunks of eight (kChunks: lane_sums) or its elements (lanes stride over k), the M rows
// summed in fp32, then one reduction per row of x into y[m * N + n] (+ bias[n]).
template <int T, typename O, bool kChunks>
__device__ __forceinline__ void row_products(const uint8_t* row, const O* x, int M, int64_t K, int lane, int64_t n,
                                             int64_t N, const O* bias, O* y) {
  float acc[kPackedGemvRows];
#pragma unroll
  for (int m = 0; m < kPackedGemvRows; ++m) acc[m] = 0.f;
  if constexpr (kChunks) {
    lane_sums<T, kPackedGemvRows>(row, XRows<O>{x, K}, M, K, lane, warpSize, acc);
  } else {
    for (int64_t k = lane; k < K; k += warpSize) {
      const float v = value<T>(row, k);
#pragma unroll
      for (int m = 0; m < kPackedGemvRows; ++m)
        if (m < M) acc[m] += v * to_f(x[m * K + k]);
    }
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

// One warp per weight row n (rows strided over the grid, so any grid size covers them; a warp
// leaves the loop as a whole, so its shuffles never miss a lane).
template <int T, typename O, bool kChunks>
__global__ void gemv_kernel(const O* x, int M, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t N,
                            const O* bias, O* y) {
  const int lane = threadIdx.x % warpSize, warps = blockDim.x / warpSize;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / warpSize; n < N;
       n += static_cast<int64_t>(gridDim.x) * warps)
    row_products<T, O, kChunks>(w + n * row_bytes, x, M, K, lane, n, N, bias, y);
}

// Rows of x sorted by expert (experts[j] is row j's, ascending; ends[e] the end of expert e's
// run) times their expert's matrix of stacked blocks (expert e's rows start at w + e *
// expert_bytes, row_stride bytes apart). Block row j = blockIdx.y works only where j is a multiple
// of kPackedGemvRows into its expert's run (quant_decode.cuh's grouped_rows): it takes that run's
// rows [j, j + kPackedGemvRows) (fewer at the run's end), warps over weight rows as gemv_kernel's;
// the other block rows return at once.
// An expert's blocks are read once per kPackedGemvRows of its rows, and a long run spreads over
// as many block rows. Reads nothing on the host: a CUDA graph holds it whatever the routing.
template <int T, typename O, bool kChunks>
__global__ void grouped_gemv_kernel(const O* x, int64_t K, const uint8_t* w, int64_t expert_bytes, int64_t row_stride,
                                    int64_t N, const int64_t* experts, const int32_t* ends, O* y) {
  const int64_t j = blockIdx.y;
  int64_t e = 0;
  const int M = grouped_rows<kPackedGemvRows>(j, experts, ends, &e);
  if (M == 0) return;
  const uint8_t* we = w + e * expert_bytes;
  const int lane = threadIdx.x % warpSize, warps = blockDim.x / warpSize;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / warpSize; n < N;
       n += static_cast<int64_t>(gridDim.x) * warps)
    row_products<T, O, kChunks>(we + n * row_stride, x + j * K, M, K, lane, n, N, nullptr, y + j * N);
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether the chunk kernels may read blocks w of this type and x (or write out) `io`: asked for,
// K % 8 == 0, w aligned to the type's load width, io to 16 bytes.
bool chunks_fit(bool chunks, int32_t type, int64_t K, const uint8_t* w, const void* io) {
  return chunks && K % 8 == 0 && aligned(w, code_align(type)) && aligned(io, 16);
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
                      gpuStream_t stream, bool chunks) {
  if (rows == 0 || K == 0) return nullptr;
  const unsigned grid = static_cast<unsigned>(rows < 65535 ? rows : 65535);
  if (chunks_fit(chunks, type, K, w, out))
    return with_type(type, [&](auto t) {
      dequant_chunks_kernel<decltype(t)::value, O><<<grid, kThreads, 0, stream>>>(w, row_bytes, rows, K,
                                                                                  static_cast<O*>(out));
    });
  return with_type(type, [&](auto t) {
    dequant_kernel<decltype(t)::value, O><<<grid, kThreads, 0, stream>>>(w, row_bytes, rows, K, static_cast<O*>(out));
  });
}

template <typename O>
const char* gemv_t(int32_t type, const void* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t N,
                   const void* bias, void* y, gpuStream_t stream, bool chunks) {
  if (M == 0 || N == 0) return nullptr;
  if (M > kPackedGemvRows) return "gemv_packed takes at most kPackedGemvRows rows of x";
  const int64_t per_block = kThreads / 32, want = (N + per_block - 1) / per_block;  // 32-lane warps; 64 loop twice
  const unsigned grid = static_cast<unsigned>(want < 65535 ? want : 65535);
  if (chunks_fit(chunks, type, K, w, x))
    return with_type(type, [&](auto t) {
      gemv_kernel<decltype(t)::value, O, true><<<grid, kThreads, 0, stream>>>(
          static_cast<const O*>(x), static_cast<int>(M), K, w, row_bytes, N, static_cast<const O*>(bias), static_cast<O*>(y));
    });
  return with_type(type, [&](auto t) {
    gemv_kernel<decltype(t)::value, O, false><<<grid, kThreads, 0, stream>>>(
        static_cast<const O*>(x), static_cast<int>(M), K, w, row_bytes, N, static_cast<const O*>(bias), static_cast<O*>(y));
  });
}

template <typename O>
const char* grouped_gemv_t(int32_t type, const void* x, int64_t P, int64_t K, const uint8_t* w, int64_t expert_bytes,
                           int64_t row_stride, int64_t N, const int64_t* experts, const int32_t* ends, void* y,
                           gpuStream_t stream, bool chunks) {
  if (P == 0 || N == 0) return nullptr;
  if (P > 65535) return "gemv_packed_grouped takes at most 65535 rows of x";
  const int64_t per_block = kThreads / 32, want = (N + per_block - 1) / per_block;
  const dim3 grid(static_cast<unsigned>(want < 65535 ? want : 65535), static_cast<unsigned>(P));
  const bool fit = chunks_fit(chunks, type, K, w, x) && expert_bytes % code_align(type) == 0 &&
                   row_stride % code_align(type) == 0;
  const O* xo = static_cast<const O*>(x);
  O* yo = static_cast<O*>(y);
  if (fit)
    return with_type(type, [&](auto t) {
      grouped_gemv_kernel<decltype(t)::value, O, true>
          <<<grid, kThreads, 0, stream>>>(xo, K, w, expert_bytes, row_stride, N, experts, ends, yo);
    });
  return with_type(type, [&](auto t) {
    grouped_gemv_kernel<decltype(t)::value, O, false>
        <<<grid, kThreads, 0, stream>>>(xo, K, w, expert_bytes, row_stride, N, experts, ends, yo);
  });
}

}  // namespace

const char* dequant_packed(int32_t type, const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, int dtype,
                           void* out, void* stream, bool chunks) {
  CF_DISPATCH(dequant_t, type, w, row_bytes, rows, K, out, static_cast<gpuStream_t>(stream), chunks)
}

const char* gemv_packed(int32_t type, const void* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes,
                        int64_t N, const void* bias, int dtype, void* y, void* stream, bool chunks) {
  CF_DISPATCH(gemv_t, type, x, M, K, w, row_bytes, N, bias, y, static_cast<gpuStream_t>(stream), chunks)
}

const char* gemv_packed_grouped(int32_t type, const void* x, int64_t P, int64_t K, const uint8_t* w,
                                int64_t expert_bytes, int64_t row_stride, int64_t N, const int64_t* experts,
                                const int32_t* ends, int dtype, void* y, void* stream, bool chunks) {
  CF_DISPATCH(grouped_gemv_t, type, x, P, K, w, expert_bytes, row_stride, N, experts, ends, y,
              static_cast<gpuStream_t>(stream), chunks)
}

}  // namespace cf::gpu
