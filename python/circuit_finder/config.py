"""ModelConfig: the normalized view of a model's config.json, as the C++ core understands it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from . import _C

__all__ = ["ModelConfig", "ConfigError", "parse_config"]

ConfigError = _C.ConfigError


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    wrapper: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    fused_qkv: bool
    fused_gate_up: bool
    hidden_act: str
    norm_plus_one: bool
    norm_fp32: bool
    attn_sinks: bool
    sandwich_norm: bool
    embed_scale: float
    attn_scale: float
    attn_softcap: float
    final_softcap: float
    query_scale_beta: float
    query_scale_original_max: int
    sliding_window: tuple[int, ...]
    num_experts: int
    experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    router_weights_fp32: bool
    softmax_after_topk: bool
    expert_bias: bool
    swiglu_alpha: float
    swiglu_limit: float
    sparse_layers: tuple[int, ...]
    attn_output_gate: bool
    linear_layers: tuple[int, ...]
    linear_k_heads: int
    linear_v_heads: int
    linear_k_dim: int
    linear_v_dim: int
    linear_conv_kernel: int
    rope: dict[str, Any]
    rope_local: dict[str, Any] | None
    torch_dtype: str
    eos_token_ids: tuple[int, ...]
    bos_token_id: int
    pad_token_id: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_normalized(cls, normalized: str, raw: dict[str, Any]) -> ModelConfig:
        d = json.loads(normalized)
        d["sliding_window"] = tuple(d["sliding_window"])
        d["sparse_layers"] = tuple(d["sparse_layers"])
        d["linear_layers"] = tuple(d["linear_layers"])
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(raw=raw, **d)


def parse_config(config: str | dict, source: str = "config.json") -> ModelConfig:
    """Validates a config (JSON text or dict) and returns its normalized form."""
    text = config if isinstance(config, str) else json.dumps(config)
    normalized = _C.parse_config(text, source)
    return ModelConfig.from_normalized(normalized, json.loads(text))
