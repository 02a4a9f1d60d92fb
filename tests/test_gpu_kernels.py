"""Fused GPU kernels (csrc/kernels/cuda): the CUDA sources compile with this machine's nvcc (no GPU
needed, so a broken kernel cannot land unseen), and on a GPU each kernel matches its pure-torch
reference (Hugging Face's formulas) in fp32, fp16 and bf16."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuit_finder import _C

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "kernels" / "cuda"


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))
    return candidates[-1] if candidates else None


def tool(name: str) -> str | None:
    """A build tool from this interpreter's environment (the venv's cmake/ninja), else PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def cuda_include(nvcc: str) -> str:
    real = Path(os.path.realpath(nvcc)).parent.parent
    for candidate in [real / "include", *map(Path, sorted(glob.glob("/usr/local/cuda*/include")))]:
        if (candidate / "cuda_runtime.h").exists():
            return str(candidate)
    out = subprocess.run([nvcc, "-v", "-E", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True, text=True)
    for tok in (out.stdout + out.stderr).replace('"', " ").split():
        if tok.startswith("-I") and Path(tok[2:], "cuda_runtime.h").exists():
            return tok[2:]
    pytest.fail(f"no cuda_runtime.h next to {nvcc}")


def cuda_macros_stub(tmp_path) -> Path:
    """An include folder with the one header CPU torch wheels lack for compiling against c10/cuda:
    the CMake-generated c10/cuda/impl/cuda_cmake_macros.h."""
    folder = tmp_path / "stub"
    (folder / "c10" / "cuda" / "impl").mkdir(parents=True)
    (folder / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return folder


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", ["fused", "quant"])
def test_cuda_sources_compile(tmp_path, source):
    nvcc = find_nvcc()
    cmd = [nvcc, "-std=c++17", "-O2", "-c", str(CUDA_DIR / f"{source}.cu"), "-o", str(tmp_path / f"{source}.o"),
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(" ".join(cmd), r.stdout, r.stderr, sep="\n")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / f"{source}.o").stat().st_size > 0
    # The ATen side (dispatch.cpp) against torch's CUDA headers, as a CUDA build compiles it. CPU
    # wheels lack only the generated cuda_cmake_macros.h; a stand-in supplies it.
    stub = cuda_macros_stub(tmp_path)
    torch_inc = Path(torch.__file__).parent / "include"
    cxx = shutil.which("c++") or shutil.which("g++")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-w", "-DCF_WITH_CUDA", f"-I{ROOT / 'csrc'}", f"-I{stub}",
           f"-I{torch_inc}", f"-I{torch_inc / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{cuda_include(nvcc)}",
           f"-I{sys.base_prefix}/include", str(CUDA_DIR / "dispatch.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(" ".join(cmd), r.stdout, r.stderr, sep="\n")
    assert r.returncode == 0, r.stderr


HOST_DECODE = r"""
#include <cstdio>
#include <vector>
#include "kernels/cuda/quant_decode.cuh"
using namespace cf::gpu;
struct HostX {  // lane_sums' x: rows of K floats
  const float* x;
  long K;
  CF_HD void load8(int m, int64_t k0, float* v) const { for (int i = 0; i < 8; ++i) v[i] = x[m * K + k0 + i]; }
};
constexpr int kRows = 8;
// mode 0: every element through value(); 1: every chunk of eight through row_chunk() (the dequant
// chunk kernel's walk); 2: y [M, rows] = x [M, K] . W^T as the gemv kernel sums it (each lane's lane_sums over
// `lanes` lanes, then the lanes' sums added); 3: the grouped GEMV kernel's plan (grouped_rows) and sums
// over every block row, raw = E experts of rows / E weight rows, x [P, K] sorted by expert, counts[e]
// rows each: y [P, rows / E], a row written twice fails (exit 3).
template <int T> void sums(const uint8_t* row, const float* x, int M, long K, int lanes, float* total) {
  const HostX hx{x, K};
  for (int lane = 0; lane < lanes; ++lane) {
    float acc[kRows] = {};
    lane_sums<T, kRows>(row, hx, M, K, lane, lanes, acc);
    for (int m = 0; m < kRows; ++m) total[m] += acc[m];
  }
}
template <int T> int grouped(const std::vector<uint8_t>& raw, long rows, long K, int lanes, const std::vector<float>& x,
                             const std::vector<int>& counts, std::vector<float>& out) {
  const long row_bytes = K / Block<T>::n * Block<T>::b, E = counts.size(), N = rows / E;
  std::vector<int64_t> experts;
  std::vector<int32_t> ends;
  for (long e = 0; e < E; ++e) {
    ends.push_back((e ? ends.back() : 0) + counts[e]);
    experts.insert(experts.end(), counts[e], e);
  }
  std::vector<int> written(experts.size(), 0);
  for (long j = 0; j < static_cast<long>(experts.size()); ++j) {
    int64_t e = -1;
    const int M = grouped_rows<kRows>(j, experts.data(), ends.data(), &e);
    for (int m = 0; m < M; ++m) written[j + m] += 1;
    for (long n = 0; n < N && M > 0; ++n) {
      float total[kRows] = {};
      sums<T>(raw.data() + (e * N + n) * row_bytes, x.data() + j * K, M, K, lanes, total);
      for (int m = 0; m < M; ++m) out[(j + m) * N + n] = total[m];
    }
  }
  for (int w : written) if (w != 1) return 3;
  return 0;
}
template <int T> int run(int mode, const std::vector<uint8_t>& raw, long rows, long K, int lanes,
                         const std::vector<float>& x, int M, const std::vector<int>& counts, std::vector<float>& out) {
  const long row_bytes = K / Block<T>::n * Block<T>::b;
  if (mode == 3) return grouped<T>(raw, rows, K, lanes, x, counts, out);
  if (mode == 0) {
    for (long r = 0; r < rows; ++r)
      for (long k = 0; k < K; ++k) out[r * K + k] = value<T>(raw.data() + r * row_bytes, k);
  } else if (mode == 1) {
    for (long r = 0; r < rows; ++r)
      for (long k0 = 0; k0 < K; k0 += 8) row_chunk<T>(raw.data() + r * row_bytes, k0, out.data() + r * K + k0);
  } else {
    for (long r = 0; r < rows; ++r) {
      float total[kRows] = {};
      sums<T>(raw.data() + r * row_bytes, x.data(), M, K, lanes, total);
      for (int m = 0; m < M; ++m) out[m * rows + r] = total[m];
    }
  }
  return 0;
}
std::vector<uint8_t> slurp(const char* path) {
  FILE* f = fopen(path, "rb");
  std::vector<uint8_t> raw;
  for (int c; (c = fgetc(f)) != EOF;) raw.push_back(static_cast<uint8_t>(c));
  fclose(f);
  return raw;
}
int main(int argc, char** argv) {  // mode type rows K in out [lanes M x [count ...]]
  const int mode = atoi(argv[1]), type = atoi(argv[2]);
  const long rows = atol(argv[3]), K = atol(argv[4]);
  const std::vector<uint8_t> raw = slurp(argv[5]);
  int lanes = 0, M = 0;
  std::vector<float> x;
  std::vector<int> counts;
  if (mode >= 2) {
    lanes = atoi(argv[7]), M = atoi(argv[8]);
    const std::vector<uint8_t> bytes = slurp(argv[9]);
    x.resize(bytes.size() / sizeof(float));
    memcpy(x.data(), bytes.data(), bytes.size());
    for (int i = 10; i < argc; ++i) counts.push_back(atoi(argv[i]));
  }
  std::vector<float> out(mode >= 2 ? M * (mode == 3 ? rows / counts.size() : rows) : rows * K);
  int rc = 2;
  switch (type) {
#define CASE(id, ...) case id: rc = run<id>(mode, raw, rows, K, lanes, x, M, counts, out); break;
    CF_BLOCK_TYPES(CASE) CASE(1) CASE(30)
    default: return 2;
  }
  if (rc != 0) return rc;
  FILE* f = fopen(argv[6], "wb");
  fwrite(out.data(), sizeof(float), out.size(), f);
  fclose(f);
  return 0;
}
"""


@pytest.fixture(scope="module")
def host_decoder(tmp_path_factory):
    """HOST_DECODE built by nvcc: a function running it on blocks of a type (mode 0, 1 or 2)."""
    import numpy as np

    if find_nvcc() is None:
        pytest.skip("nvcc not installed")
    folder = tmp_path_factory.mktemp("host_decode")
    (folder / "decode.cu").write_text(HOST_DECODE)
    cmd = [find_nvcc(), "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(folder / "decode.cu"), "-o", str(folder / "decode")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    def run(mode, ident, raw, k, lanes=0, x=None, counts=()):
        raw.tofile(folder / "in.bin")
        extra = []
        if x is not None:
            np.ascontiguousarray(x, dtype=np.float32).tofile(folder / "x.bin")
            extra = [str(lanes), str(x.shape[0]), str(folder / "x.bin"), *map(str, counts)]
        r = subprocess.run([str(folder / "decode"), str(mode), str(ident), str(raw.shape[0]), str(k), str(folder / "in.bin"),
                            str(folder / "out.bin"), *extra], capture_output=True, text=True)
        assert r.returncode == 0, (ident, r.returncode, r.stderr)
        n = raw.shape[0] // len(counts) if counts else raw.shape[0]
        shape = (x.shape[0], n) if x is not None else (raw.shape[0], k)
        return torch.from_numpy(np.fromfile(folder / "out.bin", dtype=np.float32).reshape(shape))

    return run


@pytest.mark.parametrize("mode", [0, 1], ids=["elements", "chunks"])
def test_gpu_decoders_match_the_gguf_package_on_the_host(host_decoder, mode):
    """The GPU's decoders (quant_decode.cuh, __host__ __device__) built by nvcc into a host program:
    every element of random blocks of every packed type equals the gguf package's decoding, through
    the per-element decoders and through the eight-element chunks the fast kernels read (with the
    dequant kernel's chunk walk), so the GPU kernels' layouts are checked without a GPU."""
    from circuit_finder.quants import PACKED_TYPES
    from helpers import random_packed, reference

    rows, k = 3, 512
    for kind, ident in sorted(PACKED_TYPES.items()):
        for fill in (None, 0, 255):  # random blocks, then every code and scale byte at its extremes
            raw = random_packed(kind, rows, k, seed=ident, fill=fill)
            got, want = host_decoder(mode, ident, raw, k), reference(kind, raw, k)
            rel = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
            print(f"{kind} fill {fill}: GPU {'chunk' if mode else 'element'} decoder on the host vs the gguf package, "
                  f"relative max diff {rel:.2e}")
            assert rel < 1e-6, (kind, fill)


def test_gpu_chunk_products_match_numpy_on_the_host(host_decoder):
    """The gemv chunk kernel's sums (lane_sums: each lane's chunks, then the lanes added, as the warp
    reduction adds them) on the host, for warps of 32 and 64 lanes and 1-8 rows of x, against numpy's
    product of x with the gguf package's decoding of the blocks, in float64."""
    import numpy as np

    from circuit_finder.quants import PACKED_TYPES
    from helpers import random_packed, reference

    rows = 5
    for kind, ident in sorted(PACKED_TYPES.items()):
        for k, lanes, m in ((512, 32, 1), (768, 64, 8), (1280, 64, 3)):  # 768, 1280: lanes left idle
            raw = random_packed(kind, rows, k, seed=ident + k)
            x = np.random.default_rng(k).standard_normal((m, k)).astype(np.float32)
            want = x.astype(np.float64) @ reference(kind, raw, k).double().numpy().T
            got = host_decoder(2, ident, raw, k, lanes, x).double().numpy()
            rel = float(np.abs(got - want).max() / np.abs(want).max())
            print(f"{kind} K={k} lanes={lanes} rows of x={m}: chunk sums vs numpy, relative max diff {rel:.2e}")
            assert rel < 1e-5, (kind, k, lanes, m)


def test_gpu_grouped_products_match_numpy_on_the_host(host_decoder):
    """The grouped GEMV kernel's plan (grouped_rows: which block row takes which of an expert's rows,
    8 at a time) and sums on the host: every row taken exactly once, each times its own expert's
    matrix as the gguf package decodes it — experts with no rows (the first among them), 1, 8, 9
    and 17 rows (three block rows), warps of 32 and 64 lanes."""
    import numpy as np

    from circuit_finder.quants import PACKED_TYPES
    from helpers import random_packed, reference

    counts, n, k = [0, 1, 8, 0, 9, 17], 3, 512
    experts = np.repeat(np.arange(len(counts)), counts)
    for kind in ("Q4_K", "Q6_K", "Q8_0", "Q4_0", "IQ4_XS", "BF16"):
        ident = PACKED_TYPES[kind]
        raw = random_packed(kind, len(counts) * n, k, seed=ident)
        w = reference(kind, raw, k).double().numpy().reshape(len(counts), n, k)
        x = np.random.default_rng(ident).standard_normal((len(experts), k)).astype(np.float32)
        want = np.einsum("pk,pnk->pn", x.astype(np.float64), w[experts])
        for lanes in (32, 64):
            got = host_decoder(3, ident, raw, k, lanes, x, counts).double().numpy()
            rel = float(np.abs(got - want).max() / np.abs(want).max())
            print(f"{kind} lanes={lanes}: grouped plan and sums vs numpy, relative max diff {rel:.2e}")
            assert rel < 1e-5, (kind, lanes)


def find_hipcc() -> str | None:
    return shutil.which("hipcc") or next(iter(sorted(glob.glob("/opt/rocm*/bin/hipcc"))), None)


@pytest.mark.skipif(find_hipcc() is None, reason="hipcc not installed (Debian: apt-get install hipcc)")
@pytest.mark.parametrize("source", ["fused", "quant"])
def test_hip_sources_compile(tmp_path, source):
    """The same kernels through hipcc for AMD GPUs: CDNA (gfx90a, 64-lane waves) and RDNA (gfx1030,
    32-lane waves), against whichever ROCm headers the machine has (Debian's 5.2 lacks hip_bf16.h)."""
    env = {**os.environ, "HIP_PLATFORM": "amd"}
    cmd = [find_hipcc(), "-std=c++17", "-O2", "-x", "hip", "--offload-arch=gfx90a", "--offload-arch=gfx1030", "-c",
           str(CUDA_DIR / f"{source}.cu"), "-o", str(tmp_path / f"{source}_hip.o")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    print(" ".join(cmd), r.stdout[-2000:], r.stderr[-2000:], sep="\n")
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / f"{source}_hip.o").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(find_nvcc() is None or tool("cmake") is None or tool("ninja") is None,
                    reason="needs nvcc, cmake and ninja")
def test_cuda_build_configures_compiles_and_links(tmp_path):
    """The project's own CMake GPU path (what a CUDA torch gets), forced on with this CPU torch:
    CUDA enabled, archs chosen, fused.cu and dispatch.cpp compiled, the module linked."""
    stub = cuda_macros_stub(tmp_path)
    env = {**os.environ, "PATH": f"{Path(find_nvcc()).parent}:{os.environ.get('PATH', '')}"}
    build = tmp_path / "build"
    configure = [tool("cmake"), "-S", str(ROOT), "-B", str(build), "-G", "Ninja", f"-DPython_EXECUTABLE={sys.executable}",
                 "-DCF_TORCH_GPU=cuda", f"-DCMAKE_CXX_FLAGS=-I{stub}", "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}"]
    r = subprocess.run(configure, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([tool("ninja"), "-C", str(build)], capture_output=True, text=True, env=env)
    print(r.stdout[-2000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "fused.cu.o" in r.stdout and "dispatch.cpp.o" in r.stdout
    module = next(build.glob("_C*.so"))
    assert "cudaLaunchKernel" in subprocess.run(["nm", "-D", str(module)], capture_output=True, text=True).stdout


gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _C.gpu_kernels()),
                         reason="needs a CUDA/ROCm device and a build with the GPU kernels")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def ref_rms_norm(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def report(name, got, ref, dtype):
    diff = (got.float() - ref.float()).abs()
    scale = ref.float().abs().max().item() + 1e-6
    print(f"{name} {dtype}: max diff {diff.max().item():.3e}, mean {diff.mean().item():.3e} (scale {scale:.3g})")
    assert diff.max().item() <= TOL[dtype] * max(scale, 1.0) * 4


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,offset", [(1, 576, 0), (7, 2048, 0), (33, 100, 0), (3, 12288, 0), (1, 16384, 0),
                                          (2, 4096, 1), (1, 40000, 0), (1, 8192, 0),
                                          (2, 32768, 0)])
def test_add_rms_norm_matches_reference(dtype, rows, n, offset):
    """Rows of every length class of the kernel (one, two or four 16-byte vectors per thread, 1024
    threads with one each (8192 in 16-bit types), the scalar kernel for odd lengths, unaligned rows
    and rows too long for registers)."""
    g = torch.Generator(device="cuda").manual_seed(rows * n)
    x = torch.randn(rows * n + offset, device="cuda", generator=g).to(dtype)[offset:].view(rows, n)
    r = torch.randn(rows, n, device="cuda", generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(n, device="cuda", generator=g)).to(dtype)
    s, out = _C.gpu_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(s, x + r)
    report("add_rms_norm", out, ref_rms_norm(x + r, w, 1e-5), dtype)
    same, alone = _C.gpu_add_rms_norm(x, None, w, 1e-6)
    assert same.data_ptr() == x.data_ptr()
    report("rms_norm", alone, ref_rms_norm(x, w, 1e-6), dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,D", [(1, 1, 9, 64), (2, 17, 4, 128), (3, 5, 2, 32)])
def test_rope_matches_reference(dtype, B, T, H, D):
    g = torch.Generator(device="cuda").manual_seed(B * T * H * D)
    x = torch.randn(B, T, H, D, device="cuda", generator=g).to(dtype)
    pos = torch.arange(T, device="cuda").expand(B, T).float() + torch.arange(B, device="cuda")[:, None]
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    emb = torch.cat([pos[..., None] * inv, pos[..., None] * inv], -1)
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [B, 1, T, D]
    t = x.transpose(1, 2)
    rot = torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1)
    ref = t * cos + rot * sin
    got = _C.gpu_rope(x.clone(), cos, sin).transpose(1, 2)
    report("rope", got, ref, dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_reference(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    gate = torch.randn(5, 1, 1536, device="cuda", generator=g).to(dtype) * 4
    up = torch.randn(5, 1, 1536, device="cuda", generator=g).to(dtype)
    report("silu_mul", _C.gpu_silu_mul(gate, up), torch.nn.functional.silu(gate) * up, dtype)


@gpu
def test_gpu_kernels_reject_bad_input():
    x = torch.randn(2, 8, device="cuda")
    with pytest.raises(ValueError, match=r"add_rms_norm: weight has shape \[7\], expected \[hidden=8\]"):
        _C.gpu_add_rms_norm(x, None, torch.ones(7, device="cuda"), 1e-5)
    with pytest.raises(ValueError, match="add_rms_norm: residual has shape"):
        _C.gpu_add_rms_norm(x, x[:1], torch.ones(8, device="cuda"), 1e-5)
    with pytest.raises(ValueError, match="silu_mul: up is Double but gate is Float"):
        _C.gpu_silu_mul(x, x.double())
    with pytest.raises(ValueError, match="silu_mul: up is on cpu but gate is on cuda"):
        _C.gpu_silu_mul(x, x.cpu())
    with pytest.raises(ValueError, match="silu_mul: gate is on cpu, not a GPU"):
        _C.gpu_silu_mul(x.cpu(), x.cpu())
    with pytest.raises(ValueError, match="even D"):
        _C.gpu_rope(torch.randn(1, 1, 1, 3, device="cuda"), torch.ones(1, 1, 3, device="cuda"),
                    torch.ones(1, 1, 3, device="cuda"))
    x4 = torch.randn(2, 3, 4, 8, device="cuda")
    with pytest.raises(ValueError, match=r"rope: sin has shape \[2, 1, 5, 8\], expected \[B=2, 1, T=3, D=8\]"):
        _C.gpu_rope(x4, torch.ones(2, 1, 3, 8, device="cuda"), torch.ones(2, 1, 5, 8, device="cuda"))


@pytest.mark.skipif(not (torch.cuda.is_available() and _C.gpu_kernels() and torch.cuda.device_count() >= 2),
                    reason="needs two CUDA/ROCm devices and a build with the GPU kernels")
def test_gpu_kernels_run_on_their_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels launch on cuda:1 (a device guard)."""
    torch.cuda.set_device(0)
    x = torch.randn(3, 64, device="cuda:1")
    r = torch.randn(3, 64, device="cuda:1")
    w = torch.rand(64, device="cuda:1") + 0.5
    s, out = _C.gpu_add_rms_norm(x, r, w, 1e-6)
    torch.cuda.synchronize(1)
    assert out.device == x.device and torch.equal(s, x + r)
    report("add_rms_norm on cuda:1", out, ref_rms_norm(x + r, w, 1e-6), torch.float32)
    report("silu_mul on cuda:1", _C.gpu_silu_mul(x, r), torch.nn.functional.silu(x) * r, torch.float32)


def test_cpu_build_reports_missing_gpu_kernels():
    if _C.gpu_kernels():
        pytest.skip("this build has the GPU kernels")
    with pytest.raises(ValueError, match="without GPU kernels"):
        _C.gpu_silu_mul(torch.zeros(2), torch.zeros(2))
