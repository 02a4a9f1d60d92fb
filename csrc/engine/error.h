// error.h — the exception types the C++ core throws. bindings.cpp maps each to a Python
// exception (all subclass ValueError), so bad input never reaches Python as a crash.
#pragma once
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

// Message building without iostreams: on some platforms (torch wheels whose CMake config links
// libstdc++ statically into extensions) an ostream in the extension crashes on first use.
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

template <typename... Args>
std::string cat(const Args&... args) {
  std::string out;
  (append(out, args), ...);
  return out;
}

}  // namespace cf
