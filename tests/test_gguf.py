"""GGUF loading: every supported type against the gguf package's own dequantization, logits of
GGUF files against transformers, and clear errors for bad files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import circuit_finder as cf
from circuit_finder.gguf import SUPPORTED_TYPES, hf_name, unpermute_qk
from helpers import build_hf_model, write_gguf


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A random Llama whose rows are multiples of 256, so every quant type (K-quants too) applies."""
    folder = tmp_path_factory.mktemp("wide")
    return build_hf_model("llama", folder, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          vocab_size=64, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                          rope_scaling=None)


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES)
def test_every_quant_type_matches_package_dequantization(wide_llama, tmp_path, qtype):
    path = tmp_path / f"m-{qtype}.gguf"
    written = write_gguf(wide_llama, path, qtype=qtype)
    model = cf.load(path)
    tensors = dict(model.engine.layer_tensors(1))
    got = {
        "blk.1.attn_q.weight": tensors["q_proj"], "blk.1.attn_k.weight": tensors["k_proj"],
        "blk.1.ffn_down.weight": tensors["down_proj"], "blk.1.ffn_norm.weight": tensors["post_attention_layernorm"],
    }
    heads = {"blk.1.attn_q.weight": 4, "blk.1.attn_k.weight": 2}
    worst = 0.0
    for name, ours in got.items():
        data, kind = written[name]
        ref = gguf.quants.dequantize(data, kind).astype(np.float32)
        if name in heads:
            ref = unpermute_qk(ref, heads[name])
        ref = torch.from_numpy(np.ascontiguousarray(ref))
        assert ours.shape == ref.shape, name
        worst = max(worst, (ours - ref).abs().max().item())
    print(f"{qtype}: max abs diff vs gguf.quants.dequantize {worst:.3e}")
    assert worst == 0.0
    logits = model.logits(torch.tensor([[1, 5, 9, 13]]), layers="0,1,1")
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f32_gguf_logits_match_transformers(tmp_path, arch):
    overrides = {"qwen3": dict(head_dim=16)}.get(arch, {})
    hf = build_hf_model(arch, tmp_path / "hf", rope_scaling=None, **overrides)
    path = tmp_path / "m.gguf"
    write_gguf(hf, path)
    model = cf.load(path)
    assert model.config.architecture == hf.config.architectures[0]
    ids = torch.randint(3, 160, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    out = model.logits(ids)
    diff = (out - ref).abs()
    print(f"{arch} gguf f32: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}")
    assert diff.max().item() < 1e-4


def test_bf16_compute_dtype_from_gguf(wide_llama, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(wide_llama, path, qtype="Q8_0")
    model = cf.load(path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert model.engine.layer_tensors(0)["q_proj"].dtype == torch.bfloat16


def test_truncated_gguf(wide_llama, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(wide_llama, path, qtype="Q4_0")
    data = path.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(cf.GGUFError) as e:
            cf.load(bad)
        print(f"cut at {cut}: {e.value}")
        assert f"cut{cut}.gguf" in str(e.value)


def test_unsupported_quant_type(wide_llama, tmp_path):
    path = tmp_path / "m.gguf"
    arr = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    extra = {"blk.0.attn_q.weight": (gguf.quants.quantize(arr, gguf.GGMLQuantizationType.TQ2_0),
                                     gguf.GGMLQuantizationType.TQ2_0)}
    write_gguf(wide_llama, path, skip={"blk.0.attn_q.weight"}, extra_tensors=extra)
    with pytest.raises(cf.GGUFError, match=r"'blk.0.attn_q.weight' has type TQ2_0.*supported: .*Q4_K"):
        cf.load(path)


def test_unknown_architecture(wide_llama, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(wide_llama, path, arch="gpt2", permute=False)
    with pytest.raises(cf.GGUFError, match="'gpt2' is not supported.*llama, qwen2, qwen3"):
        cf.load(path)


def test_missing_tensor(wide_llama, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(wide_llama, path, skip={"blk.1.ffn_up.weight"})
    with pytest.raises(cf.WeightError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        cf.load(path)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(cf.GGUFError, match="junk.gguf"):
        cf.load(bad)
    with pytest.raises(FileNotFoundError):
        cf.load(tmp_path / "absent.gguf")


def test_name_mapping():
    assert hf_name("blk.12.attn_q_norm.weight") == "model.layers.12.self_attn.q_norm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("rope_freqs.weight") is None
