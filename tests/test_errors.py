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


def test_token_outside_vocabulary(model_dir):
    folder, _ = model_dir("llama")
    model = cf.load(folder)
    with pytest.raises(cf.InputError, match="outside the vocabulary"):
        model.logits(torch.tensor([[3, 999]]))


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
