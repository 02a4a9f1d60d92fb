// dispatch.cpp — ATen tensors -> the fused GPU kernels of fused.cu (built only when torch has CUDA
// or ROCm: CF_WITH_CUDA). Checks what the kernels assume (device, dtype, contiguity, shapes).
#include <c10/core/ScalarType.h>
#if defined(CF_HIP)
#include <ATen/hip/impl/HIPStreamMasqueradingAsCUDA.h>
#else
#include <c10/cuda/CUDAStream.h>
#endif

#include "../../engine/error.h"
#include "../gpu_ops.h"
#include "fused.h"

namespace cf::gpu {
namespace {

int code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: throw InputError(cat("GPU kernels take float32, float16 or bfloat16, got ", c10::toString(t.scalar_type())));
  }
}

void* stream_of(const at::Tensor& t) {
#if defined(CF_HIP)
  return at::hip::getCurrentHIPStreamMasqueradingAsCUDA(t.device().index()).stream();
#else
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#endif
}

void same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  if (!a.is_cuda() || a.device() != b.device() || a.scalar_type() != b.scalar_type())
    throw InputError(cat(what, ": tensors must be on one GPU with one dtype"));
}

void ok(const char* err, const char* what) {
  if (err != nullptr) throw std::runtime_error(cat(what, ": GPU kernel launch failed: ", err));
}

}  // namespace

bool available() { return true; }

std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                               const at::Tensor& weight, double eps) {
  const int64_t n = x.size(-1);
  same(x, weight, "add_rms_norm");
  if (weight.dim() != 1 || weight.size(0) != n) throw InputError(cat("add_rms_norm: weight must be [", n, "]"));
  at::Tensor xc = x.contiguous(), wc = weight.contiguous(), out = at::empty_like(xc), sum, rc;
  if (residual) {
    same(x, *residual, "add_rms_norm");
    if (residual->sizes() != x.sizes()) throw InputError("add_rms_norm: residual must have x's shape");
    rc = residual->contiguous();
    sum = at::empty_like(xc);
  }
  ok(cf::gpu::add_rms_norm(code(xc), xc.data_ptr(), rc.defined() ? rc.data_ptr() : nullptr, wc.data_ptr(),
                           sum.defined() ? sum.data_ptr() : nullptr, out.data_ptr(), xc.numel() / std::max<int64_t>(n, 1),
                           n, static_cast<float>(eps), stream_of(xc)),
     "add_rms_norm");
  return {sum.defined() ? sum : xc, out};
}

at::Tensor rope_bthd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  same(x, cos, "rope");
  same(x, sin, "rope");
  if (x.dim() != 4 || x.size(3) % 2 != 0) throw InputError("rope: x must be [B, T, H, D] with even D");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  at::Tensor c = cos.reshape({B, T, D}).contiguous(), s = sin.reshape({B, T, D}).contiguous();
  at::Tensor out = x.contiguous();
  ok(cf::gpu::rope(code(out), out.data_ptr(), c.data_ptr(), s.data_ptr(), B, T, H, D, stream_of(out)), "rope");
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  same(gate, up, "silu_mul");
  if (gate.sizes() != up.sizes()) throw InputError("silu_mul: gate and up must have one shape");
  at::Tensor g = gate.contiguous(), u = up.contiguous(), out = at::empty_like(g);
  ok(cf::gpu::silu_mul(code(g), g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel(), stream_of(g)), "silu_mul");
  return out;
}

}  // namespace cf::gpu
