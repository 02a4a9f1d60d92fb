"""Bad models and bad calls: each a Python exception with a message that names the fault."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import circuit_finder as cf


def copy_model(src, dst):
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


def test_unknown_architecture(model_dir, tmp_path):
    folder, _ = model_dir("llama")
    d = copy_model(folder, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(cf.ConfigError, match="GPTNeoXForCausalLM.*supported: .*LlamaForCausalLM"):
        cf.load(d)


def test_unsupported_rope_type(model_dir, tmp_path):
    folder, _ = model_dir("llama")
    d = copy_model(folder, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(cf.ConfigError, match="dynamic.*default, linear, llama3, yarn, longrope"):
        cf.load(d)


def test_missing_tensor(model_dir, tmp_path):
    folder, _ = model_dir("qwen2")
    d = copy_model(folder, tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.4.self_attn.k_proj.bias"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(cf.WeightError, match="missing tensor 'model.layers.4.self_attn.k_proj.bias'"):
        cf.load(d)


def test_wrong_shape_names_expected_and_actual(model_dir, tmp_path):
    folder, _ = model_dir("llama")
    d = copy_model(folder, tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(cf.WeightError, match=r"up_proj.weight': expected shape \[112, 64\], got \[100, 64\]"):
        cf.load(d)


def test_layer_index_out_of_range(model_dir):
    folder, _ = model_dir("llama")
    model = cf.load(folder)
    with pytest.raises(cf.LayerPathError, match="layer index 6 is out of range; the model has 6 layers"):
        model.logits(torch.tensor([[3, 4]]), layers="0..6")


def test_malformed_path_in_call(model_dir):
    folder, _ = model_dir("llama")
    model = cf.load(folder)
    with pytest.raises(cf.LayerPathError, match="'a'"):
        model.generate(torch.tensor([[3, 4]]), layers="0,a", max_new_tokens=2)


def test_generate_refuses_right_padded_prompts(model_dir):
    """Generation continues each row from its last column: a right-padded mask would predict from a
    pad token, silently; it is refused naming the row. Left padding generates."""
    folder, _ = model_dir("llama")
    model = cf.load(folder)
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    with pytest.raises(ValueError, match="attention_mask row 1 ends in padding"):
        model.generate(ids, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), max_new_tokens=2)
    left = model.generate(torch.tensor([[0, 0, 5, 6], [5, 6, 7, 8]]), attention_mask=torch.tensor([[0, 0, 1, 1], [1] * 4]),
                          max_new_tokens=2)
    assert left.shape == (2, 2)


def test_token_outside_vocabulary(model_dir):
    folder, _ = model_dir("llama")
    model = cf.load(folder)
    with pytest.raises(cf.InputError, match="outside the vocabulary"):
        model.logits(torch.tensor([[3, 999]]))


def test_cache_of_another_path_and_empty_batch_are_refused(model_dir):
    """A cache keeps which layer each slot ran: another path of the same length and kinds (whose
    keys the engine would otherwise attend over silently) is refused, and so is sharing or placing
    slots of another path; an empty batch is an InputError, not a torch error from inside."""
    folder, _ = model_dir("llama")
    engine = cf.load(folder).engine
    ids, pos = torch.tensor([[3, 4, 5]]), torch.arange(3).unsqueeze(0)
    cache = engine.new_cache([0, 1, 2, 3], 1, 8)
    engine.forward(ids, pos, None, [0, 1, 2, 3], cache, False)
    with pytest.raises(cf.InputError, match="slot 2 was made for layer 2 but the layer path runs layer 1 there"):
        engine.forward(ids[:, :1], pos[:, :1] + 3, None, [0, 1, 1, 3], cache, False)
    with pytest.raises(cf.InputError, match="shared cache's slot 1 holds layer 1 but this path runs layer 2"):
        engine.new_cache([0, 2, 2, 3], 1, 8, cache, 2)
    assert engine.new_cache([0, 1, 5], 1, 8, cache, 2).num_slots == 3  # a common prefix is shared
    with pytest.raises(cf.InputError, match="place: slot 3 of the source cache holds layer 3, this one layer 4"):
        engine.new_cache([0, 1, 2, 4], 1, 8).place(cache, 0, 0, 1)
    with pytest.raises(cf.InputError, match=r"input_ids has an empty batch: \[0, 3\]"):
        engine.forward(ids[:0], pos[:0], None, [0, 1], None, False)


def test_tensors_the_config_does_not_use_are_warned_of(model_dir):
    """A checkpoint tensor no part of this config reads (here a bias the family has not) is named in
    a warning; an old checkpoint's saved RoPE table (rotary_emb.inv_freq) is not."""
    import warnings

    folder, _ = model_dir("llama")
    config = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cf.load_from_tensors(config, {**state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) this model's config does not use, left out: "
                                         r"model\.layers\.2\.mlp\.down_proj\.bias"):
        cf.load_from_tensors(config, {**state, "model.layers.2.mlp.down_proj.bias": torch.zeros(config["hidden_size"])})


def test_missing_config_and_bad_dtype(tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match="config.json"):
        cf.load(tmp_path)
    folder, _ = model_dir("llama")
    with pytest.raises(ValueError, match="float64"):
        cf.load(folder, dtype="float64")
    assert cf.load(folder, dtype="auto").dtype == cf.load(folder).dtype  # transformers' / lm-eval's word for None
    with pytest.raises(ValueError, match="dequantize= applies to GGUF files"):
        cf.load(folder, dequantize=True)
    with pytest.raises(FileNotFoundError, match="Hub ids are not downloaded: fetch it first"):
        cf.load("Qwen/Qwen2.5-0.5B-Instruct")


def test_text_prompt_without_tokenizer(model_dir):
    folder, _ = model_dir("llama")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        cf.load(folder).generate("hello")


def test_special_ids_outside_the_vocabulary_and_bad_score_targets(model_dir, tmp_path):
    """A config.json pad/eos id past the vocabulary is warned about and left out (it was fed back to
    the model as padding, so a score of uneven pairs failed blaming the input); a continuation's
    last id, a target only, is range-checked too; a corrupt config.json is named."""
    folder, _ = model_dir("llama")
    d = copy_model(folder, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    vocab = cfg["vocab_size"]
    cfg["pad_token_id"], cfg["eos_token_id"] = vocab, [vocab + 5, 2]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=rf"the config's eos_token_id {vocab + 5} is outside the vocabulary"):
        model = cf.load(d)
    assert model.codec.eos_ids == [2] and 0 <= model.codec.pad_id < vocab
    uneven = model.score([[5, 6, 7], [5]], [[8], [9, 10]])  # padded rows
    alone = [model.score([5, 6, 7], [8])[0], model.score([5], [9, 10])[0]]
    assert uneven == pytest.approx(alone, abs=1e-4)
    import numpy as np  # ids as numpy integers, arrays or tensors: the same pairs

    assert model.score(np.array([5, 6, 7]), torch.tensor([8]))[0] == pytest.approx(alone[0], abs=1e-6)
    assert model.score([np.int64(5)], [np.int64(9), np.int64(10)])[0] == pytest.approx(alone[1], abs=1e-6)
    for bad in (vocab + 100, -3):
        with pytest.raises(cf.InputError, match=rf"pair 0: token id {bad} is outside the vocabulary"):
            model.score([5, 6, 7], [8, bad])
    (d / "config.json").write_bytes(b"\xff{")
    with pytest.raises(ValueError, match=r"config.json: not valid UTF-8 JSON"):
        cf.load(d)


def test_engine_inputs_that_would_read_wrong_are_refused(model_dir):
    """An additive float mask (0 / -inf) is refused rather than read inverted (a 0 / 1 float mask
    reads as the integer one); RoPE tables of the wrong shape are refused by the CPU kernel; a
    duplicated block repeated past any runnable length is a LayerPathError, not a billion-slot list."""
    from circuit_finder import _C

    model = cf.load(model_dir("llama")[0])
    ids, pos, path = torch.tensor([[0, 5, 6, 7]]), torch.tensor([[0, 0, 1, 2]]), list(range(6))
    mask = torch.tensor([[0, 1, 1, 1]])
    with torch.inference_mode():
        with pytest.raises(ValueError, match="this float mask holds other values"):
            model.engine.forward(ids, pos, torch.tensor([[float("-inf"), 0.0, 0.0, 0.0]]), path, None, True)
        assert torch.equal(model.engine.forward(ids, pos, mask.float(), path, None, True),
                           model.engine.forward(ids, pos, mask, path, None, True))
    x = torch.randn(2, 3, 4, 8)
    with pytest.raises(ValueError, match=r"cos/sin must be \[2, 1, 3, 8\], got \[3, 1, 2, 8\]"):
        _C.cpu_rope(x, torch.randn(3, 1, 2, 8), torch.randn(3, 1, 2, 8))
    with pytest.raises(cf.LayerPathError, match="into a path too long"):
        _C.duplicate_layers(6, 2, 4, 10**9)  # (LayerPath.duplicate refuses it before the engine)


@pytest.mark.parametrize("arch", ["llama", "qwen3_5_text"])
def test_a_kv_cache_larger_than_free_memory_is_refused_before_it_is_made(model_dir, arch, monkeypatch):
    """generate() and a generate-mode sweep size the KV cache from max_new_tokens: one that cannot fit
    the device's free memory is refused naming the argument, instead of failing inside torch or (on
    a CPU with overcommitted memory) getting the process killed as the cache fills. The bound is
    the cache's bytes counted here from the config: keys and values of attention layers, the conv
    inputs and fp32 recurrent state of linear-attention ones; a cache may fill 90% of free memory."""
    import circuit_finder.placement

    folder, hf = model_dir(arch)
    m = cf.load(folder)
    c = hf.config
    kinds = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_attention = 2 * (4 + 20) * c.num_key_value_heads * head_dim * 4  # fp32, batch 1, 4 + 20 positions
    per_linear = 0
    if "linear_attention" in kinds:
        channels = 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim
        per_linear = (channels * c.linear_conv_kernel_dim
                      + c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim) * 4
    need = sum(per_linear if k == "linear_attention" else per_attention for k in kinds)
    print(f"{arch}: layers {kinds}; cache {need} B")
    ids = torch.tensor([[5, 6, 7, 8]])
    monkeypatch.setattr(circuit_finder.placement, "MARGIN", 1.0)  # the exact boundary first
    monkeypatch.setattr(circuit_finder.placement, "free_memory", lambda d: need - 1)
    with pytest.raises(ValueError, match=r"max_new_tokens=20: the KV cache of 1 row\(s\) x 24 positions along 6 slots"):
        m.generate(ids, max_new_tokens=20)
    monkeypatch.setattr(circuit_finder.placement, "free_memory", lambda d: need)
    assert m.generate(ids, max_new_tokens=20, min_new_tokens=20).shape == (1, 20)
    monkeypatch.setattr(circuit_finder.placement, "MARGIN", 0.9)  # as it is: 10% of free memory left over
    with pytest.raises(cf.placement.CacheTooLarge):
        m.generate(ids, max_new_tokens=20)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="max_new_tokens=10000000000: the KV cache"):  # the real free memory
        m.generate(ids, max_new_tokens=10**10)


def test_a_sweep_probe_whose_cache_cannot_fit_is_refused(chat_model, tmp_path):
    from circuit_finder.probes import from_jsonl

    items = tmp_path / "add.jsonl"
    items.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(3)))
    with pytest.raises(ValueError, match=r"probe 'add': max_new_tokens=10000000000 \(a budget of 10000000000 tokens "
                                         r"a row\): the KV cache"):
        cf.sweep(chat_model, probes=[from_jsonl(items, max_new_tokens=10**10)], paths=["0..2"], mode="generate",
                 chat=False, progress=False)
