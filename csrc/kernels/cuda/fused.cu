// fused.cu — see fused.h. HIP-portable through gpu_compat.h.
#include "fused.h"

#include <algorithm>
#include <cstdint>

#include "gpu_compat.h"

namespace cf::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxThreads = 1024;

// V elements of T in one 16-byte access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int m = warpSize / 2; m > 0; m /= 2) v += CF_SHFL_XOR(v, m);
  const int warp = threadIdx.x / warpSize, lane = threadIdx.x % warpSize;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + warpSize - 1) / warpSize;
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += shared[w];  // same order in every thread
  __syncthreads();
  return total;
}

// One block per row. Matches HF: h = x (+ residual) in dtype; var in fp32; weight * (h * rsqrt).to(dtype).
// The general kernel: any n and alignment, one element per access, the row read twice.
template <typename T>
__global__ void add_rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
                                    T* __restrict__ sum, T* __restrict__ out, int64_t n, float eps) {
  __shared__ float shared[kMaxThreads / 16];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * n;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    float h = to_f(xr[i]);
    if (residual != nullptr) {
      const T s = from_f<T>(h + to_f(residual[row * n + i]));
      sum[row * n + i] = s;
      h = to_f(s);
    }
    ss += h * h;
  }
  const float inv = rsqrtf(block_sum(ss, shared) / static_cast<float>(n) + eps);
  const T* src = residual != nullptr ? sum + row * n : xr;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const T normed = from_f<T>(to_f(src[i]) * inv);
    out[row * n + i] = from_f<T>(to_f(weight[i]) * to_f(normed));
  }
}

// The same, for 16-byte aligned rows of n = V * k: each thread holds R vectors of its row in
// registers between the two passes (a decode row of 4096 bf16 is one vector per thread of 512), so
// the row is read once, in 16-byte accesses. Same formula, element by element, as above.
template <typename T, int V, int R>
__global__ void __launch_bounds__(kMaxThreads) add_rms_norm_vec_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                        const T* __restrict__ weight, T* __restrict__ sum, T* __restrict__ out,
                                        int64_t n, float eps) {
  using Vt = Vec<T, V>;
  __shared__ float shared[kMaxThreads / 16];
  const int64_t row = blockIdx.x, nv = n / V;
  const Vt* xr = reinterpret_cast<const Vt*>(x + row * n);
  const Vt* rr = residual != nullptr ? reinterpret_cast<const Vt*>(residual + row * n) : nullptr;
  Vt* sr = residual != nullptr ? reinterpret_cast<Vt*>(sum + row * n) : nullptr;
  Vt keep[R];
  float ss = 0.f;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(r) * blockDim.x;
    if (i < nv) {
      Vt a = xr[i];
      if (rr != nullptr) {
        const Vt b = rr[i];
#pragma unroll
        for (int j = 0; j < V; ++j) a.v[j] = from_f<T>(to_f(a.v[j]) + to_f(b.v[j]));
        sr[i] = a;
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float h = to_f(a.v[j]);
        ss += h * h;
      }
      keep[r] = a;
    }
  }
  const float inv = rsqrtf(block_sum(ss, shared) / static_cast<float>(n) + eps);
  const Vt* wr = reinterpret_cast<const Vt*>(weight);
  Vt* orow = reinterpret_cast<Vt*>(out + row * n);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(r) * blockDim.x;
    if (i < nv) {
      const Vt w = wr[i];
      Vt o;
#pragma unroll
      for (int j = 0; j < V; ++j) o.v[j] = from_f<T>(to_f(w.v[j]) * to_f(from_f<T>(to_f(keep[r].v[j]) * inv)));
      orow[i] = o;
    }
  }
}

template <typename T>
__global__ void rope_kernel(T* __restrict__ x, const T* __restrict__ cos, const T* __restrict__ sin, int64_t H,
                            int64_t D) {
  // grid: (B * T * H); threads over the first half of D, each rotating the pair (d, d + D/2).
  const int64_t bth = blockIdx.x;
  const int64_t bt = bth / H;
  T* v = x + bth * D;
  const T* c = cos + bt * D;
  const T* s = sin + bt * D;
  const int64_t half = D / 2;
  for (int64_t d = threadIdx.x; d < half; d += blockDim.x) {
    const float a = to_f(v[d]), b = to_f(v[d + half]);
    v[d] = from_f<T>(a * to_f(c[d]) - b * to_f(s[d]));
    v[d + half] = from_f<T>(b * to_f(c[d + half]) + a * to_f(s[d + half]));
  }
}

template <typename T>
__global__ void silu_mul_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = to_f(gate[i]);
    const T act = from_f<T>(g / (1.f + __expf(-g)));  // silu rounded to dtype, then the product
    out[i] = from_f<T>(to_f(act) * to_f(up[i]));
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int R>
void launch_rms_vec(int threads, const T* x, const T* residual, const T* weight, T* sum, T* out, int64_t rows,
                    int64_t n, float eps, gpuStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  add_rms_norm_vec_kernel<T, V, R><<<static_cast<unsigned>(rows), threads, 0, stream>>>(x, residual, weight, sum, out,
                                                                                       n, eps);
}

template <typename T>
const char* add_rms_norm_t(const void* x, const void* residual, const void* weight, void* sum, void* out, int64_t rows,
                           int64_t n, float eps, gpuStream_t stream) {
  if (rows == 0) return nullptr;
  const T *xt = static_cast<const T*>(x), *rt = static_cast<const T*>(residual), *wt = static_cast<const T*>(weight);
  T *st = static_cast<T*>(sum), *ot = static_cast<T*>(out);
  constexpr int V = 16 / sizeof(T);
  const int64_t nv = n / V;
  if (n % V == 0 && nv <= 4 * kMaxThreads && aligned16(x) && aligned16(residual) && aligned16(weight) &&
      aligned16(residual != nullptr ? sum : nullptr) && aligned16(out)) {
    const int64_t per = nv <= kMaxThreads ? nv : (nv <= 2 * kMaxThreads ? (nv + 1) / 2 : (nv + 3) / 4);
    const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (per + 31) / 32 * 32)));
    if (nv <= kMaxThreads) launch_rms_vec<T, 1>(threads, xt, rt, wt, st, ot, rows, n, eps, stream);
    else if (nv <= 2 * kMaxThreads) launch_rms_vec<T, 2>(threads, xt, rt, wt, st, ot, rows, n, eps, stream);
    else launch_rms_vec<T, 4>(threads, xt, rt, wt, st, ot, rows, n, eps, stream);
    return launched();
  }
  add_rms_norm_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(xt, rt, wt, st, ot, n, eps);
  return launched();
}

template <typename T>
const char* rope_t(void* x, const void* cos, const void* sin, int64_t B, int64_t T_, int64_t H, int64_t D,
                   gpuStream_t stream) {
  if (B * T_ * H == 0) return nullptr;
  const int threads = static_cast<int>(D / 2 < 128 ? (D / 2 > 0 ? D / 2 : 1) : 128);
  rope_kernel<T><<<static_cast<unsigned>(B * T_ * H), threads, 0, stream>>>(
      static_cast<T*>(x), static_cast<const T*>(cos), static_cast<const T*>(sin), H, D);
  return launched();
}

template <typename T>
const char* silu_mul_t(const void* gate, const void* up, void* out, int64_t n, gpuStream_t stream) {
  if (n == 0) return nullptr;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  silu_mul_kernel<T><<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), kThreads, 0, stream>>>(
      static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(out), n);
  return launched();
}

}  // namespace

const char* add_rms_norm(int dtype, const void* x, const void* residual, const void* weight, void* sum, void* out,
                         int64_t rows, int64_t n, float eps, void* stream) {
  CF_DISPATCH(add_rms_norm_t, x, residual, weight, sum, out, rows, n, eps, static_cast<gpuStream_t>(stream))
}
const char* rope(int dtype, void* x, const void* cos, const void* sin, int64_t B, int64_t T, int64_t H, int64_t D,
                 void* stream) {
  CF_DISPATCH(rope_t, x, cos, sin, B, T, H, D, static_cast<gpuStream_t>(stream))
}
const char* silu_mul(int dtype, const void* gate, const void* up, void* out, int64_t n, void* stream) {
  CF_DISPATCH(silu_mul_t, gate, up, out, n, static_cast<gpuStream_t>(stream))
}
#undef CF_DISPATCH

}  // namespace cf::gpu
