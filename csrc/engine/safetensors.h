// safetensors.h — memory-mapped safetensors reader.
// Every header field is validated (header length within the file, offsets inside the data
// section, non-overlapping, byte size == dtype size x numel) before any tensor data is touched.
// Tensors are zero-copy views of a private (copy-on-write) mapping when aligned; otherwise copied.
// Limits: little-endian hosts; dtypes F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <string>

namespace cf {

using TensorMap = std::map<std::string, at::Tensor>;

// One .safetensors file -> name -> tensor (CPU views of the mapping).
TensorMap load_safetensors_file(const std::string& path);

// A model folder or a file: a folder uses model.safetensors.index.json when present (sharded),
// else model.safetensors, else every *.safetensors in it.
TensorMap load_safetensors(const std::string& path);

}  // namespace cf
