// safetensors.cpp — see safetensors.h. Validation first, data second.
#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <vector>

#include "../common/errors.h"

namespace cf {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// Largest header we accept: far above any real checkpoint, small enough to never exhaust memory.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

struct Mapping {
  void* base = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (base != nullptr && base != MAP_FAILED) munmap(base, size);
  }
};

struct DtypeInfo {
  at::ScalarType type;
  size_t bytes;
};

const std::map<std::string, DtypeInfo>& dtype_table() {
  static const std::map<std::string, DtypeInfo> table = {
      {"F32", {at::kFloat, 4}}, {"F16", {at::kHalf, 2}},  {"BF16", {at::kBFloat16, 2}},
      {"F64", {at::kDouble, 8}}, {"I64", {at::kLong, 8}}, {"I32", {at::kInt, 4}},
      {"I16", {at::kShort, 2}},  {"I8", {at::kChar, 1}},  {"U8", {at::kByte, 1}},
      {"BOOL", {at::kBool, 1}},  {"F8_E4M3", {at::kFloat8_e4m3fn, 1}}, {"F8_E5M2", {at::kFloat8_e5m2, 1}},
  };
  return table;
}

std::string supported_dtypes() {
  std::string out;
  for (const auto& [name, _] : dtype_table()) out += (out.empty() ? "" : ", ") + name;
  return out;
}

std::shared_ptr<Mapping> map_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw FormatError(cat(path, ": cannot open: ", std::strerror(errno)));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    throw FormatError(cat(path, ": cannot stat: ", std::strerror(errno)));
  }
  auto m = std::make_shared<Mapping>();
  m->size = static_cast<size_t>(st.st_size);
  if (m->size < 8) {
    ::close(fd);
    throw FormatError(cat(path, ": truncated safetensors file: ", m->size,
                          " bytes, need at least 8 for the header length"));
  }
  // Private + writable: pages are copy-on-write, so a caller writing into a weight view
  // changes only its own copy and never faults on a read-only page.
  m->base = mmap(nullptr, m->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (m->base == MAP_FAILED) throw FormatError(cat(path, ": mmap failed: ", std::strerror(errno)));
  return m;
}

uint64_t checked_mul(uint64_t a, uint64_t b, const std::string& where) {
  if (a != 0 && b > UINT64_MAX / a) throw FormatError(cat(where, ": tensor size overflows"));
  return a * b;
}

struct Entry {
  std::string name;
  DtypeInfo dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};

std::vector<Entry> parse_header(const std::string& path, const char* text, size_t len,
                                uint64_t data_size) {
  json header;
  std::set<std::string> names;
  std::string repeated;  // a tensor name the header gives twice (JSON parsers keep one silently)
  auto note_key = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && depth == 1 && !names.insert(parsed.get<std::string>()).second &&
        repeated.empty())
      repeated = parsed.get<std::string>();
    return true;
  };
  try {
    header = json::parse(text, text + len, note_key);
  } catch (const json::exception& e) {
    throw FormatError(cat(path, ": invalid JSON header: ", e.what()));
  }
  if (!header.is_object()) throw FormatError(cat(path, ": header is not a JSON object"));
  if (!repeated.empty()) throw FormatError(cat(path, ": the header names tensor '", repeated, "' twice"));
  std::vector<Entry> entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") continue;
    const std::string where = cat(path, ": tensor '", name, "'");
    const json& v = it.value();
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") ||
        !v.contains("data_offsets"))
      throw FormatError(cat(where, ": entry needs dtype, shape and data_offsets"));
    if (!v["dtype"].is_string()) throw FormatError(cat(where, ": dtype is not a string"));
    const std::string dt = v["dtype"].get<std::string>();
    auto found = dtype_table().find(dt);
    if (found == dtype_table().end())
      throw FormatError(cat(where, ": unsupported dtype ", dt, " (supported: ", supported_dtypes(), ")"));
    Entry e{name, found->second, {}, 0, 0};
    if (!v["shape"].is_array()) throw FormatError(cat(where, ": shape is not an array"));
    uint64_t numel = 1, span = 1;  // span: the product of the non-zero sizes, which strides reach
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) throw FormatError(cat(where, ": shape has a non-integer or negative dimension"));
      uint64_t dim = d.get<uint64_t>();
      if (dim > (uint64_t{1} << 62)) throw FormatError(cat(where, ": dimension ", dim, " is too large"));
      numel = checked_mul(numel, dim, where);
      span = checked_mul(span, std::max<uint64_t>(dim, 1), where);
      if (span > static_cast<uint64_t>(INT64_MAX)) throw FormatError(cat(where, ": tensor size overflows"));
      e.shape.push_back(static_cast<int64_t>(dim));
    }
    const json& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned())
      throw FormatError(cat(where, ": data_offsets must be two non-negative integers"));
    e.begin = off[0].get<uint64_t>();
    e.end = off[1].get<uint64_t>();
    if (e.begin > e.end)
      throw FormatError(cat(where, ": data_offsets [", e.begin, ", ", e.end, "] are reversed"));
    if (e.end > data_size)
      throw FormatError(cat(where, ": data_offsets end ", e.end, " is past the end of the data section (",
                            data_size, " bytes)"));
    const uint64_t expect = checked_mul(numel, e.dtype.bytes, where);
    if (e.end - e.begin != expect)
      throw FormatError(cat(where, ": byte size ", e.end - e.begin, " does not match dtype ", dt, " x shape (",
                            expect, " bytes)"));
    entries.push_back(std::move(e));
  }
  std::vector<const Entry*> order;
  for (const auto& e : entries) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t max_end = 0;
  const Entry* last = nullptr;
  for (const Entry* e : order) {
    if (e->begin == e->end) continue;  // empty tensors occupy no bytes
    if (last != nullptr && e->begin < max_end)
      throw FormatError(cat(path, ": tensors '", last->name, "' and '", e->name,
                            "' have overlapping data_offsets"));
    if (e->end > max_end) {
      max_end = e->end;
      last = e;
    }
  }
  return entries;
}

std::string read_text(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) throw FormatError(cat(path, ": cannot open: ", std::strerror(errno)));
  std::string text;
  char buf[65536];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
  std::fclose(f);
  return text;
}

}  // namespace

TensorMap load_safetensors_file(const std::string& path) {
  auto m = map_file(path);
  const auto* bytes = static_cast<const unsigned char*>(m->base);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > m->size - 8)
    throw FormatError(cat(path, ": header length ", header_len, " is beyond the file (", m->size, " bytes)"));
  if (header_len > kMaxHeaderBytes)
    throw FormatError(cat(path, ": header length ", header_len, " exceeds the limit of ", kMaxHeaderBytes));
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = m->size - data_start;
  auto entries = parse_header(path, reinterpret_cast<const char*>(bytes + 8), header_len, data_size);

  TensorMap out;
  auto* data = static_cast<unsigned char*>(m->base) + data_start;
  for (const auto& e : entries) {
    void* ptr = data + e.begin;
    auto opts = at::TensorOptions().dtype(e.dtype.type).device(at::kCPU);
    at::Tensor t;
    if (e.end == e.begin) {
      t = at::empty(e.shape, opts);
    } else if (reinterpret_cast<uintptr_t>(ptr) % e.dtype.bytes == 0) {
      std::shared_ptr<Mapping> keep = m;  // the view keeps the mapping alive
      t = at::from_blob(ptr, e.shape, [keep](void*) mutable { keep.reset(); }, opts);
    } else {
      t = at::empty(e.shape, opts);
      std::memcpy(t.data_ptr(), ptr, e.end - e.begin);
    }
    out.emplace(e.name, std::move(t));
  }
  return out;
}

TensorMap load_safetensors(const std::string& path) {
  if (!fs::exists(path)) throw FormatError(cat(path, ": no such file or folder"));
  if (!fs::is_directory(path)) return load_safetensors_file(path);
  const fs::path dir(path);
  const fs::path index = dir / "model.safetensors.index.json";
  if (fs::exists(index)) {
    json doc;
    try {
      doc = json::parse(read_text(index.string()));
    } catch (const json::exception& e) {
      throw FormatError(cat(index.string(), ": invalid JSON: ", e.what()));
    }
    if (!doc.is_object() || !doc.contains("weight_map") || !doc["weight_map"].is_object())
      throw FormatError(cat(index.string(), ": needs a 'weight_map' object"));
    std::map<std::string, std::vector<std::string>> by_file;
    for (auto it = doc["weight_map"].begin(); it != doc["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        throw FormatError(cat(index.string(), ": weight_map entry '", it.key(), "' is not a file name"));
      const std::string file = it.value().get<std::string>();
      if (file.empty() || file.find('/') != std::string::npos || file.find('\\') != std::string::npos ||
          file == "." || file == "..")
        throw FormatError(cat(index.string(), ": shard name '", file, "' must be a plain file name in the folder"));
      by_file[file].push_back(it.key());
    }
    TensorMap out;
    for (const auto& [file, names] : by_file) {
      const std::string shard = (dir / file).string();
      TensorMap tensors = load_safetensors_file(shard);
      for (const auto& name : names) {
        auto t = tensors.find(name);
        if (t == tensors.end())
          throw FormatError(cat(index.string(), ": tensor '", name, "' is listed in ", file, " but ", shard,
                                " does not hold it"));
        out.emplace(name, t->second);
      }
    }
    return out;
  }
  const fs::path single = dir / "model.safetensors";
  if (fs::exists(single)) return load_safetensors_file(single.string());
  std::vector<fs::path> files;
  for (const auto& f : fs::directory_iterator(dir))
    if (f.path().extension() == ".safetensors") files.push_back(f.path());
  if (files.empty()) throw FormatError(cat(path, ": no .safetensors files in this folder"));
  std::sort(files.begin(), files.end());
  TensorMap out;
  for (const auto& f : files) {
    for (auto& [name, t] : load_safetensors_file(f.string())) {
      if (out.count(name)) throw FormatError(cat(f.string(), ": tensor '", name, "' also appears in another file"));
      out.emplace(name, t);
    }
  }
  return out;
}

}  // namespace cf
