// dispatch.cpp — ATen tensors -> the fused GPU kernels of fused.cu (built only when torch has CUDA
// or ROCm: CF_WITH_CUDA). Each entry point checks what the kernels assume (one device, one dtype,
// shapes; messages name the tensor), makes the tensors contiguous, and launches on the inputs'
// device (a device guard: a model on cuda:1 runs there whatever the current device is) and on that
// device's current stream.
#include <c10/core/ScalarType.h>
#if defined(CF_HIP)
#include <ATen/hip/impl/HIPGuardImplMasqueradingAsCUDA.h>
#include <ATen/hip/impl/HIPStreamMasqueradingAsCUDA.h>
#else
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "../../common/checks.h"
#include "../gpu_ops.h"
#include "../cpu/quant_blocks.h"
#include "fused.h"
#include "quant.h"

namespace cf::gpu {
namespace {

#if defined(CF_HIP)
using DeviceGuard = c10::hip::HIPGuardMasqueradingAsCUDA;
#else
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

int code(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default:
      throw InputError(cat(op, ": ", name, " is ", c10::toString(t.scalar_type()),
                           "; the GPU kernels take float32, float16 or bfloat16"));
  }
}

void* stream_of(const at::Tensor& t) {
#if defined(CF_HIP)
  return at::hip::getCurrentHIPStreamMasqueradingAsCUDA(t.device().index()).stream();
#else
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#endif
}

void check_gpu(const char* op, const char* name, const at::Tensor& t) {
  if (!t.is_cuda()) throw InputError(cat(op, ": ", name, " is on ", t.device().str(), ", not a GPU"));
}

// b on a's GPU with a's dtype (a is already checked to be on a GPU).
void check_like(const char* op, const char* a_name, const at::Tensor& a, const char* b_name, const at::Tensor& b) {
  check_same_device(op, a_name, a, b_name, b);
  check_same_dtype(op, a_name, a, b_name, b);
}

void ok(const char* err, const char* what) {
  if (err != nullptr) throw std::runtime_error(cat(what, ": GPU kernel launch failed: ", err));
}

// Bytes of a packed row of K columns of ggml type `type` (the one format table, quant_blocks.h's,
// whose every type the GPU kernels decode); InputError for another type or columns that are not
// whole blocks.
int64_t packed_row_bytes(const char* op, int32_t type, int64_t K) {
  const cpu::BlockFormat* f = cpu::block_format(type);
  if (f == nullptr) throw InputError(cat(op, ": ggml type ", type, " is not a packed type the GPU kernels decode"));
  if (K <= 0 || K % f->block != 0)
    throw InputError(cat(op, ": ", K, " columns are not whole ", f->block, "-element blocks"));
  return K / f->block * f->bytes;
}

void check_blocks(const char* op, const at::Tensor& w, int64_t row_bytes) {
  check_gpu(op, "blocks", w);
  if (w.scalar_type() != at::kByte || w.dim() < 1 || w.size(-1) != row_bytes)
    throw InputError(cat(op, ": blocks must be uint8 [..., rows, ", row_bytes, "], got ", c10::toString(w.scalar_type()),
                         " ", shape_str(w.sizes())));
}

}  // namespace

bool available() { return true; }

bool grouped_mm_without_sync(at::Device device) {
#if defined(CF_HIP)
  return false;  // torch's sync-free kernels there need MI300-class parts built with CK: not relied on
#else
  int major = 0;
  if (!device.is_cuda() || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()) != cudaSuccess)
    return false;
  return major == 9 || major == 10;
#endif
}

// x [..., hidden]; residual [..., hidden] (x's shape) or none; weight [hidden].
std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                               const at::Tensor& weight, double eps) {
  const char* op = "add_rms_norm";
  check_gpu(op, "x", x);
  if (x.dim() < 1) throw InputError(cat(op, ": x must have a hidden dimension, got a 0-D tensor"));
  const int64_t hidden = x.size(-1);
  check_like(op, "x", x, "weight", weight);
  CF_CHECK_SHAPE(op, weight, hidden);
  const int dtype = code(op, "x", x);
  if (residual) {
    check_like(op, "x", x, "residual", *residual);
    if (residual->sizes() != x.sizes())
      throw InputError(cat(op, ": residual has shape ", shape_str(residual->sizes()), ", expected x's shape ",
                           shape_str(x.sizes())));
  }
  const DeviceGuard guard(x.device());
  at::Tensor xc = x.contiguous(), wc = weight.contiguous(), out = at::empty_like(xc), sum, rc;
  if (residual) {
    rc = residual->contiguous();
    sum = at::empty_like(xc);
  }
  ok(cf::gpu::add_rms_norm(dtype, xc.data_ptr(), rc.defined() ? rc.data_ptr() : nullptr, wc.data_ptr(),
                           sum.defined() ? sum.data_ptr() : nullptr, out.data_ptr(),
                           xc.numel() / std::max<int64_t>(hidden, 1), hidden, static_cast<float>(eps), stream_of(xc)),
     op);
  return {sum.defined() ? sum : xc, out};
}

// x [B, T, H, D] with even D; cos, sin [B, 1, T, D] or [B, T, D].
at::Tensor rope_bthd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const char* op = "rope";
  check_gpu(op, "x", x);
  if (x.dim() != 4 || x.size(3) % 2 != 0)
    throw InputError(cat(op, ": x has shape ", shape_str(x.sizes()), ", expected [B, T, H, D] with even D"));
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  auto check_table = [&](const char* name, const at::Tensor& t) {
    check_like(op, "x", x, name, t);
    if (t.dim() == 3) check_shape(op, name, t, "B, T, D", {B, T, D});
    else check_shape(op, name, t, "B, 1, T, D", {B, 1, T, D});
  };
  check_table("cos", cos);
  check_table("sin", sin);
  const int dtype = code(op, "x", x);
  const DeviceGuard guard(x.device());
  at::Tensor c = cos.reshape({B, T, D}).contiguous(), s = sin.reshape({B, T, D}).contiguous();
  at::Tensor out = x.contiguous();
  ok(cf::gpu::rope(dtype, out.data_ptr(), c.data_ptr(), s.data_ptr(), B, T, H, D, stream_of(out)), op);
  return out;
}

// gate, up [...] of one shape.
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  const char* op = "silu_mul";
  check_gpu(op, "gate", gate);
  check_like(op, "gate", gate, "up", up);
  if (gate.sizes() != up.sizes())
    throw InputError(cat(op, ": up has shape ", shape_str(up.sizes()), ", expected gate's shape ",
                         shape_str(gate.sizes())));
  const int dtype = code(op, "gate", gate);
  const DeviceGuard guard(gate.device());
  at::Tensor g = gate.contiguous(), u = up.contiguous(), out = at::empty_like(g);
  ok(cf::gpu::silu_mul(dtype, g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel(), stream_of(g)), op);
  return out;
}

// w uint8 [..., rows, row_bytes] -> [..., rows, K] in dtype (chunks: quant.h).
at::Tensor dequantize_packed(const at::Tensor& w, int32_t type, int64_t K, at::ScalarType dtype, bool chunks) {
  const char* op = "dequantize_packed";
  const int64_t rb = packed_row_bytes(op, type, K);
  check_blocks(op, w, rb);
  const DeviceGuard guard(w.device());
  std::vector<int64_t> shape(w.sizes().begin(), w.sizes().end());
  shape.back() = K;
  at::Tensor wc = w.contiguous(), out = at::empty(shape, w.options().dtype(dtype));
  ok(dequant_packed(type, wc.data_ptr<uint8_t>(), rb, wc.numel() / rb, K, code(op, "out", out), out.data_ptr(),
                    stream_of(wc), chunks),
     op);
  return out;
}

// x [..., K] . W^T (+ bias [N]) for W packed uint8 [N, row_bytes]: up to direct_rows rows of x
// read the blocks directly (the exact weights, fp32 sums), kPackedGemvRows rows per launch; more
// dequantize ~64 MB of weight rows at a time into x's dtype for the BLAS GEMM (so in bf16 / fp16 the
// weights are rounded to it first, as a dequantized model's are). chunks: quant.h.
at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& w, int32_t type, int64_t K, const at::Tensor& bias,
                         bool chunks, int64_t direct_rows) {
  const char* op = "linear_packed";
  check_gpu(op, "x", x);
  const int64_t rb = packed_row_bytes(op, type, K);
  check_blocks(op, w, rb);
  check_same_device(op, "x", x, "blocks", w);
  if (w.dim() != 2 || x.dim() < 1 || x.size(-1) != K)
    throw InputError(cat(op, ": x ", shape_str(x.sizes()), " and blocks ", shape_str(w.sizes()), " do not make a product of ",
                         K, " columns"));
  const int64_t N = w.size(0), M = x.numel() / K;
  if (bias.defined()) {
    check_like(op, "x", x, "bias", bias);
    CF_CHECK_SHAPE(op, bias, N);
  }
  const int dtype = code(op, "x", x);
  const DeviceGuard guard(x.device());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor xc = x.contiguous().view({M, K}), wc = w.contiguous();
  if (M <= std::max(direct_rows, kPackedGemvRows)) {
    at::Tensor y = at::empty({M, N}, x.options()), bc = bias.defined() ? bias.contiguous() : at::Tensor();
    for (int64_t m0 = 0; m0 < M; m0 += kPackedGemvRows) {  // rows m0.. of x and y: 16-byte aligned as x's and y's starts
      const int64_t m = std::min(kPackedGemvRows, M - m0);
      ok(gemv_packed(type, xc[m0].data_ptr(), m, K, wc.data_ptr<uint8_t>(), rb, N, bc.defined() ? bc.data_ptr() : nullptr,
                     dtype, y[m0].data_ptr(), stream_of(xc), chunks),
         op);
    }
    return y.view(shape);
  }
  const int64_t chunk = std::max<int64_t>(1, (int64_t{64} << 20) / (K * static_cast<int64_t>(x.element_size())));
  if (chunk >= N) {
    const at::Tensor wd = dequantize_packed(wc, type, K, x.scalar_type(), chunks);
    return (bias.defined() ? at::linear(xc, wd, bias) : at::linear(xc, wd)).view(shape);
  }
  at::Tensor y = at::empty({M, N}, x.options());  // filled a chunk of columns at a time
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t n = std::min(chunk, N - n0);
    const at::Tensor wd = dequantize_packed(wc.narrow(0, n0, n), type, K, x.scalar_type(), chunks);
    y.narrow(1, n0, n).copy_(bias.defined() ? at::linear(xc, wd, bias.narrow(0, n0, n)) : at::linear(xc, wd));
  }
  return y.view(shape);
}

// x [P, K] rows sorted by expert . their expert's matrix of blocks uint8 [E, N, row_bytes] (rows
// contiguous bytes, any row and expert strides: not copied), experts [P] int64, ends [E] int32.
at::Tensor linear_packed_grouped(const at::Tensor& x, const at::Tensor& w, int32_t type, int64_t K,
                                 const at::Tensor& experts, const at::Tensor& ends, bool chunks) {
  const char* op = "linear_packed_grouped";
  check_gpu(op, "x", x);
  const int64_t rb = packed_row_bytes(op, type, K);
  check_blocks(op, w, rb);
  check_same_device(op, "x", x, "blocks", w);
  if (w.dim() != 3 || w.stride(2) != 1 || w.stride(1) < rb || w.stride(0) < 0)
    throw InputError(cat(op, ": blocks must be [experts, rows, ", rb, "] with each row's bytes contiguous, got ",
                         shape_str(w.sizes()), " strides ", shape_str(w.strides())));
  if (x.dim() != 2 || x.size(1) != K)
    throw InputError(cat(op, ": x must be [rows, ", K, "], got ", shape_str(x.sizes())));
  const int64_t P = x.size(0), E = w.size(0), N = w.size(1);
  check_same_device(op, "x", x, "experts", experts);
  check_same_device(op, "x", x, "ends", ends);
  if (experts.scalar_type() != at::kLong || experts.dim() != 1 || experts.size(0) != P)
    throw InputError(cat(op, ": experts must be int64 [", P, "] (one per row of x), got ",
                         c10::toString(experts.scalar_type()), " ", shape_str(experts.sizes())));
  if (ends.scalar_type() != at::kInt || ends.dim() != 1 || ends.size(0) != E)
    throw InputError(cat(op, ": ends must be int32 [", E, "] (one per expert), got ", c10::toString(ends.scalar_type()),
                         " ", shape_str(ends.sizes())));
  const int dtype = code(op, "x", x);
  const DeviceGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), ec = experts.contiguous(), nc = ends.contiguous();
  at::Tensor y = at::empty({P, N}, x.options());
  ok(gemv_packed_grouped(type, xc.data_ptr(), P, K, w.data_ptr<uint8_t>(), w.stride(0), w.stride(1), N,
                         ec.data_ptr<int64_t>(), nc.data_ptr<int32_t>(), dtype, y.data_ptr(), stream_of(xc), chunks),
     op);
  return y;
}

}  // namespace cf::gpu
