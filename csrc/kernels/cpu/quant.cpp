// quant.cpp — see quant.h and quant_blocks.h.
#include "quant.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../../common/errors.h"
#include "linear.h"
#include "quant_blocks.h"

namespace cf::cpu {

const BlockFormat* block_format(int32_t type) {
#define CF_FORMAT_ROW(id, name, fn, block, bytes) {id, #name, block, bytes},
  static const BlockFormat kFormats[] = {{1, "F16", 1, 2}, {30, "BF16", 1, 2}, CF_BLOCK_TYPES(CF_FORMAT_ROW)};
#undef CF_FORMAT_ROW
  for (const BlockFormat& f : kFormats)
    if (f.type == type) return &f;
  return nullptr;
}

std::string packed_type_name(int32_t type) {
  const BlockFormat* f = block_format(type);
  return f != nullptr ? f->name : cat("type ", type);
}

int64_t packed_row_bytes(int32_t type, int64_t K, const std::string& what) {
  const BlockFormat* f = block_format(type);
  if (f == nullptr) throw WeightError(cat(what, ": ggml type ", type, " is not one the engine reads packed"));
  if (K <= 0 || K % f->block != 0)
    throw WeightError(cat(what, ": ", K, " columns are not a whole number of ", f->name, " blocks of ", f->block));
  return K / f->block * f->bytes;
}

namespace {

void check_cpu_packed(const at::Tensor& w, int32_t type, int64_t K, const char* op) {
  const int64_t rb = packed_row_bytes(type, K, op);
  if (!w.device().is_cpu() || w.scalar_type() != at::kByte || w.dim() < 2 || w.size(-1) != rb || !w.is_contiguous())
    throw InputError(cat(op, ": a packed ", packed_type_name(type), " matrix of ", K, " columns is a contiguous CPU "
                         "uint8 [..., rows, ", rb, "]; got ", c10::toString(w.scalar_type()), " ", shape_str(w.sizes()),
                         " on ", w.device().str()));
}

// y [M, N] fp32 = x [M, K] fp32 times the packed w^T for x up to skinny_max_rows_f32(K) rows: one
// row decodes the blocks into its dot products, more rows kQuantTileRows weight rows at a time, or
// (gemm_q_k_major) kQuantKnCols rows K-major.
void gemm_few_rows(const Isa& isa, const at::Tensor& xf, const at::Tensor& w, int32_t type, const float* bp,
                   at::Tensor& y) {
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0), rb = w.size(1);
  // tasks of whole K-major tiles where the ISA may take them (quant_blocks.h), else of 4-row tiles
  const bool k_major = isa.gemm_q_k_major(type, M, K);
  const int64_t unit = k_major ? kQuantKnCols : kQuantTileRows;
  const int64_t tiles = (N + unit - 1) / unit;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(K, 1) * kQuantTileRows / unit);
  const float* xp = xf.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, tiles, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(static_cast<size_t>(quant_scratch_floats(K, k_major)));
    isa.gemm_q(type, xp, M, K, wp, rb, bp, yp, N, lo * unit, std::min(hi * unit, N), scratch.data());
  });
}

// y [M, N] fp32 = x [M, K] rounded to int8 per block of columns (once, here) times the packed w^T of
// a q8_activation_type, on all threads in tasks of whole kQuantTileRows-row tiles.
void gemm_q8_rows(const Isa& isa, const at::Tensor& xf, const at::Tensor& w, int32_t type, const float* bp,
                  at::Tensor& y) {
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0), rb = w.size(1), block = q8_x_block(type);
  at::Tensor buf = at::empty({M * K + 2 * (M * K / 16) + 4 * (M * K / block)}, xf.options().dtype(at::kByte));
  uint8_t* base = buf.data_ptr<uint8_t>();
  int8_t* q = reinterpret_cast<int8_t*>(base);
  int16_t* sums = reinterpret_cast<int16_t*>(base + M * K);
  float* d = reinterpret_cast<float*>(base + M * K + 2 * (M * K / 16));
  isa.quantize_q8(xf.data_ptr<float>(), M, K, block, q, sums, d);
  const Q8Rows rows{q, sums, d, M, K, block};
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (N + kQuantTileRows - 1) / kQuantTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t lo, int64_t hi) {
    isa.gemm_q8(type, rows, wp, rb, bp, yp, N, lo * kQuantTileRows, std::min(hi * kQuantTileRows, N));
  });
}

// The same for many rows where the ISA has gemm_q8_tiled: x quantized and tiled once, tasks of
// whole kQ8TileRows-row tiles of w, each decoding its rows into a scratch of its own.
void gemm_q8_tiles(const Isa& isa, const at::Tensor& xf, const at::Tensor& w, int32_t type, const float* bp,
                   at::Tensor& y) {
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0), rb = w.size(1), block = q8_x_block(type);
  const int64_t qb = q8_tile_q_bytes(M, K), sb = q8_tile_sums_bytes(M, K), tiles = (M + kQ8Lanes - 1) / kQ8Lanes;
  at::Tensor buf = at::empty({qb + sb + q8_tile_d_bytes(M, K, block)}, xf.options().dtype(at::kByte));
  uint8_t* tq = buf.data_ptr<uint8_t>();
  int32_t* ts = reinterpret_cast<int32_t*>(tq + qb);
  float* td = reinterpret_cast<float*>(tq + qb + sb);
  const float* xp = xf.data_ptr<float>();
  at::parallel_for(0, tiles, 1,
                   [&](int64_t lo, int64_t hi) { isa.quantize_q8_tiles(xp, M, K, block, tq, ts, td, lo, hi); });
  const Q8Tiles x{tq, ts, td, tiles, M, K, block};
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + kQ8TileRows - 1) / kQ8TileRows, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint8_t> scratch(static_cast<size_t>(q8_tiled_scratch_bytes(K, block)) + 64);
    uint8_t* aligned = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t{63});
    isa.gemm_q8_tiled(type, x, wp, rb, bp, yp, N, lo * kQ8TileRows, std::min(hi * kQ8TileRows, N), aligned);
  });
}

// Many rows: chunks of about kPackedChunkBytes of dequantized rows, each dequantized on all threads
// into a scratch kept between calls (no page faults per call) and multiplied by ATen's GEMM.
void gemm_many_rows(const Isa& isa, const at::Tensor& xf, const at::Tensor& w, int32_t type, const at::Tensor& b,
                    at::Tensor& y) {
  const int64_t K = xf.size(1), N = w.size(0), rb = w.size(1);
  const int64_t chunk = std::min(N, std::max<int64_t>(kQuantTileRows, kPackedChunkBytes / (4 * K)));
  static thread_local std::vector<float> scratch;
  if (scratch.size() < static_cast<size_t>(chunk * K)) scratch.resize(static_cast<size_t>(chunk * K));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* sp = scratch.data();
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t rows = std::min(chunk, N - n0);
    at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / K), [&](int64_t r0, int64_t r1) {
      isa.dequant_rows(type, wp + (n0 + r0) * rb, rb, r1 - r0, K, sp + r0 * K);
    });
    at::Tensor out = y.narrow(1, n0, rows);
    const at::Tensor wt = at::from_blob(sp, {rows, K}, xf.options()).t();
    if (b.defined())
      at::addmm_out(out, b.narrow(0, n0, rows), xf, wt);
    else
      at::mm_out(out, xf, wt);
  }
}

}  // namespace

at::Tensor dequantize(const at::Tensor& w, int32_t type, int64_t K, at::ScalarType dtype, const std::string& isa_name) {
  check_cpu_packed(w, type, K, "dequantize");
  std::vector<int64_t> shape(w.sizes().begin(), w.sizes().end());
  shape.back() = K;
  at::Tensor out = at::empty(shape, w.options().dtype(at::kFloat));
  const int64_t rows = w.numel() / std::max<int64_t>(w.size(-1), 1), rb = w.size(-1);
  const Isa isa = isa_for(isa_name);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
    isa.dequant_rows(type, wp + r0 * rb, rb, r1 - r0, K, op + r0 * K);
  });
  return dtype == at::kFloat ? out : out.to(dtype);
}

bool q8_activations_here() { return kernels_enabled() && active().q8_vectorized(); }

int64_t q8_tiled_rows_here(int32_t type, const std::string& isa) {
  if (isa.empty()) return q8_activations_here() ? active().q8_tiled_rows(type) : 0;
  return isa_for(isa).q8_tiled_rows(type);
}

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& w, int32_t type, int64_t K, const at::Tensor& b,
                         const std::string& isa_name, bool q8_activations) {
  check_cpu_packed(w, type, K, "linear");
  if (w.dim() != 2 || !x.device().is_cpu() || !at::isFloatingType(x.scalar_type()) || x.dim() < 1 || x.size(-1) != K)
    throw InputError(cat("linear: x [..., ", K, "] float on the CPU against a packed [rows, bytes] matrix; got x ",
                         shape_str(x.sizes()), " ", c10::toString(x.scalar_type()), " on ", x.device().str(),
                         ", w ", shape_str(w.sizes())));
  const int64_t N = w.size(0), M = x.numel() / K;
  if (b.defined() && (b.dim() != 1 || b.size(0) != N || !b.device().is_cpu() || !at::isFloatingType(b.scalar_type())))
    throw InputError(cat("linear: the bias of a packed matrix of ", N, " rows must be a float CPU [", N, "], got ",
                         c10::toString(b.scalar_type()), " ", shape_str(b.sizes()), " on ", b.device().str()));
  const Isa isa = isa_for(isa_name);
  at::Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();
  at::Tensor bf = b.defined() ? b.to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, xf.options());
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  if (M > 0 && N > 0) {
    // q8 where this CPU has its vector kernels, unless CF_CPU_KERNELS=0 (or a test names the ISA)
    const bool q8 = q8_activations && q8_activation_type(type) && (!isa_name.empty() || q8_activations_here());
    const int64_t tiled_from = q8 ? isa.q8_tiled_rows(type) : 0;
    if (tiled_from > 0 && M >= tiled_from)
      gemm_q8_tiles(isa, xf, w, type, bp, y);
    else if (q8 && M <= isa.q8_rows(type))
      gemm_q8_rows(isa, xf, w, type, bp, y);
    else if (M <= skinny_max_rows_f32(K) && kernels_enabled())
      gemm_few_rows(isa, xf, w, type, bp, y);
    else
      gemm_many_rows(isa, xf, w, type, bf, y);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.to(x.scalar_type()).view(shape);
}

}  // namespace cf::cpu
