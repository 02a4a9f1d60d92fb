"""compressed-tensors checkpoints (circuit_finder.compressed): random models compressed by the
compressed-tensors package itself (its schemes, its observers' formula for the scales, its compressors
and config writer), then read by transformers, which dequantizes them on load
(``CompressedTensorsConfig(dequantize=True)``), and by us: the logits must agree along the identity
and a repeated path. The dequantization is also checked against plain loops (groups by g_idx,
ragged blocks, packed zero points), and every refusal names what it refuses."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch

import circuit_finder as cf
from circuit_finder.compressed import (
    compressed_groups,
    compressed_matrices,
    config_group_of,
    dequantize_compressed,
    unpack_int32,
)
from circuit_finder.loading import quantizer_module_names
from helpers import build_hf_model, load_checking_q8_0, quantized_paths_match, rebuilt, relative

ct = pytest.importorskip("compressed_tensors")


def _scheme(preset: str, targets: list[str], **weights):
    """A compressed-tensors preset scheme, its weight arguments overridden (group_size / block_structure
    that fit the tiny models)."""
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, targets)
    scheme.weights = scheme.weights.model_copy(update=weights)
    return scheme


def _qparams(w: torch.Tensor, args):
    """weight_scale and weight_zero_point of w from its min and max, as compressed-tensors' min-max
    observer computes them (per tensor, row, group of columns or block)."""
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    if args.strategy == "tensor":
        low, high = w.amin().reshape(1), w.amax().reshape(1)
    elif args.strategy == "channel":
        low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    elif args.strategy == "group":
        v = w.unflatten(1, (-1, args.group_size))
        low, high = v.amin(-1), v.amax(-1)
    else:  # blocks, the weight padded with zeros as compressed-tensors pads it
        b0, b1 = args.block_structure
        padded = torch.nn.functional.pad(w, (0, -w.shape[1] % b1, 0, -w.shape[0] % b0))
        v = padded.unflatten(1, (-1, b1)).unflatten(0, (-1, b0))
        low, high = v.amin((1, 3)), v.amax((1, 3))
    return calculate_qparams(low, high, args)


def _observe(module: torch.nn.Module) -> None:
    scale, zero = _qparams(module.weight.data, module.quantization_scheme.weights)
    module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
    if hasattr(module, "weight_zero_point"):
        module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(module.weight_zero_point.shape)


def compress(hf_model, folder, groups: dict) -> None:
    """hf_model saved to folder as compressed-tensors writes it: each config group's scheme applied
    to the Linear layers it targets (lm_head left out), scales observed, weights compressed."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    model = copy.deepcopy(hf_model)
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, ignore=["lm_head"]))
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            _observe(module)
    compressor = ModelCompressor.from_pretrained_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressor.compress_model(model)
        model.save_pretrained(folder)
    compressor.update_config(folder)


def compress_file(folder, scheme, fmt: str) -> None:
    """A saved model's projections (per-expert ones included, as published MoE checkpoints store them;
    not the router, the head, embeddings or norms) compressed in place by compressed-tensors'
    compressor for `fmt`, and the config's quantization_config written by its ModelCompressor."""
    import safetensors.torch
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    compressor, out = BaseCompressor.get_value_from_registry(fmt), {}
    for name, t in safetensors.torch.load_file(folder / "model.safetensors").items():
        if not re.search(r"_proj\.weight$", name):
            out[name] = t
            continue
        scale, zero = _qparams(t, scheme.weights)
        parts = {"weight": t, "weight_scale": scale, **({} if scheme.weights.symmetric else {"weight_zero_point": zero})}
        module = name.removesuffix(".weight")
        out.update({f"{module}.{p}": v.contiguous() for p, v in compressor.compress(parts, scheme).items()})
    safetensors.torch.save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed",
                                ignore=["lm_head", "re:.*mlp.gate$"])
    ModelCompressor(quantization_config=config).update_config(folder)


def decompressed(hf_model, folder, group_of):
    """hf_model with each quantized weight replaced by compressed-tensors' own decompression of what
    `folder` holds (its compressor and scheme for config group number `group_of(module name)`): the
    reference where transformers cannot be one (it dequantizes every dense module by one group's scheme)."""
    import safetensors.torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    stored = safetensors.torch.load_file(folder / "model.safetensors")
    groups = list(json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"].values())
    model = copy.deepcopy(hf_model)
    for name in [n.removesuffix(".weight_scale") for n in stored if n.endswith(".weight_scale")]:
        scheme = QuantizationScheme.model_validate(groups[group_of(name)])
        parts = {n.removeprefix(name + "."): t for n, t in stored.items() if n.startswith(name + ".")}
        dense = BaseCompressor.get_value_from_registry(scheme.format).decompress(parts, scheme)["weight"]
        model.get_submodule(name).weight.data = dense.float()
    return model


CASES = {  # id: (architecture, config groups)
    "llama-fp8-dynamic": ("llama", {"g": _scheme("FP8_DYNAMIC", ["Linear"])}),
    "mistral-fp8-static": ("mistral", {"g": _scheme("FP8", ["Linear"])}),
    "qwen3-fp8-ragged-blocks": ("qwen3", {"g": _scheme("FP8_BLOCK", ["Linear"], block_structure=[16, 48])}),
    "qwen2-w8a8": ("qwen2", {"g": _scheme("W8A8", ["Linear"])}),
    "phi3-w4a16": ("phi3", {"g": _scheme("W4A16", ["Linear"], group_size=16)}),
    "gemma3-w4a16-asym": ("gemma3_text", {"g": _scheme("W4A16_ASYM", ["Linear"], group_size=16)}),
    "llama-mixed-w8-w4": ("llama", {"attention": _scheme("W8A16", ["re:.*self_attn.*"], strategy="channel", group_size=None),
                                    "mlp": _scheme("W4A16_ASYM", ["Linear"], group_size=16)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_checkpoint_matches_transformers_dequantizing_it(tmp_path, case):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    arch, groups = CASES[case]
    hf = build_hf_model(arch, tmp_path / "float")
    compress(hf, tmp_path, groups)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    print(case, "format", config["format"])
    ids = torch.randint(0, 160, (2, 24), generator=torch.Generator().manual_seed(0))
    if len(groups) > 1:  # attention by the first group, the rest by the second
        ref_model = decompressed(hf, tmp_path, lambda m: 0 if ".self_attn." in m else 1)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_model = AutoModelForCausalLM.from_pretrained(
                tmp_path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    ours = cf.load(tmp_path)
    assert not any(n.endswith(("weight_scale", "weight_packed")) for n in ours.tensors)
    for layers in ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 2, 3, 4, 5]):
        with torch.no_grad():
            ref = rebuilt(ref_model, layers)(ids).logits
            exact = rebuilt(hf, layers)(ids).logits
        assert relative(f"{case} vs {'compressed-tensors' if len(groups) > 1 else 'transformers'} dequantizing it, "
                        f"path {layers}",
                        ours.logits(ids, layers=layers), ref) < 1e-5
        assert relative(f"{case}: the quantization error itself (vs the float model)", ref, exact) > 1e-4


@pytest.mark.parametrize("preset, fmt", [("FP8_DYNAMIC", "float-quantized"), ("W4A16", "pack-quantized")])
def test_compressed_moe_checkpoint_per_expert(tmp_path, preset, fmt):
    """A mixture of experts as published compressed checkpoints store it (Qwen3-30B-A3B-FP8-dynamic,
    -quantized.w4a16): every expert's projections compressed under their own names, the router not;
    transformers dequantizes them and stacks the experts, we dequantize them one by one."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    hf = build_hf_model("qwen3_moe", tmp_path)
    compress_file(tmp_path, _scheme(preset, ["Linear"], group_size=8 if fmt == "pack-quantized" else None), fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                         quantization_config=CompressedTensorsConfig(dequantize=True))
    ours = cf.load(tmp_path)
    assert not any(n.endswith((".weight_scale", ".weight_packed", ".weight_shape")) for n in ours.tensors)
    ids = torch.randint(0, 160, (2, 20), generator=torch.Generator().manual_seed(2))
    quantized_paths_match(f"qwen3_moe {preset} (reference: transformers dequantizing it)", ours, ref_model, hf, ids,
                          paths=([0, 1, 2, 3, 4, 5], [0, 1, 2, 1, 2, 3, 4, 5]))


def test_compressed_checkpoint_quantizes_and_exports(tmp_path):
    """quantize= packs the dequantized matrices; export_hf of the folder keeps the compressed parts and
    their quantization_config (scales not cast by dtype=), of the loaded model writes floats; both
    read back by transformers along the path."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    hf = build_hf_model("llama", tmp_path / "float", intermediate_size=128)  # rows of whole Q8_0 blocks
    compress(hf, tmp_path, {"g": _scheme("W4A16_ASYM", ["Linear"], group_size=16)})
    model = load_checking_q8_0(tmp_path)
    path = [0, 1, 2, 3, 2, 3, 4, 5]
    ids = torch.randint(0, 160, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = model.logits(ids, layers=path)
    cf.export_hf(tmp_path, tmp_path / "kept", path, dtype="bfloat16")
    cf.export_hf(model, tmp_path / "floats", path)
    import safetensors.torch

    written = safetensors.torch.load_file(tmp_path / "kept" / "model.safetensors")
    assert written["model.layers.5.mlp.down_proj.weight_scale"].dtype == torch.float32  # as stored, not bf16
    assert written["model.layers.5.mlp.down_proj.weight_packed"].dtype == torch.int32
    assert written["model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "floats" / "config.json").read_text()).get("quantization_config") is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = AutoModelForCausalLM.from_pretrained(tmp_path / "kept", dtype=torch.float32,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True))
        floats = AutoModelForCausalLM.from_pretrained(tmp_path / "floats", dtype=torch.float32)
        cf.export_hf(tmp_path, tmp_path / "kept32", path)
        kept32 = AutoModelForCausalLM.from_pretrained(tmp_path / "kept32", dtype=torch.float32,
                                                      quantization_config=CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        assert relative(f"export of the loaded model along {path}, in transformers", floats(ids).logits, ref) < 1e-5
        assert relative(f"the folder's export along {path} (compressed parts kept), in transformers",
                        kept32(ids).logits, ref) < 1e-5
        assert relative("the folder's export in bf16 (compressed parts kept), ours vs transformers",
                        cf.load(tmp_path / "kept", dtype="float32").logits(ids), kept(ids).logits) < 1e-5


def test_activation_and_cache_scales_are_named_and_exported_with_their_config(tmp_path):
    """A checkpoint whose weights are float and whose activations and KV cache were quantized (input_scale,
    k_scale / v_scale; the config written by compressed-tensors): it loads with a warning that the scales
    are not applied, runs as the float model; export_hf of the folder keeps the scales and the config
    that describes them (it dropped the config and kept the scales), of the loaded model neither."""
    import safetensors.torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    hf = build_hf_model("llama", tmp_path)
    stored = safetensors.torch.load_file(tmp_path / "model.safetensors")
    for name in list(stored):
        if name.endswith("_proj.weight"):
            stored[name.replace(".weight", ".input_scale")] = torch.tensor([0.02])
        if name.endswith("k_proj.weight"):
            for cache in ("k_scale", "v_scale"):
                stored[name.replace("k_proj.weight", cache)] = torch.tensor(0.1)
    safetensors.torch.save_file(stored, tmp_path / "model.safetensors", metadata={"format": "pt"})
    fp8 = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False)
    config = QuantizationConfig(config_groups={"g": QuantizationScheme(targets=["Linear"], input_activations=fp8)},
                                kv_cache_scheme=fp8, quantization_status="compressed", ignore=["lm_head"])
    ModelCompressor(quantization_config=config).update_config(tmp_path)
    with pytest.warns(UserWarning, match=r"54 activation / KV-cache scales .* are not applied") as said:
        model = cf.load(tmp_path)
    assert [w.filename for w in said if "KV-cache" in str(w.message)] == [__file__]  # the cf.load line
    path = [0, 1, 2, 1, 2, 3, 4, 5]
    ids = torch.randint(0, 160, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = rebuilt(hf, path)(ids).logits
    assert relative(f"activation-quantized checkpoint along {path} vs the float model", model.logits(ids, layers=path),
                    ref) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cf.export_hf(tmp_path, tmp_path / "kept", path)
        cf.export_hf(model, tmp_path / "floats", path)
    kept = safetensors.torch.load_file(tmp_path / "kept" / "model.safetensors")
    qc = json.loads((tmp_path / "kept" / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"]["num_bits"] == 8 and qc["config_groups"]["g"]["input_activations"]["type"] == "float"
    assert {n for n in kept if n.startswith("model.layers.7.") and "scale" in n} == {
        *(f"model.layers.7.{m}.input_scale" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
        "model.layers.7.self_attn.k_scale", "model.layers.7.self_attn.v_scale"}
    floats = safetensors.torch.load_file(tmp_path / "floats" / "model.safetensors")
    assert not any("scale" in n for n in floats)
    assert "quantization_config" not in json.loads((tmp_path / "floats" / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = cf.load(tmp_path / "kept")
    assert relative("its export, reloaded", again.logits(ids), ref) < 1e-5


def test_dequantization_against_plain_loops():
    """Packed 4-bit codes with packed zero points and GPTQ's g_idx; 8-bit codes in ragged blocks;
    float8 per row; each against a loop over the elements."""
    g = torch.Generator().manual_seed(0)
    rows, cols = 10, 24
    q = torch.randint(-8, 8, (rows, cols), generator=g)
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for j in range(cols):
        words[:, j // 8] |= (q[:, j] + 8) << (4 * (j % 8))
    words = ((words + 2**31) % 2**32 - 2**31).to(torch.int32)  # the words' bits as int32
    assert torch.equal(unpack_int32(words, 4, cols), q.int())
    scale, zero = torch.rand(rows, 3, generator=g) + 0.5, torch.randint(-8, 8, (rows, 3), generator=g)
    g_idx = torch.randint(0, 3, (cols,), generator=g)
    weights = {"num_bits": 4, "strategy": "group", "group_size": 8}
    got = dequantize_compressed(words, scale, zero, g_idx, (rows, cols), 4, weights, torch.float32, chunk=4)
    want = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            want[i, j] = (q[i, j] - zero[i, g_idx[j]]) * scale[i, g_idx[j]]
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    codes = torch.randint(-128, 128, (40, 70), generator=g, dtype=torch.int8)
    blocks = torch.rand(3, 3, generator=g) + 0.5  # 16 x 32 blocks: 16 + 16 + 8 rows, 32 + 32 + 6 columns
    got = dequantize_compressed(codes, blocks, None, None, (40, 70), None,
                                {"strategy": "block", "block_structure": [16, 32]}, torch.float32, chunk=20)
    want = torch.tensor([[codes[i, j].item() * blocks[i // 16, j // 32].item() for j in range(70)] for i in range(40)])
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    f8, per_row = (torch.randn(5, 7, generator=g) * 8).to(torch.float8_e4m3fn), torch.rand(5, 1, generator=g)
    got = dequantize_compressed(f8, per_row, None, None, (5, 7), None, {"strategy": "channel"}, torch.float32)
    assert torch.equal(got, f8.float() * per_row)


def _config(fmt="pack-quantized", bits=4, **extra) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": 8}
    return {"quantization_config": {"quant_method": "compressed-tensors", "format": fmt, "quantization_status":
                                    "compressed", "config_groups": {"g": {"targets": ["Linear"], "weights": weights}},
                                    **extra}}


def test_what_we_cannot_load_is_named():
    assert compressed_groups({"quantization_config": {"quant_method": "fp8"}}) is None
    for config, match in ((_config("nvfp4-pack-quantized"), "format 'nvfp4-pack-quantized' is not supported"),
                          (_config(bits=3), "3-bit packing is not supported"),
                          (_config(transform_config={"t": {}}), "transforms .* are not supported"),
                          (_config(sparsity_config={"format": "sparse-24-bitmask"}), "sparsity .* not supported"),
                          (_config(quantization_status="frozen"), "quantization_status 'frozen'")):
        with pytest.raises(ValueError, match=match):
            compressed_groups(config)
    groups = compressed_groups(_config())
    words = torch.zeros(4, 2, dtype=torch.int32)
    good = {"m.weight_packed": words, "m.weight_shape": torch.tensor([4, 16]), "m.weight_scale": torch.ones(4, 2)}
    stored, parts = compressed_matrices(good, groups)
    assert stored["m.weight"][0] == (4, 16) and parts == set(good)
    for broken, match in (({"m.weight_shape": None}, r"'m' \(pack-quantized\) has no 'm.weight_shape'"),
                          ({"m.weight_scale": torch.ones(4, 3)}, r"'m.weight_scale' is \[4, 3\]: expected \[4, 2\]"),
                          ({"m.weight_packed": words[:, :1]}, r"'m.weight_packed' is torch.int32 \[4, 1\]: expected "
                                                              r"int32 \[4, 2\]"),
                          ({"m.weight_g_idx": torch.zeros(15)}, r"'m.weight_g_idx' is \[15\]: one group index per "
                                                                r"column \(16\)")):
        tensors = {**good, **broken}
        with pytest.raises(ValueError, match=match):
            compressed_matrices({n: t for n, t in tensors.items() if t is not None}, groups)
    only_attention = [g.__class__(("re:.*self_attn.*",), g.format, g.weights) for g in groups]
    with pytest.raises(ValueError, match="'m' holds compressed-tensors weights but no config group targets it"):
        compressed_matrices(good, only_attention)
    with pytest.raises(ValueError, match=r"'m.weight' is torch.float32 \[4, 16\]: a float-quantized weight"):
        compressed_matrices({"m.weight": torch.ones(4, 16), "m.weight_scale": torch.ones(4, 1)},
                            compressed_groups(_config("float-quantized", 8)))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_codes_and_zero_points_as_compressed_tensors_packs_them(bits):
    """Codes and zero points packed by compressed-tensors' own pack_to_int32 (rows and columns not
    whole words), read through compressed_matrices, against a loop; an all-zero zero point of a
    symmetric scheme (very old checkpoints) is ignored, as compressed-tensors does; -1 in g_idx
    means column order."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g, rows, cols, size = torch.Generator().manual_seed(bits), 13, 40, 8
    low, high = -(1 << (bits - 1)), 1 << (bits - 1)
    q = torch.randint(low, high, (rows, cols), generator=g, dtype=torch.int8)
    zero = torch.randint(low, high, (rows, cols // size), generator=g, dtype=torch.int8)
    scale = torch.rand(rows, cols // size, generator=g) + 0.5
    tensors = {"m.weight_packed": pack_to_int32(q, bits), "m.weight_shape": torch.tensor([rows, cols]),
               "m.weight_scale": scale, "m.weight_zero_point": pack_to_int32(zero, bits, packed_dim=0)}
    config = _config(bits=bits)
    config["quantization_config"]["config_groups"]["g"]["weights"].update(symmetric=False, group_size=size)
    stored, _ = compressed_matrices(tensors, compressed_groups(config))
    want = torch.tensor([[(q[i, j].item() - zero[i, j // size].item()) * scale[i, j // size].item() for j in range(cols)]
                         for i in range(rows)])
    assert torch.allclose(stored["m.weight"][1](torch.float32, "cpu"), want, rtol=1e-6, atol=0)
    unpacked = {**tensors, "m.weight_zero_point": zero}  # stored as it is (before zero points were packed)
    assert torch.allclose(compressed_matrices(unpacked, compressed_groups(config))[0]["m.weight"][1](
        torch.float32, "cpu"), want, rtol=1e-6, atol=0)
    symmetric = compressed_groups(_config(bits=bits))
    zeros = {**tensors, "m.weight_zero_point": torch.zeros(rows, cols // size, dtype=torch.int8),
             "m.weight_g_idx": torch.full((cols,), -1)}
    plain = torch.tensor([[q[i, j].item() * scale[i, j // size].item() for j in range(cols)] for i in range(rows)])
    assert torch.allclose(compressed_matrices(zeros, symmetric)[0]["m.weight"][1](torch.float32, "cpu"), plain,
                          rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"'m.weight_zero_point' is torch.int8 \[13\]: expected one per scale"):
        compressed_matrices({**tensors, "m.weight_zero_point": zero[:, 0]}, compressed_groups(config))


def test_config_groups_are_chosen_as_compressed_tensors_chooses_them():
    """Which group quantized a module, against compressed-tensors' own matcher (match_targets, the
    first target of each module's sorted matches, each target owned by the last group listing
    it): two patterns matching one module (the alphabetically first wins, not the later group), a
    module-name target beside a class target ("lm_head" is no class: it does not take every
    Linear), exact names over patterns over classes."""
    from compressed_tensors.utils.match import match_targets

    w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}
    layouts = [[["Linear"], ["lm_head"]], [["re:.*down_proj$"], ["re:.*mlp\\..*"]],
               [["re:.*mlp\\..*"], ["re:.*down_proj$"]], [["Linear"], ["re:.*proj"], ["model.layers.0.mlp.up_proj"]],
               [["Linear", "re:.*up_proj"], ["re:.*up_proj"]], [["Embedding"], ["Linear"]]]
    modules = [("model.layers.0.mlp.up_proj", torch.nn.Linear(2, 2)), ("model.layers.1.mlp.down_proj",
               torch.nn.Linear(2, 2)), ("lm_head", torch.nn.Linear(2, 2)), ("model.embed_tokens", torch.nn.Embedding(2, 2))]
    checked = 0
    for layout in layouts:
        q = {"quant_method": "compressed-tensors", "format": "pack-quantized",
             "config_groups": {f"g{k}": {"targets": t, "weights": w} for k, t in enumerate(layout)}}
        groups = compressed_groups({"quantization_config": q})
        owner = {t: k for k, targets in enumerate(layout) for t in targets}
        for name, module in modules:
            matched = match_targets(name, module, list(owner))
            if not matched:
                with pytest.raises(ValueError, match="no config group targets it"):
                    config_group_of((name,), groups)
                continue
            want = groups[owner[matched[0]]]
            print(layout, name, "->", matched[0])
            assert config_group_of((name,), groups) is want, (layout, name)
            checked += 1
    assert checked >= 15


def test_module_groups_and_weight_kinds_as_compressed_tensors_reads_them():
    """A target naming the module exactly wins over a pattern, a pattern over a class name; FP8
    weights alone are written as naive-quantized; a float8 weight without its scale is refused;
    a group index past the scale's groups is refused by name."""
    w = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
    q = {"quant_method": "compressed-tensors", "format": "naive-quantized", "config_groups": {
        "a": {"targets": ["Linear"], "weights": w},
        "b": {"targets": ["re:.*proj"], "weights": {**w, "strategy": "tensor"}},
        "c": {"targets": ["model.layers.0.q_proj"], "weights": {**w, "strategy": "group", "group_size": 4}}}}
    groups = compressed_groups({"quantization_config": q})
    f8 = torch.ones(4, 8).to(torch.float8_e4m3fn)
    for module, scale in (("model.layers.0.q_proj", torch.ones(4, 2)), ("model.layers.1.q_proj", torch.ones(1)),
                          ("model.layers.1.up", torch.ones(4, 1))):
        stored, _ = compressed_matrices({f"{module}.weight": f8, f"{module}.weight_scale": scale}, groups)
        assert torch.equal(stored[f"{module}.weight"][1](torch.float32, "cpu"), torch.ones(4, 8))
    with pytest.raises(ValueError, match="float8 tensor 'x.weight' has no 'x.weight_scale'"):
        compressed_matrices({"x.weight": f8}, groups)
    module = "model.layers.0.q_proj"  # group c: 2 groups of 4 columns
    for g_idx, message in ((torch.tensor([0, 0, 0, 0, 1, 1, 5, 1]), r"holds group 5; the weight_scale has 2 groups"),
                           (torch.zeros(8), "is torch.float32: group indices are integers")):
        tensors = {f"{module}.weight": f8, f"{module}.weight_scale": torch.ones(4, 2), f"{module}.weight_g_idx": g_idx}
        with pytest.raises(ValueError, match=rf"'{re.escape(module)}.weight_g_idx' {message}"):
            compressed_matrices(tensors, groups)
    wrapper = {**q, "config_groups": {**q["config_groups"], "c": {  # targets under a v5 wrapper's module names
        "targets": ["model.language_model.layers.0.q_proj"], "weights": q["config_groups"]["c"]["weights"]},
        "d": {"targets": ["re:.*language_model\\.layers\\.2\\."], "weights": w}}}
    groups = compressed_groups({"quantization_config": wrapper})
    # (d's pattern sorts before "re:.*proj", so it wins where it matches, as in compressed-tensors)
    for module, scale in (("model.layers.0.q_proj", torch.ones(4, 2)), ("model.layers.2.q_proj", torch.ones(4, 1))):
        tensors = {f"{module}.weight": f8, f"{module}.weight_scale": scale}  # loaded: model.*
        with pytest.raises(ValueError, match=rf"'{re.escape(module)}.weight_scale' is \[4, \d\]: expected \[1\]"):
            compressed_matrices(tensors, groups)  # under its loaded name alone: the per-tensor pattern group
        stored, _ = compressed_matrices(tensors, groups, quantizer_module_names)
        assert torch.equal(stored[f"{module}.weight"][1](torch.float32, "cpu"), torch.ones(4, 8))
    assert compressed_groups({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
        "kv": {"targets": ["re:.*self_attn$"], "input_activations": {"num_bits": 8}}}}}) == []


def test_exact_module_names_follow_the_path_in_an_export():
    """llm-compressor lists every module it left float by name (each MoE router: model.layers.N.mlp.gate):
    an export along a path names them per slot (a layer run twice twice, a skipped layer not at all),
    patterns left as they are, so transformers and vLLM build the right modules float."""
    from circuit_finder import LayerPath
    from circuit_finder.export import remap_config

    qc = {"quant_method": "compressed-tensors", "ignore": ["lm_head", "model.layers.1.mlp.gate",
                                                           "model.layers.3.mlp.gate", r"re:.*layers\.0\..*"],
          "config_groups": {"g": {"targets": ["Linear", "model.layers.2.self_attn.q_proj"]}}}
    out = remap_config({"num_hidden_layers": 4, "quantization_config": qc}, LayerPath.coerce([0, 1, 2, 1, 2], 4))
    assert out["quantization_config"]["ignore"] == ["lm_head", "model.layers.1.mlp.gate", "model.layers.3.mlp.gate",
                                                    r"re:.*layers\.0\..*"]
    assert out["quantization_config"]["config_groups"]["g"]["targets"] == [
        "Linear", "model.layers.2.self_attn.q_proj", "model.layers.4.self_attn.q_proj"]
    assert qc["ignore"][2] == "model.layers.3.mlp.gate"  # the source config is not modified
