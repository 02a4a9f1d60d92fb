// gpu_stubs.cpp — cf::gpu in a build without CUDA/ROCm (torch without a GPU build, or no nvcc).
#include "../common/errors.h"
#include "gpu_ops.h"

namespace cf::gpu {
namespace {
[[noreturn]] void missing() {
  throw InputError("circuit-finder was built without GPU kernels (torch has no CUDA/ROCm, or no GPU compiler was found)");
}
}  // namespace

bool available() { return false; }
bool grouped_mm_without_sync(at::Device) { return false; }
std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                               double) {
  missing();
}
at::Tensor rope_bthd(const at::Tensor&, const at::Tensor&, const at::Tensor&) { missing(); }
at::Tensor silu_mul(const at::Tensor&, const at::Tensor&) { missing(); }
at::Tensor dequantize_packed(const at::Tensor&, int32_t, int64_t, at::ScalarType, bool) { missing(); }
at::Tensor linear_packed(const at::Tensor&, const at::Tensor&, int32_t, int64_t, const at::Tensor&, bool, int64_t) {
  missing();
}
at::Tensor linear_packed_grouped(const at::Tensor&, const at::Tensor&, int32_t, int64_t, const at::Tensor&,
                                 const at::Tensor&, bool) {
  missing();
}

}  // namespace cf::gpu
