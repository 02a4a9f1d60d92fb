// matrix.h — a weight matrix as the linear layers and the embedding read it: a float tensor [N, K]
// (any float dtype, possibly a strided view), or a packed ggml tensor (a GGUF file's blocks, kept
// as they are): uint8 [N, row_bytes] with its ggml type and K (kernels/cpu/quant_blocks.h lists
// the types). Stacked expert matrices ([E, N, ...]) index like tensors. Packed matrices run on
// the CPU (kernels/cpu/quant.h) and, in a build with GPU kernels, on a CUDA/ROCm GPU
// (kernels/cuda/quant.h); the loader dequantizes what it places on other devices.
#pragma once
#include <ATen/ATen.h>

#include <utility>

namespace cf {

struct Matrix {
  at::Tensor t;        // float [..., N, K], or packed uint8 [..., N, row_bytes]
  int32_t type = -1;   // ggml type id when packed, else -1
  int64_t cols = 0;    // K of a packed matrix
  bool q8 = false;     // CPU products of few rows round x to 8 bits (cpu::linear_packed's q8_activations)

  Matrix() = default;
  Matrix(at::Tensor w) : t(std::move(w)) {}  // NOLINT: a float tensor is a matrix
  Matrix(at::Tensor w, int32_t ggml_type, int64_t k) : t(std::move(w)), type(ggml_type), cols(k) {}

  bool defined() const { return t.defined(); }
  bool packed() const { return type >= 0; }
  int64_t rows() const { return t.size(-2); }  // N (of a float view, its logical rows)
  Matrix operator[](int64_t i) const {
    Matrix m = packed() ? Matrix(t[i], type, cols) : Matrix(t[i]);
    m.q8 = q8;
    return m;
  }
};

}  // namespace cf
