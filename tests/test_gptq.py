"""GPTQ and AWQ checkpoints (circuit_finder.gptq): random models quantized here (min-max codes per
group of inputs, GPTQ's activation order as a permuted g_idx), packed by this file's loops as the
formats lay out their int32 words, and saved with their quantization_config. The reference is
transformers running the same model with each weight replaced by (q - zero) x scale computed from the
codes before packing: our loader must unpack to exactly those numbers. AWQ is also read through
compressed-tensors' own AutoAWQ converter (its unpacking order, not ours) and transformers'
dequantizing loader. Every refusal names what it refuses."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import safetensors.torch
import torch

import circuit_finder as cf
from circuit_finder.gptq import GptqLayout, dequantize_gptq, gptq_config, gptq_matrices
from circuit_finder.quants import unpack_words
from helpers import (
    build_hf_model,
    build_mistral3_wrapper,
    load_checking_q8_0,
    quantized_paths_match,
    relative,
)

AUTOAWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack: nibble i of a word holds output order[i] of its 8


def _minmax_codes(w: torch.Tensor, g_idx: torch.Tensor, groups: int, bits: int, symmetric: bool):
    """Codes q [in, out], zeros and scales [groups, out] (scales fp16, as checkpoints store them)
    of w [out, in]: min-max per group of inputs (the inputs with that g_idx)."""
    top = (1 << bits) - 1
    wt = w.t()
    low = torch.stack([wt[g_idx == k].amin(0) for k in range(groups)]).clamp(max=0)
    high = torch.stack([wt[g_idx == k].amax(0) for k in range(groups)]).clamp(min=0)
    if symmetric:
        scales = (torch.maximum(high, -low) * 2 / top).clamp(min=1e-6).half()
        zeros = torch.full_like(scales, 1 << (bits - 1), dtype=torch.int64)
    else:
        scales = ((high - low) / top).clamp(min=1e-6).half()
        zeros = torch.round(-low / scales.float()).clamp(0, top).long()
    q = torch.round(wt / scales.float()[g_idx]).long() + zeros[g_idx]
    return q.clamp(0, top), zeros, scales


def _words(codes: torch.Tensor, bits: int, along: int, order=None) -> torch.Tensor:
    """codes (0 .. 2^bits - 1) packed into int32 words along dim `along`: code j of each run of
    32 / bits at bit j x bits, or the run's code order[i] at bit i x bits."""
    per = 32 // bits
    c = codes.movedim(along, 0).long()
    words = torch.zeros((c.shape[0] // per, *c.shape[1:]), dtype=torch.int64)
    for i in range(per):
        words |= (c[(order[i] if order else i)::per] & ((1 << bits) - 1)) << (i * bits)
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32).movedim(0, along).contiguous()


def _minus_one_each(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words minus 1 in each code, as one subtraction per word modulo 2^32 (GPTQ v1's writer)."""
    ones = int("".join(["0" * (bits - 1) + "1"] * (32 // bits)), 2)
    return (((words.long() - ones) % 2**32 + 2**31) % 2**32 - 2**31).int()


def _quantize_layer(w, method: str, bits: int, group_size: int, act_order: bool, fmt: str, symmetric: bool, seed: int):
    """(the stored parts of one layer, its dequantized weight [out, in] from the unpacked codes)."""
    out, inputs = w.shape
    size = inputs if group_size == -1 else group_size
    groups = -(-inputs // size)
    g_idx = torch.arange(inputs) // size
    if act_order:  # GPTQ's desc_act: groups follow a column order, not the inputs' order
        g_idx = g_idx[torch.argsort(torch.argsort(torch.randn(inputs, generator=torch.Generator().manual_seed(seed))))]
    if not symmetric:  # every fifth output positive: zero points of 0 (GPTQ v1 stores -1, borrowing)
        w = w.clone()
        w[::5] = w[::5].abs()
    q, zeros, scales = _minmax_codes(w, g_idx, groups, bits, symmetric)
    dense = ((q - zeros[g_idx]).float() * scales.float()[g_idx]).t().contiguous()
    if method == "awq":
        parts = {"qweight": _words(q, 4, 1, AUTOAWQ_PACK_ORDER), "scales": scales}
        if not symmetric:
            parts["qzeros"] = _words(zeros, 4, 1, AUTOAWQ_PACK_ORDER)
        return parts, dense
    qzeros = _words(zeros, bits, 1)
    if fmt == "gptq":  # v1: GPTQModel subtracts one from each code by subtracting from the whole word
        qzeros = _minus_one_each(qzeros, bits)
    parts = {"qweight": _words(q, bits, 0), "qzeros": qzeros, "scales": scales, "g_idx": g_idx.int()}
    return parts, dense


def _in_memory(module: str) -> str:
    """A checkpoint's module name as transformers v5's model names it (a wrapper saves its decoder
    under language_model.model.*, and GPTQModel matches its patterns against the model's names)."""
    module = re.sub(r"^language_model\.model\.", "model.language_model.", module)
    return re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", module)


def _set_weight(model, module: str, dense: torch.Tensor) -> None:
    """model's weight of `module` (a checkpoint name; per-expert ones live in transformers' stacked
    gate_up_proj [E, 2I, H], gate rows first, and down_proj [E, H, I]) set to dense."""
    module = _in_memory(module)
    m = re.match(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj$", module)
    if m is None:
        model.get_submodule(module).weight.data = dense
        return
    experts, e, kind = model.get_submodule(m.group(1)), int(m.group(2)), m.group(3)
    if kind == "down":
        experts.down_proj.data[e] = dense
    else:
        rows = dense.shape[0]
        experts.gate_up_proj.data[e, (0 if kind == "gate" else rows):][:rows] = dense


def quantize_folder(hf_model, folder, method="gptq", bits=4, group_size=16, act_order=False, fmt="gptq",
                    symmetric=False, dynamic=None, awq_zero_point=True, not_convert=None):
    """folder's projections (per-expert ones too; not routers, the head or embeddings) replaced by
    their GPTQ / AWQ parts and the config given its quantization_config; modules whose names hold a
    `not_convert` entry (AWQ's modules_to_not_convert) left float. Returns hf_model with the
    dequantized weights: the reference."""
    ref = copy.deepcopy(hf_model)
    out = {}
    for k, (name, t) in enumerate(safetensors.torch.load_file(folder / "model.safetensors").items()):
        module = name.removesuffix(".weight")
        if not name.endswith("_proj.weight") or t.dim() != 2:
            out[name] = t
            continue
        rule = next(((p, o) for p, o in (dynamic or {}).items()  # GPTQModel's: the first pattern matching
                     if re.match(p[2:] if p[:2] in ("+:", "-:") else p, _in_memory(module))), None)
        if (rule is not None and rule[0].startswith("-:")) or any(key in module for key in not_convert or ()):
            out[name] = t
            continue
        layer_bits, layer_size = (rule[1].get("bits", bits), rule[1].get("group_size", group_size)) if rule \
            else (bits, group_size)
        parts, dense = _quantize_layer(t, method, layer_bits, layer_size, act_order, fmt,
                                       symmetric or (method == "awq" and not awq_zero_point), seed=k)
        out.update({f"{module}.{p}": v for p, v in parts.items()})
        _set_weight(ref, module, dense)
    safetensors.torch.save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    if method == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": awq_zero_point,
              "version": "gemm", "modules_to_not_convert": not_convert}
        if dynamic:  # GPTQModel's AWQ writer
            qc.update(dynamic=dynamic, format="gemm", meta={"quantizer": ["gptqmodel:7.7.0"]})
    else:
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order,
              "sym": symmetric, "checkpoint_format": fmt, "pack_dtype": "int32",
              "meta": {"quantizer": ["gptqmodel:7.7.0"]}}  # its v1 writer: zero points minus one, word by word
        if dynamic:
            qc["dynamic"] = dynamic
    config["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(config))
    return ref


GPTQ_CASES = {  # id: (architecture, quantize_folder arguments)
    "llama-4bit-g16-asym": ("llama", dict(bits=4, group_size=16)),
    "qwen2-8bit-act-order-sym": ("qwen2", dict(bits=8, group_size=32, act_order=True, symmetric=True)),
    "phi3-4bit-one-group": ("phi3", dict(bits=4, group_size=-1)),
    "mistral-2bit-v2": ("mistral", dict(bits=2, group_size=16, fmt="gptq_v2")),
    "gemma3-dynamic-8bit-mlp": ("gemma3_text", dict(bits=4, group_size=16,
                                                    dynamic={r"-:.*\.layers\.5\.self_attn\.o_proj": {},
                                                             r"+:.*\.mlp\..*": {"bits": 8, "group_size": 32}})),
    "qwen2-awq-dynamic-g32-mlp": ("qwen2", dict(method="awq", group_size=16,  # GPTQModel's AWQ
                                                dynamic={r"-:.*\.layers\.2\.self_attn\.o_proj": {},
                                                         r"+:.*\.mlp\..*": {"group_size": 32}})),
}


@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_gptq_checkpoint_matches_its_dequantized_codes(tmp_path, case):
    arch, kwargs = GPTQ_CASES[case]
    hf = build_hf_model(arch, tmp_path)
    ref_model = quantize_folder(hf, tmp_path, **kwargs)
    ours = cf.load(tmp_path)
    assert not any(n.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for n in ours.tensors)
    quantized_paths_match(f"GPTQ {case}", ours, ref_model, hf, torch.randint(0, 160, (2, 24), generator=torch.Generator()
                                                                     .manual_seed(0)))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_moe_checkpoint_per_expert(tmp_path, method):
    """Qwen3-MoE as its GPTQ / AWQ repos store it: every expert's projections quantized under their
    own names, the router left float."""
    hf = build_hf_model("qwen3_moe", tmp_path, moe_intermediate_size=48)
    ref_model = quantize_folder(hf, tmp_path, method=method, group_size=16)
    ours = cf.load(tmp_path)
    quantized_paths_match(f"qwen3_moe {method}", ours, ref_model, hf,
                 torch.randint(0, 160, (2, 20), generator=torch.Generator().manual_seed(2)))


WRAPPER_OPTIONS = {  # GPTQModel leaves a VLM's vision tower float by a negative pattern, AutoAWQ by not_convert
    "gptq": dict(dynamic={r"-:.*(vision_tower|multi_modal_projector).*": {}}),
    "awq": dict(not_convert=["vision_tower", "multi_modal_projector"]),
    # patterns anchored at the names of transformers v5's model (model.language_model.*), which the
    # checkpoint saves as language_model.model.*: layer 1's MLP in 8 bits
    "gptq-anchored": dict(dynamic={r"-:^model\.(vision_tower|multi_modal_projector)\..*": {},
                                   r"+:^model\.language_model\.layers\.1\.mlp\..*": {"bits": 8, "group_size": 32}}),
}


@pytest.mark.parametrize("case", list(WRAPPER_OPTIONS))
def test_multimodal_wrapper_reads_its_text_decoder(tmp_path, case):
    """A Mistral3 wrapper quantized as GPTQModel / AutoAWQ leave VLMs: its text decoder's layers, saved
    under language_model.model.*, read as the decoder's, per-module patterns matched under the names
    the quantizer saw; its export along a path repeating layer 1 reloads with the same logits."""
    hf = build_mistral3_wrapper(tmp_path / "q", intermediate_size=128)
    method = case.removesuffix("-anchored")
    ref_model = quantize_folder(hf, tmp_path / "q", method=method, group_size=16, **WRAPPER_OPTIONS[case])
    stored = safetensors.torch.load_file(tmp_path / "q" / "model.safetensors")
    assert sum(n.startswith("language_model.model.layers.") and n.endswith(".qweight") for n in stored) == 6 * 7
    if method == "gptq":  # 64 inputs packed 8 (4-bit) or 4 (8-bit: the anchored override took) a word
        assert stored["language_model.model.layers.1.mlp.up_proj.qweight"].shape[0] == 64 // (
            4 if case == "gptq-anchored" else 8)
    assert not any(n.startswith("vision_tower.") and n.endswith(".qweight") for n in stored)
    assert stored["vision_tower.transformer.layers.0.attention.q_proj.weight"].dtype == torch.float32  # left float
    ours = cf.load(tmp_path / "q")
    ids = torch.randint(11, 160, (2, 20), generator=torch.Generator().manual_seed(5))
    quantized_paths_match(f"{case} Mistral3 wrapper", ours, ref_model, hf, ids)
    path = [0, 1, 1, 2, 3, 2, 3, 4, 5]
    cf.export_hf(tmp_path / "q", tmp_path / "x", path)
    assert relative(f"its export along {path}, reloaded", cf.load(tmp_path / "x").logits(ids),
                    ours.logits(ids, layers=path)) < 1e-6


def _autoawq_converted(folder, out) -> None:
    """folder (AutoAWQ GEMM) rewritten by compressed-tensors' AutoAWQConverter as a pack-quantized
    compressed-tensors checkpoint in `out` (its unpacking, its config)."""
    from compressed_tensors.entrypoints.convert.converters import AutoAWQConverter

    out.mkdir()
    config = json.loads((folder / "config.json").read_text())
    converter = AutoAWQConverter.from_autoawq_config(config["quantization_config"])
    tensors = converter.process(safetensors.torch.load_file(folder / "model.safetensors"))
    safetensors.torch.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config["quantization_config"] = converter.update_config(None).model_dump(exclude_none=True)
    config["quantization_config"]["quant_method"] = "compressed-tensors"
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("arch, zero_point", [("llama", True), ("qwen2", True), ("qwen3", False)])
def test_awq_checkpoint_matches_compressed_tensors_reading_it(tmp_path, arch, zero_point):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    hf = build_hf_model(arch, tmp_path / "awq")
    ref_model = quantize_folder(hf, tmp_path / "awq", method="awq", group_size=16, awq_zero_point=zero_point)
    _autoawq_converted(tmp_path / "awq", tmp_path / "ct")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                         quantization_config=CompressedTensorsConfig(dequantize=True))
    ours = cf.load(tmp_path / "awq")
    ids = torch.randint(0, 160, (2, 24), generator=torch.Generator().manual_seed(1))
    quantized_paths_match(f"AWQ {arch}", ours, ref_model, hf, ids)
    layers = [n.removesuffix(".qweight") for n in safetensors.torch.load_file(tmp_path / "awq" / "model.safetensors")
              if n.endswith(".qweight")]
    assert len(layers) == 6 * 7
    for module in layers:  # compressed-tensors multiplies in the scales' fp16: our exact product, rounded once
        theirs, mine = converted.get_submodule(module).weight, ours.tensors[f"{module}.weight"]
        assert torch.equal(theirs, mine.half().float()), f"{module}: {(theirs - mine).abs().max()}"


def test_gptq_checkpoint_quantizes_and_exports(tmp_path):
    """quantize= packs the dequantized matrices; export_hf of the folder keeps qweight, qzeros, scales
    and g_idx as stored (fp16 scales not cast by dtype=) and the quantization_config; of the loaded
    model writes floats without it."""
    from transformers import AutoModelForCausalLM

    hf = build_hf_model("llama", tmp_path / "src", intermediate_size=128)  # rows of whole Q8_0 blocks
    quantize_folder(hf, tmp_path / "src", bits=4, group_size=32, act_order=True)
    model = load_checking_q8_0(tmp_path / "src")
    path = [0, 1, 2, 3, 2, 3, 4, 5]
    ids = torch.randint(0, 160, (2, 24), generator=torch.Generator().manual_seed(3))
    ref = model.logits(ids, layers=path)
    cf.export_hf(tmp_path / "src", tmp_path / "kept", path, dtype="bfloat16")
    cf.export_hf(model, tmp_path / "floats", path)
    written = safetensors.torch.load_file(tmp_path / "kept" / "model.safetensors")
    source = safetensors.torch.load_file(tmp_path / "src" / "model.safetensors")
    for part in ("qweight", "qzeros", "scales", "g_idx"):  # slot 5 runs layer 3: its parts, as stored
        assert torch.equal(written[f"model.layers.5.mlp.down_proj.{part}"], source[f"model.layers.3.mlp.down_proj.{part}"])
    assert written["model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert json.loads((tmp_path / "floats" / "config.json").read_text()).get("quantization_config") is None
    floats = AutoModelForCausalLM.from_pretrained(tmp_path / "floats", dtype=torch.float32)
    with torch.no_grad():
        assert relative(f"export of the loaded model along {path}, in transformers", floats(ids).logits, ref) < 1e-5
    assert relative(f"the folder's export along {path} (GPTQ parts kept), reloaded",
                    cf.load(tmp_path / "kept", dtype="float32").logits(ids), ref) < 2e-2  # its norms went to bf16
    cf.export_hf(tmp_path / "src", tmp_path / "kept32", path)
    assert relative(f"the folder's fp32 export along {path}, reloaded", cf.load(tmp_path / "kept32").logits(ids),
                    ref) < 1e-6


def _vllm_rule(dynamic: dict, layer: str):
    """The rule vLLM's GPTQ loader gives a layer by its own name: the first pattern re.match-ing it."""
    for pattern, override in dynamic.items():
        if re.match(pattern.removeprefix("-:").removeprefix("+:"), layer):
            return "float" if pattern.startswith("-:") else override or "config"
    return "config"  # the config's own bits and group_size


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_export_keeps_each_modules_dynamic_rule(tmp_path, method):
    """GPTQModel's ``dynamic`` names layers by number: an export along a path gives each slot's modules
    their source layer's rule (for layer 1's MLP 8 bits, or AWQ's group size 32; layer 4's o_proj left
    float) by exact entries."""
    hf = build_hf_model("llama", tmp_path / "src")
    mlp = {"bits": 8, "group_size": 32} if method == "gptq" else {"group_size": 32}
    dynamic = {r"+:model\.layers\.1\.mlp\..*": mlp, r"-:model\.layers\.4\.self_attn\.o_proj$": {}}
    quantize_folder(hf, tmp_path / "src", method=method, bits=4, group_size=16, dynamic=dynamic)
    source = safetensors.torch.load_file(tmp_path / "src" / "model.safetensors")
    assert "model.layers.4.self_attn.o_proj.weight" in source and "model.layers.1.mlp.up_proj.qweight" in source
    path = [0, 1, 1, 2, 3, 4, 4, 5]
    ids = torch.randint(0, 160, (2, 24), generator=torch.Generator().manual_seed(4))
    ref = cf.load(tmp_path / "src").logits(ids, layers=path)
    cf.export_hf(tmp_path / "src", tmp_path / "out", path)
    written = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["dynamic"]
    print(json.dumps(written, indent=1))
    assert written[r"+:^model\.layers\.2\.mlp\.up_proj$"] == mlp  # layer 1 again
    assert r"+:^model\.layers\.1\.mlp\.up_proj$" not in written  # slot 1 is layer 1: the pattern says so already
    assert written[r"-:^model\.layers\.6\.self_attn\.o_proj$"] == {}
    assert written[r"-:^model\.layers\.5\.self_attn\.o_proj$"] == {}  # layer 4's float o_proj
    assert written[r"+:^model\.layers\.4\.self_attn\.o_proj$"] == {}  # layer 3's, quantized by the config
    assert list(written)[-2:] == list(dynamic)  # the source's patterns last
    for slot, layer in enumerate(path):  # vLLM looks its fused layers up by their names (re.match, first wins)
        for module in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            assert _vllm_rule(written, f"model.layers.{slot}.{module}") == \
                _vllm_rule(dynamic, f"model.layers.{layer}.{module}"), (slot, module)
    assert relative(f"the {method} folder's export along {path} with its dynamic rules, reloaded",
                    cf.load(tmp_path / "out").logits(ids), ref) < 1e-6
    back = [0, 1, 2, 3, 5, 4, 6, 7]  # an export of the export: its exact entries are replaced, not kept
    cf.export_hf(tmp_path / "out", tmp_path / "again", back)
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["dynamic"]
    assert again[r"-:^model\.layers\.4\.self_attn\.o_proj$"] == {}  # slot 4 runs slot 5 of out: layer 4
    assert again[r"+:^model\.layers\.5\.self_attn\.o_proj$"] == {}  # slot 5 runs slot 4 of out: layer 3
    assert r"+:^model\.layers\.4\.self_attn\.o_proj$" not in again and r"-:^model\.layers\.5\.self_attn\.o_proj$" \
        not in again  # out's entries for those names, of the other sign: gone
    assert relative("the export of the export, reloaded", cf.load(tmp_path / "again").logits(ids),
                    cf.load(tmp_path / "out").logits(ids, layers=back)) < 1e-6


def test_dequantization_against_plain_loops():
    """Words with known codes, read element by element: GPTQ along the inputs (v1 zeros + 1) with an
    activation-order g_idx, AWQ along the outputs in its order; chunks smaller than the matrix."""
    g = torch.Generator().manual_seed(0)
    inputs, out, groups = 24, 16, 3
    q = torch.randint(0, 16, (inputs, out), generator=g)
    z = torch.randint(0, 16, (groups, out), generator=g)
    s = (torch.rand(groups, out, generator=g) + 0.5).half()
    g_idx = torch.randint(0, groups, (inputs,), generator=g)

    def word(values, bits, positions):
        v = sum(int(x) << (bits * p) for x, p in zip(values, positions))
        return v - (1 << 32) if v >= 1 << 31 else v

    qweight = torch.tensor([[word(q[8 * r:8 * r + 8, o], 4, range(8)) for o in range(out)] for r in range(inputs // 8)],
                           dtype=torch.int32)
    def minus_ones(w):  # GPTQ v1: each word minus 0x11111111 (a zero point of 0 borrows from the next)
        v = (w - 0x11111111) % (1 << 32)
        return v - (1 << 32) if v >= 1 << 31 else v

    qzeros = torch.tensor([[minus_ones(word(z[k, 8 * c:8 * c + 8], 4, range(8))) for c in range(out // 8)]
                           for k in range(groups)], dtype=torch.int32)
    got = dequantize_gptq(qweight, qzeros, s, g_idx, GptqLayout("gptq", 4, 8, True), torch.float32, chunk=64)
    want = torch.tensor([[(q[i, o].item() - z[g_idx[i], o].item()) * s[g_idx[i], o].item() for i in range(inputs)]
                         for o in range(out)])
    assert torch.equal(got, want)
    awq_at = [AUTOAWQ_PACK_ORDER.index(j) for j in range(8)]  # output j of a word sits at nibble awq_at[j]
    qweight = torch.tensor([[word(q[i, 8 * c:8 * c + 8], 4, awq_at) for c in range(out // 8)] for i in range(inputs)],
                           dtype=torch.int32)
    qzeros = torch.tensor([[word(z[k, 8 * c:8 * c + 8], 4, awq_at) for c in range(out // 8)] for k in range(groups)],
                          dtype=torch.int32)
    by_order = torch.arange(inputs) // 8
    got = dequantize_gptq(qweight, qzeros, s, by_order, GptqLayout("awq", 4, 8), torch.float32, chunk=64)
    want = torch.tensor([[(q[i, o].item() - z[i // 8, o].item()) * s[i // 8, o].item() for i in range(inputs)]
                         for o in range(out)])
    assert torch.equal(got, want)
    known = [0, 5, 3, 0, 7, 15, 1, 2]  # stored as [15, 3, 2, 15, 5, 14, 0, 1]: read per code + 1 it was 16, 4, ...
    stored = torch.tensor([[minus_ones(word(known, 4, range(8)))]], dtype=torch.int32)
    assert torch.equal(unpack_words(stored, 4, 8), torch.tensor([[15, 3, 2, 15, 5, 14, 0, 1]], dtype=torch.int32))
    got = dequantize_gptq(torch.zeros(1, 8, dtype=torch.int32), stored, torch.ones(1, 8),
                          torch.zeros(8, dtype=torch.int32), GptqLayout("gptq", 4, -1, True), torch.float32)
    assert torch.equal(got, -torch.tensor(known, dtype=torch.float32)[:, None].expand(8, 8))  # output o: -zero[o]
    for bits in (2, 8):  # every code of a word, in order along the inputs
        per = 32 // bits
        codes = torch.randint(0, 1 << bits, (per, 1), generator=g)
        one = torch.tensor([[word(codes[:, 0], bits, range(per))]], dtype=torch.int32)
        zero = torch.tensor([[word([0] * per, bits, range(per))]], dtype=torch.int32)
        got = dequantize_gptq(one, zero, torch.ones(1, 1), torch.zeros(per, dtype=torch.int32),
                              GptqLayout("gptq", bits, -1), torch.float32)
        assert torch.equal(got, codes.t().float())


def _gptq(**extra) -> dict:
    return {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 8, **extra}}


def test_what_we_cannot_load_is_named():
    assert gptq_config({"quantization_config": {"quant_method": "fp8"}}) is None
    for config, match in ((_gptq(bits=3), "3-bit GPTQ weights are not supported: its codes straddle int32 words"),
                          (_gptq(checkpoint_format="marlin"), "GPTQ checkpoint_format 'marlin' is not supported"),
                          (_gptq(dynamic={".*mlp.*": {"bits": 3}}), "3-bit GPTQ"),
                          (_gptq(pack_dtype="int64"), "pack_dtype 'int64'"),
                          ({"quantization_config": {"quant_method": "awq", "version": "gemv"}},
                           "AWQ version 'gemv' is not supported"),
                          (_gptq(is_marlin_format=True), "GPTQ checkpoint_format 'marlin'"),
                          ({"quantization_config": {"quant_method": "awq", "bits": 8}}, "8-bit AWQ"),
                          ({"quantization_config": {"quant_method": "awq", "dynamic": {".*mlp.*": {"bits": 8}}}},
                           "8-bit AWQ")):
        with pytest.raises(ValueError, match=match):
            gptq_config(config)
    assert gptq_config(_gptq(checkpoint_format="GPTQ_V2"))  # read as transformers reads it, lower case
    with pytest.warns(UserWarning, match="asymmetric GPTQ in the v1 format, not written by GPTQModel"):
        gptq_config(_gptq(sym=False))
    qc = gptq_config(_gptq())
    with pytest.raises(ValueError, match="'model.embed_tokens.qweight': quantized embeddings are not supported"):
        gptq_matrices({"model.embed_tokens.qweight": torch.zeros(2, 8, dtype=torch.int32)}, qc)
    awq = gptq_config({"quantization_config": {"quant_method": "awq", "group_size": 8, "zero_point": True}})
    with pytest.raises(ValueError, match=r"'m' \(4-bit AWQ\) has 'm.qweight' but no 'm.qzeros'"):
        gptq_matrices({"m.qweight": torch.zeros(16, 1, dtype=torch.int32), "m.scales": torch.ones(2, 8)}, awq)
    good = {"m.qweight": torch.zeros(2, 8, dtype=torch.int32), "m.qzeros": torch.zeros(2, 1, dtype=torch.int32),
            "m.scales": torch.ones(2, 8, dtype=torch.float16), "m.g_idx": torch.tensor([0] * 8 + [1] * 8).int()}
    stored, parts = gptq_matrices(good, qc)
    assert stored["m.weight"][0] == (8, 16) and parts == set(good)
    for broken, match in (({"m.qzeros": None}, r"'m' \(4-bit GPTQ\) has 'm.qweight' but no 'm.qzeros'"),
                          ({"m.qweight": torch.zeros(2, 7, dtype=torch.int32)},
                           r"'m.qweight' is torch.int32 \[2, 7\]: expected int32 \[2, 8\] \(4-bit GPTQ\)"),
                          ({"m.qzeros": torch.zeros(2, 1, dtype=torch.int64)}, r"'m.qzeros' is torch.int64"),
                          ({"m.g_idx": torch.tensor([0] * 8 + [2] * 8).int()},
                           r"'m.g_idx' is torch.int32 \[16\]: expected one group index in 0..1 per input"),
                          ({"m.g_idx": None, "m.scales": torch.ones(3, 8), "m.qzeros": torch.zeros(3, 1, dtype=torch.int32)},
                           r"'m.scales' is \[3, 8\]: 16 inputs in groups of 8 make 2 groups"),
                          ({"m.scales": torch.ones(2, 8, dtype=torch.int32)}, r"'m.scales' is torch.int32")):
        tensors = {**good, **broken}
        with pytest.raises(ValueError, match=match):
            gptq_matrices({n: t for n, t in tensors.items() if t is not None}, qc)


def test_a_gptq_folder_with_a_bad_part_names_it(tmp_path):
    hf = build_hf_model("llama", tmp_path)
    quantize_folder(hf, tmp_path, bits=4, group_size=16)
    tensors = safetensors.torch.load_file(tmp_path / "model.safetensors")
    tensors["model.layers.2.self_attn.o_proj.qzeros"] = tensors["model.layers.2.self_attn.o_proj.qzeros"][:, :-1].clone()
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.2.self_attn.o_proj.qzeros' is torch.int32 \[4, 7\]: "
                                         r"expected int32 \[4, 8\]"):
        cf.load(tmp_path)
