"""benchmarks/run.py keeps working: its quick mode runs every section in seconds and writes the
JSON and markdown a full run writes (figures are not asserted: speed is measured, not tested)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_quick_run(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run as bench
    finally:
        sys.path.pop(0)
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    files = sorted(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".json", ".md"]
    res = json.loads(files[0].read_text())
    assert {"date", "machine", "torch", "device", "dtype"} <= set(res["meta"])
    assert len(res["forward"]) == 2
    for f in res["forward"]:
        assert f["same_greedy_tokens"]
        assert f["prefill_tok_s"]["circuit_finder"] > 0 and f["decode_tok_s"]["transformers"] > 0
    assert "decode_roofline" in res["forward"][0]
    sweep = res["sweep"]
    assert sweep["identical_scores"] and sweep["scores_compared"] == sweep["configs"]
    md = files[1].read_text()
    assert "| sweep |" in md and "decode tok/s" in md


def quick_run(module: str, tmp_path, *args) -> dict:
    """benchmarks/<module>.py's main in --quick mode, writing into tmp_path; its one JSON file."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        bench = importlib.import_module(module)
    finally:
        sys.path.pop(0)
    assert bench.main(["--quick", *args, "--out", str(tmp_path)]) == 0
    return json.loads(next(tmp_path.iterdir()).read_text())


def test_products_benchmark_quick_run(tmp_path):
    """Every route of every product measured (a rate > 0), with the ISA it ran on in the name."""
    from circuit_finder import _C

    res = quick_run("bench_products", tmp_path)
    assert [(r["type"], r["rows"]) for r in res["products"]] == [("Q4_K", 1), ("Q4_K", 17), ("Q4_1", 1), ("Q4_1", 17)]
    isas = [isa for isa in ("avx2", "avx512") if _C.cpu_isa().removesuffix("-novnni") in (isa, "avx512")]
    routes = [f"{isa}{route}" for isa in isas
              for route in (" packed", " packed q8", "-novnni packed q8", " dequantized")]
    assert all(list(r["g_weights_s"]) == [*routes, "aten dequantized"] for r in res["products"])
    assert all(rate > 0 for r in res["products"] for rate in r["g_weights_s"].values())


@pytest.mark.slow
def test_placement_benchmark_quick_run(tmp_path):
    res = quick_run("bench_placement", tmp_path, "--device", "cpu")
    assert {"date", "torch", "device_name"} <= set(res["meta"]) and len(res["rows"]) == 2
    assert res["rows"][1]["max_logit_diff_vs_one_device"] == 0.0  # two groups on the CPU: the very same numbers


@pytest.mark.slow
def test_moe_benchmark_quick_run(tmp_path):
    res = quick_run("bench_moe", tmp_path)
    assert [r["model"] for r in res["rows"]] == ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "qwen3_5_text",
                                                 "qwen3_next", "qwen3_5_moe_text"]
    assert all(r["same_greedy_tokens"] and r["decode_tok_s"]["circuit_finder"] > 0 for r in res["rows"])


@pytest.mark.slow
def test_quant_gpu_benchmark_quick_run(tmp_path):
    """The GPU packed-weights benchmark's script, on the CPU: packed and dequantized routes over the
    same random Q4_K blocks, each against transformers on the decoded weights."""
    res = quick_run("bench_quant_gpu", tmp_path)
    assert [r["route"] for r in res["rows"]] == ["packed", "dequantized"]
    packed, dense = res["rows"]
    assert packed["weight_GB"] < dense["weight_GB"] / 2  # the blocks, not floats
    assert all(r["decode_tok_s"]["circuit_finder"] > 0 and "decode_roofline" in r for r in res["rows"])


@pytest.mark.slow
def test_quantize_benchmark_quick_run(tmp_path):
    """Quantize-on-load rates: ours beside the gguf package's per matrix, and whole loads."""
    res = quick_run("bench_quantize", tmp_path)
    # the tiny shape's down_proj has 688 columns: not whole blocks, so it is left out
    assert {(r["matrix"], r["type"]) for r in res["matrices"]} == {(m, t) for m in ("q/o", "gate/up")
                                                                    for t in ("Q8_0", "Q4_K")}
    assert all(("gguf_package_M_weights_s" in r) == (r["type"] == "Q8_0") for r in res["matrices"])
    assert [r["quantize"] for r in res["loads"]] == [None, "Q8_0", "Q4_K", "Q4_K_M"]
    plain, q8, q4, q4_k_m = (r["weight_GB"] for r in res["loads"])
    assert q4 < q4_k_m < q8 < plain  # the loads did quantize; the mix's Q6_K head and more-bits layers


def test_random_q4_k_m_file_loads_with_llama_cpp_type_mix(tmp_path, monkeypatch):
    """bench_quant's random GGUF of a shape: llama.cpp's Q4_K_M type per tensor (Q6_K for the head
    and, in the layers its rule picks, attn_v / ffn_down), the default model's tokenizer, and a model
    that loads packed and runs (finite logits)."""
    import gguf
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # bench_quant imports its neighbours
    from bench_quant import q4_k_m_type, write_random_gguf

    import circuit_finder as cf

    # llama.cpp's use_more_bits over 32 layers: the first and last four, then every third from 6
    picked = [i for i in range(32) if q4_k_m_type(f"blk.{i}.ffn_down.weight", 32) == "Q6_K"]
    assert picked == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    path = write_random_gguf(tmp_path / "r.gguf", hidden=256, ffn=512, layers=8, heads=4, kv_heads=2)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds["output.weight"] == "Q6_K" and kinds["token_embd.weight"] == "Q4_K"
    assert kinds["blk.0.attn_v.weight"] == "Q6_K" and kinds["blk.1.attn_v.weight"] == "Q4_K"
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    model = cf.load(path)
    assert model.config.num_layers == 8 and len(model.tokenizer) == 49152
    logits = model.logits(model.tokenizer("The capital of France is", return_tensors="pt").input_ids)
    print("random Q4_K_M logits std", float(logits.std()))
    assert torch.isfinite(logits).all() and logits.shape[-1] == 49152


def test_q8_agreement_teacher_forces_decode_steps(monkeypatch):
    """bench_quant's top-1 agreement: its step-by-step decode logits are the full forward's (an
    independent route: one pass over the whole sequence), and the agreement it reports is a fraction
    of the steps it ran."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from bench_quant import decode_logits, q8_agreement

    import circuit_finder as cf
    from circuit_finder import _C

    model = cf.load("default")
    ids = torch.randint(100, 20000, (2, 12), generator=torch.Generator().manual_seed(0))
    steps, full = decode_logits(model, ids, 8), model.logits(ids)[:, 7:-1].float()
    rel = float((steps - full).abs().max() / full.abs().max())
    print("decode steps vs one forward: relative max diff", rel)
    assert steps.shape == full.shape and rel < 1e-4
    res = q8_agreement(items=2, steps=4)
    print(res)
    assert res["steps"] == 8 and 0 <= res["top1_agreement"] <= 1
    assert res["max_logit_diff_rel"] > 0 or not _C.cpu_q8_activations()  # q8 ran where this CPU has it
