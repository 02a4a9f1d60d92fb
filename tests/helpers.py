"""Builders for the tiny random models every parity test uses."""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]

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
# qkv bias + yarn, q/k norm + a head_dim override.
ARCH_EXTRA = {
    "llama": dict(tie_word_embeddings=True, rope_theta=50000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(sliding_window=12, rope_theta=10000.0),
    "qwen2": dict(tie_word_embeddings=False, rope_theta=100000.0,
                  rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
    "qwen3": dict(head_dim=24, tie_word_embeddings=False, rope_theta=1000000.0,
                  rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Large, varied random weights so that a wrong norm, bias or RoPE shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
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
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    randomize(model, seed)
    model.eval()
    model.save_pretrained(str(folder))
    return model



def rebuilt(hf_model, layers):
    """A transformers model whose decoder runs `layers` in order, from deep-copied layers."""
    m = copy.deepcopy(hf_model)
    originals = hf_model.model.layers
    m.model.layers = torch.nn.ModuleList([copy.deepcopy(originals[i]) for i in layers])
    for slot, layer in enumerate(m.model.layers):
        layer.self_attn.layer_idx = slot
    m.config.num_hidden_layers = len(layers)
    if getattr(m.config, "layer_types", None) is not None:
        m.config.layer_types = [hf_model.config.layer_types[i] for i in layers]
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
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
HF_TO_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}

# Byte offsets of the fp16 scale fields in each K-quant block (ggml's block layouts); the
# package has no K-quantizer, so tests fill blocks with random bytes and sane scales.
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def llama_cpp_permute(w, n_head: int):
    """llama.cpp's converter reorders Q/K rows for the `llama` architecture (HF halves-RoPE ->
    interleaved pairs). Written here by index, independently of circuit_finder: within each head of
    `hd` rows, GGUF row 2*i + j holds Hugging Face row j*hd/2 + i (i < hd/2, j in {0, 1})."""
    rows = w.shape[0]
    hd = rows // n_head
    assert hd * n_head == rows and hd % 2 == 0, (rows, n_head)
    order = [h * hd + j * (hd // 2) + i for h in range(n_head) for i in range(hd // 2) for j in range(2)]
    return w[order]


def gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF_GLOBAL:
        return HF_TO_GGUF_GLOBAL[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF_BLOCK[rest]}"


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


def write_gguf(hf_model, path, qtype: str = "F32", arch: str | None = None, skip=(), permute=True, seed=0,
               extra_tensors=None, extra_arrays=None, extra_strings=None):
    """Writes a transformers model as GGUF the way llama.cpp's converter lays it out.

    Matrices get `qtype` (norms stay F32); llama-arch Q/K rows are permuted as the converter does
    (by `llama_cpp_permute`, not by circuit_finder's code). Returns {gguf tensor name: (bytes array,
    type)} of what was written.
    """
    import gguf
    import numpy as np

    cfg = hf_model.config
    arch = arch or cfg.model_type
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_eos_token_id(2)
    w.add_bos_token_id(1)
    for key, values in (extra_arrays or {}).items():
        w.add_array(key, values)
    for key, value in (extra_strings or {}).items():
        w.add_string(key, value)
    written = {}
    state = hf_model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf, t in state.items():
        name = gguf_name(hf)
        if name in skip:
            continue
        arr = t.detach().float().numpy()
        if permute and arch == "llama" and hf.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, cfg.num_attention_heads)
        elif permute and arch == "llama" and hf.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        data, kind = encode_tensor(arr, qtype if arr.ndim == 2 else "F32", rng)
        w.add_tensor(name, data, raw_dtype=kind)
        written[name] = (data, kind)
    for name, (data, kind) in (extra_tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written
