// layer_path.h — the order in which decoder layers run. Text form: comma-separated indices and
// inclusive ascending ranges ("0..14,12,13,14,15..39"); ';', '+' and whitespace also separate
// items, so a path can be written without commas where commas are taken (lm-eval model_args).
// Whitespace around a separator is fine ("0..3, 4"); an empty item ("0..3,,4", "0..3,") is not.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace cf {

using LayerPath = std::vector<int64_t>;

// Parses path text; throws LayerPathError naming the bad item (its text, or its 1-based number
// when it is empty).
LayerPath parse_layer_path(const std::string& text);
// Canonical compact text: ascending runs of 3 or more become a..b; parses back to the same path.
std::string format_layer_path(const LayerPath& path);
// Throws LayerPathError naming the first index outside [0, num_layers).
void validate_layer_path(const LayerPath& path, int64_t num_layers);
// RYS: 0..end-1, then start..end-1 (times-1 more times), then end..num_layers-1.
LayerPath duplicate_layers(int64_t num_layers, int64_t start, int64_t end, int64_t times);

}  // namespace cf
