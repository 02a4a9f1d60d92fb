"""Fused projections: a layer's q / k / v and an MLP's gate / up laid out as one matrix each
(``load(fuse_projections=...)``, ``layout.lay_out_fused``) and run as one product by the engine,
which takes rows that follow one another in memory as one matrix. Parity with transformers on every
family (identity and repeated paths, cached greedy decode), biases included; packed GGUF blocks
against the gguf package's dequantization; layouts the engine must not fuse; export of a fused model.
The GPU twin (fused by default there) is in test_cuda.py."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import circuit_finder as cf
from circuit_finder import LayerPath
from circuit_finder.layout import lay_out_fused
from circuit_finder.quants import PackedTensor
from helpers import (
    ARCHS,
    HYBRID_ARCHS,
    MOE_ARCHS,
    random_packed,
    rebuilt,
    relative,
    report,
    tokens,
    write_gguf,
)

N = 6
RYS = LayerPath.duplicate(N, 2, 4)
# llama with every bias the family allows: q / k / v / o and gate / up / down
CASES = [*ARCHS, *MOE_ARCHS, *HYBRID_ARCHS, "llama-biases"]


def built(model_dir, case: str):
    if case == "llama-biases":
        return model_dir("llama", attention_bias=True, mlp_bias=True)
    return model_dir(case)


def checkpoint_groups(folder) -> dict[str, int]:
    """The q / k / v and gate / up groups lay_out_fused can fuse, counted from the checkpoint's own
    names (not from our loader)."""
    names: list[str] = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            names += list(s.keys())
    return {"qkv": sum(n.endswith(".q_proj.weight") for n in names),
            "gate_up": sum(n.endswith((".gate_proj.weight", ".w1.weight")) for n in names)}


@pytest.mark.parametrize("case", CASES)
def test_fused_projections_match_transformers(model_dir, case):
    folder, hf = built(model_dir, case)
    plain, fused = cf.load(folder, fuse_projections=False), cf.load(folder, fuse_projections=True)
    groups, before, after = checkpoint_groups(folder), plain.fused_products(), fused.fused_products()
    print(f"{case}: checkpoint groups {groups}, fused products unfused {before}, fused {after}")
    assert {k: after[k] - before[k] for k in after} == groups  # Phi-3's checkpoint is fused already
    assert after["qkv"] > 0 and after["gate_up"] > 0
    ids = tokens(2, 20, seed=1)
    ref_model = rebuilt(hf, list(RYS))
    with torch.no_grad():
        ref = ref_model(ids).logits
        ref_identity = hf(ids).logits
    assert relative(f"{case} fused rys", fused.logits(ids, layers=RYS), ref) < 1e-4
    assert relative(f"{case} fused identity", fused.logits(ids), ref_identity) < 1e-4
    prompt = tokens(1, 7, seed=3)
    with torch.no_grad():
        want = ref_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                  min_new_tokens=12, do_sample=False, pad_token_id=0)[:, 7:]
    got = fused.generate(prompt, layers=RYS, max_new_tokens=12, min_new_tokens=12)
    print(f"{case} fused cached greedy: ours {got[0].tolist()} transformers {want[0].tolist()}")
    assert torch.equal(got, want)


def test_the_cpu_default_keeps_projections_apart(model_dir):
    folder, _ = model_dir("llama")
    assert cf.load(folder).fused_products() == {"qkv": 0, "gate_up": 0}


def _views(parts: list[torch.Tensor], gap: int = 0) -> list[torch.Tensor]:
    """parts copied into one buffer in order, `gap` rows between them; row views of it."""
    cols = parts[0].shape[1]
    buf = torch.zeros(sum(p.shape[0] for p in parts) + gap * (len(parts) - 1), cols, dtype=parts[0].dtype)
    views, row = [], 0
    for p in parts:
        views.append(buf[row: row + p.shape[0]])
        views[-1].copy_(p)
        row += p.shape[0] + gap
    return views


@pytest.mark.parametrize("layout", ["in order", "gap", "reversed"])
def test_the_engine_fuses_only_rows_that_follow_each_other(model_dir, layout):
    folder, hf = model_dir("qwen2")  # q / k / v biases
    state = {n: t.detach().clone() for n, t in hf.state_dict().items()}
    for layer in range(N):
        names = [f"model.layers.{layer}.self_attn.{p}_proj.weight" for p in "qkv"]
        parts = [state[n] for n in names]
        if layout == "reversed":  # v, k, q in memory: not q / k / v rows
            views = _views(parts[::-1])[::-1]
        else:
            views = _views(parts, gap=1 if layout == "gap" else 0)
        state.update(zip(names, views))
    model = cf.load_from_tensors(hf.config.to_dict(), state, fuse_projections=False)
    print(f"{layout}: {model.fused_products()}")
    assert model.fused_products()["qkv"] == (N if layout == "in order" else 0)
    ids = tokens(2, 16, seed=2)
    with torch.no_grad():
        ref = hf(ids).logits
    assert report(f"qwen2 q/k/v {layout}", model.logits(ids), ref) < 1e-4


def test_lay_out_fused_takes_only_whole_matching_groups():
    def floats(*shapes, dtype=torch.float32):
        return [torch.randn(*s).to(dtype) for s in shapes]

    p = "model.layers.0.self_attn."
    qkv = [f"{p}{n}_proj.weight" for n in "qkv"]
    cases = {
        "whole": (dict(zip(qkv, floats((8, 4), (2, 4), (2, 4)))), 1),
        "v missing": (dict(zip(qkv[:2], floats((8, 4), (2, 4)))), 0),
        "two dtypes": (dict(zip(qkv, [*floats((8, 4), (2, 4)), *floats((2, 4), dtype=torch.bfloat16)])), 0),
        "two row lengths": (dict(zip(qkv, floats((8, 4), (2, 4), (2, 6)))), 0),
        "packed, two types": (dict(zip(qkv, [PackedTensor(torch.from_numpy(random_packed(k, r, 32)), k, 32)
                                            for k, r in (("Q8_0", 8), ("Q8_0", 2), ("Q4_0", 2))])), 0),
    }
    for name, (tensors, want) in cases.items():
        before = {n: t for n, t in tensors.items()}
        assert lay_out_fused(tensors, where=lambda d: True) == want, name
        for n, t in tensors.items():  # the same values, fused or not
            a, b = (t.blocks, before[n].blocks) if isinstance(t, PackedTensor) else (t, before[n])
            assert torch.equal(a, b), (name, n)
    tensors = dict(zip(qkv, floats((8, 4), (2, 4), (2, 4))))
    assert lay_out_fused(tensors, where=lambda d: d.type == "cuda") == 0
    assert lay_out_fused(tensors, where=lambda d: True, keep={qkv[1]}) == 0
    assert lay_out_fused(tensors, where=lambda d: True) == 1
    assert tensors[qkv[1]].untyped_storage().data_ptr() == tensors[qkv[0]].untyped_storage().data_ptr()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_fused_packed_blocks_match_the_gguf_package(model_dir, tmp_path, qtype):
    _, hf = model_dir("llama", intermediate_size=256, hidden_size=256)  # whole 256-value blocks for Q4_K
    path = tmp_path / "m.gguf"
    write_gguf(hf, path, qtype=qtype)
    fused = cf.load(str(path), fuse_projections=True)
    reference = cf.load(str(path), dequantize=True)  # the gguf package's dequantization, float products
    print(f"{qtype}: {fused.fused_products()}")
    assert fused.fused_products() == {"qkv": N, "gate_up": N}
    ids = tokens(2, 16, seed=4)
    assert relative(f"{qtype} fused packed vs dequantized", fused.logits(ids, layers=RYS),
                    reference.logits(ids, layers=RYS)) < 1e-4


def test_a_fused_model_exports_its_tensors_unchanged(model_dir, tmp_path):
    folder, _ = model_dir("qwen2")
    fused = cf.load(folder, fuse_projections=True)
    assert fused.fused_products()["qkv"] == N
    cf.export.export_hf(fused, tmp_path / "out", layers=None)
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as a, \
            safe_open(str(next((tmp_path / "out").glob("*.safetensors"))), "pt") as b:
        assert set(a.keys()) <= set(b.keys())
        for name in a.keys():
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name


def test_fused_biases_stay_the_models_own_tensors(model_dir):
    """The biases of a fused group are laid out in sequence too, so the engine runs views of them,
    not copies: writing model.tensors' q_proj.bias / gate_proj.bias changes the logits (the Model's
    contract: its tensors are the engine's own)."""
    folder, _ = model_dir("llama", attention_bias=True, mlp_bias=True)
    model = cf.load(folder, fuse_projections=True)
    t = model.tensors
    q, k = t["model.layers.1.self_attn.q_proj.bias"], t["model.layers.1.self_attn.k_proj.bias"]
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    ids = tokens(1, 10, seed=7)
    before = model.logits(ids)
    for name in ("model.layers.1.self_attn.q_proj.bias", "model.layers.2.mlp.gate_proj.bias"):
        with torch.no_grad():
            t[name].add_(0.5)
        after = model.logits(ids)
        print(f"{name} += 0.5: logits move by {(after - before).abs().max().item():.3e}")
        assert (after - before).abs().max() > 1e-3
        before = after


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3_text"])
def test_additive_masks_match_transformers(model_dir, arch, monkeypatch):
    """The additive masks a GPU's SDPA gets (0 / -inf, made once per call), forced on the CPU by
    CF_ADDITIVE_MASKS: padded, sliding-window and cached decode equal transformers'."""
    monkeypatch.setenv("CF_ADDITIVE_MASKS", "1")
    folder, hf = model_dir(arch)
    model = cf.load(folder)
    ids, mask = tokens(2, 20, seed=5), torch.ones(2, 20, dtype=torch.long)
    ids[1, :5], mask[1, :5] = 0, 0
    with torch.no_grad():
        ref = rebuilt(hf, list(RYS))(ids, attention_mask=mask).logits
    out = model.logits(ids, layers=RYS, attention_mask=mask)
    assert relative(f"{arch} additive masks, padded rys", out[mask.bool()], ref[mask.bool()]) < 1e-4
    with torch.no_grad():
        want = rebuilt(hf, list(RYS)).generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                                               do_sample=False, pad_token_id=0)[:, 20:]
    assert torch.equal(model.generate(ids, layers=RYS, attention_mask=mask, max_new_tokens=8, min_new_tokens=8), want)
