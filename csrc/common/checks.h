// checks.h — argument checks for C++ entry points that take tensors (flash-attention's CHECK_SHAPE,
// with dimension names): each failure is an InputError naming the op, the tensor, and expected vs
// actual, e.g. "add_rms_norm: weight has shape [512], expected [hidden=1024]". Kept apart from
// errors.h so files that throw without touching tensors (config, layer paths) need no ATen.
#pragma once
#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "errors.h"

namespace cf {

// "[hidden=1024, 2]": sizes with the names they were written with in the call (names "hidden, 2").
// A name that is the number itself prints once; names that do not split one per size (a size
// written as f(a, b)) are dropped.
inline std::string expected_shape_str(const char* names, std::initializer_list<int64_t> sizes) {
  std::vector<std::string> parts(1);
  for (const char* p = names; *p != '\0'; ++p) {
    if (*p == ',') parts.emplace_back();
    else if (*p != ' ') parts.back() += *p;
  }
  const bool named = parts.size() == sizes.size();
  std::string out = "[";
  size_t i = 0;
  for (int64_t size : sizes) {
    const std::string value = std::to_string(size);
    out += i ? ", " : "";
    out += named && parts[i] != value ? cat(parts[i], "=", value) : value;
    ++i;
  }
  return out + "]";
}

// Throws unless t has exactly `sizes`; dim_names is how the sizes were written (see CF_CHECK_SHAPE).
inline void check_shape(const char* op, const char* name, const at::Tensor& t, const char* dim_names,
                        std::initializer_list<int64_t> sizes) {
  if (t.sizes() == c10::IntArrayRef(sizes)) return;
  throw InputError(cat(op, ": ", name, " has shape ", shape_str(t.sizes()), ", expected ",
                       expected_shape_str(dim_names, sizes)));
}

// CF_CHECK_SHAPE("rope", x, B, T, H, D): x must be [B, T, H, D]; the message names x and each size.
#define CF_CHECK_SHAPE(op, t, ...) ::cf::check_shape(op, #t, t, #__VA_ARGS__, {__VA_ARGS__})

// b on a's device: "add_rms_norm: weight is on cuda:1 but x is on cuda:0".
inline void check_same_device(const char* op, const char* a_name, const at::Tensor& a, const char* b_name,
                              const at::Tensor& b) {
  if (a.device() != b.device())
    throw InputError(cat(op, ": ", b_name, " is on ", b.device().str(), " but ", a_name, " is on ", a.device().str()));
}

// b of a's dtype: "silu_mul: up is Double but gate is Float".
inline void check_same_dtype(const char* op, const char* a_name, const at::Tensor& a, const char* b_name,
                             const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type())
    throw InputError(cat(op, ": ", b_name, " is ", c10::toString(b.scalar_type()), " but ", a_name, " is ",
                         c10::toString(a.scalar_type())));
}

}  // namespace cf
