// fused.cpp — see fused.h.
#include "fused.h"

#include <ATen/Parallel.h>

#include <vector>

#include "../../common/errors.h"
#include "linear.h"

namespace cf::cpu {
namespace {

// Rows per task: enough elements that handing work to the second thread pays off.
int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_elems, 1)); }

void check_same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  if (!fused_takes(b) || a.sizes() != b.sizes())
    throw InputError(cat(what, ": tensors must be CPU float32 of one shape, got ", shape_str(a.sizes()), " and ",
                         shape_str(b.sizes())));
}

}  // namespace

bool fused_takes(const at::Tensor& x) {
  return kernels_enabled() && x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1 && x.numel() > 0;
}

std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                               const at::Tensor& weight, double eps) {
  const int64_t n = x.size(-1);
  if (!fused_takes(x) || !fused_takes(weight) || weight.dim() != 1 || weight.size(0) != n)
    throw InputError(cat("add_rms_norm: CPU float32 x [..., ", n, "] and weight [", n, "] expected"));
  at::Tensor xc = x.contiguous(), wc = weight.contiguous(), out = at::empty_like(xc), sum, rc;
  if (residual) {
    check_same(x, *residual, "add_rms_norm");
    rc = residual->contiguous();
    sum = at::empty_like(xc);
  }
  const float* xp = xc.data_ptr<float>();
  const float* rp = rc.defined() ? rc.data_ptr<float>() : nullptr;
  float* sp = sum.defined() ? sum.data_ptr<float>() : nullptr;
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Isa& isa = active();
  at::parallel_for(0, xc.numel() / n, grain_rows(n), [&](int64_t r0, int64_t r1) {
    isa.add_rms_norm_f32(xp, rp, wp, sp, op, r0, r1, n, static_cast<float>(eps));
  });
  return {sum.defined() ? sum : xc, out};
}

at::Tensor rope_bthd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  if (!fused_takes(x) || x.dim() != 4 || x.size(3) % 2 != 0 || !fused_takes(cos) || !fused_takes(sin))
    throw InputError(cat("rope: CPU float32 x [B, T, H, D] with even D expected, got ", shape_str(x.sizes())));
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  const std::vector<int64_t> table{B, 1, T, D};  // (the kernel reads them as [B, T, D])
  if (cos.sizes() != at::IntArrayRef(table) || sin.sizes() != at::IntArrayRef(table))
    throw InputError(cat("rope: cos/sin must be [", B, ", 1, ", T, ", ", D, "], got ", shape_str(cos.sizes()), " and ",
                         shape_str(sin.sizes())));
  at::Tensor xc = x.contiguous(), c = cos.contiguous(), s = sin.contiguous(), out = at::empty_like(xc);
  const float *xp = xc.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Isa& isa = active();
  at::parallel_for(0, B * T * H, grain_rows(D), [&](int64_t r0, int64_t r1) { isa.rope_f32(xp, cp, sp, op, r0, r1, H, D); });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  if (!fused_takes(gate)) throw InputError("silu_mul: CPU float32 tensors expected");
  check_same(gate, up, "silu_mul");
  at::Tensor g = gate.contiguous(), u = up.contiguous(), out = at::empty_like(g);
  const float *gp = g.data_ptr<float>(), *upp = u.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Isa& isa = active();
  at::parallel_for(0, g.numel(), 16384, [&](int64_t i0, int64_t i1) { isa.silu_mul_f32(gp, upp, op, i0, i1); });
  return out;
}

bool attend_one_takes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& mask) {
  if (!fused_takes(q) || !fused_takes(k) || !fused_takes(v) || q.dim() != 4 || k.dim() != 4 || v.dim() != 4)
    return false;
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1);
  if (q.size(2) != 1 || k.sizes() != v.sizes() || k.size(0) != B || k.size(3) != D || Hkv == 0 || Hq % Hkv != 0 ||
      k.stride(3) != 1 || v.stride(3) != 1)
    return false;
  if (!mask) return true;
  const at::Tensor& m = *mask;
  return m.scalar_type() == at::kBool && m.device().is_cpu() && m.dim() == 4 && m.size(1) == 1 && m.size(2) == 1 &&
         m.size(3) == k.size(2) && (m.size(0) == B || m.size(0) == 1);
}

at::Tensor attend_one(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& mask, double scale) {
  if (!attend_one_takes(q, k, v, mask))
    throw InputError(cat("attend_one: CPU float32 q [B, Hq, 1, D] and k / v [B, Hkv, S, D] (and a bool mask [B, 1, 1, S])"
                         " expected, got q ", shape_str(q.sizes()), ", k ", shape_str(k.sizes())));
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2), G = Hq / Hkv;
  at::Tensor qc = q.contiguous(), out = at::empty({B, Hq, 1, D}, q.options());
  at::Tensor mc = mask ? mask->contiguous() : at::Tensor();
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const uint8_t* mp = mc.defined() ? reinterpret_cast<const uint8_t*>(mc.data_ptr<bool>()) : nullptr;
  float* op = out.data_ptr<float>();
  const Isa& isa = active();
  at::parallel_for(0, B * Hq, std::max<int64_t>(1, 65536 / std::max<int64_t>(S * D, 1)), [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(static_cast<size_t>(S));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hq, g = (i % Hq) / G;
      const uint8_t* row_mask = mp == nullptr ? nullptr : mp + (mc.size(0) == 1 ? 0 : b) * S;
      isa.attend_one_f32(qp + i * D, kp + b * k.stride(0) + g * k.stride(1), k.stride(2),
                         vp + b * v.stride(0) + g * v.stride(1), v.stride(2), row_mask, S, D,
                         static_cast<float>(scale), scores.data(), op + i * D);
    }
  });
  return out;
}

}  // namespace cf::cpu
