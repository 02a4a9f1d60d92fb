"""Architectures beyond Llama/Mistral/Qwen: what the generic parity tests (test_parity.py, run for
every family in helpers.ARCHS) cannot show. GGUF files per family written the way llama.cpp's
converter lays them out; the config layouts published checkpoints carry; Phi-3's LongRoPE switch
past the original context; the multimodal wrappers' text decoders in both weight layouts; Gemma
GGUF exports keeping each slot's attention kind; sweeps with prefix reuse on every family, the
mixture-of-experts ones (helpers.MOE_ARCHS; their parity tests are test_moe.py) included.
transformers is the reference throughout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import circuit_finder as cf
from circuit_finder import LayerPath
from circuit_finder.probes import get_probe
from helpers import (
    HYBRID_ARCHS,
    MOE_ARCHS,
    build_hf_model,
    make_config,
    randomize,
    rebuilt,
    report,
    tokens,
    write_gguf,
)

N = 6
PATHS = {"identity": list(range(N)), "rys": list(LayerPath.duplicate(N, 2, 4)),
         "triple": list(LayerPath.duplicate(N, 1, 3, times=3))}
FAMILIES = ["phi3", "gemma2", "gemma3_text", "ministral3"]


def greedy(hf, ids, new: int) -> torch.Tensor:
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)[:, ids.shape[1]:]


# ----------------------------------------------------------------------------- GGUF per family
# A converter-written Gemma file carries no query_pre_attn_scalar (llama.cpp uses the head size
# below the 27B layer counts) and no sliding pattern (every 6th Gemma 3 layer is full): the test
# models follow those conventions, as the published checkpoints do.
GGUF_OVERRIDES = {"gemma2": dict(query_pre_attn_scalar=16), "gemma3_text": dict(query_pre_attn_scalar=24, layer_types=None)}


@pytest.fixture(scope="module", params=FAMILIES)
def gguf_family(request, tmp_path_factory):
    arch = request.param
    folder = tmp_path_factory.mktemp(f"gguf-{arch}")
    hf = build_hf_model(arch, folder / "hf", **GGUF_OVERRIDES.get(arch, {}))
    write_gguf(hf, folder / "m.gguf")
    return arch, folder / "m.gguf", hf


@pytest.mark.parametrize("name", sorted(PATHS))
def test_gguf_family_matches_transformers(gguf_family, name):
    arch, path, hf = gguf_family
    model = cf.load(path)
    assert model.config.architecture == hf.config.architectures[0]
    ids = tokens(2, 24, seed=1)
    with torch.no_grad():
        ref = rebuilt(hf, PATHS[name])(ids).logits
    assert report(f"{arch} gguf {name}", model.logits(ids, layers=PATHS[name]), ref) < 1e-4 * ref.abs().max()


def test_gguf_family_greedy_decode_matches_transformers(gguf_family):
    arch, path, hf = gguf_family
    ids = tokens(2, 9, seed=2)
    ref = greedy(rebuilt(hf, PATHS["rys"]), ids, 20)
    ours = cf.load(path).generate(ids, layers=PATHS["rys"], max_new_tokens=20, min_new_tokens=20)
    print(f"{arch} gguf generate: ours {ours[0, :10].tolist()} ref {ref[0, :10].tolist()}")
    assert torch.equal(ours, ref)


def test_gguf_family_tensors_return_to_hugging_face_layout(gguf_family):
    """Gemma's +1 norms and the fused Phi-3 / permuted mistral3 tensors come back as transformers'."""
    from circuit_finder.gguf import read_gguf

    arch, path, hf = gguf_family
    _, tensors = read_gguf(path)
    state = {k: v for k, v in hf.state_dict().items() if k in tensors}
    assert len(state) == len(tensors) and len(state) >= len(hf.state_dict()) - 1  # all but a tied lm_head
    worst = max((tensors[k] - v).abs().max().item() for k, v in state.items())
    print(f"{arch}: largest tensor difference after the round trip {worst:.3e}")
    assert worst < 1e-6


def test_gguf_export_along_a_path_matches_transformers(gguf_family, tmp_path):
    """Block bytes copied along a path. For Gemma the path moves sliding layers into full-attention
    positions: the exported file names each slot's kind (and the query scale), so it still loads
    to the path's logits."""
    arch, path, hf = gguf_family
    layers = [5, 0, 1, 2, 3, 4, 4]  # layer 5 (full) first; sliding layers where full ones were
    dst = cf.export_gguf(path, tmp_path / "path.gguf", layers)
    ids = tokens(2, 24, seed=3)
    with torch.no_grad():
        ref = rebuilt(hf, layers)(ids).logits
    assert report(f"{arch} exported gguf along {layers}", cf.load(dst).logits(ids), ref) < 1e-4 * ref.abs().max()


# ----------------------------------------------------------------------------- published config layouts
def _copy_with_config(folder, dst, edit) -> None:
    shutil.copytree(folder, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))


def _gemma2_published(c):  # transformers 4.x: no layer_types, top-level rope_theta, both activation keys
    del c["layer_types"]
    c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
    c["hidden_act"] = c["hidden_activation"]


def _gemma3_published(c):  # gemma-3-1b/4b style: rope_local_base_freq, rope_scaling, a pattern
    del c["layer_types"]
    rope = c.pop("rope_parameters")
    c["rope_theta"], c["rope_local_base_freq"] = rope["full_attention"]["rope_theta"], rope["sliding_attention"]["rope_theta"]
    c["rope_scaling"] = {"rope_type": "linear", "factor": rope["full_attention"]["factor"]}
    c["sliding_window_pattern"] = 3


def _phi3_published(c):  # phi-3.5 style: rope_scaling {type: longrope}, top-level rope_theta
    rope = c.pop("rope_parameters")
    c["rope_theta"], c["partial_rotary_factor"] = rope["rope_theta"], rope["partial_rotary_factor"]
    c["rope_scaling"] = {"type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}


PUBLISHED = {"gemma2": _gemma2_published, "gemma3_text": _gemma3_published, "phi3": _phi3_published}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_published_config_layouts_match_transformers_reading_them(model_dir, tmp_path, arch):
    """transformers reads the edited config.json itself (its own defaults and conversions) and is
    the reference for the same weights."""
    from transformers import AutoModelForCausalLM

    folder, _ = model_dir(arch)
    _copy_with_config(folder, tmp_path / "m", PUBLISHED[arch])
    ref_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    ids = tokens(2, 24, seed=4)
    model = cf.load(tmp_path / "m")
    for name in ("identity", "rys"):
        with torch.no_grad():
            ref = rebuilt(ref_model, PATHS[name])(ids).logits
        assert report(f"{arch} published layout {name}", model.logits(ids, layers=PATHS[name]), ref) < 1e-4


# ----------------------------------------------------------------------------- Phi-3 LongRoPE
def test_longrope_switches_to_long_factors_past_the_original_context(model_dir):
    """original_max_position_embeddings is 64: an 80-token call runs every position on the long
    factors (transformers' rule: max position + 1 > 64), a 40-token call on the short ones."""
    folder, hf = model_dir("phi3")
    model = cf.load(folder)
    ids = tokens(2, 80, seed=5)
    for name in ("identity", "triple"):
        with torch.no_grad():
            ref = rebuilt(hf, PATHS[name])(ids).logits
        assert report(f"phi3 longrope 80 tokens {name}", model.logits(ids, layers=PATHS[name]), ref) < 1e-4
    short = model.logits(ids[:, :40])
    assert (short - model.logits(ids)[:, :40]).abs().max() > 1e-3  # the same positions, other factors


def test_longrope_cached_decode_below_the_switch_matches_transformers(model_dir):
    folder, hf = model_dir("phi3")
    ids = tokens(2, 20, seed=6)
    ref = greedy(rebuilt(hf, PATHS["triple"]), ids, 40)  # 60 positions: all on the short factors
    ours = cf.load(folder).generate(ids, layers=PATHS["triple"], max_new_tokens=40, min_new_tokens=40)
    assert torch.equal(ours, ref)


# ----------------------------------------------------------------------------- multimodal wrappers
def _tiny_wrapper(kind: str, folder):
    """A tiny Gemma3ForConditionalGeneration or Mistral3ForConditionalGeneration (text decoder as in
    helpers, a one-layer vision tower), random weights, saved with save_pretrained."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralVisionConfig,
        SiglipVisionConfig,
    )

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    if kind == "gemma3":
        text = make_config("gemma3_text", final_logit_softcapping=2.0)  # the wrapper must not apply it
        config = Gemma3Config(text_config=text.to_dict(), mm_tokens_per_image=4, image_token_index=159,
                              boi_token_index=157, eoi_token_index=158,
                              vision_config=SiglipVisionConfig(**vision, image_size=32, patch_size=8).to_dict())
        cls, attn = Gemma3ForConditionalGeneration, "eager"
    else:
        text = make_config("ministral3" if kind == "ministral3" else "mistral",
                           **({} if kind == "ministral3" else {"sliding_window": None}))
        config = Mistral3Config(text_config=text.to_dict(), image_token_index=10, tie_word_embeddings=False,
                                vision_config=PixtralVisionConfig(**vision, head_dim=16, image_size=64,
                                                                  patch_size=8).to_dict())
        cls, attn = Mistral3ForConditionalGeneration, "sdpa"
    torch.manual_seed(0)
    model = cls._from_config(config, dtype=torch.float32, attn_implementation=attn)
    randomize(model)
    model.eval()
    model.save_pretrained(str(folder))
    return model


def _renamed(folder, dst, rename, extra: dict | None = None) -> None:
    """A copy of a one-file checkpoint with every tensor name passed through ``rename`` (and ``extra``
    tensors added)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dst)
    tensors = {rename(k): v for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file({**tensors, **(extra or {})}, str(dst / "model.safetensors"), metadata={"format": "pt"})


def _v5_name(k: str) -> str:
    """A saved wrapper's name as transformers v5 holds it in memory (model.language_model.*, lm_head)."""
    if k.startswith("language_model.model."):
        return "model.language_model." + k[len("language_model.model."):]
    return k[len("language_model."):] if k.startswith("language_model.lm_head.") else "model." + k


def _doubled_name(k: str) -> str:
    """v5 names with the doubled ``.model`` transformers 5.10-5.23 saved (model.language_model.model.*)."""
    k = _v5_name(k)
    return k.replace("model.language_model.", "model.language_model.model.", 1)


@pytest.mark.parametrize("layout", ["saved", "v5-names", "doubled"])
@pytest.mark.parametrize("kind", ["gemma3", "ministral3", "mistral"])
def test_multimodal_text_decoder_matches_transformers(tmp_path, kind, layout):
    hf = _tiny_wrapper(kind, tmp_path / "saved")
    folder = tmp_path / "saved"
    names = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"] \
        if (folder / "model.safetensors.index.json").exists() else None
    ids = tokens(2, 24, seed=7)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    if layout != "saved":
        assert names is None
        folder = tmp_path / layout
        _renamed(tmp_path / "saved", folder, _v5_name if layout == "v5-names" else _doubled_name)
        with torch.no_grad():  # a layout transformers reads to the same model
            again = type(hf).from_pretrained(str(folder), dtype=torch.float32).eval()(input_ids=ids).logits
        assert report(f"transformers reading {layout}", again, ref) < 1e-4  # gemma3: its default attention
    model = cf.load(folder)
    assert model.config.wrapper == type(hf).__name__
    assert report(f"{kind} wrapper ({layout}) identity", model.logits(ids), ref) < 1e-4
    with torch.no_grad():
        ref = rebuilt(hf, PATHS["rys"])(input_ids=ids).logits
    assert report(f"{kind} wrapper ({layout}) rys", model.logits(ids, layers=PATHS["rys"]), ref) < 1e-4


@pytest.mark.parametrize("arch, layout", [("qwen3_5_text", "wrapper-names"), ("qwen3", "bare"), ("llama", "bare")])
def test_causal_lm_names_transformers_reads(tmp_path, arch, layout):
    """Causal-LM checkpoints whose tensor names are not ``model.*``, as published: a Qwen3.5 text
    fine-tune saves its wrapper's names (model.language_model.*, beside model.visual.* and mtp.*
    that transformers ignores); a base model's save has no ``model.`` prefix (Qwen3-Embedding's).
    transformers reads each to the same model, and so do we."""
    from transformers import AutoModelForCausalLM

    hf = build_hf_model(arch, tmp_path / "saved")
    def rename(k: str) -> str:
        if k.startswith("lm_head."):
            return k
        return k.removeprefix("model.") if layout == "bare" else k.replace("model.", "model.language_model.", 1)

    extra = {} if layout == "bare" else {"model.visual.patch_embed.weight": torch.ones(4, 4),
                                         "mtp.fc.weight": torch.ones(4, 4)}
    _renamed(tmp_path / "saved", tmp_path / layout, rename, extra)
    ids = tokens(2, 24, seed=9)
    with torch.no_grad():
        ref = hf(ids).logits
        again = AutoModelForCausalLM.from_pretrained(str(tmp_path / layout), dtype=torch.float32).eval()(ids).logits
    assert report(f"transformers reading {arch} {layout}", again, ref) < 1e-4
    model = cf.load(tmp_path / layout)
    assert report(f"{arch} {layout} identity", model.logits(ids), ref) < 1e-4
    with torch.no_grad():
        ref = rebuilt(hf, PATHS["rys"])(ids).logits
    assert report(f"{arch} {layout} rys", model.logits(ids, layers=PATHS["rys"]), ref) < 1e-4
    cf.export_hf(tmp_path / layout, tmp_path / "export", PATHS["rys"])  # each slot's layer under the same names
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.float32).eval()(ids).logits
    assert report(f"{arch} {layout} exported along rys, in transformers", exported, ref) < 1e-4


def test_export_refuses_layers_it_cannot_find(tmp_path):
    """A folder whose layer tensors have names the exporter does not know is refused, not written
    as a config of 8 layers over the source's 6."""
    build_hf_model("llama", tmp_path / "saved")
    _renamed(tmp_path / "saved", tmp_path / "odd", lambda k: k.replace("model.layers.", "model.decoder.layers."))
    with pytest.raises(ValueError, match=r"layer 0 of the path has no tensors in the source"):
        cf.export_hf(tmp_path / "odd", tmp_path / "export", [0, 1, 2, 3, 2, 3, 4, 5])
    assert not (tmp_path / "export").exists()


def test_multimodal_export_loads_in_transformers(tmp_path):
    """A wrapper folder exported along a path stays a wrapper (vision tower included, text_config
    remapped); a loaded wrapper exports as its text decoder. Both give our logits."""
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    _tiny_wrapper("gemma3", tmp_path / "src")
    path = LayerPath.duplicate(N, 2, 4)
    ids = tokens(2, 20, seed=8)
    ours = cf.load(tmp_path / "src").logits(ids, layers=path)
    cf.export_hf(tmp_path / "src", tmp_path / "wrapper", path)
    config = json.loads((tmp_path / "wrapper" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == len(path)
    wrapper = Gemma3ForConditionalGeneration.from_pretrained(str(tmp_path / "wrapper"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert report("gemma3 wrapper export", wrapper(input_ids=ids).logits, ours) < 1e-4
    cf.export_hf(cf.load(tmp_path / "src"), tmp_path / "text", path)
    text = AutoModelForCausalLM.from_pretrained(str(tmp_path / "text"), dtype=torch.float32).eval()
    assert type(text).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        assert report("gemma3 text-decoder export", text(ids).logits, ours) < 1e-4


# ----------------------------------------------------------------------------- errors
def test_unsupported_architecture_names_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"], "vocab_size": 8}))
    with pytest.raises(cf.ConfigError) as e:
        cf.load(tmp_path)
    for name in ("GPTNeoXForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                 "Gemma3ForConditionalGeneration", "Ministral3ForCausalLM", "Mistral3ForConditionalGeneration"):
        assert name in str(e.value)


def test_wrapper_without_text_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"]}))
    with pytest.raises(cf.ConfigError, match="text_config"):
        cf.load(tmp_path)


def test_longrope_factor_count_is_checked(model_dir, tmp_path):
    folder, _ = model_dir("phi3")
    _copy_with_config(folder, tmp_path / "m", lambda c: c["rope_parameters"]["long_factor"].pop())
    with pytest.raises(cf.ConfigError, match="long_factor"):
        cf.load(tmp_path / "m")


# ----------------------------------------------------------------------------- sweeps on every family
@pytest.fixture(scope="module", params=FAMILIES + MOE_ARCHS + HYBRID_ARCHS)
def family_chat_model(request, tmp_path_factory):
    """A tiny random model of the family with the default model's tokenizer and chat template."""
    from circuit_finder.gguf import gguf_tokenizer

    try:
        tokenizer = gguf_tokenizer(cf.default_model_path())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    folder = tmp_path_factory.mktemp(f"chat-{request.param}")
    build_hf_model(request.param, folder, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tokenizer.save_pretrained(str(folder))
    return request.param, cf.load(folder)


@pytest.mark.parametrize("mode", ["likelihood", "generate"])
def test_family_sweep_reuse_equals_plain_runs(family_chat_model, mode):
    """Prefix reuse (shared KV slots, run_slots from the first differing slot) gives what separate
    runs give, for every family; generate mode's outputs are model.generate's."""
    arch, model = family_chat_model
    kw = dict(probes=("math", "eq"), mode=mode, max_items=2, progress=False)
    reused = cf.sweep(model, block_sizes=(2,), times=(2, 3), **kw)
    plain = cf.sweep(model, block_sizes=(2,), times=(2, 3), reuse=False, **kw)
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "kind")} for r in reused.records]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "kind")} for r in plain.records]
    assert len(reused) == 1 + 5 + 5
    if mode == "generate":
        probe = get_probe("math")
        record = next(r for r in reused.records if r["layers"] == str(LayerPath.duplicate(N, 1, 3, times=3)))
        items = probe.items()[:2]
        want = model.generate([it.prompt for it in items], layers=LayerPath.duplicate(N, 1, 3, times=3),
                              max_new_tokens=probe.max_new_tokens, chat=True)
        assert [record["outputs"]["math"][it.id] for it in items] == want


# ----------------------------------------------------------------------------- review follow-ups
def test_published_gemma_export_keeps_each_slots_kind(model_dir, tmp_path):
    """A published Gemma 3 config (a pattern, no layer_types) exported along a path that moves a
    full-attention layer first: layer_types are written out, so transformers runs each slot with
    its layer's kind and gives our logits."""
    from transformers import AutoModelForCausalLM

    folder, _ = model_dir("gemma3_text")
    _copy_with_config(folder, tmp_path / "published", _gemma3_published)
    layers = [2, 0, 1, 2, 3, 4, 5, 5]
    cf.export_hf(tmp_path / "published", tmp_path / "out", layers)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["layer_types"][:2] == ["full_attention", "sliding_attention"]
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    ids = tokens(2, 24, seed=9)
    with torch.no_grad():
        ref = theirs(ids).logits
    assert report("published gemma3 export", cf.load(tmp_path / "published").logits(ids, layers=layers), ref) < 1e-4


def test_mistral3_gguf_without_yarn_keeps_its_rope(tmp_path):
    """A mistral3 file with plain RoPE and no temperature key: its freq_base, not Ministral3's
    class-default YaRN."""
    rope = {"rope_type": "default", "rope_theta": 5000.0, "llama_4_scaling_beta": 0.0,
            "original_max_position_embeddings": 8}
    hf = build_hf_model("ministral3", tmp_path / "hf", rope_parameters=rope)
    write_gguf(hf, tmp_path / "m.gguf")
    model = cf.load(tmp_path / "m.gguf")
    assert model.config.rope["type"] == "default" and model.config.rope["theta"] == 5000.0
    ids = tokens(2, 24, seed=10)
    with torch.no_grad():
        ref = hf(ids).logits
    assert report("mistral3 gguf, plain rope", model.logits(ids), ref) < 1e-4


def test_generation_config_end_of_turn_counts_as_eos(model_dir, tmp_path):
    folder, _ = model_dir("gemma2")
    shutil.copytree(folder, tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 107]}))
    model = cf.load(tmp_path / "m")
    assert 107 in model.config.eos_token_ids and 2 in model.config.eos_token_ids
    assert 107 in model.codec.eos_ids


def test_quantized_safetensors_checkpoint_is_refused(model_dir, tmp_path):
    folder, _ = model_dir("ministral3")
    _copy_with_config(folder, tmp_path / "m", lambda c: c.update(quantization_config={"quant_method": "hqq"}))
    with pytest.raises(cf.ConfigError, match=r"quantization_config: hqq\) is not supported"):
        cf.load(tmp_path / "m")


def test_mergekit_refuses_a_multimodal_folder(tmp_path):
    _tiny_wrapper("gemma3", tmp_path / "src")
    with pytest.raises(ValueError, match="multimodal"):
        cf.export_mergekit(tmp_path / "src", tmp_path / "m.yaml", "0..5")
