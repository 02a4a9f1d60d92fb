"""Hybrid linear-attention families (issue #14): Qwen3.5 (dense), Qwen3-Next and Qwen3.5-MoE —
Gated DeltaNet layers between gated full-attention layers — against transformers' torch reference
on tiny random models: identity, RYS and triple-repeat paths over prompts that cross a 64-token
chunk, cached decode (one-token steps and a chunked prefill on top of a state), padded greedy
generation, fixed-shape decode, bf16; every slot of a path owns its conv and recurrent state (a
repeated layer does not overwrite its first instance's), a shared prefix slot is copied, not
aliased; exports along a path load in transformers; the multimodal wrapper's text decoder; bad
input. Printed diffs before each assert."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import circuit_finder as cf
from circuit_finder import LayerPath
from helpers import HYBRID_ARCHS, build_hf_model, half_errors, rebuilt, relative, tokens

N = 6
PATHS = {"identity": LayerPath.identity(N), "rys": LayerPath.duplicate(N, 0, 3),  # linear layers 0, 1 twice
         "triple": LayerPath.duplicate(N, 0, 3, times=3)}


@pytest.fixture(scope="module", params=HYBRID_ARCHS)
def hybrid(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, build_hf_model(request.param, folder)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_hybrid_paths_match_transformers(hybrid, name):
    arch, folder, hf = hybrid
    model = cf.load(folder)
    assert list(model.config.linear_layers) == [1, 1, 0, 1, 1, 0]  # transformers' layer_types
    ids = tokens(2, 70, seed=1)
    with torch.no_grad():
        ref = rebuilt(hf, list(PATHS[name]))(ids).logits
    out = model.logits(ids, layers=PATHS[name])
    assert relative(f"{arch} {name}", out, ref) < 1e-4
    if name != "identity":
        assert (model.logits(ids) - out).abs().max() > 1e-3  # the path changes the output: the test can fail


def test_hybrid_cached_decode_equals_one_pass(hybrid):
    """Prefill 66 tokens (two chunks), a 4-token prefill on top of the states (chunked with an
    initial state), then one-token steps (the recurrent form): the logits of one 75-token pass."""
    arch, folder, _ = hybrid
    model = cf.load(folder)
    path = list(PATHS["triple"])
    ids = tokens(2, 75, seed=2)
    full = model.logits(ids, layers=path)
    cache = model.engine.new_cache(path, 2, 96)
    pos = torch.arange(75).expand(2, 75).contiguous()
    with torch.inference_mode():
        parts = [model.engine.forward(ids[:, :66], pos[:, :66], None, path, cache, False),
                 model.engine.forward(ids[:, 66:70], pos[:, 66:70], None, path, cache, False)]
        parts += [model.engine.forward(ids[:, t:t + 1], pos[:, t:t + 1], None, path, cache, False) for t in range(70, 75)]
    # chunked vs token-by-token forms of the same rule: equal up to fp32 rounding
    assert relative(f"{arch} cached decode", torch.cat(parts, 1), full) < 1e-4


def test_hybrid_padded_generation_matches_transformers(hybrid):
    """Left padding: the padded tokens' inputs are zeroed before the linear layers, as transformers
    does; greedy tokens equal its generate's, and the fixed-shape decode step's equal the dynamic one's."""
    arch, folder, hf = hybrid
    model = cf.load(folder)
    path = list(PATHS["rys"])
    prompt, mask = tokens(2, 9, seed=3), torch.ones(2, 9, dtype=torch.long)
    prompt[1, :4], mask[1, :4] = 0, 0
    with torch.no_grad():
        ref = rebuilt(hf, path).generate(prompt, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
                                         do_sample=False, pad_token_id=0)[:, 9:]
    kw = dict(layers=path, attention_mask=mask, max_new_tokens=10, min_new_tokens=10)
    ours = model.generate(prompt, **kw)
    print(f"{arch} generate: ours {ours.tolist()} ref {ref.tolist()}")
    assert torch.equal(ours, ref)
    alone = model.generate(prompt[1:, 4:], layers=path, max_new_tokens=10, min_new_tokens=10)
    assert torch.equal(ours[1:], alone)  # the padded row decodes as it does unpadded
    model.static_decode = True
    assert torch.equal(model.generate(prompt, **kw), ours)


def test_each_slot_owns_its_linear_state(hybrid):
    """A linear layer run twice has two states (the second instance sees the first's output, so
    they differ), distinct tensors; a cache sharing a prefix gets copies of its linear slots."""
    arch, folder, _ = hybrid
    model = cf.load(folder)
    path = [0, 1, 0, 1, 2, 3, 4, 5]
    cache = model.engine.new_cache(path, 1, 32)
    ids = tokens(1, 12, seed=4)
    with torch.inference_mode():
        model.engine.forward(ids, torch.arange(12).unsqueeze(0), None, path, cache, False)
    (conv0, state0), (conv2, state2) = cache.linear_state(0), cache.linear_state(2)
    assert not torch.equal(conv0, conv2)  # layer 0 saw the embeddings in slot 0, its own output in slot 2
    print(f"{arch} slot 0 vs slot 2 (both layer 0): state diff {(state0 - state2).abs().max().item():.3e}")
    assert state0.data_ptr() != state2.data_ptr() and (state0 - state2).abs().max() > 1e-3
    assert state0.dtype == torch.float32 and conv0.shape == (1, 2 * 2 * 16 + 4 * 24, 4)
    shared = model.engine.new_cache(path, 1, 32, cache, 4)
    assert torch.equal(shared.linear_state(0)[1], state0) and shared.linear_state(0)[1].data_ptr() != state0.data_ptr()
    with pytest.raises(ValueError, match="linear-attention slot"):
        cache.keys(0)


def test_hybrid_bf16_error_within_twice_transformers(hybrid):
    arch, folder, hf = hybrid
    e_ours, e_theirs = half_errors(arch, hf, folder, tokens(2, 40, seed=9), PATHS["rys"])
    assert e_ours <= 2 * e_theirs + 1e-3


def test_hybrid_export_loads_in_transformers(hybrid, tmp_path):
    """layer_types (and Qwen3-Next's dense slots) follow the path, so transformers runs each slot
    with its layer's kind."""
    arch, folder, _ = hybrid
    path = LayerPath.parse("0..2,0,1,3..5")
    out = cf.export_hf(str(folder), tmp_path / "out", path)
    config = json.loads((out / "config.json").read_text())
    print(arch, "exported layer_types:", config["layer_types"])
    assert config["layer_types"] == ["linear_attention", "linear_attention", "full_attention"] + \
        ["linear_attention"] * 2 + ["linear_attention", "linear_attention", "full_attention"]
    from transformers import AutoModelForCausalLM

    ids = tokens(1, 20, seed=5)
    ours = cf.load(folder).logits(ids, layers=path)
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()(ids).logits
    assert relative(f"{arch} export in transformers", theirs, ours) < 1e-4


def test_packed_pattern_is_refused_for_linear_layers(hybrid):
    arch, folder, _ = hybrid
    model = cf.load(folder)
    ids = tokens(1, 6)
    pattern = torch.ones(1, 6, 6, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="linear-attention"):
        model.engine.forward(ids, torch.arange(6).unsqueeze(0), pattern, [0, 1, 2], None, False)
    # the attention-only part of a path takes it
    model.engine.forward(ids, torch.arange(6).unsqueeze(0), pattern, [2, 5], None, False)


def test_hybrid_config_errors_name_the_key(hybrid):
    arch, folder, hf = hybrid
    config = json.loads((folder / "config.json").read_text())
    state = {k: v.detach() for k, v in hf.state_dict().items()}
    with pytest.raises(cf.ConfigError, match="linear_num_value_heads"):
        cf.load_from_tensors(dict(config, linear_num_value_heads=3), state)
    bad = dict(state)
    name = "model.layers.0.linear_attn.conv1d.weight"
    bad[name] = bad[name][:, :, :3]
    with pytest.raises(cf.WeightError, match=f"tensor '{name}': expected shape"):
        cf.load_from_tensors(config, bad)
    without = {k: v for k, v in config.items() if k != "layer_types"}  # full_attention_interval's rule
    interval = cf.load_from_tensors(dict(without, full_attention_interval=3), state).config
    assert list(interval.linear_layers) == [1, 1, 0, 1, 1, 0]


@pytest.mark.parametrize("kind", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_conditional_generation_text_decoder(tmp_path, kind):
    """Qwen3.5 as published: Qwen3_5(Moe)ForConditionalGeneration (model.language_model.*, a vision
    tower, text_config). Its text decoder loads (the tower left out) to the wrapper's text-only
    logits (its multimodal RoPE reduces to the 1-D one for text)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from helpers import ARCH_EXTRA, BASE, randomize

    vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=16, patch_size=4)
    text = dict(BASE, **ARCH_EXTRA[f"{kind}_text"])
    config = AutoConfig.for_model(kind, text_config=text, vision_config=vision, tie_word_embeddings=False)
    torch.manual_seed(0)
    wrapper = AutoModelForImageTextToText.from_config(config).eval()
    randomize(wrapper)
    wrapper.save_pretrained(str(tmp_path))
    model = cf.load(tmp_path)
    names = {"qwen3_5": "Qwen3_5", "qwen3_5_moe": "Qwen3_5Moe"}[kind]
    assert (model.config.architecture, model.config.wrapper) == (f"{names}ForCausalLM",
                                                                 f"{names}ForConditionalGeneration")
    ids = tokens(2, 30, seed=6)
    with torch.no_grad():
        ref = wrapper(input_ids=ids).logits
    assert relative(f"{kind} wrapper text decoder", model.logits(ids), ref) < 1e-4


@pytest.mark.parametrize("arch", HYBRID_ARCHS)
def test_hybrid_gguf_matches_transformers(arch, tmp_path):
    """A GGUF laid out by llama.cpp's converter rules (qwen35 / qwen35moe: value heads tiled, ssm_a
    = -exp(A_log), norms + 1; qwen3next: in_proj_qkvz split into attn_qkv and attn_gate) loads back
    to transformers' logits. For qwen35 files transformers' own GGUF reader is the independent
    check that the test writer's layout is the converter's."""
    from transformers import AutoModelForCausalLM

    from helpers import write_gguf

    sizes = dict(intermediate_size=128)  # rows of 32-value blocks for the Q8_0 file
    if arch != "qwen3_5_text":
        sizes.update(moe_intermediate_size=64, shared_expert_intermediate_size=96)
    hf = build_hf_model(arch, tmp_path / "hf", **sizes)
    vocab = {"tokenizer.ggml.tokens": [f"t{i}" for i in range(hf.config.vocab_size)]}  # transformers sizes from it
    written = write_gguf(hf, tmp_path / "m.gguf", extra_arrays=vocab)
    assert "blk.0.ssm_a" in written and "blk.0.attn_gate.weight" in written
    model = cf.load(tmp_path / "m.gguf")
    assert model.config.architecture == hf.config.architectures[0]
    assert list(model.config.linear_layers) == [1, 1, 0, 1, 1, 0]
    ids = tokens(2, 70, seed=7)
    for name in ("identity", "rys"):
        with torch.no_grad():
            ref = rebuilt(hf, list(PATHS[name]))(ids).logits
        assert relative(f"{arch} gguf {name}", model.logits(ids, layers=PATHS[name]), ref) < 1e-4
    out = cf.export_hf(tmp_path / "m.gguf", tmp_path / "export", PATHS["rys"])  # qwen3next: regrouped projections
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()(ids).logits
    assert relative(f"{arch} gguf exported, in transformers", exported, model.logits(ids, layers=PATHS["rys"])) < 1e-4
    if arch != "qwen3_next":  # transformers has no qwen3next GGUF reader
        try:
            theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
        except ValueError as e:  # older transformers (5.17 on the GPU machine) have no qwen35moe reader
            if "is not supported yet" not in str(e):
                raise
            pytest.skip(f"transformers {transformers.__version__} cannot read this GGUF: {e}")
        with torch.no_grad():
            assert relative(f"{arch} gguf read by transformers", theirs(ids).logits, hf(ids).logits) < 1e-4
    # Q8_0: the error these recurrences amplify is the one the same rounding gives in transformers
    # (every matrix quantized and dequantized by the gguf package in Hugging Face's layout)
    write_gguf(hf, tmp_path / "q8.gguf", "Q8_0", extra_arrays=vocab)
    q8, f32 = cf.load(tmp_path / "q8.gguf").logits(ids), model.logits(ids)
    with torch.no_grad():
        rounded = _q8_roundtrip(hf)(ids).logits
    ours, theirs = [((x - f32).abs().mean() / f32.abs().mean()).item() for x in (q8, rounded)]
    print(f"{arch} q8_0 mean relative error: ours {ours:.3e}, transformers with Q8_0-rounded weights {theirs:.3e}")
    assert ours <= 1.5 * theirs


def _q8_roundtrip(hf):
    import copy

    import gguf

    m = copy.deepcopy(hf)
    kind = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2 and p.shape[-1] % 32 == 0 and "conv1d" not in name and not name.endswith("mlp.gate.weight"):
                rows = p.detach().float().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(rows, kind), kind)))
    return m


def test_qwen35_gguf_with_fused_attention_qkv(tmp_path):
    """A converter run with fused q/k/v writes a full-attention layer's projections as one attn_qkv
    ([query+gate | k | v] rows), the name linear layers use for theirs: the layer's kind decides."""
    import gguf

    from helpers import write_gguf

    hf = build_hf_model("qwen3_5_text", tmp_path / "hf")
    parts = write_gguf(hf, tmp_path / "plain.gguf")
    fused = np.concatenate([parts[f"blk.2.attn_{x}.weight"][0] for x in "qkv"])
    write_gguf(hf, tmp_path / "fused.gguf", skip={f"blk.2.attn_{x}.weight" for x in "qkv"},
               extra_tensors={"blk.2.attn_qkv.weight": (fused, gguf.GGMLQuantizationType.F32)})
    ids = tokens(1, 20, seed=8)
    with torch.no_grad():
        ref = hf(ids).logits
    assert relative("qwen35 fused attention qkv", cf.load(tmp_path / "fused.gguf").logits(ids), ref) < 1e-4


def test_hybrid_gguf_export_pins_each_slots_kind(tmp_path):
    """A GGUF exported along a path that puts full-attention layer 2 first: attention.recurrent_layers
    says each slot's kind (the interval rule would not), so the file loads to the path's logits."""
    from helpers import write_gguf

    hf = build_hf_model("qwen3_5_text", tmp_path / "hf")
    write_gguf(hf, tmp_path / "m.gguf")
    layers = [2, 0, 1, 3, 4, 0, 5]
    exported = cf.load(cf.export_gguf(tmp_path / "m.gguf", tmp_path / "path.gguf", layers))
    assert list(exported.config.linear_layers) == [0, 1, 1, 1, 1, 1, 0]
    ids = tokens(2, 30, seed=9)
    with torch.no_grad():
        ref = rebuilt(hf, layers)(ids).logits
    assert relative("qwen35 gguf exported along a path", exported.logits(ids), ref) < 1e-4


def test_hybrid_through_score_lm_eval_and_server(tmp_path):
    """Qwen3-Next with the default model's tokenizer, along a path repeating linear layers:
    Model.score equals log-probabilities summed from transformers' logits (padded rows of two
    lengths in one batch), the lm-eval adapter returns Model.score's, and the server's greedy
    completion is model.generate's."""
    pytest.importorskip("lm_eval")
    fastapi = pytest.importorskip("fastapi")  # noqa: F841
    from fastapi.testclient import TestClient
    from lm_eval.api.instance import Instance

    from circuit_finder import likelihood
    from circuit_finder.gguf import gguf_tokenizer
    from circuit_finder.lm_eval import CircuitFinderLM
    from circuit_finder.server import create_app

    try:
        tokenizer = gguf_tokenizer(cf.default_model_path())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    hf = build_hf_model("qwen3_next", tmp_path, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tokenizer.save_pretrained(str(tmp_path))
    model, path = cf.load(tmp_path), [0, 1, 2, 0, 1, 2, 3, 4, 5]
    pairs = [("The sky is", " blue"), ("Two plus two is, as everyone knows,", " four")]
    ours = model.score([c for c, _ in pairs], [x for _, x in pairs], layers=path)
    ref_model = rebuilt(hf, path)
    for (ctx, cont), got in zip(pairs, ours):
        c, x = likelihood.encode_pair(model.codec, ctx, cont)
        with torch.no_grad():
            logits = ref_model(torch.tensor([c + x[:-1]])).logits[0, len(c) - 1:].log_softmax(-1)
        want = logits.gather(-1, torch.tensor(x).unsqueeze(-1)).sum().item()
        print(f"score {ctx!r}: ours {got:.5f} transformers {want:.5f}")
        assert abs(got - want) < 1e-3
    lm = CircuitFinderLM.create_from_arg_string(f"pretrained={tmp_path},layers=rys=0:3", {"batch_size": 2})
    assert list(lm.path) == path
    results = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    assert [r[0] for r in results] == pytest.approx(ours, abs=1e-4)
    with TestClient(create_app(model, layers=path, model_name="tiny", batch_window_ms=0)) as http:
        r = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == model.generate("Once upon a time", layers=path, max_new_tokens=8)[0]


def test_interval_only_config_exports_layer_types(hybrid, tmp_path):
    """A published-style config that names only full_attention_interval: an export along a path that
    moves full-attention layer 2 first writes layer_types, so each slot keeps its layer's kind."""
    arch, folder, hf = hybrid
    src = tmp_path / "src"
    src.mkdir()
    config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != "layer_types"}
    (src / "config.json").write_text(json.dumps(dict(config, full_attention_interval=3)))
    (src / "model.safetensors").symlink_to(folder / "model.safetensors")
    layers = [2, 0, 1, 3, 4, 5]
    out = cf.export_hf(str(src), tmp_path / "out", layers)
    assert json.loads((out / "config.json").read_text())["layer_types"][:3] == \
        ["full_attention", "linear_attention", "linear_attention"]
    ids = tokens(1, 12, seed=10)
    assert relative(f"{arch} interval-only export", cf.load(out).logits(ids), cf.load(src).logits(ids, layers=layers)) < 1e-6


def test_gguf_multi_token_prediction_block_is_left_out(tmp_path):
    """A qwen35 file whose block_count includes a multi-token-prediction block (nextn_predict_layers):
    the decoder has the other layers, and a path exported as GGUF drops the block."""
    import gguf

    from helpers import write_gguf

    hf = build_hf_model("qwen3_5_text", tmp_path / "hf")
    f32 = gguf.GGMLQuantizationType.F32
    mtp = {"blk.6.attn_norm.weight": (np.ones(64, np.float32), f32),
           "blk.6.nextn.eh_proj.weight": (np.zeros((64, 128), np.float32), f32)}
    write_gguf(hf, tmp_path / "m.gguf", extra_tensors=mtp, block_count=7, extra_uints={"qwen35.nextn_predict_layers": 1})
    model = cf.load(tmp_path / "m.gguf")
    from circuit_finder.export import source_num_layers

    assert model.num_layers == 6 and source_num_layers(tmp_path / "m.gguf") == 6
    ids = tokens(1, 12, seed=11)
    with torch.no_grad():
        ref = hf(ids).logits
    assert relative("qwen35 with an MTP block", model.logits(ids), ref) < 1e-4
    exported = cf.load(cf.export_gguf(tmp_path / "m.gguf", tmp_path / "path.gguf", "0..5"))
    assert exported.num_layers == 6 and relative("qwen35 MTP file exported", exported.logits(ids), ref) < 1e-4


def test_cache_of_another_kind_is_refused(hybrid):
    arch, folder, _ = hybrid
    model = cf.load(folder)
    cache = model.engine.new_cache([2, 2, 2], 1, 8)  # attention slots
    with pytest.raises(ValueError, match="slot 0 holds keys and values but layer 0 is a linear-attention layer"):
        model.engine.forward(tokens(1, 4), torch.arange(4).unsqueeze(0), None, [0, 1, 2], cache, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hybrid_on_cuda_matches_transformers_and_graph_decode(hybrid):
    """On the GPU: logits against transformers, and the fixed-shape decode (a CUDA graph for the
    dense Qwen3.5; MoE reads its routing on the host) gives the dynamic decode's tokens."""
    arch, folder, hf = hybrid
    model = cf.load(folder, device="cuda")
    ids = tokens(2, 70, seed=12)
    with torch.no_grad():
        ref = rebuilt(hf, list(PATHS["rys"]))(ids).logits
    assert relative(f"{arch} cuda", model.logits(ids.cuda(), layers=PATHS["rys"]).cpu(), ref) < 1e-3
    kw = dict(layers=PATHS["rys"], max_new_tokens=12, min_new_tokens=12)
    model.static_decode = False
    dynamic = model.generate(ids[:, :20].cuda(), **kw)
    model.static_decode = True
    assert torch.equal(model.generate(ids[:, :20].cuda(), **kw), dynamic)
