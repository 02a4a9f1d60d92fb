// error.h — the exception types the C++ core throws. bindings.cpp maps each to a Python
// exception (all subclass ValueError), so bad input never reaches Python as a crash.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

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

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace cf
