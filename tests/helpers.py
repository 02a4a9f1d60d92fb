"""Builders for the tiny random models every parity test uses."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "ministral3"]

BASE = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Per-architecture quirks worth covering: tied embeddings + llama3 RoPE, sliding windows,
# qkv bias + yarn, q/k norm + a head_dim override; Phi-3's fused projections, LongRoPE (the short
# factors below 64 positions; test_families.py crosses into the long ones) and partial rotary;
# Gemma's norms, GeGLU, query_pre_attn_scalar, soft-capping set low enough to bite, windows
# shorter than the prompts, Gemma 3's local RoPE and a 3-layer pattern; Ministral3's YaRN and
# position-dependent query scale with a short original context so it changes within a prompt.
ARCH_EXTRA = {
    "llama": dict(tie_word_embeddings=True, rope_theta=50000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(sliding_window=12, rope_theta=10000.0),
    "qwen2": dict(tie_word_embeddings=False, rope_theta=100000.0,
                  rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
    "qwen3": dict(head_dim=24, tie_word_embeddings=False, rope_theta=1000000.0,
                  rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "phi3": dict(tie_word_embeddings=False, sliding_window=20, original_max_position_embeddings=64,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                  "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                  "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}),
    "gemma2": dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=20, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gemma3_text": dict(head_dim=24, sliding_window=8, query_pre_attn_scalar=20, final_logit_softcapping=5.0,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 1000000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "ministral3": dict(head_dim=16, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                        "original_max_position_embeddings": 8, "beta_fast": 32.0, "beta_slow": 1.0,
                                        "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5}),
}
# Mixture-of-experts families (issue #14): few experts so every one is used, top-k of 2-3; Qwen2-MoE
# with its shared expert and one dense layer, Qwen3-MoE with renormalised top-k and every other layer
# dense (decoder_sparse_step 2); Mixtral with a sliding window shorter than the prompts; GPT-OSS with
# its sinks, alternating sliding / full layers (window 8), YaRN, and a SwiGLU clamp low enough to bite.
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"]
ARCH_EXTRA.update({
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=12, rope_theta=10000.0),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=80, norm_topk_prob=False, mlp_only_layers=[2],
                      tie_word_embeddings=False, rope_theta=100000.0),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=40, norm_topk_prob=True,
                      decoder_sparse_step=2, head_dim=24, tie_word_embeddings=False, rope_theta=1000000.0),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, head_dim=16, sliding_window=8,
                    swiglu_limit=1.5, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 128}),
})
# Hybrid linear-attention families (issue #14): Gated DeltaNet layers with full attention every
# third layer (gated queries, partial rotary), more value heads than key heads (and Dv != Dk) so a
# head mix-up shows; Qwen3-Next with its MoE (shared expert, layer 1 dense), Qwen3.5 dense, Qwen3.5-MoE.
HYBRID_ARCHS = ["qwen3_5_text", "qwen3_next", "qwen3_5_moe_text"]
_HYBRID = dict(head_dim=16, partial_rotary_factor=0.5, rope_theta=10000.0, tie_word_embeddings=False,
               linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
               linear_conv_kernel_dim=4, layer_types=["linear_attention", "linear_attention", "full_attention"] * 2)
ARCH_EXTRA.update({
    "qwen3_5_text": dict(_HYBRID),
    "qwen3_next": dict(_HYBRID, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                       shared_expert_intermediate_size=80, norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen3_5_moe_text": dict(_HYBRID, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                             shared_expert_intermediate_size=80),
})
# transformers' SDPA path drops Gemma 2's attention soft-capping (and has no GPT-OSS sinks): the
# reference runs eager attention.
ATTN_IMPLEMENTATION = {"gemma2": "eager", "gemma3_text": "eager", "gpt_oss": "eager"}


def llama_cpp_or_skip():
    """The llama_cpp module; skips the test where llama-cpp-python is not installed (fails in CI,
    where the test extra installs it)."""
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("llama-cpp-python is not installed (pip install llama-cpp-python to run this check)")
    return llama_cpp


def cpu_has_amx() -> bool:
    """Whether this CPU announces AMX (Intel Sapphire Rapids and later), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_int8" in line for line in f)
    except OSError:
        return False


def llama_cpp_model(path, **kwargs):
    """llama_cpp.Llama(model_path=path, **kwargs) for running a model; on a CPU with AMX, without
    llama.cpp's extra buffer types (its AMX and repacked weight layouts): llama-cpp-python 0.3.36
    built natively on an AMX Xeon VM crashed in decode (SIGSEGV in its AMX path, 2026-11-26; with
    them off, the same calls run). Those layouts are for speed; the plain CPU kernels compute the
    same products. Llama takes no such argument, so its model defaults are wrapped while it loads."""
    import llama_cpp
    import llama_cpp.llama_cpp as api  # where Llama reads its model defaults

    if not cpu_has_amx():
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    default = api.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    api.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        api.llama_model_default_params = default


def report(name: str, ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Prints max / mean absolute and relative max difference; returns the max absolute one."""
    diff = (ours.float() - ref.float()).abs()
    print(f"{name}: max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e}, "
          f"relative max {(diff.max() / ref.float().abs().max()).item():.3e}")
    return diff.max().item()


def relative(name: str, ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Prints max / mean absolute and relative max difference; returns the relative max one."""
    diff = (ours.float() - ref.float()).abs()
    rel = (diff.max() / ref.float().abs().max()).item()
    print(f"{name}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}, relative max {rel:.3e}")
    return rel


def quantized_paths_match(name: str, ours, ref_model, float_model, ids: torch.Tensor,
                          paths=([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 2, 3, 4, 5])) -> None:
    """Our model of a quantized checkpoint against ref_model (transformers on its dequantized
    weights) along each path (< 1e-5 relative), and the reference against the float model before
    quantization (> 1e-4: the quantization is real, so the first check could fail)."""
    for layers in paths:
        with torch.no_grad():
            ref, exact = rebuilt(ref_model, layers)(ids).logits, rebuilt(float_model, layers)(ids).logits
        assert relative(f"{name} vs the reference, path {layers}", ours.logits(ids, layers=layers), ref) < 1e-5
        assert relative(f"{name}: the quantization error itself (vs the float model)", ref, exact) > 1e-4


def load_checking_q8_0(folder, name: str = "model.layers.0.mlp.down_proj.weight"):
    """cf.load(folder) of a checkpoint stored quantized, after checking that quantize="q8_0" packs
    exactly the Q8_0 of its dequantized `name` (repacking reads the same dequantization)."""
    import circuit_finder as cf
    from circuit_finder.quants import PackedTensor, quantize_matrix

    model, packed = cf.load(folder), cf.load(folder, quantize="q8_0")
    assert isinstance(packed.tensors[name], PackedTensor)
    assert torch.equal(packed.tensors[name].blocks, quantize_matrix(model.tensors[name], "Q8_0", name).blocks)
    return model


def half_errors(name: str, hf_model, folder, ids: torch.Tensor, path, dtype=torch.bfloat16) -> tuple[float, float]:
    """(our mean abs error, transformers' mean abs error) in `dtype` (bf16 or fp16), both against
    transformers' fp32 logits along `path`, on the device `ids` are on; printed. Our logits must be finite."""
    import circuit_finder as cf

    ref32 = rebuilt(hf_model, list(path)).to(ids.device)
    with torch.no_grad():
        exact = ref32(ids).logits.float()
        theirs = ref32.to(dtype)(ids).logits.float()
    ours = cf.load(folder, device=ids.device, dtype=dtype).logits(ids, layers=path).float()
    assert torch.isfinite(ours).all()
    e_ours, e_theirs = (ours - exact).abs().mean().item(), (theirs - exact).abs().mean().item()
    print(f"{name} {ids.device.type} {dtype} mean abs error: ours {e_ours:.3e}, transformers {e_theirs:.3e}")
    return e_ours, e_theirs


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random token ids in [3, 160) (clear of pad/bos/eos), seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 160, (batch, length), generator=g)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Large, varied random weights so that a wrong norm, bias or RoPE shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Gemma's, Qwen3-Next's and Qwen3.5's norms scale by (1 + w): w near 0 there (not the gated
        # norm of linear attention, a plain w)
        plus_one = getattr(model.config, "model_type", "").startswith(("gemma", "qwen3_next", "qwen3_5"))
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                centre = 0.0 if plus_one and not name.endswith("linear_attn.norm.weight") else 1.0
                p.copy_(centre + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))


def make_config(arch: str, **overrides):
    kwargs = dict(BASE)
    kwargs.update(ARCH_EXTRA[arch])
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def build_hf_model(arch: str, folder, seed: int = 0, **overrides):
    config = make_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             attn_implementation=ATTN_IMPLEMENTATION.get(arch, "sdpa"))
    randomize(model, seed)
    follow_config_clamp(model)
    model.eval()
    model.save_pretrained(str(folder))
    return model


def build_mistral3_wrapper(folder, **text_overrides):
    """A random Mistral3ForConditionalGeneration (Mistral Small 3.x's multimodal wrapper: a mistral text
    decoder and a one-layer Pixtral vision tower) saved to folder as transformers saves it
    (language_model.model.*, vision_tower.*, multi_modal_projector.*); image token 10."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=32, image_size=64, patch_size=8)
    text = make_config("mistral", sliding_window=None, **text_overrides)
    config = Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=10,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(config).float()
    randomize(model)
    model.eval()
    model.save_pretrained(str(folder))
    return model


def write_fp8_checkpoint(folder, scheme: str) -> None:
    """Rewrites a saved float checkpoint as a fine-grained FP8 one: every projection's weight as
    float8 E4M3 with its weight_scale_inv (absmax / 448 per tensor, or per 16 x 32 block), a static
    activation_scale beside per-tensor weights (Ministral 3 / Devstral's scheme)."""
    import safetensors.torch

    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        w = tensors[name].float()
        if scheme == "per-tensor":
            scale = w.abs().max() / 448
            tensors[name.removesuffix("weight") + "activation_scale"] = torch.tensor(0.25)
            expanded = scale
        else:
            blocks = w.unflatten(0, (-1, 16)).unflatten(-1, (-1, 32))  # [R/16, 16, C/32, 32]
            scale = blocks.abs().amax(dim=(1, 3)) / 448
            expanded = scale.repeat_interleave(16, 0).repeat_interleave(32, 1)
        tensors[name] = (w / expanded).to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = scale.float()
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static" if scheme == "per-tensor"
                                     else "dynamic", "weight_block_size": None if scheme == "per-tensor" else [16, 32],
                                     "modules_to_not_convert": ["lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))


def follow_config_clamp(model: torch.nn.Module) -> None:
    """GPT-OSS experts in transformers before 5.18 (the MXFP4 ones too) ignore the config's
    swiglu_alpha / swiglu_limit (hard-coded 1.702 / 7.0): set them from the config, so the
    reference computes the configured model."""
    config = getattr(model.config, "text_config", model.config)
    for module in model.modules():
        if "Experts" in type(module).__name__ and hasattr(module, "limit") and hasattr(module, "alpha"):
            module.alpha = getattr(config, "swiglu_alpha", module.alpha)
            module.limit = getattr(config, "swiglu_limit", module.limit)



def rebuilt(hf_model, layers):
    """A transformers model whose decoder runs `layers` in order, from deep-copied layers (a
    multimodal wrapper: its text decoder's layers)."""
    m = copy.deepcopy(hf_model)
    wrapper = hasattr(m.model, "language_model")
    decoder = m.model.language_model if wrapper else m.model
    source = hf_model.model.language_model if wrapper else hf_model.model
    decoder.layers = torch.nn.ModuleList([copy.deepcopy(source.layers[i]) for i in layers])
    for slot, layer in enumerate(decoder.layers):  # attention or (Qwen3-Next / 3.5) linear attention
        (layer.self_attn if hasattr(layer, "self_attn") else layer.linear_attn).layer_idx = slot
    configs = [(m.config.text_config, hf_model.config.text_config)] if wrapper else []
    configs.append((m.config, hf_model.config))
    for config, original in configs:
        config.num_hidden_layers = len(layers)
        if getattr(original, "layer_types", None) is not None:
            config.layer_types = [original.layer_types[i] for i in layers]
    return m


# ----------------------------------------------------------------------------- GGUF files
HF_TO_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.bias": "ffn_down.bias",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
HF_TO_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}

# Byte offsets of the fp16 scale fields in each K-quant block (ggml's block layouts); the
# package has no K-quantizer, so tests fill blocks with random bytes and sane scales.
# types written as random blocks with small fp16 scales (gguf-py has no quantizer for them)
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,),
                   "IQ4_XS": (0,)}


def llama_cpp_permute(w, n_head: int):
    """llama.cpp's converter reorders Q/K rows for the `llama` architecture (HF halves-RoPE ->
    interleaved pairs). Written here by index, independently of circuit_finder: within each head of
    `hd` rows, GGUF row 2*i + j holds Hugging Face row j*hd/2 + i (i < hd/2, j in {0, 1})."""
    rows = w.shape[0]
    hd = rows // n_head
    assert hd * n_head == rows and hd % 2 == 0, (rows, n_head)
    order = [h * hd + j * (hd // 2) + i for h in range(n_head) for i in range(hd // 2) for j in range(2)]
    return w[order]


# Per-family names of llama.cpp's converter where they differ from the llama table.
FAMILY_GGUF_BLOCK = {
    "phi3": {"self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight"},
    "gemma2": {"post_attention_layernorm.weight": "post_attention_norm.weight",
               "pre_feedforward_layernorm.weight": "ffn_norm.weight",
               "post_feedforward_layernorm.weight": "post_ffw_norm.weight"},
}
FAMILY_GGUF_BLOCK["gemma3"] = FAMILY_GGUF_BLOCK["gemma2"]
FAMILY_GGUF_BLOCK["gpt-oss"] = {
    "post_attention_layernorm.weight": "post_attention_norm.weight", "self_attn.sinks": "attn_sinks.weight",
    "self_attn.o_proj.bias": "attn_output.bias", "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.router.bias": "ffn_gate_inp.bias", "mlp.experts.down_proj_bias": "ffn_down_exps.bias"}
FAMILY_GGUF_BLOCK["qwen35"] = {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight", "linear_attn.in_proj_z.weight": "attn_gate.weight",
    "linear_attn.in_proj_b.weight": "ssm_beta.weight", "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
    "linear_attn.in_proj_ba.weight": "ssm_ba.weight", "linear_attn.A_log": "ssm_a", "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.conv1d.weight": "ssm_conv1d.weight", "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight"}
FAMILY_GGUF_BLOCK["qwen35moe"] = FAMILY_GGUF_BLOCK["qwen3next"] = FAMILY_GGUF_BLOCK["qwen35"]
GGUF_ARCH = {"gemma3_text": "gemma3", "ministral3": "mistral3",  # transformers model_type -> GGUF architecture
             "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss",
             "qwen3_5_text": "qwen35", "qwen3_5_moe_text": "qwen35moe", "qwen3_next": "qwen3next"}
HYBRID_GGUF = ("qwen35", "qwen35moe", "qwen3next")


def _hybrid_gguf_tensors(hf: str, arr, cfg, arch: str) -> list:
    """A Qwen3.5 / Qwen3-Next linear-attention tensor as llama.cpp's converter writes it, by its
    documented rules: A_log as -exp(A_log), conv1d squeezed, qwen35's value heads tiled (Hugging
    Face head g * r + j at file position j * Hk + g: the file's v rows of in_proj_qkv, z, b, a,
    A_log, dt_bias, conv channels, and out_proj's columns), qwen3next's in_proj_qkvz regrouped into
    attn_qkv (all q | all k | all v) and attn_gate (z)."""
    import numpy as np

    hk, hv, dk, dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r, qk, block = hv // hk, 2 * hk * dk, f"blk.{hf.split('.')[2]}"

    def tiled(a, axis, start, hd):
        if arch == "qwen3next" or r == 1:
            return a
        a = np.moveaxis(a, axis, 0)
        heads = a[start:].reshape(hk, r, hd, *a.shape[1:]).swapaxes(0, 1).reshape(hv * hd, *a.shape[1:])
        return np.moveaxis(np.concatenate([a[:start], heads]), 0, axis)

    if hf.endswith("in_proj_qkvz.weight"):
        g = arr.reshape(hk, 2 * dk + 2 * r * dv, -1)
        qkv = np.concatenate([g[:, :dk].reshape(hk * dk, -1), g[:, dk:2 * dk].reshape(hk * dk, -1),
                              g[:, 2 * dk:2 * dk + r * dv].reshape(hv * dv, -1)])
        return [(f"{block}.attn_qkv.weight", qkv), (f"{block}.attn_gate.weight", g[:, 2 * dk + r * dv:].reshape(hv * dv, -1))]
    rule = {"in_proj_qkv.weight": (0, qk, dv), "in_proj_z.weight": (0, 0, dv), "in_proj_b.weight": (0, 0, 1),
            "in_proj_a.weight": (0, 0, 1), "dt_bias": (0, 0, 1), "A_log": (0, 0, 1), "conv1d.weight": (0, qk, dv),
            "out_proj.weight": (1, 0, dv)}
    for suffix, (axis, start, hd) in rule.items():
        if hf.endswith("linear_attn." + suffix):
            arr = tiled(arr[:, 0, :] if suffix == "conv1d.weight" else arr, axis, start, hd)
            arr = -np.exp(arr) if suffix == "A_log" else arr
    return [(gguf_name(hf, arch), arr)]


def gguf_name(hf: str, arch: str = "llama") -> str:
    if hf in HF_TO_GGUF_GLOBAL:
        return HF_TO_GGUF_GLOBAL[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{FAMILY_GGUF_BLOCK.get(arch, {}).get(rest) or HF_TO_GGUF_BLOCK[rest]}"


def encode_tensor(arr, qtype_name: str, rng):
    """-> (bytes array, GGMLQuantizationType) for a float32 array, quantized with the gguf package."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[qtype_name]
    if qtype_name == "F32":
        return arr.astype(np.float32), qtype
    if qtype_name == "F16":
        return arr.astype(np.float16), qtype
    if qtype_name in K_SCALE_OFFSETS:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = arr.reshape(-1, arr.shape[-1])
        blocks = rng.integers(0, 256, size=(rows.shape[0], rows.shape[1] // block, size), dtype=np.uint8)
        for off in K_SCALE_OFFSETS[qtype_name]:
            blocks[..., off:off + 2] = np.frombuffer(np.float16(0.003).tobytes(), dtype=np.uint8)
        return blocks.reshape(*arr.shape[:-1], -1), qtype
    return gguf.quants.quantize(arr.astype(np.float32), qtype), qtype


def _family_metadata(w, cfg, arch: str, head_dim: int) -> dict:
    """The keys llama.cpp's converter writes for phi3 / gemma2 / gemma3 / mistral3 beyond the common
    ones; returns {gguf tensor name: float32 array} of extra global tensors (Phi-3's LongRoPE factors,
    llama3 scaling's rope_freqs)."""
    import gguf
    import numpy as np

    rope = cfg.rope_parameters
    extra = {}
    if arch == "phi3":
        w.add_rope_freq_base(rope["rope_theta"])
        rot = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        w.add_rope_dimension_count(rot)
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        w.add_sliding_window(cfg.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            factor = cfg.max_position_embeddings / cfg.original_max_position_embeddings
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(factor) / math.log(cfg.original_max_position_embeddings)))
            extra = {"rope_factors_long.weight": np.array(rope["long_factor"], dtype=np.float32),
                     "rope_factors_short.weight": np.array(rope["short_factor"], dtype=np.float32)}
    elif arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window)
        if arch == "gemma2" and cfg.attn_logit_softcapping is not None:  # (None: a file without the key)
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        if arch == "gemma3":
            full, local = rope["full_attention"], rope["sliding_attention"]
            w.add_rope_freq_base(full["rope_theta"])
            w.add_rope_freq_base_swa(local["rope_theta"])
            if full.get("rope_type") == "linear":
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(full["factor"])
    elif arch == "mistral3":
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_rope_dimension_count(head_dim)
        if rope.get("rope_type") == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rope["factor"])
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            w.add_rope_scaling_yarn_beta_fast(rope.get("beta_fast", 32.0))
            w.add_rope_scaling_yarn_beta_slow(rope.get("beta_slow", 1.0))
            w.add_rope_scaling_yarn_log_mul(rope.get("mscale_all_dim", 1.0))
        w.add_attn_temperature_scale(rope.get("llama_4_scaling_beta", 0.0))
    elif arch == "gpt-oss":
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope.get("beta_fast", 32.0))
        w.add_rope_scaling_yarn_beta_slow(rope.get("beta_slow", 1.0))
        w.add_sliding_window(cfg.sliding_window)
    elif arch in HYBRID_GGUF:
        w.add_rope_freq_base(float(rope["rope_theta"]))
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 0.25)))
        w.add_ssm_conv_kernel(cfg.linear_conv_kernel_dim)
        w.add_ssm_state_size(cfg.linear_key_head_dim)
        w.add_ssm_group_count(cfg.linear_num_key_heads)
        w.add_ssm_time_step_rank(cfg.linear_num_value_heads)
        w.add_ssm_inner_size(cfg.linear_value_head_dim * cfg.linear_num_value_heads)
        w.add_full_attention_interval(cfg.layer_types.index("full_attention") + 1)
        if arch != "qwen3next":  # qwen35's multimodal RoPE sections (text positions make them all alike)
            rot = int(head_dim * rope.get("partial_rotary_factor", 0.25)) // 2
            w.add_rope_dimension_sections([rot - 2 * (rot // 3), rot // 3, rot // 3, 0])
    else:
        w.add_rope_freq_base(float(rope["rope_theta"]))
        if rope.get("rope_type") == "llama3":  # the converter's rope_freqs (see converter_rope_freqs)
            extra = {"rope_freqs.weight": converter_rope_freqs(rope, head_dim)}
    return extra


def converter_rope_freqs(rope: dict, dim: int):
    """rope_freqs.weight as llama.cpp's converter computes it for llama3 scaling: per frequency (float32,
    as torch computes them there) 1 above high_freq wavelengths, the factor below low_freq ones, and
    1 / ((1 - smooth) / factor + smooth) between. The original context is taken from rope_scaling
    here; the converter reads a top-level original_max_position_embeddings or 8192 (Meta's value), so
    a rope_scaling with another one (the tests' 64) makes a synthetic file of other divisors."""
    import numpy as np

    factor, lo, hi = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)):
        wavelen = 2 * math.pi / float(freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        out.append(1.0 if wavelen < old / hi else factor if wavelen > old / lo else 1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _gguf_tensors(hf: str, arr, arch: str, cfg=None) -> list:
    """[(gguf name, array)] of one Hugging Face tensor: transformers v5's stacked gate_up_proj
    [E, 2I, H] becomes the converter's ffn_gate_exps and ffn_up_exps [E, I, H]; the shared
    expert's gate [1, H] is stored as a vector. gpt-oss (llama.cpp's converter, dequantized path):
    gate_up_proj [E, H, 2I] transposed, its even output columns the gate and odd ones up (biases
    alike); down_proj [E, I, H] transposed."""
    if arch in HYBRID_GGUF and ".linear_attn." in hf:
        return _hybrid_gguf_tensors(hf, arr, cfg, arch)
    if arch == "gpt-oss" and ".mlp.experts." in hf:
        block = f"blk.{hf.split('.')[2]}"
        if hf.endswith("gate_up_proj"):
            t = arr.transpose(0, 2, 1)
            return [(f"{block}.ffn_gate_exps.weight", t[:, 0::2]), (f"{block}.ffn_up_exps.weight", t[:, 1::2])]
        if hf.endswith("gate_up_proj_bias"):
            return [(f"{block}.ffn_gate_exps.bias", arr[:, 0::2]), (f"{block}.ffn_up_exps.bias", arr[:, 1::2])]
        if hf.endswith("down_proj"):
            return [(f"{block}.ffn_down_exps.weight", arr.transpose(0, 2, 1))]
    if hf.endswith("mlp.experts.gate_up_proj"):
        half = arr.shape[1] // 2
        block = gguf_name(hf.replace("mlp.experts.gate_up_proj", "mlp.gate_proj.weight"), arch).rsplit(".", 2)[0]
        return [(f"{block}.ffn_gate_exps.weight", arr[:, :half]), (f"{block}.ffn_up_exps.weight", arr[:, half:])]
    if hf.endswith("shared_expert_gate.weight"):
        arr = arr.reshape(-1)
    return [(gguf_name(hf, arch), arr)]


def _moe_metadata(w, cfg, arch: str) -> None:
    """Expert keys as llama.cpp's converters write them (llama for Mixtral, qwen2moe, qwen3moe, gpt-oss)."""
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if not experts:
        return
    w.add_expert_count(experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch != "llama":
        w.add_expert_feed_forward_length(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)
    if getattr(cfg, "shared_expert_intermediate_size", None):
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch == "qwen2moe":
        w.add_expert_weights_norm(bool(cfg.norm_topk_prob))


def _gguf_array(hf: str, t, cfg, arch: str, permute: bool):
    """One tensor as the converter stores it: llama/mistral3 Q/K rows (and biases) permuted, Gemma norms + 1."""
    arr = t.detach().float().numpy()
    if permute and arch in ("llama", "mistral3") and hf.endswith(("q_proj.weight", "q_proj.bias")):
        arr = llama_cpp_permute(arr, cfg.num_attention_heads)
    elif permute and arch in ("llama", "mistral3") and hf.endswith(("k_proj.weight", "k_proj.bias")):
        arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
    elif (arch in ("gemma2", "gemma3", *HYBRID_GGUF) and hf.endswith("norm.weight")
          and not hf.endswith("linear_attn.norm.weight")):
        arr = arr + 1.0
    return arr


def write_gguf(hf_model, path, qtype: str = "F32", arch: str | None = None, skip=(), permute=True, seed=0,
               extra_tensors=None, extra_arrays=None, extra_strings=None, expert_qtype: str | None = None,
               extra_uints=None, block_count: int | None = None, extra_floats=None, big_endian: bool = False):
    """Writes a transformers model as GGUF the way llama.cpp's converter lays it out (per family:
    fused Phi-3 tensors and LongRoPE factor tensors, Gemma's +1 norms and names, mistral3's YaRN and
    temperature keys; the keys each converter leaves out are left out here too).

    Matrices get `qtype` (norms stay F32; stacked experts `expert_qtype` when given, as llama.cpp's
    gpt-oss files keep theirs in MXFP4); llama/mistral3 Q/K rows are permuted as the converter does
    (by `llama_cpp_permute`, not by circuit_finder's code). Returns {gguf tensor name: (bytes array,
    type)} of what was written.
    """
    import gguf
    import numpy as np

    cfg = hf_model.config
    arch = arch or GGUF_ARCH.get(cfg.model_type, cfg.model_type)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch, endianess=gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE)
    w.add_block_count(block_count or cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch != "phi3":  # the phi3 converter writes neither head sizes nor the vocabulary size
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_vocab_size(cfg.vocab_size)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_eos_token_id(2)
    w.add_bos_token_id(1)
    family_tensors = _family_metadata(w, cfg, arch, head_dim)
    _moe_metadata(w, cfg, arch)
    for key, values in (extra_arrays or {}).items():
        w.add_array(key, values)
    for key, value in (extra_strings or {}).items():
        w.add_string(key, value)
    for key, value in (extra_uints or {}).items():
        w.add_uint32(key, value)
    for key, value in (extra_floats or {}).items():
        w.add_float32(key, value)
    written = {}
    for name, arr in family_tensors.items():
        w.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType.F32)
        written[name] = (arr, gguf.GGMLQuantizationType.F32)
    state = hf_model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf, t in state.items():
        for name, arr in _gguf_tensors(hf, _gguf_array(hf, t, cfg, arch, permute), arch, cfg):
            if name in skip:
                continue
            # the converter keeps vectors, biases, the router and a hybrid's conv in F32
            matrix = arr.ndim >= 2 and name.endswith(".weight") and "ffn_gate_inp" not in name and "ssm_conv1d" not in name
            kind_name = (expert_qtype if expert_qtype and name.endswith("_exps.weight") else qtype) if matrix else "F32"
            data, kind = encode_tensor(np.ascontiguousarray(arr), kind_name, rng)
            w.add_tensor(name, data, raw_dtype=kind)
            written[name] = (data, kind)
    for name, (data, kind) in (extra_tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


# ------------------------------------------------------------------ packed ggml blocks
# byte offsets of each type's fp16 scale fields (ggml-common.h): random bytes there could be NaN
HALF_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
                "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}


def random_packed(kind: str, rows: int, cols: int, seed: int = 0, fill: int | None = None):
    """uint8 [rows, row_bytes] of `kind` (numpy): random codes, fp16 scales of moderate size; with
    `fill`, every byte but the fp16 fields is that value (0 / 255: the extreme codes and scales)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[kind]
    if kind in ("F16", "BF16"):
        return np.ascontiguousarray(gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32),
                                                         qtype)).view(np.uint8)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if fill is not None:
        raw[:] = fill
    for off in HALF_FIELDS[kind]:
        halves = rng.uniform(-0.05, 0.05, size=raw.shape[:2]).astype(np.float16)
        raw[:, :, off:off + 2] = halves.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def awkward_rows(cols: int, rows: int = 300) -> np.ndarray:
    """Rows of N(0, 0.02^2) weights and the cases rounding rules differ on: zeros, one sign only, a
    lone outlier, a peak of each sign with equal magnitudes, values at exact half steps, tiny ones."""
    rng = np.random.default_rng(cols)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[0] = 0.0
    w[1] = np.abs(w[1]) + 0.5
    w[2] = -np.abs(w[2]) - 0.5
    w[3, 7] = 40.0
    w[4, ::2] = -w[4, 1::2]  # +peak and -peak in every block: the first one's sign decides
    w[5] = (rng.integers(-254, 255, cols) / 2).astype(np.float32)  # half steps for Q8_0 (d = 127 / 127)
    w[5, ::32] = 127.0
    w[6] = rng.integers(-16, 17, cols).astype(np.float32) / 2  # half steps for Q4_0 / Q5_0
    w[7] *= 1e-6  # f16 scales underflow
    return w


def reference(kind: str, raw, cols: int) -> torch.Tensor:
    """The gguf package's decoding of raw uint8 [rows, row_bytes] (its numpy code, not ours)."""
    import gguf
    import numpy as np

    values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(raw.shape[0], cols))
