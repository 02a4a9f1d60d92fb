"""Builders for the tiny random models every parity test uses."""

from __future__ import annotations

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
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    model.eval()
    model.save_pretrained(str(folder))
    return model
