// linear.cpp — see linear.h.
#include "linear.h"

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>

#include "../../common/errors.h"
#include "quant_blocks.h"
#include "skinny_gemm.h"

namespace cf::cpu {
namespace {
#define CF_ISA_TABLE(ns) \
  { #ns, ns::gemm_f32, ns::gemm_bf16, ns::gemm_kn_f32, ns::gemm_kn_bf16, ns::add_rms_norm_f32, ns::rope_f32, \
    ns::silu_mul_f32, ns::attend_one_f32, ns::dequant_rows, ns::gemm_q, ns::gemm_q_k_major, ns::quantize_q8, ns::gemm_q8, \
    ns::q8_vectorized, ns::q8_rows, ns::quantize_q8_tiles, ns::plain::gemm_q8_tiled,                      \
    ns::plain::q8_tiled_rows }

// An ISA name without the "-novnni" that avx2 / avx512 may carry: the same kernels, but the tiled
// int8 products (activations="q8") by vpmaddubsw as on a CPU without VNNI, to measure or test them.
std::string family(const std::string& name) {
  const std::string suffix = "-novnni";
  const bool marked =
      name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  const std::string fam = marked ? name.substr(0, name.size() - suffix.size()) : name;
  return marked && fam != "avx2" && fam != "avx512" ? name : fam;
}

bool supported(const std::string& full) {
  const std::string name = family(full);
  if (name == "base") return full == name;
#if defined(__x86_64__) && defined(CF_CPU_ISA_VARIANTS)
  __builtin_cpu_init();
  if (name == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
#endif
  return false;
}

// The tiled int8 kernels compiled for VNNI where the CPU has it: AVX-512 VNNI for the avx512
// build, AVX-VNNI (its 256-bit form) for the avx2 build.
bool cpu_vnni(const std::string& name) {
#if defined(__x86_64__) && defined(CF_CPU_ISA_VARIANTS)
  __builtin_cpu_init();
  if (name == "avx512") return __builtin_cpu_supports("avx512vnni") != 0;
  // AVX-VNNI: CPUID leaf 7, subleaf 1, EAX bit 4 (older compilers' __builtin_cpu_supports lack the
  // name); the OS's YMM state is what avx2's check already needs
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) != 0 && ((a >> 4) & 1) != 0;
#else
  (void)name;
  return false;
#endif
}

Isa isa_named(const std::string& name) {
#define CF_ISA_NAMED(ns)                                                                                   \
  if (family(name) == #ns) {                                                                               \
    Isa isa = CF_ISA_TABLE(ns);                                                                            \
    if (name != #ns)                                                                                       \
      isa.name = #ns "-novnni";                                                                            \
    else if (cpu_vnni(#ns))                                                                                \
      isa.gemm_q8_tiled = ns::vnni::gemm_q8_tiled, isa.q8_tiled_rows = ns::vnni::q8_tiled_rows;           \
    return isa;                                                                                            \
  }
#if defined(__x86_64__) && defined(CF_CPU_ISA_VARIANTS)
  CF_ISA_NAMED(avx512)
  CF_ISA_NAMED(avx2)
#endif
#undef CF_ISA_NAMED
  return CF_ISA_TABLE(base);
}

// CF_CPU_ISA=base / avx2 / avx512 (/ avx2-novnni / avx512-novnni) where set (to run as a CPU without
// the wider sets would, or to compare them; InputError when this CPU lacks it), else the widest
// this CPU has.
Isa best_isa() {
  if (const char* v = std::getenv("CF_CPU_ISA"); v != nullptr && *v != '\0') {
    if (!supported(v))
      throw InputError(cat("CF_CPU_ISA=", v, ": not an instruction set of this CPU's kernels (base, avx2, avx512 where "
                           "the CPU has it; avx2-novnni / avx512-novnni: the same without VNNI's int8 products)"));
    return isa_named(v);
  }
  for (const char* name : {"avx512", "avx2"})
    if (supported(name)) return isa_named(name);
  return isa_named("base");
}

}  // namespace

bool kernels_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("CF_CPU_KERNELS");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

const Isa& active() {
  static const Isa isa = best_isa();
  return isa;
}

namespace {

// A transposed view of a contiguous [K, N] matrix (the layout GPT-OSS's experts are held in).
bool k_major(const at::Tensor& w) { return w.dim() == 2 && w.stride(0) == 1 && w.stride(1) == w.size(0); }

bool takes(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  if (!x.device().is_cpu() || !w.device().is_cpu() || w.dim() != 2 || !(w.is_contiguous() || k_major(w)) ||
      x.dim() < 1)
    return false;
  const at::ScalarType t = w.scalar_type();
  if ((t != at::kFloat && t != at::kBFloat16) || x.scalar_type() != t || x.size(-1) != w.size(1)) return false;
  if (b.defined() && (b.dim() != 1 || b.size(0) != w.size(0) || b.scalar_type() != t || !b.device().is_cpu()))
    return false;
  return w.size(0) > 0 && w.size(1) > 0 && x.numel() > 0;
}

int64_t rows(const at::Tensor& x, const at::Tensor& w) { return x.numel() / w.size(1); }

at::Tensor run(const Isa& isa, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  const int64_t K = w.size(1), N = w.size(0), M = rows(x, w);
  at::Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();
  at::Tensor bf = b.defined() ? b.to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // Tasks of whole 4-row weight blocks; each task's bytes should dwarf the thread hand-off.
  const int64_t blocks = (N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1));
  if (!w.is_contiguous()) {  // K-major: tasks of 64-column blocks (whole tiles for up to 16 lanes)
    const bool f32 = w.scalar_type() == at::kFloat;
    const void* wp = w.data_ptr();
    at::parallel_for(0, (N + 63) / 64, std::max<int64_t>(1, grain / 16), [&](int64_t lo, int64_t hi) {
      const int64_t n0 = lo * 64, n1 = std::min(hi * 64, N);
      if (f32)
        isa.gemm_kn_f32(xp, M, K, static_cast<const float*>(wp), N, bp, yp, N, n0, n1);
      else
        isa.gemm_kn_bf16(xp, M, K, static_cast<const uint16_t*>(wp), N, bp, yp, N, n0, n1);
    });
  } else if (w.scalar_type() == at::kFloat) {
    const float* wp = w.data_ptr<float>();
    at::parallel_for(0, blocks, grain, [&](int64_t lo, int64_t hi) {
      isa.gemm_f32(xp, M, K, wp, bp, yp, N, lo * 4, std::min(hi * 4, N));
    });
  } else {
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
    at::parallel_for(0, blocks, grain, [&](int64_t lo, int64_t hi) {
      isa.gemm_bf16(xp, M, K, wp, bp, yp, N, lo * 4, std::min(hi * 4, N));
    });
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.to(w.scalar_type()).view(shape);
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  if (kernels_enabled() && takes(x, w, b) &&
      rows(x, w) <= (w.scalar_type() == at::kFloat ? skinny_max_rows_f32(w.size(1)) : kSkinnyMaxRowsBF16))
    return run(active(), x, w, b);
  return at::linear(x, w, b);
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                         const std::string& isa) {
  const at::Tensor b = bias.value_or(at::Tensor());
  if (!takes(x, w, b))
    throw InputError(cat("skinny_linear takes a CPU fp32/bf16 x [..., K] and a w [N, K], contiguous or a transposed "
                         "contiguous [K, N] (and bias [N]) of "
                         "the same dtype; got x ", shape_str(x.sizes()), " ",
                         c10::toString(x.scalar_type()), ", w ", shape_str(w.sizes()), " ",
                         c10::toString(w.scalar_type())));
  if (!isa.empty() && !supported(isa)) throw InputError(cat("instruction set '", isa, "' is not available here"));
  return run(isa.empty() ? best_isa() : isa_named(isa), x, w, b);
}

Isa isa_for(const std::string& name) {
  if (name.empty()) return active();
  if (!supported(name)) throw InputError(cat("instruction set '", name, "' is not available here"));
  return isa_named(name);
}

std::string active_isa() { return kernels_enabled() ? active().name : "off"; }

}  // namespace cf::cpu
