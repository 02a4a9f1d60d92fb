"""bitsandbytes checkpoints (circuit_finder.bnb): random models quantized by transformers with
bitsandbytes itself (NF4 / FP4, double quantization, another quant storage dtype, LLM.int8) and saved
as transformers saves them, then read back by transformers: the reference weights are bitsandbytes'
own dequantization of what it loaded (transformers' dequantize_bnb_weight), weight for weight, and
the logits of transformers' float model on them along the paths. (transformers running the
bitsandbytes layers themselves on the CPU multiplies in lower precision: 1.5e-2 relative off.)
Plain loops check the nibble order and a partial last block; every refusal names the tensor."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import safetensors.torch
import torch

import circuit_finder as cf
from circuit_finder.bnb import bnb_matrices, dequantize_4bit, dequantize_int8
from helpers import (
    build_hf_model,
    build_mistral3_wrapper,
    load_checking_q8_0,
    quantized_paths_match,
    relative,
)

bnb = pytest.importorskip("bitsandbytes")


def quantized(src, out, auto=None, **options):
    """The float model in `src` quantized by transformers + bitsandbytes and saved to `out`; returns
    transformers' model of `out` (loaded back, as a user would), by `auto` (AutoModelForCausalLM)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    auto = auto or AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_pretrained(src, quantization_config=BitsAndBytesConfig(**options), dtype=torch.float32,
                                     device_map="cpu")
        model.save_pretrained(out)
        return auto.from_pretrained(out, dtype=torch.float32, device_map="cpu")


def dequantized(hf, loaded) -> tuple[torch.nn.Module, dict]:
    """hf with each bitsandbytes layer of `loaded` replaced by bitsandbytes' dequantization of it, and
    those weights by name."""
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    ref, weights = copy.deepcopy(hf), {}
    for name, module in loaded.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            w = dequantize_bnb_weight(module.weight, state=getattr(module, "state", None)).float()
            ref.get_submodule(name).weight.data = w
            weights[f"{name}.weight"] = w
    return ref, weights


# ROWS: bitsandbytes 0.50.2's native CPU dequantization restarts its blocks at each row, while its
# quantization (and CUDA's) runs them over the flattened matrix: on a [64, 112] down_proj its own
# dequantization is 0.139 off the float weights, ours 0.042. The models here have rows of whole
# 64-value blocks, as published ones do; a ragged last block is checked against a loop below.
CASES = {  # id: (architecture, BitsAndBytesConfig options)
    "llama-nf4-double": ("llama", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)),
    "qwen2-fp4": ("qwen2", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
    "phi3-nf4": ("phi3", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)),
    "gemma3-nf4-bf16-storage": ("gemma3_text", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_quant_storage=torch.bfloat16)),  # head_dim 32: ROWS
    "mistral-int8": ("mistral", dict(load_in_8bit=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bnb_checkpoint_matches_bitsandbytes_dequantizing_it(tmp_path, case):
    arch, options = CASES[case]
    shapes = dict(intermediate_size=128, **({"head_dim": 32} if arch == "gemma3_text" else {}))
    hf = build_hf_model(arch, tmp_path / "float", **shapes)  # rows of whole blocks: see ROWS
    loaded = quantized(tmp_path / "float", tmp_path / "q", **options)
    ref_model, weights = dequantized(hf, loaded)
    assert len(weights) == 6 * (4 if arch == "phi3" else 7)
    ours = cf.load(tmp_path / "q")
    for name, w in weights.items():  # weight for weight: the same products, rounded once
        assert torch.equal(ours.tensors[name], w), f"{name}: {(ours.tensors[name] - w).abs().max()}"
    ids = torch.randint(0, 160, (2, 24), generator=torch.Generator().manual_seed(0))
    quantized_paths_match(f"bitsandbytes {case}", ours, ref_model, hf, ids)


def test_bnb_multimodal_wrapper_reads_its_text_decoder(tmp_path):
    """A wrapper quantized whole (unsloth's gemma-3 / Mistral Small 3 *-bnb-4bit): its text decoder's
    layers under model.language_model.* read as the decoder's, the quantized vision tower left out."""
    from transformers import AutoModelForImageTextToText

    hf = build_mistral3_wrapper(tmp_path / "float", intermediate_size=128)
    loaded = quantized(tmp_path / "float", tmp_path / "q", auto=AutoModelForImageTextToText, load_in_4bit=True,
                       bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    ref_model, weights = dequantized(hf, loaded)
    stored = safetensors.torch.load_file(tmp_path / "q" / "model.safetensors")
    assert any(n.startswith("vision_tower.") and n.endswith(".absmax") for n in stored)  # quantized too
    decoder = {n.replace("model.language_model.", "model."): w for n, w in weights.items() if ".language_model." in n}
    assert len(decoder) == 6 * 7
    ours = cf.load(tmp_path / "q")
    for name, w in decoder.items():
        assert torch.equal(ours.tensors[name], w), name
    quantized_paths_match("bitsandbytes Mistral3 wrapper", ours, ref_model, hf,
                          torch.randint(11, 160, (2, 20), generator=torch.Generator().manual_seed(5)))


def test_bnb_checkpoint_quantizes_and_exports(tmp_path):
    """quantize= packs the dequantized matrices; export_hf of the folder keeps the codes, absmax and
    quant states as stored (float32 absmax not cast by dtype=) with the quantization_config, and
    transformers reads it back along the path; of the loaded model writes floats without it."""
    from transformers import AutoModelForCausalLM

    build_hf_model("llama", tmp_path / "float", intermediate_size=128)  # rows of whole Q8_0 blocks
    quantized(tmp_path / "float", tmp_path / "src", load_in_4bit=True, bnb_4bit_quant_type="nf4",
              bnb_4bit_use_double_quant=True)
    model = load_checking_q8_0(tmp_path / "src")
    path = [0, 1, 2, 3, 2, 3, 4, 5]
    ids = torch.randint(0, 160, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = model.logits(ids, layers=path)
    cf.export_hf(tmp_path / "src", tmp_path / "kept", path, dtype="bfloat16")
    cf.export_hf(tmp_path / "src", tmp_path / "kept32", path)
    cf.export_hf(model, tmp_path / "floats", path)
    written = safetensors.torch.load_file(tmp_path / "kept" / "model.safetensors")
    source = safetensors.torch.load_file(tmp_path / "src" / "model.safetensors")
    for part in ("", ".absmax", ".quant_map", ".nested_absmax", ".quant_state.bitsandbytes__nf4"):
        name5, name3 = (f"model.layers.{i}.mlp.down_proj.weight{part}" for i in (5, 3))  # slot 5 runs layer 3
        assert torch.equal(written[name5], source[name3]) and written[name5].dtype == source[name3].dtype, part
    assert written["model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["quantization_config"]["quant_method"] \
        == "bitsandbytes"
    assert json.loads((tmp_path / "floats" / "config.json").read_text()).get("quantization_config") is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept32 = AutoModelForCausalLM.from_pretrained(tmp_path / "kept32", dtype=torch.float32, device_map="cpu")
    _, read = dequantized(build_hf_model("llama", tmp_path / "unused", intermediate_size=128, num_hidden_layers=8),
                          kept32)
    assert len(read) == 8 * 7
    for name, w in read.items():  # transformers + bitsandbytes read slot k as layer path[k]
        k = int(name.split(".")[2])
        assert torch.equal(w, model.tensors[name.replace(f"layers.{k}.", f"layers.{path[k]}.")]), name
    floats = AutoModelForCausalLM.from_pretrained(tmp_path / "floats", dtype=torch.float32)
    with torch.no_grad():
        assert relative(f"export of the loaded model along {path}, in transformers", floats(ids).logits, ref) < 1e-5
    assert relative(f"the folder's export along {path} (bitsandbytes parts kept), reloaded",
                    cf.load(tmp_path / "kept32").logits(ids), ref) < 1e-6


def test_bnb_codes_stored_as_floats_export_as_stored(tmp_path):
    """bnb_4bit_quant_storage=bfloat16 stores the codes' bytes as a bf16 tensor: an export with
    dtype= must copy them, not convert them (converted, they load as other weights without an error).
    A config of transformers before 4.32 (load_in_4bit, no quant_method) reads the same."""
    build_hf_model("llama", tmp_path / "float", intermediate_size=128)
    quantized(tmp_path / "float", tmp_path / "src", load_in_4bit=True, bnb_4bit_quant_type="nf4",
              bnb_4bit_quant_storage=torch.bfloat16)
    path = [0, 1, 1, 2, 3, 4, 5]
    cf.export_hf(tmp_path / "src", tmp_path / "half", path, dtype="float16")
    source = safetensors.torch.load_file(tmp_path / "src" / "model.safetensors")
    written = safetensors.torch.load_file(tmp_path / "half" / "model.safetensors")
    codes = "model.layers.{}.self_attn.o_proj.weight"
    assert source[codes.format(1)].dtype == torch.bfloat16 and torch.equal(written[codes.format(2)], source[codes.format(1)])
    assert written["model.norm.weight"].dtype == torch.float16
    model, half = cf.load(tmp_path / "src"), cf.load(tmp_path / "half", dtype="float32")
    for k, layer in enumerate(path):
        for module in ("self_attn.o_proj", "mlp.down_proj"):
            assert torch.equal(half.tensors[f"model.layers.{k}.{module}.weight"],
                               model.tensors[f"model.layers.{layer}.{module}.weight"]), (k, module)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["quantization_config"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    old = cf.load(tmp_path / "src")
    assert all(torch.equal(old.tensors[n], t) for n, t in model.tensors.items() if n.endswith("_proj.weight"))


def test_skip_modules_renumbered_along_the_path_decoder_layers_only():
    config = {"num_hidden_layers": 4, "quantization_config": {"quant_method": "bitsandbytes", "llm_int8_skip_modules": [
        "lm_head", "model.layers.1.mlp.down_proj", "vision_tower.vision_model.encoder.layers.1.self_attn"]}}
    from circuit_finder.export import remap_config

    out = remap_config(config, cf.LayerPath.coerce([0, 1, 1, 3], 4))
    assert out["quantization_config"]["llm_int8_skip_modules"] == [
        "lm_head", "model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj",
        "vision_tower.vision_model.encoder.layers.1.self_attn"]


def test_dequantization_against_plain_loops():
    """4-bit codes two per byte (the first in the high nibble) over 100 elements in blocks of 16 (the
    last one partial), with double-quantized absmax; int8 rows; each against a loop."""
    g = torch.Generator().manual_seed(0)
    shape, block = (10, 10), 16
    codes = torch.randint(0, 16, (100,), generator=g)
    packed = torch.tensor([(codes[i].item() << 4) | codes[i + 1].item() for i in range(0, 100, 2)],
                          dtype=torch.uint8)[:, None]
    table = torch.linspace(-1, 1, 16)
    absmax_codes = torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8)
    nested_table, outer = torch.rand(256, generator=g), torch.tensor([0.5, 2.0])
    got = dequantize_4bit(packed, absmax_codes, table, (outer, nested_table, 4, 0.25), shape, block, torch.float32,
                          chunk=32)
    want = [table[codes[i]].item() * (nested_table[int(absmax_codes[i // 16])].item() * outer[i // 16 // 4].item() + 0.25)
            for i in range(100)]
    assert torch.allclose(got.reshape(-1), torch.tensor(want), rtol=1e-6, atol=0)
    q, scb = torch.randint(-127, 128, (3, 5), generator=g, dtype=torch.int8), torch.rand(3, generator=g) * 4
    want = torch.tensor([[q[r, c].item() * scb[r].item() / 127 for c in range(5)] for r in range(3)])
    assert torch.allclose(dequantize_int8(q, scb, torch.float32), want, rtol=1e-6, atol=0)
    assert torch.equal(dequantize_int8(q, scb, torch.float32, chunk=7), dequantize_int8(q, scb, torch.float32))


def _state(shape, **extra) -> torch.Tensor:
    text = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float32",
                       "shape": None if shape is None else list(shape), **extra})
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def test_what_we_cannot_load_is_named():
    good = {"m.weight": torch.zeros(64, 1, dtype=torch.uint8), "m.weight.absmax": torch.ones(2),
            "m.weight.quant_map": torch.zeros(16), "m.weight.quant_state.bitsandbytes__nf4": _state((8, 16))}
    stored, parts = bnb_matrices(good)
    assert stored["m.weight"][0] == (8, 16) and parts == set(good)
    for broken, match in (({"m.weight.absmax": None}, r"'m.weight' \(bitsandbytes nf4\) has no 'm.weight.absmax'"),
                          ({"m.weight": torch.zeros(63, 1, dtype=torch.uint8)},
                           r"'m.weight' is torch.uint8 \[63, 1\]: expected 64 bytes of 4-bit codes for shape \[8, 16\]"),
                          ({"m.weight.absmax": torch.ones(3)}, r"'m.weight.absmax' has 3 values: expected one per 64"),
                          ({"m.weight.absmax": torch.ones(2, dtype=torch.uint8)},
                           r"'m.weight.absmax' is uint8 \(double quantization\) but 'm.weight.nested_absmax'"),
                          ({"m.weight.quant_map": torch.zeros(15)}, r"'m.weight.quant_map' is \[15\]"),
                          ({"m.weight.absmax": torch.ones(2, dtype=torch.uint8), "m.weight.nested_absmax": torch.ones(1),
                            "m.weight.nested_quant_map": torch.zeros(256)}, r"or the quant state's nested_blocksize"),
                          ({"m.weight.quant_state.bitsandbytes__nf4": _state(None)},
                           r"'m.weight.quant_state.bitsandbytes__nf4' gives shape None and blocksize 64"),
                          ({"m.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b"{not json"), dtype=torch.uint8)},
                           r"'m.weight.quant_state.bitsandbytes__nf4' is not a bitsandbytes quant state \(JSON bytes\)"),
                          ({"m.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b"[1]"), dtype=torch.uint8)},
                           r"'m.weight.quant_state.bitsandbytes__nf4' is JSON but not an object")):
        tensors = {**good, **broken}
        with pytest.raises(ValueError, match=match):
            bnb_matrices({n: t for n, t in tensors.items() if t is not None})
    int8 = {"m.weight": torch.zeros(4, 8, dtype=torch.int8), "m.SCB": torch.ones(4)}
    assert bnb_matrices(int8)[0]["m.weight"][0] == (4, 8)
    with pytest.raises(ValueError, match=r"'m.weight' is torch.int8 \[4, 8\] with 'm.SCB' \[3\]: expected an int8"):
        bnb_matrices({**int8, "m.SCB": torch.ones(3)})
    with pytest.raises(ValueError, match=r"'m.weight_format' is 1: only bitsandbytes' row-major int8 layout"):
        bnb_matrices({**int8, "m.weight_format": torch.tensor(1, dtype=torch.uint8)})
