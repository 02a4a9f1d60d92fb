"""Packed GGUF weights (issue #15): the engine reads ggml blocks without a dequantized copy.

Checked by routes independent of our kernels:
- every packed type's decoder, on every instruction set this CPU has, against the `gguf`
  package's own numpy dequantizers (random blocks; tests/test_gguf.py also checks hand-packed
  blocks with hand-computed values);
- the packed linear layer (decode-sized and many-row paths, bias, bf16) against x @ W^T with W
  from the package's decoder;
- whole models: packed vs dequantized logits in fp32 (relative max diff < 1e-4), greedy tokens
  along identity and repeated paths with the KV cache, a packed mixture of experts, and the
  default model's resident weight bytes against its file size;
- bad input: clear errors naming the tensor.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import circuit_finder as cf
from circuit_finder import _C, quantizers
from circuit_finder.loading import q8_products
from circuit_finder.quants import (
    K_FALLBACK,
    PACKED_TYPES,
    MixModel,
    PackedTensor,
    dequantize_fp8,
    fp8_pairs,
    llama_cpp_70b,
    mix_type,
    quantize_choice,
    quantize_matrix,
)
from helpers import (
    GGUF_ARCH,
    awkward_rows,
    build_hf_model,
    gguf_name,
    llama_cpp_or_skip,
    random_packed,
    rebuilt,
    reference,
    write_fp8_checkpoint,
    write_gguf,
)

ISAS = [isa for isa in ("base", "avx2", "avx512")
        if isa == "base" or _C.cpu_isa().removesuffix("-novnni") in (isa, "avx512")]
CPU_FLAGS = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
# 8-bit activations also as a CPU without VNNI runs them (the tiled products by vpmaddubsw)
Q8_ISAS = ISAS + [f"{isa}-novnni" for isa in ISAS if isa != "base"]


def diff(label: str, ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (ours.float() - ref.float()).abs()
    scale = ref.float().abs().max().item()
    print(f"{label}: max abs diff {d.max().item():.3e}, mean {d.mean().item():.3e}, relative {d.max().item() / scale:.3e}")
    return d.max().item(), d.max().item() / scale


def test_the_packed_types_are_the_issues_list():
    assert set(PACKED_TYPES) == {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                                 "Q6_K", "IQ4_NL", "IQ4_XS"}
    for kind, ident in PACKED_TYPES.items():
        assert gguf.GGMLQuantizationType[kind] == ident
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        assert _C.packed_row_bytes(ident, 512) == 512 // block * size, kind


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", sorted(PACKED_TYPES))
def test_decoder_matches_the_gguf_package(kind, isa):
    raw = random_packed(kind, 5, 512, seed=len(kind))
    ours = _C.dequantize_packed(torch.from_numpy(raw), PACKED_TYPES[kind], 512, torch.float32, isa)
    assert diff(f"{kind} on {isa}", ours, reference(kind, raw, 512))[0] == 0.0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 3, 16, 30, 33, 64, 2100])
@pytest.mark.parametrize("kind", sorted(PACKED_TYPES))
def test_packed_linear_matches_the_dequantized_product(kind, rows, isa):
    """Every product path — one row (blocks decoded into the dot products), a few rows (4 weight
    rows dequantized at a time for the skinny GEMM: 3 and 16 rows), more (on AVX2 / AVX-512: 32
    weight rows decoded K-major in parts of K, quant_blocks.h: 30, 33 and 64 rows, whose register
    tiles of 12 (AVX-512) or 6 (AVX2), 4, 2 and 1 rows all occur), past the skinny GEMM's 4 MB of x (chunks for ATen's GEMM: 2100
    rows) — on every instruction set, with and without bias, against x @ W^T of the package's W.
    70 weight rows: two K-major tiles and a tail; K: three parts of K-major depth."""
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]
    n, k = 70, 768 if block == 256 else 576
    raw = random_packed(kind, n, k, seed=rows)
    w = reference(kind, raw, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(n)
    for b in (None, bias):
        ours = _C.linear_packed(x, torch.from_numpy(raw), PACKED_TYPES[kind], k, b, isa)
        ref = x.double() @ w.double().T + (0 if b is None else b.double())
        assert ours.shape == (rows, n)
        assert diff(f"{kind} on {isa}, {rows} rows, bias={b is not None}", ours, ref)[1] < 1e-5


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind,k", [("Q4_1", 608), ("IQ4_NL", 608), ("Q8_0", 256), ("Q4_K", 256), ("Q6_K", 256)])
def test_packed_linear_k_major_parts_of_unequal_depth_and_one_part(kind, k, isa):
    """The K-major tiles where K = 608 splits into parts of 224, 224 and 160 columns (the last
    shorter) and where K <= 256 is one part (no continued sums, bias on it): 64 rows."""
    raw = random_packed(kind, 70, k, seed=k)
    w = reference(kind, raw, k)
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(k))
    bias = torch.randn(70)
    ours = _C.linear_packed(x, torch.from_numpy(raw), PACKED_TYPES[kind], k, bias, isa)
    assert diff(f"{kind} on {isa}, K = {k}, 64 rows", ours, x.double() @ w.double().T + bias.double())[1] < 1e-5


def test_packed_linear_keeps_leading_dims_and_checks_the_bias():
    raw = torch.from_numpy(random_packed("Q4_K", 16, 256))
    x = torch.randn(2, 3, 256)
    out = _C.linear_packed(x, raw, PACKED_TYPES["Q4_K"], 256)
    assert out.shape == (2, 3, 16)
    single = _C.linear_packed(x[1, 2:3], raw, PACKED_TYPES["Q4_K"], 256)[0]  # the one-row path: another sum order
    torch.testing.assert_close(out[1, 2], single, rtol=1e-5, atol=1e-4)
    for bad in (torch.zeros(1), torch.zeros(16, 1), torch.zeros(16, dtype=torch.long)):
        with pytest.raises(_C.InputError, match=r"the bias of a packed matrix of 16 rows must be a float CPU \[16\]"):
            _C.linear_packed(x, raw, PACKED_TYPES["Q4_K"], 256, bad)


def test_packed_linear_in_bf16_multiplies_in_fp32():
    raw = random_packed("Q4_K", 64, 512)
    w = reference("Q4_K", raw, 512)
    x = torch.randn(3, 512).bfloat16()
    ours = _C.linear_packed(x, torch.from_numpy(raw), PACKED_TYPES["Q4_K"], 512)
    assert ours.dtype == torch.bfloat16
    assert diff("bf16 x, Q4_K", ours, (x.float() @ w.T).bfloat16())[1] < 1e-2


def test_bad_packed_input_names_what_is_wrong():
    raw = torch.from_numpy(random_packed("Q4_0", 4, 64))
    with pytest.raises(ValueError, match=r"my.weight: 96 Q4_0 columns take 54 bytes a row, got 36"):
        PackedTensor(raw, "Q4_0", 96, "my.weight")
    with pytest.raises(ValueError, match="my.weight: type Q7_X is not packed"):
        PackedTensor(raw, "Q7_X", 64, "my.weight")
    with pytest.raises(ValueError, match=r"packed blocks are a uint8 \[..., rows, bytes\] tensor on the CPU or a GPU"):
        PackedTensor(raw.float(), "Q4_0", 64, "my.weight")
    with pytest.raises(_C.WeightError, match="100 columns are not a whole number of Q4_1 blocks of 32"):
        _C.packed_row_bytes(PACKED_TYPES["Q4_1"], 100)
    with pytest.raises(_C.InputError, match=r"x \[\.\.\., 64\]"):
        _C.linear_packed(torch.randn(2, 65), raw, PACKED_TYPES["Q4_0"], 64)
    with pytest.raises(_C.InputError, match="instruction set 'sve' is not available"):
        _C.dequantize_packed(raw, PACKED_TYPES["Q4_0"], 64, torch.float32, "sve")


# ----------------------------------------------------------------------------- 8-bit activations
Q8_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")


def q8_block(kind: str) -> int:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]


def q8_rows(kind: str, isa: str) -> int:
    """Rows of x up to which activations="q8" takes a product on `isa` (quant_blocks.h's q8_max_rows)."""
    return 16 if isa == "avx2" or q8_block(kind) == 256 else 8 if kind == "Q8_0" else 3


def q8_route(kind: str, isa: str, rows: int) -> str:
    """Which products activations="q8" runs for `rows` rows of x on `isa` (quant_blocks.h): "tiles"
    (from q8_tiled_rows), "rows" (up to q8_max_rows), else "float"."""
    tiled = _C.cpu_q8_tiled_rows(PACKED_TYPES[kind], isa)
    if tiled and rows >= tiled:
        return "tiles"
    return "rows" if rows <= q8_rows(kind, isa.removesuffix("-novnni")) else "float"


def rounded_x(x: torch.Tensor, block: int) -> torch.Tensor:
    """x rounded to 8 bits per `block` columns as documented (ggml's q8_0 / q8_K facts), in numpy:
    d = max|x| / 127, codes rint(x * (127 / max|x|)) in fp32; returns d * codes."""
    v = x.numpy().astype(np.float32).reshape(x.shape[0], -1, block)
    amax = np.abs(v).max(-1, keepdims=True)
    scale = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    codes = np.clip(np.rint(v * scale), -127, 127)
    return torch.from_numpy((codes * (amax / np.float32(127)).astype(np.float32)).reshape(x.shape))


@pytest.mark.parametrize("isa", Q8_ISAS)
@pytest.mark.parametrize("kind", Q8_TYPES)
def test_q8_activations_are_the_dequantized_matrix_times_rounded_x(kind, isa):
    """Exactly (up to the float sums' order) the package's dequantized W times x rounded to 8 bits
    per block of x, by either int8 route (q8_route); and measurably not the float product, so the
    test sees which route ran. Rows: 1 to q8_rows + 1 (every register-tile remainder of the row
    kernels, 1-4 rows a pass), then the tiled kernels' partial and several tiles of 16 rows, with
    37-39 weight rows (their 1-4 row remainders). Where neither route takes the rows: the float
    route. 19 / 3 blocks per row: an odd 32-block tail."""
    block = q8_block(kind)
    k = 768 if block == 256 else 608
    cases = [(37, rows) for rows in range(1, q8_rows(kind, isa) + 2)] + [(38, 9), (39, 17), (37, 33), (38, 40)]
    matrices = {}  # weight rows -> packed, the package's decoding, bias (decoded once per size)
    for n, rows in cases:
        if n not in matrices:
            packed = random_packed(kind, n, k, seed=7)
            matrices[n] = packed, reference(kind, packed, k).double(), torch.randn(n)
        raw, w, bias = matrices[n]
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        exact = x.double() @ w.T + bias.double()
        ours = _C.linear_packed(x, torch.from_numpy(raw), PACKED_TYPES[kind], k, bias, isa, True)
        route = q8_route(kind, isa, rows)
        if route == "float":
            assert diff(f"{kind} on {isa}, {rows} rows (float)", ours, exact)[1] < 1e-5
            continue
        assert diff(f"{kind} on {isa}, {rows} x {n} ({route})", ours, rounded_x(x, block).double() @ w.T + bias.double())[1] < 2e-6
        assert diff("  vs float x", ours, exact)[1] > 1e-4


@pytest.mark.parametrize("isa", Q8_ISAS)
def test_q8_activations_of_zero_tiny_and_non_finite_rows(isa):
    """A zero block of x adds nothing (its scale is 0), nor does one too small to scale (1e-38); inf
    or NaN in x makes the row's outputs NaN (the float route's: inf or NaN), never a finite number."""
    for kind in ("Q4_K", "Q4_1", "IQ4_XS", "Q3_K"):
        raw = torch.from_numpy(random_packed(kind, 8, 512))
        for rows in (3, 20):  # the row kernels, and the tiled ones where this CPU has them
            x = torch.randn(rows, 512)
            x[0] = 0
            x[0, 7] = 1e-38
            x[1, 5], x[2, 300] = float("inf"), float("nan")
            bias = torch.randn(8)
            ours = _C.linear_packed(x, raw, PACKED_TYPES[kind], 512, bias, isa, True)
            assert torch.equal(ours[0], bias), (kind, rows, q8_route(kind, isa, rows))
            assert ours[3:].isfinite().all()
            if q8_route(kind, isa, rows) == "float":  # inf times the weights: inf or NaN
                assert not ours[1:3].isfinite().any()
            else:
                assert ours[1:3].isnan().all()


@pytest.mark.parametrize("isa", [isa for isa in Q8_ISAS if isa != "base"])
def test_q8_tiled_kernels_take_the_types_they_can_sum(isa):
    """With VNNI (where the CPU has it) every q8 type is tiled; without it (vpmaddubsw, int16 pair
    sums) all but Q8_0 and the IQ4 types, whose codes up to 128 could saturate them; never F16."""
    vnni = not isa.endswith("-novnni") and ("avx512_vnni" if isa == "avx512" else "avx_vnni") in CPU_FLAGS
    for kind in Q8_TYPES:
        tiled = _C.cpu_q8_tiled_rows(PACKED_TYPES[kind], isa)
        if vnni or kind not in ("Q8_0", "IQ4_NL", "IQ4_XS"):
            assert 1 < tiled <= 32, (kind, isa)
        else:
            assert tiled == 0, (kind, isa)
    assert _C.cpu_q8_tiled_rows(PACKED_TYPES["F16"], isa) == 0
    assert _C.cpu_q8_tiled_rows(PACKED_TYPES["Q4_K"], "base") == 0


@pytest.mark.parametrize("isa", [isa for isa in Q8_ISAS if isa != "base"])
def test_q8_tiled_kernels_at_the_extreme_codes(isa):
    """Every code byte 0, 127, 128 or 255 (each type's largest codes and scales) against rows of x all at
    +-max (bytes 255 / 1 in the tiles): the int16 pair sums that vpmaddubsw adds before widening at
    their largest; exact (up to float order) where they would saturate or wrap they are not."""
    for kind in Q8_TYPES:
        tiled = _C.cpu_q8_tiled_rows(PACKED_TYPES[kind], isa)
        if not tiled:
            continue
        block = q8_block(kind)
        k = 512 if block == 256 else 128
        rows = max(tiled, 18)
        x = torch.ones(rows, k)
        x[1::2] = -1
        x[2::3, ::2] = -1  # mixed signs within a row too
        for fill in (0, 127, 128, 255):  # Q8_0's codes 0, 127, -128, -1
            raw = random_packed(kind, 6, k, seed=fill, fill=fill)
            w = reference(kind, raw, k).double()
            ours = _C.linear_packed(x, torch.from_numpy(raw), PACKED_TYPES[kind], k, None, isa, True)
            if not w.any():  # all codes (or scales) zero
                assert not ours.any(), (kind, isa, fill)
                continue
            assert diff(f"{kind} on {isa}, bytes {fill}", ours, x.double() @ w.T)[1] < 2e-6


@pytest.mark.parametrize("isa", [isa for isa in Q8_ISAS if isa != "base"])
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "Q6_K", "IQ4_XS", "Q5_1"])
def test_q8_tiled_kernels_on_whole_tiles_without_bias(kind, isa):
    """The tiled route at exactly one and two tiles of 16 rows, no bias, 4 / 5 / 6 / 7 weight rows
    (each remainder of the 4-row passes on one thread)."""
    if not _C.cpu_q8_tiled_rows(PACKED_TYPES[kind], isa):
        pytest.skip(f"{isa} has no tiled kernel for {kind} here")
    block = q8_block(kind)
    k = 512 if block == 256 else 96
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n in (4, 5, 6, 7):
            raw = random_packed(kind, n, k, seed=n)
            w = reference(kind, raw, k).double()
            for rows in (16, 32):
                x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
                ours = _C.linear_packed(x, torch.from_numpy(raw), PACKED_TYPES[kind], k, None, isa, True)
                assert diff(f"{kind} {rows} x {n}", ours, rounded_x(x, block).double() @ w.T)[1] < 2e-6
    finally:
        torch.set_num_threads(threads)


needs_q8 = pytest.mark.skipif(not _C.cpu_q8_activations(), reason="activations='q8' needs AVX2 (the model is "
                                                                    "float here; see the fallback test)")


@needs_q8
def test_q8_activations_on_a_model(q4k_llama):
    """load(activations="q8"): decode-sized products (few token rows) differ slightly from the
    float route's; prefill-sized ones too where this CPU has the tiled int8 kernels for Q4_K (with
    VNNI or vpmaddubsw), else not at all; the setting is recorded on the model and checked."""
    exact, q8 = cf.load(q4k_llama), cf.load(q4k_llama, activations="q8")
    assert (exact.activations, q8.activations) == ("float", "q8")
    step = torch.randint(0, 256, (2, 1), generator=torch.Generator().manual_seed(1))
    assert 1e-5 < diff("one decode-sized forward, q8 vs float", q8.logits(step), exact.logits(step))[1] < 5e-2
    prompt = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(2))
    if _C.cpu_q8_tiled_rows(PACKED_TYPES["Q4_K"]):
        assert 1e-5 < diff("a 60-row prefill (tiled int8)", q8.logits(prompt), exact.logits(prompt))[1] < 5e-2
    else:
        assert diff("a 60-row prefill (float)", q8.logits(prompt), exact.logits(prompt))[1] < 1e-6
    with pytest.raises(ValueError, match="activations='int4': expected one of 'float', 'q8'"):
        cf.load(q4k_llama, activations="int4")


def test_q8_activations_without_the_int8_kernels_stay_float(q4k_llama, monkeypatch):
    """Where the CPU has no AVX2 int8 kernels, q8 is not emulated by slow loops: the products
    stay float, the load warns, and the model (and so a sweep's results file) says float."""
    monkeypatch.setattr(_C, "cpu_q8_activations", lambda: False)
    with pytest.warns(UserWarning, match="activations='q8': this CPU's kernels .* have no int8 products"):
        model = cf.load(q4k_llama, activations="q8")
    assert model.activations == "float"
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="activations='q8': no packed matrix is on the CPU"):
        model = cf.load(q4k_llama, activations="q8", dequantize=True)
    assert model.activations == "float"


# ----------------------------------------------------------------------------- whole models

@pytest.fixture(scope="module")
def q4k_llama(tmp_path_factory):
    """A random Llama (rows of 256: every K-quant applies) written as a Q4_K GGUF."""
    folder = tmp_path_factory.mktemp("q4k")
    hf = build_hf_model("llama", folder / "hf", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        vocab_size=256, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                        rope_scaling=None)
    write_gguf(hf, folder / "m.gguf", qtype="Q4_K")
    return folder / "m.gguf"


def test_packed_model_matches_the_dequantized_model(q4k_llama):
    """Same logits up to the order of the sums (identity and repeated paths, prefill lengths on both
    sides of the decode-sized threshold), the same greedy tokens through the KV cache, and the
    matrices held as the file's bytes."""
    packed, dense = cf.load(q4k_llama), cf.load(q4k_llama, dequantize=True)
    q = packed.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, PackedTensor) and q.type_name == "Q4_K"
    assert isinstance(packed.tensors["model.embed_tokens.weight"], PackedTensor)
    assert isinstance(packed.tensors["lm_head.weight"], PackedTensor)
    assert packed.tensors["model.layers.0.input_layernorm.weight"].dtype == torch.float32
    for tokens in (5, 40):
        ids = torch.randint(0, 256, (3, tokens), generator=torch.Generator().manual_seed(tokens))
        for layers in ("0..3", "0,1,2,1,2,3"):
            _, rel = diff(f"packed vs dequantized, {tokens} tokens, path {layers}", packed.logits(ids, layers=layers),
                          dense.logits(ids, layers=layers))
            assert rel < 1e-4
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    for layers in ("0..3", "0,1,2,1,2,3"):
        assert torch.equal(packed.generate(ids, layers=layers, max_new_tokens=12),
                           dense.generate(ids, layers=layers, max_new_tokens=12))
    assert packed.weight_bytes()["cpu"] < dense.weight_bytes()["cpu"] / 4


def test_packed_mixture_of_experts_matches_the_dequantized_model(tmp_path):
    """Stacked experts ([E, rows, bytes]) run as per-expert views of the packed blocks."""
    hf = build_hf_model("qwen3_moe", tmp_path / "hf", intermediate_size=128, moe_intermediate_size=64)
    write_gguf(hf, tmp_path / "m.gguf", qtype="Q8_0")
    packed, dense = cf.load(tmp_path / "m.gguf"), cf.load(tmp_path / "m.gguf", dequantize=True)
    experts = packed.tensors["model.layers.1.mlp.experts.gate_proj"]  # decoder_sparse_step 2: layers 1, 3, 5
    assert isinstance(experts, PackedTensor) and experts.blocks.dim() == 3
    ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    for layers in ("0..5", "0..3,2,3,4,5"):
        assert diff(f"moe packed vs dequantized, path {layers}", packed.logits(ids, layers=layers),
                    dense.logits(ids, layers=layers))[1] < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_dequantized_gguf_decoded_from_its_blocks_where_it_goes(q4k_llama, tmp_path, arch, monkeypatch):
    """dequantize=True on a GPU with our kernels decodes each matrix there from its copied blocks
    (reordered as the packed route reorders them: llama's Q / K rows, stacked experts) instead of
    on the host: forced here on the CPU, that route gives the host route's tensors exactly."""
    from circuit_finder import gguf as cf_gguf

    path = q4k_llama
    if arch == "qwen3_moe":
        hf = build_hf_model("qwen3_moe", tmp_path / "hf", intermediate_size=128, moe_intermediate_size=64)
        write_gguf(hf, path := tmp_path / "m.gguf", qtype="Q8_0")
    host = cf.load(path, dequantize=True)
    monkeypatch.setattr(cf_gguf, "_decodes_on", lambda device: True)
    blocks = cf.load(path, dequantize=True)
    assert set(blocks.tensors) == set(host.tensors)
    for name, t in host.tensors.items():
        assert not isinstance(blocks.tensors[name], PackedTensor) and torch.equal(blocks.tensors[name], t), name


def test_engine_refuses_bad_packed_tensors(q4k_llama):
    model = cf.load(q4k_llama)
    raw = {n: getattr(t, "blocks", t) for n, t in model.tensors.items()}
    types = {n: t.ggml_type for n, t in model.tensors.items() if isinstance(t, PackedTensor)}
    config = __import__("json").dumps(model.config.raw)
    name = "model.layers.1.mlp.up_proj.weight"
    with pytest.raises(_C.WeightError, match=rf"tensor '{name}': expected shape \[512, 144\], got \[512, 143\] "
                                              r"\(packed Q4_K\)"):
        _C.Engine(config, "t", {**raw, name: raw[name][:, :143].contiguous()}, types)
    norm = "model.layers.0.input_layernorm.weight"
    with pytest.raises(_C.WeightError, match=f"tensor '{norm}' is packed .* reads it as float"):
        _C.Engine(config, "t", raw, {**types, norm: 12})
    with pytest.raises(_C.WeightError, match="dtype Float but a packed tensor is uint8"):
        _C.Engine(config, "t", {**raw, name: torch.zeros(512, 144)}, types)
    with pytest.raises(_C.WeightError, match="packed tensor 'nope' is not among the tensors"):
        _C.Engine(config, "t", raw, {**types, "nope": 12})


def test_packed_matrices_placed_off_the_cpu_are_dequantized(q4k_llama):
    """Packed kernels are CPU-only: layers put elsewhere (here the meta device of a split plan) get
    dequantized tensors, with a warning saying how many and where."""
    from circuit_finder.placement import Placement

    model = cf.load(q4k_llama)
    meta, cpu = torch.device("meta"), torch.device("cpu")
    plan = Placement(layers=(cpu, cpu, cpu, meta), main=cpu)
    with pytest.warns(UserWarning, match=r"packed .* 7 placed on meta were dequantized"):
        split = cf.load_from_tensors(model.config, dict(model.tensors), device_map=plan)
    assert isinstance(split.tensors["model.layers.2.mlp.up_proj.weight"], PackedTensor)
    assert split.tensors["model.layers.3.mlp.up_proj.weight"].device.type == "meta"


def test_default_model_is_packed_and_holds_its_file_size():
    """The embedded default model (Q4_1 + Q8_0, a 98 MB file) loads packed: resident weight bytes
    within 1.2x the file, logits within 1e-4 of the dequantized load."""
    path = cf.default_model_path()
    packed, dense = cf.load("default"), cf.load("default", dequantize=True)
    held, size = packed.weight_bytes()["cpu"], os.path.getsize(path)
    print(f"default model: {held / 1e6:.1f} MB of weights packed, {dense.weight_bytes()['cpu'] / 1e6:.1f} MB "
          f"dequantized, file {size / 1e6:.1f} MB")
    assert held <= 1.2 * size
    ids = packed.tokenizer(["The capital of France is", "2 + 2 ="], return_tensors="pt", padding=True)
    for layers in (None, "0..15,10..29"):
        assert diff(f"default model packed vs dequantized, path {layers}",
                    packed.logits(ids.input_ids, layers=layers, attention_mask=ids.attention_mask),
                    dense.logits(ids.input_ids, layers=layers, attention_mask=ids.attention_mask))[1] < 1e-4


_RSS_AFTER_LOAD = """
import sys, circuit_finder as cf, circuit_finder.loading as loading
if sys.argv[1] == "kept":
    loading.release_freed_heap = lambda: False
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
before = rss()
cf.load("default")
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmRSS and malloc_trim: Linux with glibc")
def test_load_hands_its_freed_heap_back():
    """Loading the default GGUF frees its temporaries (the reader's vocabulary arrays) and hands the
    freed C heap back to the system: the process holds tens of MB less than with the heap kept.
    A first load fills the tokenizer cache, so both measured loads read it."""
    import subprocess

    from circuit_finder.loading import release_freed_heap

    if not release_freed_heap():
        pytest.skip("the C library has no malloc_trim (not glibc)")

    def growth(how: str) -> int:
        return int(subprocess.run([sys.executable, "-c", _RSS_AFTER_LOAD, how], capture_output=True, text=True,
                                  check=True).stdout.split()[-1])

    growth("warm-up")
    grown = {how: growth(how) for how in ("kept", "released")}
    print(f"default model load: process grows {grown['kept'] / 1e6:.1f} MB with the freed heap kept, "
          f"{grown['released'] / 1e6:.1f} MB with it released")
    assert grown["released"] < grown["kept"] - 10e6


def _mapped_resident(path) -> int:
    """Bytes of `path`'s memory maps resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if not head[0].endswith(":"):  # a mapping's header line: address range ... [pathname]
            inside = len(head) > 5 and head[5] == str(path)
        elif inside and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise: Linux")
def test_load_drops_the_file_pages_it_read(tmp_path):
    """Reading a llama GGUF touches its metadata and its permuted Q/K rows (copied back into Hugging
    Face order); the load takes the map's pages out of the resident set, so none of the file counts
    until a product reads it, and afterwards not the Q/K rows nobody reads again. Kept (the drop
    disabled), the same load leaves those pages resident."""
    from circuit_finder import gguf as cf_gguf

    hf = build_hf_model("llama", tmp_path, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    path = tmp_path / "m.gguf"
    write_gguf(hf, path, "Q8_0")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    kept_drop, held = cf_gguf.drop_resident_pages, {}
    for how in ("kept", "dropped"):
        cf_gguf.drop_resident_pages = (lambda reader: False) if how == "kept" else kept_drop
        try:
            model = cf.load(path)
        finally:
            cf_gguf.drop_resident_pages = kept_drop
        held[how] = _mapped_resident(path)
        logits = model.logits(ids)
        print(f"{how}: {held[how] / 1e3:.0f} kB of the {path.stat().st_size / 1e3:.0f} kB file resident after load, "
              f"{_mapped_resident(path) / 1e3:.0f} kB after a forward")
        assert torch.isfinite(logits).all()
        del model
    assert held["dropped"] == 0 and held["kept"] >= 4096


# ----------------------------------------------------------------------------- quantized on load

def _q4_k_m_of_6_layers(name: str) -> str:
    """llama.cpp's Q4_K_M of a 6-layer Llama (untied): Q6_K for the head and for v / down in layers 2
    and 5 (its use_more_bits rule: the last eighth and every third layer), Q4_K for the rest."""
    more = name.endswith(("v_proj.weight", "down_proj.weight")) and name.split(".")[2] in ("2", "5")
    return "Q6_K" if name == "lm_head.weight" or more else "Q4_K"


@pytest.mark.parametrize("kind", ["q8_0", "q6_k", "q5_k", "q5_1", "q4_k", "q4_0", "bf16", "q4_k_m"])
def test_hugging_face_checkpoint_quantized_on_load(tmp_path, kind):
    """cf.load(folder, quantize=kind) packs every matrix (a mix: each as ``mix_type`` says); transformers,
    running the weights the gguf package decodes from those very bytes, gives the same logits
    (identity and repeated path), and the packed weights are within the type's rounding of the
    checkpoint's."""
    k = "_k" in kind  # K-quants' rows are 256-value blocks
    hf = build_hf_model("llama", tmp_path, hidden_size=256 if k else 128, intermediate_size=512 if k else 256,
                        tie_word_embeddings=False, rope_scaling=None)
    model = cf.load(tmp_path, quantize=kind)
    state = hf.state_dict()
    packed = {n: t for n, t in model.tensors.items() if isinstance(t, PackedTensor)}
    assert set(packed) == {n for n in state if n.endswith("_proj.weight")} | {"model.embed_tokens.weight",
                                                                             "lm_head.weight"}
    with torch.no_grad():
        for name, p in packed.items():
            assert p.type_name == (_q4_k_m_of_6_layers(name) if kind == "q4_k_m" else kind.upper()), name
            decoded = reference(p.type_name, p.blocks.numpy(), p.cols).reshape(p.shape)
            err = (decoded - state[name]).abs().max().item() / state[name].abs().max().item()
            assert err < {"q8_0": 0.01, "q6_k": 0.04, "q5_k": 0.08, "q5_1": 0.04, "q4_k": 0.15, "q4_0": 0.15, "bf16": 0.005,
                          "q4_k_m": 0.15}[kind], name
            state[name].copy_(decoded)
    ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    for layers in ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 2, 3, 4, 5]):
        with torch.no_grad():
            ref = rebuilt(hf, layers)(ids).logits
        assert diff(f"{kind} on load vs transformers on the decoded weights, path {layers}",
                    model.logits(ids, layers=layers), ref)[1] < 1e-4


@pytest.mark.parametrize("head", ["equal", "different", "only"])
def test_tied_checkpoint_that_stores_lm_head(tmp_path, head):
    """A tied config whose checkpoint stores lm_head too (older exports do). transformers ties the
    two only when they are equal, and otherwise runs the stored head: the logits agree either way.
    An equal head is not kept (nor quantized); a different one is the head (Q6_K under a mix).
    "only": the tied matrix stored as lm_head alone, which transformers then ties the embedding to."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    hf = build_hf_model("llama", tmp_path, hidden_size=256, intermediate_size=512, rope_scaling=None)
    assert hf.config.tie_word_embeddings
    without = cf.load(tmp_path, quantize="q4_k_m").weight_bytes()["cpu"]
    file = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    assert "lm_head.weight" not in tensors
    embed = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = torch.randn_like(embed) if head == "different" else embed.clone()
    if head == "only":
        del tensors["model.embed_tokens.weight"]
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)(ids).logits
    model = cf.load(tmp_path)
    assert diff(f"tied config, {head} stored lm_head, vs transformers", model.logits(ids), ref)[1] < 1e-4
    assert ("lm_head.weight" in model.tensors) == (head == "different")
    packed = cf.load(tmp_path, quantize="q4_k_m")
    if head != "different":
        assert "lm_head.weight" not in packed.tensors and packed.weight_bytes()["cpu"] == without
        assert packed.tensors["model.embed_tokens.weight"].type_name == "Q6_K"  # the head the engine reads
    else:
        assert packed.tensors["lm_head.weight"].type_name == "Q6_K"
        assert packed.tensors["model.embed_tokens.weight"].type_name == "Q4_K"


@pytest.mark.parametrize("arch, scheme", [("ministral3", "per-tensor"), ("qwen3", "blocks")])
def test_fp8_checkpoint_matches_transformers_dequantizing_it(tmp_path, arch, scheme):
    """A fine-grained FP8 checkpoint (Ministral 3 / Devstral's per-tensor static scheme; Qwen3-FP8's
    blocks, 128 x 128 there, 16 x 32 here): transformers, without an FP8 GPU, dequantizes it on load,
    and its logits are ours (identity and repeated path); quantize="q8_0" packs the dequantized
    matrices, one at a time."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    build_hf_model(arch, tmp_path, intermediate_size=128)
    write_fp8_checkpoint(tmp_path, scheme)
    ids = torch.randint(0, 160, (2, 24), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization_config=FineGrainedFP8Config(
            dequantize=True, weight_block_size=None if scheme == "per-tensor" else (16, 32))).eval()
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # dequantized, not FP8 products
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = cf.load(tmp_path)
    said = [str(w.message) for w in caught if "activation / KV-cache scales" in str(w.message)
            and w.filename == __file__]  # pointing at the cf.load line
    assert said == (["FP8: 42 activation / KV-cache scales (e.g. 'model.layers.0.mlp.down_proj.activation_scale') "
                     "are not applied: products and caches run in the compute dtype, as in transformers' dequantized "
                     "model (vLLM quantizes them)"] if scheme == "per-tensor" else [])
    assert "model.layers.0.self_attn.q_proj.weight_scale_inv" not in model.tensors
    for layers in ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 2, 3, 4, 5]):
        with torch.no_grad():
            ref = rebuilt(hf, layers)(ids).logits
        assert diff(f"FP8 {scheme} vs transformers dequantizing it, path {layers}",
                    model.logits(ids, layers=layers), ref)[1] < 1e-4
    packed, name = cf.load(tmp_path, quantize="q8_0"), "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(packed.tensors[name].blocks, quantize_matrix(model.tensors[name], "Q8_0", name).blocks)
    for source, out in ((tmp_path, "fp8-export"), (model, "float-export")):  # FP8 bytes kept / dequantized
        cf.export_hf(source, tmp_path / out, [0, 1, 2, 3, 2, 3, 4, 5])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = AutoModelForCausalLM.from_pretrained(tmp_path / out, dtype=torch.float32).eval()
        with torch.no_grad():
            assert diff(f"{out} along the path, in transformers", exported(ids).logits, ref)[1] < 1e-4
    cf.export_hf(tmp_path, tmp_path / "bf16-export", [0, 1, 2], dtype="bfloat16")  # FP8 parts stay as they are
    import safetensors.torch

    written = safetensors.torch.load_file(tmp_path / "bf16-export" / "model.safetensors")
    assert written[name].dtype == torch.float8_e4m3fn and written[name + "_scale_inv"].dtype == torch.float32
    assert written["model.norm.weight"].dtype == torch.bfloat16
    written[name] = written[name].float()  # a cast that leaves the scale behind: refused, not read as weights
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight_scale_inv' scales .* not a float8"):
        fp8_pairs(written, (16, 32))


def test_fp8_blocks_at_ragged_edges():
    """dequantize_fp8 against a plain loop: a grid rounded up where the rows and columns are not
    whole blocks, E8M0 (uint8) scales, and a bad scale shape named."""
    w = (torch.randn(40, 70) * 4).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 3) + 0.5  # blocks of 16 x 32: 16 + 16 + 8 rows, 32 + 32 + 6 columns
    expected = w.float().clone()
    for i in range(40):
        for j in range(70):
            expected[i, j] *= scale[i // 16, j // 32]
    assert torch.equal(dequantize_fp8(w, scale, (16, 32), torch.float32), expected)
    for chunk in (1, 70 * 16, 70 * 40 - 1):  # a block's rows at a time, or two blocks' (the last ragged)
        assert torch.equal(dequantize_fp8(w, scale, (16, 32), torch.float32, chunk=chunk), expected)
    stacked = torch.stack([w, w.flip(0)])  # experts [E, rows, cols] with a grid each, a per-tensor scale
    assert torch.equal(dequantize_fp8(stacked, torch.stack([scale, scale * 2]), (16, 32), torch.float32, chunk=2000),
                       torch.stack([expected, dequantize_fp8(w.flip(0), scale * 2, (16, 32), torch.float32)]))
    assert torch.equal(dequantize_fp8(w, torch.tensor(0.5), None, torch.bfloat16, chunk=100),
                       (w.float() * 0.5).bfloat16())
    assert torch.equal(dequantize_fp8(w[3], torch.tensor([0.5]), None, torch.float32), w[3].float() * 0.5)  # a vector
    exponents = torch.tensor([[120, 127, 130]] * 3, dtype=torch.uint8)
    assert torch.equal(dequantize_fp8(w, exponents, (16, 32), torch.float32)[17, 65], w[17, 65].float() * 8)
    with pytest.raises(ValueError, match=r"'m.weight_scale_inv' is \[2, 3\], expected one scale or \[3, 3\]"):
        fp8_pairs({"m.weight": w, "m.weight_scale_inv": torch.ones(2, 3)}, (16, 32))
    with pytest.raises(ValueError, match="FP8 tensor 'm.weight' has no 'm.weight_scale_inv'"):
        fp8_pairs({"m.weight": w}, None)


def test_quantize_choice_per_tensor(tmp_path):
    hf = build_hf_model("llama", tmp_path, hidden_size=128, intermediate_size=256, tie_word_embeddings=False,
                        rope_scaling=None)
    rules = {"lm_head.weight": "q8_0", "*.embed_tokens.*": None, "*.mlp.*": "q4_1", "*": "q5_0"}
    model = cf.load(tmp_path, quantize=rules)
    t = model.tensors
    assert t["lm_head.weight"].type_name == "Q8_0" and t["model.layers.0.mlp.up_proj.weight"].type_name == "Q4_1"
    assert t["model.layers.0.self_attn.q_proj.weight"].type_name == "Q5_0"
    assert isinstance(t["model.embed_tokens.weight"], torch.Tensor)
    assert isinstance(t["model.layers.0.input_layernorm.weight"], torch.Tensor)  # never a norm
    assert quantize_choice("q8_0", "model.layers.0.mlp.up_proj.weight", (0, 128)) is None  # empty: stays float
    with pytest.warns(UserWarning, match=r"Q5_0 for Q4_K, Q5_1 for Q5_K, Q8_0 for Q6_K, as llama.cpp does"):
        mixed = cf.load(tmp_path, quantize={"*.embed_tokens.*": None, "*": "q5_k_m"}).tensors  # a mix as a rule's type
    assert mixed["lm_head.weight"].type_name == "Q8_0"  # the mix's Q6_K, which falls back (rows of 128)
    assert mixed["model.layers.1.mlp.gate_proj.weight"].type_name == "Q5_1"  # Q5_K's fallback
    assert isinstance(mixed["model.embed_tokens.weight"], torch.Tensor)
    with pytest.raises(ValueError, match="the mix 'q4_k_m' .* needs the model's layer count"):
        quantize_choice("q4_k_m", "model.layers.0.mlp.up_proj.weight", (256, 256))
    with pytest.raises(ValueError, match="'Q3_K' .* is not a type circuit-finder can make"):
        cf.load(tmp_path, quantize="q3_k")
    with pytest.warns(UserWarning, match=r"quantize: \d+ matrices .* not whole 256-value blocks: .* Q8_0 for Q6_K") as got:
        fallback = cf.load(tmp_path, quantize={"*.mlp.down_proj.*": "q4_k", "*": "q6_k"})  # 256 columns but 128
    assert len([w for w in got if "256-value" in str(w.message)]) == 1
    types = {n: t.type_name for n, t in fallback.tensors.items() if isinstance(t, PackedTensor)}
    assert types["model.layers.0.mlp.down_proj.weight"] == "Q4_K" and types["lm_head.weight"] == "Q8_0"
    with pytest.warns(UserWarning, match=r"the rule '\*\.mpl\.\*' matches no tensor of this model$"):
        cf.load(tmp_path, quantize={"*.mpl.*": "q4_0", "*": "q8_0"})  # a typo is said, not silently unused
    with pytest.warns(UserWarning, match=r"the rule '\*norm\*' matches only tensors that stay float \(e.g. "
                                         r"model.layers.0.input_layernorm.weight: norms, biases"):
        cf.load(tmp_path, quantize={"*norm*": "q8_0", "*": "q4_0"})
    tied = tmp_path / "tied"
    build_hf_model("llama", tied, hidden_size=128, intermediate_size=256, tie_word_embeddings=True, rope_scaling=None)
    with pytest.warns(UserWarning, match=r"the rule 'lm_head.weight' matches no tensor of this model \(this model's "
                                         r"head is its embedding"):
        cf.load(tied, quantize={"lm_head.weight": "q8_0", "*": "q4_0"})
    narrow = tmp_path / "narrow"  # rows of 80: no 32-value blocks fit, whatever the type: said, not hidden
    build_hf_model("llama", narrow, hidden_size=80, intermediate_size=160, rope_scaling=None)
    for spec in ("q8_0", "q4_k"):
        with pytest.warns(UserWarning, match=r"quantize: \d+ matrices .* stay float: their rows are not whole "
                                             r"32-value blocks") as got:
            held = cf.load(narrow, quantize=spec).tensors
        fell = [str(w.message) for w in got if "256-value" in str(w.message)]  # claimed only where it fits
        assert fell == ([] if spec == "q8_0" else [m for m in fell if "(e.g. model.layers.0.mlp.down_proj" in m])
        assert len(fell) == (spec == "q4_k")
        assert isinstance(held["model.layers.0.mlp.up_proj.weight"], torch.Tensor)
        assert isinstance(held["model.layers.0.mlp.down_proj.weight"], PackedTensor)  # rows of 160 fit Q8_0 / Q5_0
    write_gguf(hf, tmp_path / "m.gguf", qtype="Q8_0")
    with pytest.raises(ValueError, match="a GGUF file keeps its own quantization"):
        cf.load(tmp_path / "m.gguf", quantize="q8_0")


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16"])
def test_quantizers_match_the_gguf_package_byte_for_byte(kind):
    """Our torch quantizers (quantize_matrix, in row chunks) write the bytes the gguf package's
    numpy quantizers write (ggml's reference rounding), from float32 and from bf16 weights."""
    w = awkward_rows(4096)  # 300 rows of 4096: three chunks of rows
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.from_numpy(w).to(dtype)
        want = gguf.quants.quantize(t.float().numpy(), gguf.GGMLQuantizationType[kind]).view(np.uint8).reshape(300, -1)
        got = quantize_matrix(t, kind).blocks.numpy()
        print(f"{kind} from {dtype}: {(got != want).sum()} of {want.size} bytes differ")
        assert np.array_equal(got, want)
    dense = torch.from_numpy(w[:256]).t()  # a transposed view without gaps (a copy of it keeps its strides)
    assert torch.equal(quantize_matrix(dense, kind).blocks, quantize_matrix(dense.contiguous(), kind).blocks)
    stacked = quantize_matrix(torch.from_numpy(w[:8]).reshape(2, 4, 4096), kind)  # stacked experts: [E, rows, cols]
    assert stacked.shape == (2, 4, 4096) and torch.equal(stacked.blocks.reshape(8, -1), quantize_matrix(
        torch.from_numpy(w[:8]), kind).blocks)
    if kind != "BF16":  # f16 scales (or values): +-65504 at most
        with pytest.raises(ValueError, match=r"experts: holds values up to 1e\+05, beyond f16's 65504 \(in rows 0..1\)"):
            quantize_matrix(torch.tensor([[0.0] * 31 + [-1e5], [1.0] * 32]), kind, "experts")
    if kind == "F16":  # a NaN beside it does not hide an out-of-range value
        with pytest.raises(ValueError, match=r"experts: holds values up to 1e\+05, beyond f16's 65504"):
            quantize_matrix(torch.tensor([[float("nan"), 1e5, 1.0, 2.0]]), kind, "experts")
    if kind not in ("BF16", "F16"):
        with pytest.raises(ValueError, match=r"experts: holds non-finite values \(in rows 0..1\)"):
            quantize_matrix(torch.tensor([[0.0] * 31 + [float("inf")], [1.0] * 32]), kind, "experts")
        with pytest.raises(ValueError, match="whole 32-value blocks"):
            quantize_matrix(torch.zeros(2, 48), kind)


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"])
def test_quantizers_keep_their_bytes_under_cudas_division_rule(kind, monkeypatch):
    """CUDA's kernel for a tensor divided by a Python number multiplies by the number's float32
    reciprocal, a step off at times, which moves codes at half steps (the previous version: up to
    297 of 300 bf16 rows apart). With that rule emulated here, the quantizers write the same bytes:
    none of their divisions is by a Python number, so a GPU writes the CPU's bytes."""
    true_div = torch.Tensor.__truediv__

    def cuda_rule(self, other):
        if isinstance(other, (int, float)):
            return self * torch.tensor(np.float32(1) / np.float32(other))
        return true_div(self, other)

    w = torch.from_numpy(awkward_rows(4096)).bfloat16()
    want = quantize_matrix(w, kind).blocks
    monkeypatch.setattr(torch.Tensor, "__truediv__", cuda_rule)
    assert torch.equal(torch.ones(2) / 3, torch.ones(2) * torch.tensor(np.float32(1) / np.float32(3)))  # emulated
    assert torch.equal(quantize_matrix(w, kind).blocks, want)


@pytest.mark.parametrize("kind, rival", [("Q4_K", "Q4_1"), ("Q5_K", "Q5_1"), ("Q6_K", "Q5_1")])
def test_k_quantizers_decode_with_gguf_within_their_rivals_error(kind, rival):
    """Our Q4_K / Q5_K / Q6_K blocks, decoded by the gguf package (an independent reader of ggml's
    layout), give back the matrix clearly better than the package's own quantizer of the 32-block
    type of about the same size; our decoder reads the same values; zero, one-signed, outlier and
    constant rows."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 1024)).astype(np.float32)
    w[0] = 0.0
    w[1] = np.abs(w[1]) + 0.5  # no negative value: the offset is 0
    w[2, 7] = 40.0  # one outlier
    w[3] *= 1e-6
    w[4], w[5] = -0.3, 0.7  # constant blocks: all codes alike
    w[6] = w[6] * 3e-6 - 5e-6  # tiny, one-signed on average
    packed = quantize_matrix(torch.from_numpy(w), kind)
    decoded = reference(kind, packed.blocks.numpy(), 1024).numpy()
    ours = packed.dequantize().numpy()
    other = reference(rival, gguf.quants.quantize(w, gguf.GGMLQuantizationType[rival]), 1024).numpy()

    def rel_rmse(x):
        return float(np.sqrt(((x - w) ** 2).mean(1)).mean() / np.sqrt((w ** 2).mean(1)).mean())

    print(f"{kind}: relative RMS error {rel_rmse(decoded):.4f}, {rival} (gguf package) {rel_rmse(other):.4f}")
    assert np.array_equal(ours, decoded)
    assert not decoded[0].any() and (decoded[1] >= 0).all()
    assert np.abs(decoded[4:6] - w[4:6]).max() < 1e-3, np.abs(decoded[4:6] - w[4:6]).max(1)
    # the scale search (candidates fitted by least squares, the best kept) is what puts Q4_K 8%, Q5_K 5%
    # and Q6_K 52% under their rivals here; refining the range's scale alone gave 5.7%, 2.8% and 49.5%
    assert rel_rmse(decoded) <= rel_rmse(other) * {"Q4_K": 0.93, "Q5_K": 0.96, "Q6_K": 0.49}[kind]
    # a super-block of values ~1e-6: the f16 super-scales underflow (the format's limit), nothing blows up
    assert np.isfinite(decoded[3]).all() and np.abs(decoded[3] - w[3]).max() <= np.ptp(w[3])
    for row in (3, 6):  # ... and what is written is never worse than zeros (each sub-block its mean alone)
        assert np.sqrt(((decoded[row] - w[row]) ** 2).mean()) <= np.sqrt((w[row] ** 2).mean()), row
    with pytest.raises(ValueError, match="whole 256-value blocks"):
        quantize_matrix(torch.zeros(2, 96), kind)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_matrix(torch.full((1, 256), float("nan")), kind)
    with pytest.raises(ValueError, match="beyond f16's 65504"):  # its super-scales would round to inf
        quantize_matrix(torch.full((1, 256), 6.1e7), kind)


@pytest.mark.parametrize("levels", [16, 32])
def test_k_quant_fit_keeps_float32s_accuracy_where_the_offset_dwarfs_the_spread(levels):
    """Q4_K / Q5_K sub-blocks of mean -100 and spread 0.1: the candidate search in float32 picks fits
    as good as the same search in float64 but in 0.1-0.3% of blocks (its error from sums of centred
    values; from raw sums of x and x^2 it picked a worse fit in 87% of blocks, 1.27x the error on
    average)."""
    x = -100 + 0.1 * torch.randn(4096, 32, generator=torch.Generator().manual_seed(0))

    def error(scale, offset):  # in float64, each fit's own codes
        xd, s, o = x.double(), scale.double()[:, None], offset.double()[:, None]
        q = torch.round((xd + o) / torch.where(s == 0, 1.0, s)).clamp(0, levels - 1)
        return ((xd - s * q + o) ** 2).sum(1)

    ours, exact = error(*quantizers.affine_fit(x, levels)), error(*quantizers.affine_fit(x.double(), levels))
    worse = (ours > exact * 1.001).float().mean().item()
    print(f"levels {levels}: {worse:.2%} of blocks fit worse than in float64; mean error ratio {(ours / exact).mean():.5f}")
    assert worse < 0.01 and (ours / exact).mean() < 1.001


# llama.cpp's mixes, tensor by tensor: random models whose rows are 256-value blocks (one of 320:
# the fallbacks), with layer counts that show the more-bits pattern; tied embeddings, Phi-3's fused
# qkv, Gemma, 8 experts (attention's k / v / output rules) and 16, hybrid linear attention
MIX_BASE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, vocab_size=512, rope_scaling=None)
MIX_MODELS = {
    "llama": ("llama", dict(num_hidden_layers=16, tie_word_embeddings=False)),
    "llama tied": ("llama", dict(num_attention_heads=8, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)),
    "llama 320": ("llama", dict(hidden_size=320, intermediate_size=640, num_attention_heads=5, num_key_value_heads=5,
                                tie_word_embeddings=False)),
    "phi3": ("phi3", dict(num_key_value_heads=4, rope_parameters=None)),
    "gemma3_text": ("gemma3_text", dict(num_hidden_layers=6)),
    "mixtral": ("mixtral", dict(num_local_experts=8)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=16, moe_intermediate_size=256, num_attention_heads=8)),
    "qwen3_5_text": ("qwen3_5_text", dict(num_hidden_layers=12, layer_types=["linear_attention"] * 3 + ["full_attention"],
                                          linear_key_head_dim=64, linear_value_head_dim=64)),
    # llama.cpp's 70B (80 layers: Llama with grouped-query attention, any Qwen2; not the 65B's equal heads)
    "llama 80": ("llama", dict(num_hidden_layers=80, intermediate_size=256, vocab_size=256, tie_word_embeddings=False)),
    "llama 80 equal heads": ("llama", dict(num_hidden_layers=80, intermediate_size=256, vocab_size=256,
                                           num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen2 80": ("qwen2", dict(num_hidden_layers=80, intermediate_size=256, vocab_size=256, num_key_value_heads=4)),
    "qwen3_next": ("qwen3_next", dict(num_hidden_layers=12, layer_types=["linear_attention"] * 3 + ["full_attention"],
                                      linear_key_head_dim=64, linear_value_head_dim=64, num_experts=8, mlp_only_layers=[],
                                      moe_intermediate_size=256, shared_expert_intermediate_size=256)),
}


def _file_names(name: str, arch: str) -> list[str]:
    """The tensors llama.cpp's converter writes for Hugging Face matrix `name` (the one whose type a mix
    gives first): experts' matrices stacked, Qwen3-Next's in_proj_qkvz split."""
    block = ".".join(["blk", *name.split(".")[2:3]])
    expert = re.search(r"\.experts\.(\d+\.)?(gate_up_proj|gate_proj|up_proj|down_proj|w1|w2|w3)(\.weight)?$", name)
    if expert:
        parts = {"gate_up_proj": ["gate", "up"], "gate_proj": ["gate"], "w1": ["gate"], "up_proj": ["up"], "w3": ["up"],
                 "down_proj": ["down"], "w2": ["down"]}[expert.group(2)]
        return [f"{block}.ffn_{p}_exps.weight" for p in parts]
    if name.endswith("linear_attn.in_proj_qkvz.weight"):
        return [f"{block}.attn_qkv.weight", f"{block}.attn_gate.weight"]
    return [gguf_name(name, GGUF_ARCH.get(arch, arch))]


@pytest.mark.parametrize("label", MIX_MODELS)
def test_mixes_choose_llama_cpps_types(label, tmp_path):
    """quantize="q4_k_m" / "q5_k_m" gives every matrix the type llama.cpp's quantizer gives it in the
    same mix (llama_model_quantize on the model's F32 GGUF, no importance matrix), and packs every
    matrix llama.cpp quantizes."""
    llama_cpp = llama_cpp_or_skip()
    import ctypes

    arch, overrides = MIX_MODELS[label]
    if arch == "qwen3_5_text" or arch == "qwen3_next":
        overrides = dict(overrides, layer_types=overrides["layer_types"] * 3)
    hf = build_hf_model(arch, tmp_path / "hf", **dict(MIX_BASE, **overrides))
    write_gguf(hf, tmp_path / "f32.gguf", qtype="F32")
    for mix, ftype in (("q4_k_m", 15), ("q5_k_m", 17)):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        out = tmp_path / f"{mix}.gguf"
        assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(out).encode(),
                                              ctypes.byref(params)) == 0
        read = gguf.GGUFReader(str(out)).tensors
        theirs = {t.name: t.tensor_type.name for t in read}
        c = hf.config
        experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", 0)
        facts = MixModel(c.num_hidden_layers, experts, tied="output.weight" not in theirs, seventy_b=llama_cpp_70b(
            c.architectures[0], c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, experts))
        for t in read:  # mix_type reads the file's names too
            if t.tensor_type.name not in ("F32", "F16"):
                kind = mix_type(mix.upper(), t.name, facts)
                kind = K_FALLBACK[kind] if kind in K_FALLBACK and int(t.shape[0]) % 256 else kind
                assert kind == t.tensor_type.name, f"{label} {mix}: {t.name}: mix_type {kind}, llama.cpp {t.tensor_type.name}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 320-wide model's fallbacks warn
            model = cf.load(tmp_path / "hf", quantize=mix, fuse_projections=False)
        ours = {n: t.type_name for n, t in model.tensors.items() if isinstance(t, PackedTensor)}
        covered = set()
        for name, kind in ours.items():
            files = _file_names(name, arch)
            covered.update(files)
            assert kind == theirs[files[0]], f"{label} {mix}: {name} ({files[0]}): ours {kind}, llama.cpp {theirs[files[0]]}"
        missed = {n: k for n, k in theirs.items() if k not in ("F32", "F16") and n not in covered}
        counts = {k: sum(v == k for v in ours.values()) for k in sorted(set(ours.values()))}
        if " 80" in label:  # the 70B rule did apply (Q5_K in a Q4_K_M), or not
            assert ("Q5_K" in counts) == (label != "llama 80 equal heads" or mix == "q5_k_m")
        print(f"{label} {mix}: {len(ours)} matrices agree with llama.cpp ({counts}); not packed by us: {missed}")
        assert not missed


# ----------------------------------------------------------------------------- the tools on packed models

@pytest.fixture(scope="module")
def packed_chat(chat_model_dir):
    """The tiny chat model packed as Q8_0 on load, and the same model run in float on the weights the
    packed bytes decode to (by the gguf package): the reference every tool is compared with."""
    packed = cf.load(chat_model_dir, quantize="q8_0")
    decoded = {n: reference(t.type_name, t.blocks.numpy(), t.cols).reshape(t.shape) if isinstance(t, PackedTensor)
               else t for n, t in packed.tensors.items()}
    dense = cf.load_from_tensors(packed.config, decoded, tokenizer=packed.tokenizer)
    assert any(isinstance(t, PackedTensor) for t in packed.tensors.values())
    return packed, dense


def close(a, b) -> bool:
    """Equal records, floats (in nested dicts and lists too) within 1e-4."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(close, a, b))
    if isinstance(a, float):
        return b == pytest.approx(a, abs=1e-4, nan_ok=True)
    return a == b


def test_sweep_on_a_packed_model(packed_chat):
    packed, dense = packed_chat
    for mode in ("likelihood", "generate"):
        kw = dict(probes=("math", "eq"), mode=mode, max_items=2, block_sizes=(2,), progress=False)
        a, b = cf.sweep(packed, **kw).records, cf.sweep(dense, **kw).records
        assert len(a) == len(b) > 1
        for x, y in zip(a, b):
            assert x.keys() == y.keys() and x["layers"] == y["layers"], mode
            for key in x.keys() - {"seconds", "kind"}:
                assert close(x[key], y[key]), (mode, x["layers"], key, x[key], y[key])


@needs_q8
@pytest.mark.filterwarnings("ignore:quantize")
def test_a_sweep_records_its_activations(chat_model_dir, tmp_path):
    """A results file written with activations="q8" is not resumed by a float model (the scores
    differ), nor where the CPU rounds other products (another ISA or tiled rule: q8_products), and
    one written before the setting existed counts as float."""
    q8 = cf.load(chat_model_dir, quantize="q4_k", activations="q8")
    kw = dict(probes=("math",), mode="likelihood", max_items=2, block_sizes=(2,), progress=False)
    cf.sweep(q8, results=tmp_path / "q8.jsonl", **kw)
    lines = (tmp_path / "q8.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert header["q8_products"] == q8_products() and f"{_C.cpu_isa()}; tiled from Q4_0:" in q8_products()
    cf.sweep(q8, results=tmp_path / "q8.jsonl", **kw)  # the same machine: resumed
    header["q8_products"] = "avx2-novnni; tiled from Q4_0:8"  # as another CPU wrote it
    (tmp_path / "other.jsonl").write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="was run with q8_products='avx2-novnni; tiled from Q4_0:8'"):
        cf.sweep(q8, results=tmp_path / "other.jsonl", **kw)
    exact = cf.load(chat_model_dir, quantize="q4_k")
    with pytest.raises(ValueError, match="was run with activations='q8'; this sweep has activations='float'"):
        cf.sweep(exact, results=tmp_path / "q8.jsonl", **kw)
    cf.sweep(exact, results=tmp_path / "float.jsonl", **kw)
    lines = (tmp_path / "float.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    with pytest.raises(ValueError, match="was run with quantize='q4_k'; this sweep has quantize=None"):
        cf.sweep(cf.load(chat_model_dir), results=tmp_path / "float.jsonl", **kw)  # the float weights: refused
    with pytest.raises(ValueError, match="was run with quantize='q4_k'; this sweep has quantize='q8_0'"):
        cf.sweep(cf.load(chat_model_dir, quantize="q8_0"), results=tmp_path / "float.jsonl", **kw)
    assert header.pop("activations") == "float" and header.pop("quantize") == "q4_k"
    (tmp_path / "float.jsonl").write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    cf.sweep(exact, results=tmp_path / "float.jsonl", **kw)  # an older file (no activations, no quantize): resumed


def test_server_and_lm_eval_on_a_packed_model(packed_chat):
    from fastapi.testclient import TestClient

    from circuit_finder.server import create_app

    packed, dense = packed_chat
    with TestClient(create_app(packed, layers="rys=1:3", model_name="q8", batch_window_ms=0)) as http:
        r = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == dense.generate("Once upon a time", layers="rys=1:3", max_new_tokens=8)[0]
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from circuit_finder.lm_eval import CircuitFinderLM

    pairs = [("The capital of France is", " Paris"), ("2 + 2 =", " 4")]
    ours, ref = (CircuitFinderLM(model=m, layers="rys=1:3", batch_size=2).loglikelihood(
        [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]) for m in (packed, dense))
    assert [r[0] for r in ours] == pytest.approx([r[0] for r in ref], abs=1e-4)


def test_hf_export_of_a_packed_model(packed_chat, tmp_path):
    """export_hf writes the packed matrices as the model's float dtype: transformers loads the
    export and gives the packed model's logits along the path."""
    from transformers import AutoModelForCausalLM

    packed, _ = packed_chat
    out = cf.export_hf(packed, tmp_path / "export", "rys=1:3")
    ids = torch.randint(0, packed.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()(ids).logits
    assert diff("export of a packed model, in transformers", theirs, packed.logits(ids, layers="rys=1:3"))[1] < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "qwen3_next"])
def test_hf_export_dequantizes_packed_matrices_shard_by_shard(tmp_path, monkeypatch, arch):
    """export_hf of a quantized GGUF file, and of the packed Model loaded from it, writes the floats
    the gguf package decodes from the model's blocks (its numpy code, not ours: the logits of the
    export equal those of a model built from that decoding) — and dequantizes each packed matrix
    only as its shard is written, so the whole model's floats are never held at once. Stacked
    experts are written per expert from rows of their blocks; Qwen3-Next's regrouped projections
    decoded."""
    import safetensors.torch

    sizes = dict(intermediate_size=128)
    if arch != "llama":
        sizes.update(moe_intermediate_size=64, shared_expert_intermediate_size=96)
    hf = build_hf_model(arch, tmp_path / "hf", **sizes)
    write_gguf(hf, tmp_path / "m.gguf", qtype="Q8_0")
    packed = cf.load(tmp_path / "m.gguf")
    decoded = {n: reference(t.type_name, t.blocks.reshape(-1, t.blocks.shape[-1]).numpy(), t.cols).reshape(t.shape)
               if isinstance(t, PackedTensor) else t for n, t in packed.tensors.items()}
    dense = cf.load_from_tensors(packed.config.raw, decoded)
    events: list[str] = []
    decode, save = PackedTensor.dequantize, safetensors.torch.save_file
    monkeypatch.setattr(PackedTensor, "dequantize",
                        lambda self, dtype=torch.float32: events.append("decode") or decode(self, dtype))
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: events.append("save") or save(*a, **k))
    path = "0..3,1..5"
    ids = torch.randint(0, hf.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    for label, src in (("file", tmp_path / "m.gguf"), ("model", packed)):
        events.clear()
        out = cf.export_hf(src, tmp_path / f"export-{label}", path, max_shard_size="64KB")
        last_decode = len(events) - 1 - events[::-1].index("decode")
        print(f"{arch} from the {label}: {events.count('decode')} matrices decoded over {events.count('save')} "
              f"shards, the first shard written at event {events.index('save')} of {len(events)}")
        assert events.count("save") > 3 and events.index("save") < last_decode
        assert diff(f"{arch} export from the packed {label} vs the gguf package's decoding", cf.load(out).logits(ids),
                    dense.logits(ids, layers=path))[1] < 1e-6


def test_packed_tensor_indexing_keeps_rows_whole():
    raw = torch.from_numpy(random_packed("Q8_0", 12, 64)).reshape(3, 4, -1)
    p = PackedTensor(raw, "Q8_0", 64)
    assert p[1].shape == (4, 64) and torch.equal(p[1].blocks, raw[1])
    assert p[:, :2].shape == (3, 2, 64) and torch.equal(p[:, :2].dequantize(), p.dequantize()[:, :2])
    with pytest.raises(IndexError, match="leading dimensions only"):
        p[0, 0]
    with pytest.raises(IndexError, match="leading dimensions only"):
        p[..., 0]
    with pytest.raises(TypeError, match="not iterable"):
        list(p)


@pytest.mark.parametrize("arch", ["qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"])
def test_packed_hybrid_matches_the_dequantized_model(tmp_path, arch):
    """The hybrids' converter changes are undone on the packed rows (value heads regrouped, fused
    projections split) as on the floats the dequantized load regroups (checked against transformers
    in test_hybrid.py); Qwen3.5's out_proj, regrouped by columns, is the one matrix left float."""
    sizes = dict(intermediate_size=128)
    if arch != "qwen3_5_text":
        sizes.update(moe_intermediate_size=64, shared_expert_intermediate_size=96)
    hf = build_hf_model(arch, tmp_path / "hf", **sizes)
    write_gguf(hf, tmp_path / "m.gguf", qtype="Q8_0")
    packed, dense = cf.load(tmp_path / "m.gguf"), cf.load(tmp_path / "m.gguf", dequantize=True)
    names = {n.split(".")[-2] for n, t in packed.tensors.items() if isinstance(t, PackedTensor)}
    assert {"in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "q_proj", "lm_head"} <= names
    assert ("out_proj" in names) == (arch == "qwen3_next")  # its converter keeps transformers' grouped order
    ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    for layers in ("0..5", "0..3,1..5"):
        assert diff(f"{arch} packed vs dequantized, path {layers}", packed.logits(ids, layers=layers),
                    dense.logits(ids, layers=layers))[1] < 1e-4
