// layer_path.cpp — see layer_path.h.
#include "layer_path.h"

#include <cctype>
#include <limits>

#include "../common/errors.h"

namespace cf {
namespace {

bool is_space(char ch) { return std::isspace(static_cast<unsigned char>(ch)) != 0; }
bool is_mark(char ch) { return ch == ',' || ch == ';' || ch == '+'; }

[[noreturn]] void empty_item(const std::string& text, size_t item) {
  throw LayerPathError(cat("layer path '", text, "': item ", item,
                           " is empty (a separator at an end, or two with nothing between)"));
}

int64_t parse_index(const std::string& item, const std::string& digits, const std::string& text) {
  if (digits.empty())
    throw LayerPathError(cat("layer path '", text, "': item '", item, "' is missing a layer index"));
  for (char ch : digits)
    if (!std::isdigit(static_cast<unsigned char>(ch)))
      throw LayerPathError(cat("layer path '", text, "': item '", item,
                               "' is not a layer index or an a..b range (indices are non-negative integers)"));
  if (digits.size() > 9) throw LayerPathError(cat("layer path '", text, "': index '", digits, "' is too large"));
  return std::stoll(digits);
}

}  // namespace

// Items are separated by one mark (',', ';', '+'), by whitespace, or by one mark with whitespace
// around it; a mark with no item before or after it is an empty item, an error.
LayerPath parse_layer_path(const std::string& text) {
  LayerPath path;
  size_t items = 0;   // items read so far
  bool open = false;  // a mark was read and no item since
  size_t i = 0;
  while (i < text.size()) {
    if (is_space(text[i])) {
      ++i;
      continue;
    }
    if (is_mark(text[i])) {
      if (open || items == 0) empty_item(text, items + 1);
      open = true;
      ++i;
      continue;
    }
    size_t j = i;
    while (j < text.size() && !is_space(text[j]) && !is_mark(text[j])) ++j;
    const std::string item = text.substr(i, j - i);
    ++items;
    open = false;
    const size_t dots = item.find("..");
    if (dots == std::string::npos) {
      path.push_back(parse_index(item, item, text));
    } else {
      const int64_t a = parse_index(item, item.substr(0, dots), text);
      const int64_t b = parse_index(item, item.substr(dots + 2), text);
      if (b < a)
        throw LayerPathError(cat("layer path '", text, "': range ", item,
                                 " is descending; write reordered layers one by one"));
      if (b - a > 100000) throw LayerPathError(cat("layer path '", text, "': range ", item, " is too long"));
      for (int64_t k = a; k <= b; ++k) path.push_back(k);
    }
    i = j;
  }
  if (open) empty_item(text, items + 1);
  if (path.empty()) throw LayerPathError(cat("layer path '", text, "' is empty"));
  return path;
}

std::string format_layer_path(const LayerPath& path) {
  std::string out;
  size_t i = 0;
  while (i < path.size()) {
    size_t j = i;
    while (j + 1 < path.size() && path[j + 1] == path[j] + 1) ++j;
    if (!out.empty()) out += ",";
    if (j - i >= 2) {
      out += cat(path[i], "..", path[j]);
    } else {
      out += std::to_string(path[i]);
      for (size_t k = i + 1; k <= j; ++k) out += "," + std::to_string(path[k]);
    }
    i = j + 1;
  }
  return out;
}

void validate_layer_path(const LayerPath& path, int64_t num_layers) {
  if (path.empty()) throw LayerPathError("layer path is empty");
  for (size_t s = 0; s < path.size(); ++s) {
    if (path[s] < 0 || path[s] >= num_layers)
      throw LayerPathError(cat("layer path slot ", s, ": layer index ", path[s], " is out of range; the model has ",
                               num_layers, " layers (0..", num_layers - 1, ")"));
  }
}

LayerPath duplicate_layers(int64_t num_layers, int64_t start, int64_t end, int64_t times) {
  if (num_layers <= 0) throw LayerPathError(cat("num_layers must be positive, got ", num_layers));
  if (start < 0 || end > num_layers || start >= end)
    throw LayerPathError(cat("duplicate(", num_layers, ", start=", start, ", end=", end,
                             "): need 0 <= start < end <= ", num_layers, " (start inclusive, end exclusive)"));
  if (times < 1) throw LayerPathError(cat("duplicate: times must be >= 1, got ", times));
  if (times > 100000 / (end - start))  // as a parsed path's ranges: a typo, not a path to run
    throw LayerPathError(cat("duplicate: times=", times, " repeats ", end - start, " layers into a path too long"));
  LayerPath path;
  for (int64_t k = 0; k < end; ++k) path.push_back(k);
  for (int64_t t = 1; t < times; ++t)
    for (int64_t k = start; k < end; ++k) path.push_back(k);
  for (int64_t k = end; k < num_layers; ++k) path.push_back(k);
  return path;
}

}  // namespace cf
