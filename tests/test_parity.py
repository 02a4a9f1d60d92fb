"""Parity with Hugging Face transformers (the reference) on tiny random models of every
supported architecture: identity and repeated paths, decode, padding, generation, dtypes; YaRN
with an explicit factor, Qwen2's per-layer sliding windows. That the engine runs the mmapped
weights without copies is checked in test_zero_copy.py."""

from __future__ import annotations

import json

import pytest
import torch

import circuit_finder as cf
from circuit_finder import LayerPath
from helpers import build_hf_model, rebuilt, report, tokens

N = 6  # layers in the test models
PATHS = {
    "rys": LayerPath.duplicate(N, 2, 4),
    "triple": LayerPath.duplicate(N, 1, 3, times=3),
    "repeat3": LayerPath.parse("0..2,3,3,3,4..5"),
    "skip": LayerPath.parse("0,1,3,5"),
    "reorder": LayerPath.parse("0,2,1,3..5"),
}


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
        if "full_attention" in params:  # Gemma 3: one entry per layer type -> rope_theta + rope_local_base_freq
            config["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
            params = params["full_attention"]
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
    cache = engine.new_cache(path, 2, 32)
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


def test_padded_prompts_without_a_mask_are_read_as_transformers_reads_them(model_dir):
    """Left-padded token prompts given without attention_mask: the pad ids are padding (the pad id
    is no EOS here), as transformers' generate infers; the same as with the mask."""
    folder, hf = model_dir("llama")
    model = cf.load(folder)
    ids = tokens(2, 7, seed=5)
    ids[0, :3] = 0  # the pad id
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    ours = model.generate(ids, max_new_tokens=10, min_new_tokens=10)
    print("ours", ours[0].tolist(), "transformers", ref[0].tolist())
    assert torch.equal(ours, ref)
    assert torch.equal(ours, model.generate(ids, attention_mask=(ids != 0).long(), max_new_tokens=10, min_new_tokens=10))


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


def test_overflowed_rows_stop_with_a_warning(tmp_path):
    """A row whose forward gives NaN logits (here a NaN embedding for token 5, as a float16 overflow
    would) stops at that step, padded, with a warning naming it, greedy or sampled; the other rows
    generate what they generate alone. transformers confirms that row's logits are NaN."""
    hf = build_hf_model("llama", tmp_path, tie_word_embeddings=False)  # (tied, the head's row 5 is NaN for all)
    with torch.no_grad():
        hf.model.embed_tokens.weight[5] = float("nan")
    hf.save_pretrained(str(tmp_path))
    model = cf.load(tmp_path)
    ids = torch.tensor([[7, 8, 9, 10], [7, 5, 9, 10]])
    with torch.no_grad():
        print("transformers last logits NaN per row:", hf(ids).logits[:, -1].isnan().any(-1).tolist())
        assert hf(ids).logits[:, -1].isnan().any(-1).tolist() == [False, True]
    alone = model.generate(ids[:1], max_new_tokens=6, min_new_tokens=6)
    for sampled in ({}, {"temperature": 1.0, "seed": 3}):
        with pytest.warns(UserWarning, match=r"row\(s\) \[1\] of 2 got NaN or \+inf logits"):
            out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, **sampled)
        print(sampled, out.tolist())
        assert out[1].tolist() == [model.codec.pad_id] * 6
        if not sampled:
            assert torch.equal(out[:1], alone)


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


# ----------------------------------------------------------------------------- YaRN
# transformers (_compute_yarn_parameters) uses rope_parameters["factor"] when given, and
# max_position_embeddings / original_max_position_embeddings only when factor is None; the factor
# also sets the attention scale 0.1 * ln(factor) + 1. These configs make the two rules disagree
# (512 / 128 = 4 but factor 8; 512 / 64 = 8 but factor 2), the second with non-default betas and
# truncate=False as well.
YARN = {
    "factor8": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128},
    "factor2-betas": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "beta_fast": 16.0,
                      "beta_slow": 2.0, "truncate": False},
}


@pytest.fixture(scope="module", params=sorted(YARN))
def yarn_model(request, tmp_path_factory):
    """(folder, transformers model, transformers model with the ratio rule instead of the factor)."""
    rope = dict(YARN[request.param])
    folder = tmp_path_factory.mktemp(f"yarn-{request.param}")
    hf = build_hf_model("qwen2", folder, max_position_embeddings=512, rope_scaling=rope)
    ratio = dict(rope, factor=512 / rope["original_max_position_embeddings"])
    other = build_hf_model("qwen2", tmp_path_factory.mktemp("yarn-ratio"), max_position_embeddings=512,
                           rope_scaling=ratio)  # same seed: same weights, other factor
    return request.param, folder, hf, other


@pytest.mark.parametrize("name", ["identity", "rys", "triple"])
def test_yarn_explicit_factor_matches_transformers(yarn_model, name):
    key, folder, hf, other = yarn_model
    assert hf.config.rope_parameters["factor"] != 512 / hf.config.rope_parameters["original_max_position_embeddings"]
    model = cf.load(folder)
    path = list(range(N)) if name == "identity" else list(PATHS[name])
    ids = tokens(2, 40, seed=6)
    with torch.no_grad():
        ref = rebuilt(hf, path)(ids).logits
        wrong_rule = rebuilt(other, path)(ids).logits
    out = model.logits(ids, layers=path)
    # the other factor rule gives clearly different logits, so this parity can tell the rules apart
    report(f"yarn {key} {name}: transformers factor rule vs ratio rule", wrong_rule, ref)
    assert (wrong_rule - ref).abs().max() > 1e-2
    assert report(f"yarn {key} {name}: ours vs transformers", out, ref) < 1e-4


# ----------------------------------------------------------------------------- Qwen2 sliding windows
# Qwen2Config: with use_sliding_window, layer i slides when i >= max_window_layers (layer_types is
# derived from that when absent). Published Qwen2 configs carry no layer_types; save_pretrained in
# transformers v5 writes them. Both forms are checked.
WINDOW = 8


@pytest.fixture(scope="module", params=["layer_types", "published"])
def qwen2_sliding(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"qwen2-sliding-{request.param}")
    hf = build_hf_model("qwen2", folder, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=3)
    assert hf.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    if request.param == "published":
        config = json.loads((folder / "config.json").read_text())
        del config["layer_types"]
        (folder / "config.json").write_text(json.dumps(config))
    return request.param, folder, hf


@pytest.mark.parametrize("name", ["identity", "rys", "reorder", "repeat3"])
def test_qwen2_sliding_window_layers_match_transformers(qwen2_sliding, name):
    form, folder, hf = qwen2_sliding
    model = cf.load(folder)
    assert model.config.sliding_window == (0, 0, 0, WINDOW, WINDOW, WINDOW)
    path = list(range(N)) if name == "identity" else list(PATHS[name])
    ids = tokens(2, 3 * WINDOW, seed=7)
    with torch.no_grad():
        ref = rebuilt(hf, path)(ids).logits
    out = model.logits(ids, layers=path)
    assert report(f"qwen2 sliding ({form}) {name} {path}", out, ref) < 1e-4
    # past the window, full attention everywhere would differ: the windows are really in play
    config = json.loads((folder / "config.json").read_text())
    config.pop("layer_types", None)
    config["use_sliding_window"] = False
    full = cf.load_from_tensors(config, cf.load_safetensors(str(folder)))
    assert (full.logits(ids, layers=path)[:, WINDOW:] - out[:, WINDOW:]).abs().max() > 1e-3


def test_qwen2_sliding_window_greedy_decode_matches_transformers(qwen2_sliding):
    """Cached decode far past the window (7 + 24 tokens, window 8) along a path that repeats a
    full-attention and a sliding layer."""
    form, folder, hf = qwen2_sliding
    model = cf.load(folder)
    path = PATHS["rys"]
    ids = tokens(2, 7, seed=8)
    ids[1, :2] = 0
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        ref = rebuilt(hf, list(path)).generate(ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24,
                                               do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    ours = model.generate(ids, layers=path, attention_mask=mask, max_new_tokens=24, min_new_tokens=24)
    print(f"qwen2 sliding ({form}) generate: ours {ours[0, :12].tolist()} ref {ref[0, :12].tolist()}")
    assert torch.equal(ours, ref)


def test_qwen2_max_window_layers_default_follows_transformers(tmp_path):
    """use_sliding_window without max_window_layers: Qwen2Config's default (28) decides which layers
    slide. 30 layers, so layers 28 and 29 slide in transformers."""
    from transformers import AutoConfig

    hf = build_hf_model("qwen2", tmp_path, num_hidden_layers=30, hidden_size=32, intermediate_size=48,
                        use_sliding_window=True, sliding_window=WINDOW)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["layer_types"], config["max_window_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference_types = AutoConfig.from_pretrained(str(tmp_path)).layer_types
    print(f"transformers layer_types from the published form: {reference_types[26:]} (layers 26..29)")
    model = cf.load(tmp_path)
    ours = ["sliding_attention" if w else "full_attention" for w in model.config.sliding_window]
    print(f"ours: {ours[26:]} (layers 26..29)")
    assert ours == reference_types
    ids = tokens(1, 3 * WINDOW, seed=9)
    with torch.no_grad():
        ref = hf(ids).logits
    assert report("qwen2 30 layers, default max_window_layers", model.logits(ids), ref) < 1e-4


@pytest.mark.parametrize("every", ["1", "3", "8"])
def test_lazy_finish_checks_give_transformers_tokens_and_length(model_dir, monkeypatch, every):
    """The host may read "has every row finished" only every few steps (CF_SYNC_EVERY; 8 on GPUs):
    the extra steps' pad columns are cut, so rows that end early give transformers' tokens and length."""
    folder, hf = model_dir("llama")
    model = cf.load(folder)
    ids = tokens(3, 6, seed=11)
    free = model.generate(ids, max_new_tokens=30, min_new_tokens=30)
    rows = free.tolist()
    eos = sorted({rows[0][3], rows[1][9], rows[2][14]})  # each row ends at its first EOS of these
    ends = [min(r.index(t) for t in eos if t in r) for r in rows]
    assert len(set(ends)) > 1 and max(ends) < 29  # rows end early, at different steps
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)[:, 6:]
    model.codec.eos_ids = eos
    monkeypatch.setenv("CF_SYNC_EVERY", every)
    ours = model.generate(ids, max_new_tokens=30)
    print(f"every {every}: ours {ours.shape[1]} tokens, transformers {ref.shape[1]}; row 0 {ours[0].tolist()}")
    assert ours.shape[1] == max(ends) + 1
    assert torch.equal(ours, ref)
