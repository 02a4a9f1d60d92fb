"""Mixture-of-experts families (issue #14): Mixtral, Qwen2-MoE (shared expert, a dense layer),
Qwen3-MoE (renormalised top-k, every other layer dense) and GPT-OSS (sinks, alternating windows,
biased router and experts, clamped SwiGLU, MXFP4 checkpoints) against transformers on tiny random
models: identity, RYS and triple-repeat paths in fp32 and bf16, cached decode, padded greedy
generation, fixed-shape decode; all expert layouts (the hub's per-expert tensors as save_pretrained
writes them, the stacked tensors transformers v5 holds, GGUF files with stacked *_exps); a repeated
MoE block runs the same expert tensors (no copies); exports along a path load in transformers and
keep each slot's MLP kind; config edge cases; experts as grouped GEMMs (the GPU's bf16 route, forced
on the CPU), the hybrids' MoE included. Printed diffs before each assert. Qwen3.5 / Qwen3-Next's
other tests are in test_hybrid.py."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import circuit_finder as cf
from circuit_finder import LayerPath
from helpers import MOE_ARCHS, build_hf_model, follow_config_clamp, half_errors, rebuilt, relative, tokens

N = 6
PATHS = {"identity": LayerPath.identity(N), "rys": LayerPath.duplicate(N, 2, 4),
         "triple": LayerPath.duplicate(N, 1, 3, times=3)}


@pytest.fixture(scope="module", params=MOE_ARCHS)
def moe(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, build_hf_model(request.param, folder)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_moe_paths_match_transformers(moe, name):
    arch, folder, hf = moe
    model = cf.load(folder)
    assert model.config.num_experts > 0 and any(model.config.sparse_layers)
    ids = tokens(2, 20, seed=1)
    with torch.no_grad():
        ref = rebuilt(hf, list(PATHS[name]))(ids).logits
    out = model.logits(ids, layers=PATHS[name])
    assert relative(f"{arch} {name}", out, ref) < 1e-4
    if name != "identity":
        assert (model.logits(ids) - out).abs().max() > 1e-3  # the path changes the output: the test can fail


def test_moe_config_read_as_transformers_does(moe):
    arch, folder, hf = moe
    c = cf.load(folder).config
    text = hf.config
    sparse = [int(hasattr(layer.mlp, "experts")) for layer in hf.model.layers]  # transformers' own choice
    assert list(c.sparse_layers) == sparse and 0 < sum(sparse) <= N
    assert c.experts_per_tok == text.num_experts_per_tok and c.num_experts == (4 if arch != "qwen3_moe" else 6)
    assert c.norm_topk_prob == (arch != "qwen2_moe") and c.router_weights_fp32 == (arch == "mixtral")
    assert c.shared_expert_intermediate_size == (80 if arch == "qwen2_moe" else 0)


def test_moe_cached_decode_and_padded_generation(moe):
    arch, folder, hf = moe
    model = cf.load(folder)
    path = list(PATHS["rys"])
    ids = tokens(2, 18, seed=2)
    full = model.logits(ids, layers=path)
    cache = model.engine.new_cache(path, 2, 32)
    pos = torch.arange(18).expand(2, 18).contiguous()
    with torch.inference_mode():
        parts = [model.engine.forward(ids[:, :10], pos[:, :10], None, path, cache, False)]
        for t in range(10, 18):
            parts.append(model.engine.forward(ids[:, t:t + 1], pos[:, t:t + 1], None, path, cache, False))
    assert relative(f"{arch} cached decode", torch.cat(parts, 1), full) < 1e-5
    prompt, mask = tokens(2, 9, seed=3), torch.ones(2, 9, dtype=torch.long)
    prompt[1, :4], mask[1, :4] = 0, 0
    with torch.no_grad():
        ref = rebuilt(hf, path).generate(prompt, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
                                         do_sample=False, pad_token_id=0)[:, 9:]
    ours = model.generate(prompt, layers=path, attention_mask=mask, max_new_tokens=10, min_new_tokens=10)
    print(f"{arch} generate: ours {ours.tolist()} ref {ref.tolist()}")
    assert torch.equal(ours, ref)


def test_moe_fixed_shape_decode_equals_dynamic(moe):
    """The fixed-shape decode step (CUDA's path; a graph there when the experts run grouped) gives
    the dynamic step's tokens on the CPU too."""
    arch, folder, _ = moe
    model = cf.load(folder)
    prompt, mask = tokens(2, 7, seed=8), torch.ones(2, 7, dtype=torch.long)
    prompt[0, :2], mask[0, :2] = 0, 0
    kw = dict(layers=PATHS["triple"], attention_mask=mask, max_new_tokens=8, min_new_tokens=8)
    dynamic = model.generate(prompt, **kw)
    model.static_decode = True
    assert torch.equal(model.generate(prompt, **kw), dynamic)


def test_stacked_expert_layout_equals_the_hub_layout(moe):
    """transformers v5 holds experts stacked (gate_up_proj [E, 2I, H], down_proj [E, H, I]) and saves
    them per expert: both load, run the same numbers, and the stacked ones are used in place."""
    arch, folder, hf = moe
    hub = cf.load(folder)
    state = {k: v.detach() for k, v in hf.state_dict().items()}
    stacked = cf.load_from_tensors(json.loads((folder / "config.json").read_text()), state)
    ids = tokens(1, 12, seed=4)
    assert relative(f"{arch} stacked vs hub", stacked.logits(ids, layers=PATHS["rys"]),
                    hub.logits(ids, layers=PATHS["rys"])) < 1e-6
    layer = next(i for i in range(N) if hub.config.sparse_layers[i])
    gate_up = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
    views = stacked.engine.layer_tensors(layer)
    for e in range(hub.config.num_experts):  # views into the stacked tensor, not copies
        assert views[f"experts.{e}.gate_up_proj"].data_ptr() == gate_up[e].data_ptr()
    names = hub.engine.layer_tensors(layer)
    assert f"experts.{hub.config.num_experts - 1}.down_proj" in names and "router" in names


def test_repeated_moe_block_adds_no_expert_weights(moe):
    arch, folder, _ = moe
    model = cf.load(folder)
    layer = next(i for i in range(N) if model.config.sparse_layers[i])
    owned = {t.untyped_storage().data_ptr() for t in model.tensors.values()}
    before = {name: t.data_ptr() for name, t in model.engine.layer_tensors(layer).items()}
    # the engine runs the loaded tensors themselves (or views of stacked ones)
    assert {t.untyped_storage().data_ptr() for t in model.engine.layer_tensors(layer).values()} <= owned
    model.logits(tokens(1, 6), layers=[layer] * 4 + list(range(N)))  # the block four times over
    assert {name: t.data_ptr() for name, t in model.engine.layer_tensors(layer).items()} == before
    assert len(model.engine.layer_tensors(layer)) == len(before)


def test_moe_export_keeps_each_slots_mlp_kind(moe, tmp_path):
    arch, folder, hf = moe
    path = LayerPath.parse("0..3,2,3,2,3,4,5")  # the dense layer 2 of Qwen2-MoE repeated; Qwen3's 2 dense too
    out = cf.export_hf(str(folder), tmp_path / "out", path)
    exported = cf.load(out)
    config = json.loads((out / "config.json").read_text())
    print(arch, "exported mlp_only_layers:", config.get("mlp_only_layers"), "sparse:", exported.config.sparse_layers)
    model = cf.load(folder)
    assert list(exported.config.sparse_layers) == [model.config.sparse_layers[i] for i in path]
    ids = tokens(1, 10, seed=5)
    ours = model.logits(ids, layers=path)
    assert relative(f"{arch} export", exported.logits(ids), ours) < 1e-6
    names = load_file(str(out / "model.safetensors"))
    if arch == "gpt_oss":  # its published layout is stacked, gate and up columns alternating
        assert "model.layers.9.mlp.experts.gate_up_proj" in names and "mlp_only_layers" not in config
    else:
        assert any(".experts.0." in name for name in names)  # per expert
    assert relative(f"{arch} export in transformers", transformers_logits(out, ids), ours) < 1e-4


def transformers_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        follow_config_clamp(hf)
        return hf(ids).logits


def test_moe_bf16_error_within_twice_transformers(moe):
    """bf16 (where Mixtral's fp32 mixing and Qwen's cast-first differ): our error against the fp32
    reference at most twice transformers' own bf16 error."""
    arch, folder, hf = moe
    e_ours, e_theirs = half_errors(arch, hf, folder, tokens(2, 16, seed=9), PATHS["rys"])
    assert e_ours <= 2 * e_theirs + 1e-3


def test_moe_bad_inputs_name_the_problem(moe, tmp_path):
    arch, folder, hf = moe
    config = json.loads((folder / "config.json").read_text())
    bad = dict(config, num_experts_per_tok=99)
    with pytest.raises(cf.ConfigError, match="num_experts_per_tok"):
        cf.load_from_tensors(bad, {})
    state = {k: v.detach() for k, v in hf.state_dict().items()}
    layer = next(i for i in range(N) if cf.load(folder).config.sparse_layers[i])
    name = f"model.layers.{layer}.mlp.experts.down_proj"
    state[name] = state[name][:, :, :-1]
    with pytest.raises(cf.WeightError, match=f"tensor '{name}': expected shape"):
        cf.load_from_tensors(config, state)


GGUF_SIZES = {"mixtral": dict(intermediate_size=128, sliding_window=None),  # llama GGUF keys carry no window
              "qwen2_moe": dict(intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=96),
              "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=64),
              "gpt_oss": dict(intermediate_size=64, swiglu_limit=7.0)}  # llama.cpp fixes the clamp at 7


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_gguf_matches_transformers(arch, tmp_path):
    """A GGUF written the way llama.cpp's converters lay MoE files out (llama with experts for
    Mixtral, qwen2moe, qwen3moe, gpt-oss: stacked ffn_{gate,up,down}_exps, ffn_gate_inp, the shared
    expert's tensors, gpt-oss's biases and sinks; dense layers without a router) loads with its
    experts and matches."""
    from helpers import write_gguf

    hf = build_hf_model(arch, tmp_path / "hf", **GGUF_SIZES[arch])
    written = write_gguf(hf, tmp_path / "f32.gguf")
    assert any(name.endswith("ffn_gate_exps.weight") for name in written)
    model = cf.load(tmp_path / "f32.gguf")
    assert model.config.architecture == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                                         "qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}[arch]
    assert list(model.config.sparse_layers) == list(cf.load(tmp_path / "hf").config.sparse_layers)
    ids = tokens(2, 16, seed=6)
    for name in ("identity", "rys"):
        with torch.no_grad():
            ref = rebuilt(hf, list(PATHS[name]))(ids).logits
        assert relative(f"{arch} gguf f32 {name}", model.logits(ids, layers=PATHS[name]), ref) < 1e-4
    out = cf.export_hf(tmp_path / "f32.gguf", tmp_path / "export", PATHS["rys"])  # per-expert names
    assert relative(f"{arch} gguf export in transformers", transformers_logits(out, ids),
                    model.logits(ids, layers=PATHS["rys"])) < 1e-4
    path_file = cf.export_gguf(tmp_path / "f32.gguf", tmp_path / "path.gguf", PATHS["rys"])  # blocks copied
    exported = cf.load(path_file)
    assert list(exported.config.sparse_layers) == [model.config.sparse_layers[i] for i in PATHS["rys"]]
    assert relative(f"{arch} gguf exported along rys", exported.logits(ids), model.logits(ids, layers=PATHS["rys"])) < 1e-5
    write_gguf(hf, tmp_path / "q8.gguf", "Q8_0")  # 8-bit experts: close on average (a token whose
    q8 = cf.load(tmp_path / "q8.gguf").logits(ids, layers=PATHS["rys"])  # top-k flips may differ more)
    f32 = model.logits(ids, layers=PATHS["rys"])
    relative(f"{arch} gguf q8_0 vs f32", q8, f32)
    assert ((q8 - f32).abs().mean() / f32.abs().mean()).item() < 0.05
    # packed experts are dequantized as their shard is written (GPT-OSS's regrouped too), small shards
    out = cf.export_hf(tmp_path / "q8.gguf", tmp_path / "q8-export", PATHS["rys"], max_shard_size="64KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert relative(f"{arch} q8_0 gguf export in transformers", transformers_logits(out, ids), q8) < 1e-4


def test_moe_config_edge_cases(moe, tmp_path):
    arch, folder, hf = moe
    config = json.loads((folder / "config.json").read_text())
    state = {k: v.detach() for k, v in hf.state_dict().items()}
    if arch == "qwen3_moe":  # every layer slides iff use_sliding_window; layer_types are not read
        on = cf.load_from_tensors(dict(config, use_sliding_window=True, sliding_window=5), state).config
        off = cf.load_from_tensors(dict(config, sliding_window=5, layer_types=["sliding_attention"] * N), state).config
        assert on.sliding_window == (5,) * N and off.sliding_window == (0,) * N
    if arch == "qwen2_moe":
        with pytest.warns(UserWarning, match=r"18 tensor\(s\) this model's config does not use, left out: "
                          r"model\.layers\.0\.self_attn\.k_proj\.bias"):  # the biases qkv_bias=False drops
            assert not cf.load_from_tensors(dict(config, qkv_bias=False), state).config.qkv_bias
        with pytest.raises(cf.ConfigError, match="use_sliding_window without layer_types"):
            cf.load_from_tensors({k: v for k, v in dict(config, use_sliding_window=True).items() if k != "layer_types"},
                                 state)
    if arch == "mixtral":  # a shared-expert key is Qwen2-MoE's alone
        assert cf.load_from_tensors(dict(config, shared_expert_intermediate_size=32), state).config \
            .shared_expert_intermediate_size == 0


def test_old_per_expert_mixtral_gguf_is_refused(tmp_path):
    from helpers import write_gguf

    hf = build_hf_model("mixtral", tmp_path / "hf", intermediate_size=128, sliding_window=None)
    old = {"blk.0.ffn_gate.0.weight": (torch.zeros(128, 64).numpy(), __import__("gguf").GGMLQuantizationType.F32)}
    write_gguf(hf, tmp_path / "old.gguf", extra_tensors=old)
    with pytest.raises(cf.GGUFError, match="one tensor each"):
        cf.load(tmp_path / "old.gguf")


# ----------------------------------------------------------------------------- GPT-OSS specifics
@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss")
    return folder, build_hf_model("gpt_oss", folder)


def test_gpt_oss_sinks_and_clamp_change_the_reference_and_ours_follows(gpt_oss):
    """Each GPT-OSS feature bites in transformers (its logits move when it changes) and ours moves
    with it: sinks raised by 3, the SwiGLU clamp lifted."""
    folder, hf = gpt_oss
    config = json.loads((folder / "config.json").read_text())
    ids, path = tokens(2, 20, seed=11), list(PATHS["rys"])
    with torch.no_grad():
        base = rebuilt(hf, path)(ids).logits
    for change, edit in (("sinks + 3", lambda m: [layer.self_attn.sinks.add_(3.0) for layer in m.model.layers]),
                         ("no clamp", lambda m: [setattr(layer.mlp.experts, "limit", 1e9) for layer in m.model.layers])):
        other = __import__("copy").deepcopy(hf)
        with torch.no_grad():
            edit(other)
            ref = rebuilt(other, path)(ids).logits
        moved = (ref - base).abs().max().item()
        cfg = dict(config, swiglu_limit=1e9) if change == "no clamp" else config
        ours = cf.load_from_tensors(cfg, {k: v.detach() for k, v in other.state_dict().items()}).logits(ids, layers=path)
        print(f"gpt_oss {change}: the reference moves by {moved:.3e}")
        assert moved > 1e-2 and relative(f"gpt_oss {change}", ours, ref) < 1e-4


def _mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The OCP MX rule, written here independently: w [E, R, K] -> blocks [E, R, K/32, 16] (element
    2k in byte k's low nibble, 2k+1 in its high one) and scales [E, R, K/32] (exponent + 127), the
    scale putting each block's largest magnitude in [4, 8) and every element rounded to the nearest
    FP4 E2M1 value."""
    fp4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    exponent = (torch.floor(torch.log2(groups.abs().amax(-1).clamp_min(1e-30))) - 2).clamp(-127, 127)
    codes = ((groups / torch.exp2(exponent).unsqueeze(-1)).unsqueeze(-1) - fp4).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).to(torch.uint8)


def test_gpt_oss_mxfp4_checkpoint_matches_transformers(gpt_oss, tmp_path):
    """A checkpoint laid out as OpenAI publishes GPT-OSS: MXFP4 expert blocks and scales, a
    quantization_config, rope_scaling with a top-level rope_theta. It loads (experts dequantized on
    load) to the logits transformers gives when it dequantizes the same file itself; the
    quantization is visible against the float model, and a bf16 load runs too."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Mxfp4Config

    folder, hf = gpt_oss
    packed = {}
    for name, t in load_file(str(folder / "model.safetensors")).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] -> rows of out
            packed[name + "_blocks"], packed[name + "_scales"] = _mxfp4(t.transpose(1, 2).contiguous())
        else:
            packed[name] = t
    out = tmp_path / "mxfp4"
    out.mkdir()
    save_file(packed, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope,
                  quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]})
    (out / "config.json").write_text(json.dumps(config))
    model = cf.load(out)
    ids = tokens(2, 20, seed=12)
    if tuple(int(v) for v in transformers.__version__.split(".")[:2]) < (5, 23):
        pytest.skip(f"transformers {transformers.__version__} dequantizes MXFP4 otherwise than 5.23, which ours "
                    "matches (to 6e-7)")
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager",
                                               quantization_config=Mxfp4Config(dequantize=True)).eval()
    follow_config_clamp(ref)
    with torch.no_grad():
        expected = ref(ids).logits
    assert relative("gpt_oss mxfp4 vs transformers' dequantization", model.logits(ids), expected) < 1e-4
    assert (model.logits(ids) - cf.load(folder).logits(ids)).abs().max() > 1e-2  # the file is really quantized
    bf16 = cf.load(out, dtype="bfloat16").logits(ids).float()
    relative("gpt_oss mxfp4 bf16", bf16, expected)
    assert ((bf16 - expected).abs().mean() / expected.abs().mean()).item() < 0.05
    q8 = cf.load(out, quantize="q8_0")  # MXFP4 experts dequantized, regrouped and packed, one at a time
    relative("gpt_oss mxfp4 quantized to q8_0 on load", q8.logits(ids), expected)
    assert ((q8.logits(ids) - expected).abs().mean() / expected.abs().mean()).item() < 0.05
    assert q8.engine.layer_tensors(0)["experts.0.down_proj"].dtype == torch.uint8
    with pytest.raises(ValueError, match="_scales"):
        cf.load_from_tensors(config, {k: v for k, v in packed.items() if not k.endswith("down_proj_scales")})
    name = "model.layers.0.mlp.experts.down_proj"
    flat = dict(packed, **{name + "_blocks": packed[name + "_blocks"].flatten(0, 1),
                           name + "_scales": packed[name + "_scales"].flatten(0, 1)})
    with pytest.raises(ValueError, match=f"'{name}_blocks'.*expected \\[experts"):
        cf.load_from_tensors(config, flat)


def test_gpt_oss_mxfp4_gguf_experts_equal_the_package_dequantization(tmp_path):
    """A gpt-oss GGUF with MXFP4 experts (llama.cpp's block layout, written by the gguf package):
    every expert tensor we load equals the gguf package's own dequantization, and the logits stay
    close to the float file's."""
    import gguf

    from helpers import write_gguf

    hf = build_hf_model("gpt_oss", tmp_path / "hf", **GGUF_SIZES["gpt_oss"])
    write_gguf(hf, tmp_path / "f32.gguf")
    written = write_gguf(hf, tmp_path / "mxfp4.gguf", expert_qtype="MXFP4")
    model = cf.load(tmp_path / "mxfp4.gguf")
    for part in ("gate", "up", "down"):
        data, kind = written[f"blk.3.ffn_{part}_exps.weight"]
        assert kind == gguf.GGMLQuantizationType.MXFP4
        want = torch.from_numpy(gguf.quants.dequantize(data, kind))
        assert torch.equal(model.tensors[f"model.layers.3.mlp.experts.{part}_proj"], want)
    ids = tokens(2, 16, seed=13)
    f32 = cf.load(tmp_path / "f32.gguf").logits(ids)
    relative("gpt_oss mxfp4 gguf vs f32", model.logits(ids), f32)
    assert 0 < ((model.logits(ids) - f32).abs().mean() / f32.abs().mean()).item() < 0.3


def test_gpt_oss_experts_quantize_on_load(tmp_path):
    """quantize= packs GPT-OSS's experts too (made in GGUF's layout, one at a time): the logits equal
    those of a GGUF whose experts the gguf package quantized to Q8_0 (its own quantizer), the
    experts are held packed, and the quantization shows against the float model."""
    from helpers import write_gguf

    hf = build_hf_model("gpt_oss", tmp_path / "hf", **GGUF_SIZES["gpt_oss"])
    write_gguf(hf, tmp_path / "experts-q8.gguf", "F32", expert_qtype="Q8_0")
    ids = tokens(2, 16, seed=9)
    ours = cf.load(tmp_path / "hf", quantize={"*.mlp.experts.*": "q8_0"})
    held = ours.engine.layer_tensors(0)
    assert {held[k].dtype for k in held if k.startswith("experts.") and k.endswith("_proj")} == {torch.uint8}
    for name in ("identity", "rys"):
        want = cf.load(tmp_path / "experts-q8.gguf").logits(ids, layers=PATHS[name])
        assert relative(f"gpt_oss experts q8_0 on load vs the package's q8_0 gguf ({name})",
                        ours.logits(ids, layers=PATHS[name]), want) < 1e-4
    assert (ours.logits(ids) - cf.load(tmp_path / "hf").logits(ids)).abs().max() > 1e-3
    assert sum(ours.weight_bytes().values()) < 0.6 * sum(cf.load(tmp_path / "hf").weight_bytes().values())
    # a rule that packs no expert leaves them as loaded (transformers' layout); one that packs down_proj alone
    # lays out the layer's gate and up too, as float
    held = cf.load(tmp_path / "hf", quantize={"*.self_attn.*": "q8_0"}).engine.layer_tensors(0)
    assert held["experts.0.gate_up_proj"].dtype == torch.float32 and "experts.0.gate_proj" not in held
    held = cf.load(tmp_path / "hf", quantize={"*.experts.down_proj": "q8_0"}).engine.layer_tensors(0)
    assert held["experts.0.down_proj"].dtype == torch.uint8 and held["experts.0.gate_proj"].dtype == torch.float32
    with pytest.warns(UserWarning, match=r"packed under GGUF's names .* in transformers' layout \(e.g. "
                                         r"model.layers.0.mlp.experts.gate_up_proj\) stay float"):
        held = cf.load(tmp_path / "hf", quantize={"*.experts.gate_up_proj": "q8_0"}).engine.layer_tensors(0)
    assert held["experts.0.gate_up_proj"].dtype == torch.float32  # (it crashed: packed where read as float)


def test_gpt_oss_gguf_export_keeps_each_slots_window(tmp_path):
    """Exported along a path that puts full-attention layer 1 first and sliding layers where full
    ones were: the file pins each slot's kind, so it loads to the path's logits (transformers')."""
    from helpers import write_gguf

    hf = build_hf_model("gpt_oss", tmp_path / "hf", **GGUF_SIZES["gpt_oss"])
    write_gguf(hf, tmp_path / "m.gguf")
    layers = [1, 0, 2, 3, 4, 5, 5]
    with pytest.warns(UserWarning, match="other attention kind"):  # a llama.cpp caveat, said once
        dst = cf.export_gguf(tmp_path / "m.gguf", tmp_path / "path.gguf", layers)
    ids = tokens(2, 20, seed=14)
    with torch.no_grad():
        ref = rebuilt(hf, layers)(ids).logits
    exported = cf.load(dst)
    assert exported.config.sliding_window == tuple(8 if i % 2 == 0 else 0 for i in layers)
    assert relative("gpt_oss gguf exported along a path", exported.logits(ids), ref) < 1e-4


def test_gpt_oss_config_rules(gpt_oss):
    """Without layer_types even layers slide (transformers' default); a top-level rope_theta is
    kept when no rope parameters are given; norm weights stay fp32 in a bf16 model (they multiply
    before the cast, as GPT-OSS's RMSNorm does)."""
    folder, hf = gpt_oss
    config = json.loads((folder / "config.json").read_text())
    state = {k: v.detach() for k, v in hf.state_dict().items()}
    bare = {k: v for k, v in config.items() if k not in ("layer_types", "rope_parameters")}
    parsed = cf.load_from_tensors(dict(bare, rope_theta=12345.0), state).config
    assert parsed.sliding_window == (8, 0) * 3 and parsed.rope["theta"] == 12345.0
    assert parsed.rope["type"] == "yarn" and parsed.rope["truncate"] is False  # the family's default scaling
    norms = cf.load(folder, dtype="bfloat16").engine.layer_tensors(0)
    assert norms["input_layernorm"].dtype == torch.float32 and norms["q_proj"].dtype == torch.bfloat16


def test_gpt_oss_long_prompt_runs_attention_in_query_blocks(gpt_oss):
    """1100 tokens: the sinks composite splits the queries into blocks (about 4M scores each); the
    logits still match transformers' (which materialises them all)."""
    folder, hf = gpt_oss
    ids = tokens(1, 1100, seed=15)
    with torch.no_grad():
        ref = hf(ids).logits
    assert relative("gpt_oss 1100 tokens", cf.load(folder).logits(ids), ref) < 1e-4


# ------------------------------------------------------------------ experts as grouped GEMMs
def rys_matches_transformers(label: str, model, hf, batch: int, new: int) -> None:
    """Along the RYS path: logits of 2 x 20 tokens within 1e-4 of transformers' (relative), and
    `new` cached greedy tokens of `batch` 7-token prompts equal to its."""
    ids, path = tokens(2, 20, seed=1), list(PATHS["rys"])
    with torch.no_grad():
        ref = rebuilt(hf, path)(ids).logits
    assert relative(f"{label} rys", model.logits(ids, layers=path), ref) < 1e-4
    prompt = tokens(batch, 7, seed=3)
    with torch.no_grad():
        want = rebuilt(hf, path).generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False, pad_token_id=0)[:, 7:]
    got = model.generate(prompt, layers=path, max_new_tokens=new, min_new_tokens=new)
    print(f"{label} generate: ours {got.tolist()} ref {want.tolist()}")
    assert torch.equal(got, want)


GROUPED_ARCHS = [a for a in MOE_ARCHS if a != "gpt_oss"] + ["qwen3_next", "qwen3_5_moe_text"]


@pytest.mark.parametrize("arch", GROUPED_ARCHS)
def test_grouped_experts_match_transformers(arch, model_dir, monkeypatch):
    """Experts run as grouped GEMMs with no host synchronisation (Engine::experts_grouped: the GPU
    route in bf16, forced here on the CPU by CF_MOE_GROUPED=1) once load stacks the hub's
    per-expert tensors (fuse_projections): logits and cached greedy tokens equal transformers'.
    Without stacking, or forced off, the model reads its routing on the host."""
    folder, hf = model_dir(arch)
    monkeypatch.setenv("CF_MOE_GROUPED", "1")
    model, apart = cf.load(folder, fuse_projections=True), cf.load(folder, fuse_projections=False)
    assert model.engine.moe_without_host_sync() and not apart.engine.moe_without_host_sync()
    rys_matches_transformers(f"{arch} grouped experts", model, hf, batch=2, new=10)
    monkeypatch.setenv("CF_MOE_GROUPED", "0")
    assert not model.engine.moe_without_host_sync()
    monkeypatch.delenv("CF_MOE_GROUPED")
    assert not model.engine.moe_without_host_sync()  # the CPU default: the loop over experts


def test_grouped_experts_of_a_gguf_file_and_gpt_oss(tmp_path, model_dir, monkeypatch):
    """A GGUF's stacked float ffn_{gate,up,down}_exps run grouped as they are, gate and up apart;
    packed (Q8_0) experts and GPT-OSS's biased ones never do."""
    from helpers import write_gguf

    monkeypatch.setenv("CF_MOE_GROUPED", "1")
    hf = build_hf_model("qwen3_moe", tmp_path / "hf", **GGUF_SIZES["qwen3_moe"])
    write_gguf(hf, tmp_path / "f32.gguf")
    model = cf.load(tmp_path / "f32.gguf")
    assert model.engine.moe_without_host_sync()
    ids = tokens(2, 16, seed=6)
    with torch.no_grad():
        ref = rebuilt(hf, list(PATHS["rys"]))(ids).logits
    assert relative("qwen3_moe gguf grouped experts", model.logits(ids, layers=PATHS["rys"]), ref) < 1e-4
    write_gguf(hf, tmp_path / "q8.gguf", "Q8_0")
    assert not cf.load(tmp_path / "q8.gguf").engine.moe_without_host_sync()  # packed experts: the loop
    folder, _ = model_dir("gpt_oss")
    assert not cf.load(folder, fuse_projections=True).engine.moe_without_host_sync()


# ------------------------------------------------- experts through the grouped GEMV kernel's route
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen3_5_moe_text"])
def test_grouped_gemv_route_matches_transformers(arch, model_dir, monkeypatch):
    """The GPU's route for packed and half-precision experts at decode sizes (Engine::expert_route's
    kGroupedGemv: pairs sorted by expert on the device, ops::grouped_linear per projection), forced
    on the CPU by CF_MOE_GEMV=1, where its products loop over the experts: logits and cached greedy
    tokens equal transformers'. The CPU route reads the counts on the host, so the model does not
    claim a sync-free decode."""
    folder, hf = model_dir(arch)
    monkeypatch.setenv("CF_MOE_GEMV", "1")
    model = cf.load(folder, fuse_projections=True)
    assert not model.engine.moe_without_host_sync()
    rys_matches_transformers(f"{arch} grouped gemv route", model, hf, batch=3, new=8)


@pytest.mark.parametrize("arch,qtype", [("mixtral", "Q8_0"), ("qwen2_moe", "Q4_0"), ("qwen3_moe", "Q8_0")])
def test_grouped_gemv_route_reads_packed_experts(arch, qtype, tmp_path, monkeypatch):
    """A GGUF's packed stacked experts (ffn_*_exps, one [E, rows, bytes] view each) through the
    grouped route, forced on the CPU: the same logits as the file dequantized by the gguf package and
    run through the loop over experts (relative < 1e-4: products in float either way), and the same
    cached greedy tokens."""
    from helpers import write_gguf

    hf = build_hf_model(arch, tmp_path / "hf", **GGUF_SIZES[arch])
    write_gguf(hf, tmp_path / "q.gguf", qtype)
    monkeypatch.setenv("CF_MOE_GEMV", "0")
    dense = cf.load(tmp_path / "q.gguf", dequantize=True, dtype="float32")
    monkeypatch.setenv("CF_MOE_GEMV", "1")
    packed = cf.load(tmp_path / "q.gguf")
    ids, path = tokens(2, 16, seed=6), PATHS["rys"]
    with torch.no_grad():
        monkeypatch.setenv("CF_MOE_GEMV", "0")
        ref = dense.logits(ids, layers=path)
        prompt = tokens(3, 6, seed=4)
        want = dense.generate(prompt, layers=path, max_new_tokens=8, min_new_tokens=8)
        monkeypatch.setenv("CF_MOE_GEMV", "1")
        got = packed.logits(ids, layers=path)
    assert relative(f"{arch} {qtype} packed experts grouped gemv route", got, ref) < 1e-4
    out = packed.generate(prompt, layers=path, max_new_tokens=8, min_new_tokens=8)
    print(f"{arch} {qtype} grouped gemv generate: ours {out.tolist()} dequantized {want.tolist()}")
    assert torch.equal(out, want)
