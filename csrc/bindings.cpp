// bindings.cpp — the Python module circuit_finder._C. Binding lines only; logic lives in engine/.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <cstring>

#include "common/errors.h"
#include "engine/config.h"
#include "engine/kv_cache.h"
#include "engine/layer_path.h"
#include "engine/model.h"
#include "engine/safetensors.h"
#include "kernels/cpu/fused.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/quant.h"
#include "kernels/gpu_ops.h"
#include "kernels/ops.h"

namespace py = pybind11;

namespace {

// Sets the module's exception `name` from a message that may quote bytes of a malformed file
// which are not UTF-8: decoded with replacement characters (pybind11's own translation decodes
// strictly, so a UnicodeDecodeError would replace the error naming the file).
void raise_named(const char* name, const char* what) {
  py::object type = py::module_::import("circuit_finder._C").attr(name);
  py::object text = py::reinterpret_steal<py::object>(PyUnicode_DecodeUTF8(what, std::strlen(what), "replace"));
  PyErr_SetObject(type.ptr(), text.ptr());
}

void translate_errors(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const cf::FormatError& e) {
    raise_named("FormatError", e.what());
  } catch (const cf::ConfigError& e) {
    raise_named("ConfigError", e.what());
  } catch (const cf::LayerPathError& e) {
    raise_named("LayerPathError", e.what());
  } catch (const cf::WeightError& e) {
    raise_named("WeightError", e.what());
  } catch (const cf::InputError& e) {
    raise_named("InputError", e.what());
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "circuit-finder C++ core: safetensors, config, layer paths, forward along a path";
  py::register_exception<cf::FormatError>(m, "FormatError", PyExc_ValueError);
  py::register_exception<cf::ConfigError>(m, "ConfigError", PyExc_ValueError);
  py::register_exception<cf::LayerPathError>(m, "LayerPathError", PyExc_ValueError);
  py::register_exception<cf::WeightError>(m, "WeightError", PyExc_ValueError);
  py::register_exception<cf::InputError>(m, "InputError", PyExc_ValueError);
  py::register_exception_translator(&translate_errors);  // tried first: the last registered runs first

  m.def("load_safetensors", &cf::load_safetensors, py::arg("path"), py::call_guard<py::gil_scoped_release>());
  m.def("load_safetensors_file", &cf::load_safetensors_file, py::arg("path"), py::call_guard<py::gil_scoped_release>());
  m.def("parse_config", &cf::normalize_config, py::arg("text"), py::arg("source") = "config.json");
  m.def("parse_layer_path", &cf::parse_layer_path, py::arg("text"));
  m.def("format_layer_path", &cf::format_layer_path, py::arg("path"));
  m.def("validate_layer_path", &cf::validate_layer_path, py::arg("path"), py::arg("num_layers"));
  m.def("duplicate_layers", &cf::duplicate_layers, py::arg("num_layers"), py::arg("start"), py::arg("end"),
        py::arg("times") = 2);

  m.def("skinny_linear", &cf::cpu::skinny_linear, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("isa") = "", py::call_guard<py::gil_scoped_release>());
  m.def("cpu_isa", &cf::cpu::active_isa);
  m.def("dequantize_packed", &cf::cpu::dequantize, py::arg("blocks"), py::arg("ggml_type"), py::arg("cols"),
        py::arg("dtype"), py::arg("isa") = "", py::call_guard<py::gil_scoped_release>(),
        "packed ggml blocks uint8 [..., rows, row_bytes] (CPU) -> [..., rows, cols] in dtype");
  m.def("linear_packed",
        [](const at::Tensor& x, const at::Tensor& w, int32_t t, int64_t k, const std::optional<at::Tensor>& b,
           const std::string& isa, bool q8) { return cf::cpu::linear_packed(x, w, t, k, b.value_or(at::Tensor()), isa, q8); },
        py::arg("x"), py::arg("blocks"), py::arg("ggml_type"), py::arg("cols"), py::arg("bias") = py::none(),
        py::arg("isa") = "", py::arg("q8_activations") = false,
        py::call_guard<py::gil_scoped_release>(),
        "x [..., cols] @ dequantized(blocks)^T (+ bias), reading the packed blocks");
  m.def("cpu_q8_activations", &cf::cpu::q8_activations_here,
        "whether load(activations='q8') takes effect on this CPU (AVX2 or AVX-512BW int8 kernels)");
  m.def("cpu_q8_tiled_rows", &cf::cpu::q8_tiled_rows_here, py::arg("ggml_type"), py::arg("isa") = "",
        "the rows of x from which activations='q8' takes products of this type in int8 tiles (any number: a "
        "prefill) on this CPU, or with instruction set isa's kernels; 0: never");
  m.def("packed_row_bytes", [](int32_t t, int64_t k) { return cf::cpu::packed_row_bytes(t, k, "packed_row_bytes"); },
        py::arg("ggml_type"), py::arg("cols"));
  m.def("cpu_add_rms_norm", &cf::cpu::add_rms_norm, py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("cpu_rope", &cf::cpu::rope_bthd, py::arg("x"), py::arg("cos"), py::arg("sin"));
  m.def("cpu_silu_mul", &cf::cpu::silu_mul, py::arg("gate"), py::arg("up"));
  m.def("cpu_attend_one", &cf::cpu::attend_one, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"),
        py::arg("scale"), py::call_guard<py::gil_scoped_release>());
  m.def("gpu_kernels", &cf::ops::gpu_kernels_enabled, "whether CUDA/ROCm tensors run the fused GPU kernels");
  m.def("dense_gemv_takes", &cf::ops::dense_gemv, py::arg("x"), py::arg("weight"),
        "whether x . weight^T takes our GEMV kernel (CF_DENSE_GEMV=1: half-precision weights on a GPU, up to 8 rows)");
  m.def("gpu_add_rms_norm", &cf::gpu::add_rms_norm, py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("gpu_rope", &cf::gpu::rope_bthd, py::arg("x"), py::arg("cos"), py::arg("sin"));
  m.def("gpu_silu_mul", &cf::gpu::silu_mul, py::arg("gate"), py::arg("up"));
  m.def("gpu_dequantize_packed", &cf::gpu::dequantize_packed, py::arg("blocks"), py::arg("ggml_type"), py::arg("cols"),
        py::arg("dtype"), py::arg("chunks") = true,
        "packed ggml blocks uint8 [..., rows, row_bytes] on a GPU -> [..., rows, cols] in dtype (chunks=False: the "
        "per-element kernel)");
  m.def("gpu_linear_packed",
        [](const at::Tensor& x, const at::Tensor& w, int32_t t, int64_t k, const std::optional<at::Tensor>& b,
           bool chunks, int64_t direct_rows) {
          return cf::gpu::linear_packed(x, w, t, k, b.value_or(at::Tensor()), chunks, direct_rows);
        },
        py::arg("x"), py::arg("blocks"), py::arg("ggml_type"), py::arg("cols"), py::arg("bias") = py::none(),
        py::arg("chunks") = true, py::arg("direct_rows") = 0,
        "x [..., cols] @ dequantized(blocks)^T (+ bias) on a GPU, reading the packed blocks (chunks=False: the "
        "per-element kernels; direct_rows: up to that many rows of x read the blocks directly, 8 per launch, "
        "instead of dequantizing for cuBLAS; 0: the default, 8)");

  m.def("gpu_linear_packed_grouped", &cf::gpu::linear_packed_grouped, py::arg("x"), py::arg("blocks"),
        py::arg("ggml_type"), py::arg("cols"), py::arg("experts"), py::arg("ends"), py::arg("chunks") = true,
        "x [P, cols] rows sorted by expert (experts [P] int64, ascending; ends [E] int32, cumulative rows per "
        "expert) @ their expert's dequantized(blocks[e])^T on a GPU, blocks uint8 [E, rows, row_bytes]; reads "
        "nothing on the host");

  py::class_<cf::KVCache>(m, "KVCache")
      .def_property_readonly("length", &cf::KVCache::length)
      .def_property_readonly("capacity", &cf::KVCache::capacity)
      .def_property_readonly("num_slots", &cf::KVCache::num_slots)
      .def_property_readonly("batch", &cf::KVCache::batch)
      .def("reset", &cf::KVCache::reset)
      .def("advance", &cf::KVCache::advance, py::arg("tokens"))
      .def("select_rows", &cf::KVCache::select_rows, py::arg("rows"), py::arg("slots"))
      .def("place", &cf::KVCache::place, py::arg("src"), py::arg("row"), py::arg("column"), py::arg("first_slot") = 0,
           py::arg("length") = -1, py::arg("rows") = -1, py::arg("end_slot") = -1,
           "copies src's positions [0, length) (default: its length) of slots [first_slot, end_slot) into `rows` "
           "rows from `row` (default src.batch; a batch-1 source fills several), columns [column, column + length)")
      .def("keep_rows", &cf::KVCache::keep_rows, py::arg("rows"), "shrinks the batch: row i becomes row rows[i] (moved in place where no source is overwritten first)")
      .def("keys", &cf::KVCache::filled_keys, py::arg("slot"), "the slot's filled keys [B, kv_heads, length, head_dim]")
      .def("values", &cf::KVCache::filled_values, py::arg("slot"))
      .def("device", [](const cf::KVCache& c, int64_t slot) { return c.device(slot).str(); }, py::arg("slot"))
      .def("linear_state", [](cf::KVCache& c, int64_t slot) { return std::make_pair(c.conv_state(slot), c.recurrent_state(slot)); },
           py::arg("slot"), "a linear-attention slot's (conv inputs [B, C, K], recurrent state [B, Hv, Dk, Dv] fp32)");

  py::class_<cf::Engine>(m, "Engine")
      .def(py::init<const std::string&, const std::string&, const std::map<std::string, at::Tensor>&,
                    const std::map<std::string, int32_t>&, bool>(),
           py::arg("config_json"), py::arg("config_source"), py::arg("tensors"),
           py::arg("packed") = std::map<std::string, int32_t>{}, py::arg("q8_activations") = false)
      .def("forward", &cf::Engine::forward, py::arg("input_ids"), py::arg("positions"), py::arg("attention_mask"),
           py::arg("path"), py::arg("cache"), py::arg("last_only") = false, py::call_guard<py::gil_scoped_release>())
      .def("hidden", &cf::Engine::hidden, py::arg("input_ids"), py::arg("positions"), py::arg("attention_mask"),
           py::arg("path"), py::arg("cache"), py::call_guard<py::gil_scoped_release>())
      .def("embed", &cf::Engine::embed, py::arg("input_ids"), py::call_guard<py::gil_scoped_release>())
      .def("run_slots", &cf::Engine::run_slots, py::arg("hidden"), py::arg("positions"), py::arg("attention_mask"),
           py::arg("path"), py::arg("cache"), py::arg("begin"), py::arg("end"), py::call_guard<py::gil_scoped_release>())
      .def("head", &cf::Engine::head, py::arg("hidden"), py::call_guard<py::gil_scoped_release>())
      .def("decode_step", &cf::Engine::decode_step, py::arg("token"), py::arg("positions"), py::arg("key_mask"),
           py::arg("index"), py::arg("path"), py::arg("cache"), py::call_guard<py::gil_scoped_release>())
      .def("new_cache", &cf::Engine::new_cache, py::arg("path"), py::arg("batch"), py::arg("capacity"),
           py::arg("share") = nullptr, py::arg("shared_slots") = 0)
      .def("layer_device", [](const cf::Engine& e, int64_t layer) { return e.layer_device(layer).str(); },
           py::arg("layer"))
      .def_property_readonly("device", [](const cf::Engine& e) { return e.device().str(); })
      .def("layer_tensors", &cf::Engine::layer_tensors, py::arg("layer"))
      .def("main_tensors", &cf::Engine::main_tensors, "the embedding, final norm and head as the engine holds them")
      .def("fused_products", &cf::Engine::fused_products)
      .def("unused_tensors", &cf::Engine::unused_tensors, "the tensors given that this model does not use (name order)")
      .def("moe_without_host_sync", &cf::Engine::moe_without_host_sync, py::arg("tokens") = 1,
           "whether every mixture-of-experts layer runs a call of `tokens` rows (a decode step's batch) without "
           "reading its routing on the host, so that a decode step can be a CUDA graph")
      .def("config_json", &cf::Engine::config_json);
}
