"""Parity with Hugging Face transformers (the reference) on tiny random models of every
supported architecture: identity and repeated paths, decode, padding, generation, dtypes."""

from __future__ import annotations

import json

import pytest
import torch

import circuit_finder as cf
from circuit_finder import LayerPath
from helpers import rebuilt

N = 6  # layers in the test models
PATHS = {
    "rys": LayerPath.duplicate(N, 2, 4),
    "triple": LayerPath.duplicate(N, 1, 3, times=3),
    "repeat3": LayerPath.parse("0..2,3,3,3,4..5"),
    "skip": LayerPath.parse("0,1,3,5"),
    "reorder": LayerPath.parse("0,2,1,3..5"),
}


def report(name: str, ours: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (ours.float() - ref.float()).abs()
    print(f"{name}: max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e}, "
          f"ref mean |x| {ref.float().abs().mean().item():.3e}")
    return diff.max().item()


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 160, (batch, length), generator=g)


def test_identity_logits_match_transformers(model_dir, arch):
    folder, hf = model_dir(arch)
    model = cf.load(folder)
    ids = tokens(2, 24)  # longer than mistral's sliding window (12)
    with torch.no_grad():
        ref = hf(ids).logits
    out = model.logits(ids)
    assert out.shape == ref.shape
    assert report(f"{arch} identity", out, ref) < 1e-4


@pytest.mark.parametrize("name", sorted(PATHS))
def test_repeated_paths_match_rebuilt_transformers(model_dir, arch, name):
    folder, hf = model_dir(arch)
    model = cf.load(folder)
    path = PATHS[name]
    ids = tokens(2, 20, seed=1)
    ref_model = rebuilt(hf, list(path))
    with torch.no_grad():
        ref = ref_model(ids).logits
    out = model.logits(ids, layers=path)
    assert report(f"{arch} {name} {path}", out, ref) < 1e-4
    # a different path must really change the output (the test can fail)
    assert (model.logits(ids) - out).abs().max() > 1e-3


def test_path_forms_are_equivalent(model_dir):
    folder, _ = model_dir("llama")
    model = cf.load(folder)
    ids = tokens(1, 8)
    a = model.logits(ids, layers="0..3,2,3,4,5")
    b = model.logits(ids, layers=LayerPath.duplicate(N, 2, 4))
    c = model.logits(ids, layers=[0, 1, 2, 3, 2, 3, 4, 5])
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(model.logits(ids), model.logits(ids, layers=f"0..{N - 1}"))


@pytest.mark.parametrize("layout", ["legacy", "v5"])
def test_rope_config_layouts(model_dir, tmp_path, layout, arch):
    """Top-level rope_theta + rope_scaling (published checkpoints) and v5 rope_parameters agree."""
    folder, hf = model_dir(arch)
    config = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in config  # what save_pretrained writes today
    if layout == "legacy":
        params = config.pop("rope_parameters")
        config["rope_theta"] = params.pop("rope_theta")
        if params.get("rope_type", "default") != "default":
            config["rope_scaling"] = params
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = tokens(1, 30)
    with torch.no_grad():
        ref = hf(ids).logits
    assert report(f"{arch} {layout} rope layout", cf.load(tmp_path).logits(ids), ref) < 1e-4


def test_incremental_decode_equals_full_forward(model_dir, arch):
    folder, _ = model_dir(arch)
    model = cf.load(folder)
    path = list(PATHS["rys"])
    ids = tokens(2, 18, seed=2)
    full = model.logits(ids, layers=path)
    engine = model.engine
    cache = engine.new_cache(len(path), 2, 32)
    pos = torch.arange(18).expand(2, 18).contiguous()
    with torch.inference_mode():
        parts = [engine.forward(ids[:, :10], pos[:, :10], None, path, cache, False)]
        parts.append(engine.forward(ids[:, 10:13], pos[:, 10:13], None, path, cache, False))  # chunk
        for t in range(13, 18):
            parts.append(engine.forward(ids[:, t:t + 1], pos[:, t:t + 1], None, path, cache, False))
    assert cache.length == 18
    assert report(f"{arch} incremental", torch.cat(parts, 1), full) < 1e-4


def test_padded_batch_equals_each_sequence_alone(model_dir, arch):
    folder, _ = model_dir(arch)
    model = cf.load(folder)
    path = PATHS["repeat3"]
    seqs = [tokens(1, n, seed=n)[0] for n in (5, 16, 11)]
    width = 16
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    batched = model.logits(ids, layers=path, attention_mask=mask)
    assert torch.isfinite(batched).all()
    for i, s in enumerate(seqs):
        alone = model.logits(s.unsqueeze(0), layers=path)[0]
        assert report(f"{arch} padded row {i}", batched[i, width - len(s):], alone) < 1e-4


def test_greedy_generate_matches_transformers(model_dir, arch):
    folder, hf = model_dir(arch)
    model = cf.load(folder)
    path = PATHS["rys"]
    ids = tokens(2, 7, seed=3)
    ids[1, :3] = 0
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ref_model = rebuilt(hf, list(path))
    with torch.no_grad():
        ref = ref_model.generate(ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                 pad_token_id=0)[:, ids.shape[1]:]
    ours = model.generate(ids, layers=path, attention_mask=mask, max_new_tokens=32, min_new_tokens=32)
    print(f"{arch}: ours {ours[0, :12].tolist()} ref {ref[0, :12].tolist()}")
    assert ours.shape == (2, 32)
    assert torch.equal(ours, ref)


def test_generate_stops_at_eos_and_pads(model_dir):
    folder, _ = model_dir("llama")
    model = cf.load(folder)
    ids = tokens(3, 5, seed=4)
    free = model.generate(ids, max_new_tokens=40)
    forced = model.generate(ids, max_new_tokens=40, min_new_tokens=40)
    eos = 2
    for row_free, row_forced in zip(free.tolist(), forced.tolist()):
        if eos in row_free:
            k = row_free.index(eos)
            assert all(t == 0 for t in row_free[k + 1:])  # padded after eos
        assert eos not in row_forced


def test_sampling_is_seeded(model_dir):
    folder, _ = model_dir("qwen2")
    model = cf.load(folder)
    ids = tokens(2, 6)
    a = model.generate(ids, max_new_tokens=16, min_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    b = model.generate(ids, max_new_tokens=16, min_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    c = model.generate(ids, max_new_tokens=16, min_new_tokens=16, temperature=1.0, top_p=0.9, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_score_matches_logprobs(model_dir):
    folder, hf = model_dir("qwen3")
    model = cf.load(folder)
    ctx = [[5, 6, 7, 8], [9, 10]]
    cont = [[11, 12], [13, 14, 15]]
    got = model.score(ctx, cont, layers="0..5")
    for c, k, g in zip(ctx, cont, got):
        ids = torch.tensor([c + k])
        with torch.no_grad():
            lp = torch.log_softmax(hf(ids).logits[0].float(), -1)
        ref = sum(lp[len(c) - 1 + i, t].item() for i, t in enumerate(k))
        print(f"score ours {g:.6f} ref {ref:.6f}")
        assert abs(g - ref) < 1e-3


def test_repeated_path_adds_no_weight_memory(model_dir):
    folder, _ = model_dir("llama")
    model = cf.load(folder)
    engine = model.engine
    before = {n: t.data_ptr() for n, t in engine.layer_tensors(3).items()}
    out = model.logits(tokens(1, 4), layers=LayerPath.duplicate(N, 2, 5, times=4))
    assert out.shape[-1] == 160
    after = engine.layer_tensors(3)
    # every slot that runs layer 3 uses the very same storage, and it is the mmapped checkpoint's
    assert {n: t.data_ptr() for n, t in after.items()} == before
    tensors = cf.load_safetensors(str(folder))
    assert after["q_proj"].dtype == tensors["model.layers.3.self_attn.q_proj.weight"].dtype


def test_bfloat16_error_within_twice_transformers(model_dir, arch):
    folder, hf = model_dir(arch)
    ids = tokens(2, 16, seed=5)
    path = PATHS["rys"]
    ref32 = rebuilt(hf, list(path))
    with torch.no_grad():
        exact = ref32(ids).logits.float()
        hf_bf16 = rebuilt(hf, list(path)).to(torch.bfloat16)(ids).logits.float()
    ours = cf.load(folder, dtype="bfloat16").logits(ids, layers=path).float()
    hf_err = (hf_bf16 - exact).abs().mean().item()
    our_err = (ours - exact).abs().mean().item()
    print(f"{arch} bf16: our mean err {our_err:.4e}, transformers bf16 mean err {hf_err:.4e}")
    assert our_err <= 2 * hf_err + 1e-6


def test_float16_load_converts_once(model_dir):
    folder, _ = model_dir("mistral")
    model = cf.load(folder, dtype="float16")
    assert model.dtype == torch.float16
    assert model.logits(tokens(1, 5)).dtype == torch.float16
