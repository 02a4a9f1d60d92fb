"""CPU kernels (csrc/kernels/cpu): the skinny GEMM used for decode-sized linears, on every
instruction set this machine has, against torch's linear in fp64."""

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
def test_skinny_linear_matches_torch(isa, dtype, M, N, K):
    if not available(isa):
        pytest.skip(f"{isa} not available on this CPU (or not built)")
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    for bias in (None, b):
        got = _C.skinny_linear(x, w, bias, isa)
        ref = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
        diff = (got.double() - ref).abs()
        print(f"{isa} {dtype} M={M} N={N} K={K} bias={bias is not None}: max diff {diff.max():.3g} mean {diff.mean():.3g}")
        assert got.dtype == dtype and got.shape == (M, N)
        # fp32: sums of K products in fp32; bf16: the output rounded to bf16 (8 bits of mantissa)
        tol = 1e-4 * K ** 0.5 if dtype == torch.float32 else 1e-2 * ref.abs().max().item() + 1e-2
        assert diff.max().item() <= tol


def test_skinny_linear_batch_invariant():
    """A row's result does not depend on how many rows run with it (sweeps batch prompts)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 200, generator=g)
    w = torch.randn(70, 200, generator=g)
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
        _C.skinny_linear(torch.randn(1, 4), torch.randn(4, 3).t(), None, "")  # weight not contiguous
    with pytest.raises(ValueError, match="not available"):
        _C.skinny_linear(torch.randn(1, 4), torch.randn(3, 4), None, "sve")


def test_cpu_isa_reports_choice():
    assert _C.cpu_isa() in ISAS + ["off"]
