// errors.h — the exception types the C++ core (engine and kernels) throws, and the message
// building they share. bindings.cpp maps each type to a Python exception (all subclass ValueError),
// so bad input never reaches Python as a crash. Tensor argument checks: checks.h.
#pragma once
#include <c10/util/ArrayRef.h>

#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace cf {

// A file (safetensors, index JSON) whose bytes break the format's rules.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// config.json names something we do not support, or contradicts itself.
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Layer path text or indices that are malformed or out of range.
struct LayerPathError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A weight that is missing, or has the wrong shape, dtype or device.
struct WeightError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A call argument (input ids, mask, cache) of the wrong shape or type.
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Message building without iostreams: with torch 2.11.0+cu130 on the H100 test machine, the first
// std::ostream use inside this extension segfaulted (libstdc++'s ostream code ran from our .so;
// root cause not established), so the core formats with std::to_string / snprintf only.
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  s += buf;
}
template <typename T, typename = std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, char>>>
void append(std::string& s, T v) {
  s += std::to_string(v);
}

// "[2, 3, 4]" for error messages.
inline std::string shape_str(c10::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

template <typename... Args>
std::string cat(const Args&... args) {
  std::string out;
  (append(out, args), ...);
  return out;
}

}  // namespace cf
