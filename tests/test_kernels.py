"""CPU kernels (csrc/kernels/cpu): the skinny GEMM used for decode-sized linears, on every
instruction set this machine has, against torch's linear in fp64."""

import os
import subprocess
import sys

import pytest
import torch

from circuit_finder import _C

ISAS = ["base", "avx2", "avx512"]


def available(isa: str) -> bool:
    try:
        _C.skinny_linear(torch.zeros(1, 4), torch.zeros(4, 4), None, isa)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 7, 5), (1, 576, 576), (3, 33, 100), (5, 130, 64), (16, 64, 48), (37, 9, 17)])
@pytest.mark.parametrize("layout", ["rows", "k_major"])
def test_skinny_linear_matches_torch(isa, dtype, M, N, K, layout):
    """Weights [N, K] contiguous, or K-major (a transposed contiguous [K, N], GPT-OSS's experts)."""
    if not available(isa):
        pytest.skip(f"{isa} not available on this CPU (or not built)")
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    if layout == "k_major":
        w = w.t().contiguous().t()
        assert not w.is_contiguous() and w.stride() == (1, N)
    b = torch.randn(N, generator=g).to(dtype)
    for bias in (None, b):
        got = _C.skinny_linear(x, w, bias, isa)
        ref = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
        diff = (got.double() - ref).abs()
        print(f"{isa} {dtype} {layout} M={M} N={N} K={K} bias={bias is not None}: max diff {diff.max():.3g} "
              f"mean {diff.mean():.3g}")
        assert got.dtype == dtype and got.shape == (M, N)
        # fp32: sums of K products in fp32; bf16: the output rounded to bf16 (8 bits of mantissa)
        tol = 1e-4 * K ** 0.5 if dtype == torch.float32 else 1e-2 * ref.abs().max().item() + 1e-2
        assert diff.max().item() <= tol


@pytest.mark.parametrize("k_major", [False, True])
def test_skinny_linear_batch_invariant(k_major):
    """A row's result does not depend on how many rows run with it (sweeps batch prompts)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 200, generator=g)
    w = torch.randn(70, 200, generator=g)
    if k_major:
        w = w.t().contiguous().t()
    whole = _C.skinny_linear(x, w, None, "")
    for m in range(9):
        assert torch.equal(_C.skinny_linear(x[m:m + 1], w, None, ""), whole[m:m + 1])


def test_skinny_linear_keeps_leading_shape_and_strided_x():
    x = torch.randn(2, 3, 40)[:, :, :32]  # not contiguous
    w = torch.randn(8, 32)
    got = _C.skinny_linear(x, w, None, "")
    assert got.shape == (2, 3, 8)
    assert torch.allclose(got, torch.nn.functional.linear(x, w), atol=1e-5)


def test_skinny_linear_rejects_bad_input():
    with pytest.raises(ValueError, match="skinny_linear takes"):
        _C.skinny_linear(torch.randn(1, 4), torch.randn(3, 5), None, "")
    with pytest.raises(ValueError, match="skinny_linear takes"):
        _C.skinny_linear(torch.randn(1, 4).double(), torch.randn(3, 4).double(), None, "")
    with pytest.raises(ValueError, match="skinny_linear takes"):
        _C.skinny_linear(torch.randn(1, 4), torch.randn(3, 8)[:, ::2], None, "")  # weight neither layout
    with pytest.raises(ValueError, match="not available"):
        _C.skinny_linear(torch.randn(1, 4), torch.randn(3, 4), None, "sve")


def test_cpu_isa_reports_choice():
    assert _C.cpu_isa().removesuffix("-novnni") in ISAS + ["off"]


def run_with_env(code: str, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh Python with the kernels on (whatever CF_CPU_KERNELS says here) and `env`."""
    base = {k: v for k, v in os.environ.items() if k != "CF_CPU_KERNELS"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env})


@pytest.mark.parametrize("isa", ["base", "avx2", "avx2-novnni", "avx512-novnni"])
def test_cf_cpu_isa_picks_a_narrower_instruction_set(isa):
    """CF_CPU_ISA runs the kernels of a narrower set than the CPU's widest (to see what a CPU
    without AVX-512 gets; -novnni: nor VNNI, whose tiled int8 products then take vpmaddubsw, and
    not the types it cannot sum): cpu_isa says which, and q8 activations need AVX2's int8 kernels."""
    if not available(isa.removesuffix("-novnni")):
        pytest.skip(f"{isa} not available on this CPU (or not built)")
    code = ("from circuit_finder import _C; print(_C.cpu_isa(), _C.cpu_q8_activations(), _C.cpu_q8_tiled_rows(12), "
            "_C.cpu_q8_tiled_rows(8))")  # Q4_K, Q8_0
    r = run_with_env(code, CF_CPU_ISA=isa)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0 and r.stdout.split()[:2] == [isa, str(isa != "base")]
    tiled = [int(v) for v in r.stdout.split()[2:]]
    if isa == "base":
        assert tiled == [0, 0]
    elif isa.endswith("-novnni"):
        assert tiled[0] > 0 and tiled[1] == 0
    else:
        assert tiled[0] > 0


@pytest.mark.parametrize("name", ["sve", "base-novnni", "-novnni"])
def test_cf_cpu_isa_names_an_unknown_set(name):
    r = run_with_env("from circuit_finder import _C; _C.cpu_isa()", CF_CPU_ISA=name)
    print(r.stderr[-2000:])
    assert r.returncode != 0 and f"CF_CPU_ISA={name}: not an instruction set of this CPU's kernels" in r.stderr


# ----------------------------------------------------------------------------- fused elementwise ops
def ref_rms_norm(x, w, eps):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def close(name, got, ref, tol):
    diff = (got - ref).abs()
    print(f"{name}: max diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}")
    assert got.shape == ref.shape and diff.max().item() <= tol


@pytest.mark.parametrize("rows,n", [(1, 576), (5, 100), (64, 2048), (3, 7)])
def test_cpu_add_rms_norm(rows, n):
    g = torch.Generator().manual_seed(rows + n)
    x, r = torch.randn(rows, n, generator=g), torch.randn(rows, n, generator=g)
    w = 1 + 0.1 * torch.randn(n, generator=g)
    s, out = _C.cpu_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(s, x + r)
    close("add_rms_norm", out, ref_rms_norm(x + r, w, 1e-5), 1e-5)
    same, alone = _C.cpu_add_rms_norm(x, None, w, 1e-6)
    assert same.data_ptr() == x.data_ptr()
    close("rms_norm", alone, ref_rms_norm(x, w, 1e-6), 1e-5)


@pytest.mark.parametrize("B,T,H,D", [(1, 1, 9, 64), (2, 17, 4, 128), (3, 5, 2, 6)])
def test_cpu_rope(B, T, H, D):
    g = torch.Generator().manual_seed(B * T * H * D)
    x = torch.randn(B, T, H, D, generator=g)
    pos = torch.arange(T).expand(B, T).float() + torch.arange(B)[:, None]
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([pos[..., None] * inv, pos[..., None] * inv], -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    t = x.transpose(1, 2)
    ref = t * cos + torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1) * sin
    close("rope", _C.cpu_rope(x, cos, sin).transpose(1, 2), ref, 1e-5)


def test_cpu_silu_mul():
    g = torch.Generator().manual_seed(0)
    gate = torch.cat([torch.randn(4, 1537, generator=g) * 6, torch.tensor([[-100.0, 100.0, 0.0, -20.0] * 10 + [1.0] * 1497])])
    up = torch.randn(5, 1537, generator=g)
    ref = torch.nn.functional.silu(gate.double()) * up.double()
    got = _C.cpu_silu_mul(gate, up)
    rel = ((got.double() - ref).abs() / (ref.abs() + 1e-30))[ref.abs() > 1e-30]
    print(f"silu_mul: max rel diff {rel.max().item():.3e}")
    assert rel.max().item() < 1e-5
    assert torch.isfinite(got).all()


def test_cpu_fused_ops_reject_bad_input():
    with pytest.raises(ValueError, match="add_rms_norm"):
        _C.cpu_add_rms_norm(torch.randn(2, 8), None, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="one shape"):
        _C.cpu_silu_mul(torch.randn(2, 8), torch.randn(2, 7))
    with pytest.raises(ValueError, match="even D"):
        _C.cpu_rope(torch.randn(1, 1, 1, 3), torch.ones(1, 1, 1, 3), torch.ones(1, 1, 1, 3))
    with pytest.raises(ValueError, match="cos/sin"):
        _C.cpu_rope(torch.randn(1, 2, 1, 4), torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))


@pytest.mark.parametrize("B,Hq,Hkv,S,D", [(1, 9, 3, 70, 64), (3, 8, 8, 33, 20), (2, 4, 1, 5, 128), (2, 6, 2, 300, 80)])
def test_cpu_attend_one_matches_attention_in_fp64(B, Hq, Hkv, S, D):
    """One query per head (the decode step) against a strided window of a cache, GQA heads, a
    padding mask (a row of batch 0 fully masked: zeros, as SDPA gives), a broadcast mask, none."""
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, Hq, 1, D, generator=g)
    k = torch.randn(B, Hkv, S + 7, D, generator=g)[:, :, :S]  # a cache with spare capacity
    v = torch.randn(B, Hkv, S + 7, D, generator=g)[:, :, :S]
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[..., -1] = True
    if B > 1:
        mask[0] = False
    for m in (mask, mask[:1].clone().fill_(True), None):
        ours = _C.cpu_attend_one(q, k, v, m, D ** -0.5)
        scores = (q.double() @ k.double().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * D ** -0.5
        if m is not None:
            scores = scores.masked_fill(~m, float("-inf"))
        ref = torch.nan_to_num(scores.softmax(-1)) @ v.double().repeat_interleave(Hq // Hkv, 1)
        diff = (ours.double() - ref).abs().max().item()
        print(f"attend_one B{B} Hq{Hq} Hkv{Hkv} S{S} D{D} mask {None if m is None else list(m.shape)}: max diff {diff:.3e}")
        assert diff < 1e-5
        kv = Hq // Hkv  # and what torch's SDPA gives, fully masked rows included (zeros)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(kv, 1), v.repeat_interleave(kv, 1), m, scale=D ** -0.5)
        assert (ours - sdpa).abs().max().item() < 1e-5
    nan_q = q.clone()
    nan_q[0, 0, 0, 0] = float("nan")
    assert torch.isnan(_C.cpu_attend_one(nan_q, k, v, None, 1.0)[0, 0]).all()  # NaN stays NaN, not "no key"
    with pytest.raises(ValueError, match="attend_one"):
        _C.cpu_attend_one(q, k[:, :, :-1], v, None, 1.0)
