"""Writes the committed seed corpus (fuzz/corpus/<target>/): valid inputs and crafted bad ones.

    .venv/bin/python fuzz/make_corpus.py
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent / "corpus"


def st(header, body: bytes = b"", length=None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def safetensors_seeds() -> dict[str, bytes]:
    t = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    body = np.arange(4, dtype=np.float32).tobytes()
    return {
        "valid": st({"w": t, "__metadata__": {"format": "pt"}}, body),
        "valid_two": st({"a": t, "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}, body + bytes(8)),
        "empty_header": st({}),
        "truncated_body": st({"w": t}, body[:7]),
        "length_too_big": st({"w": t}, body, length=1 << 40),
        "length_zero": st(b"", b""),
        "overlap": st({"a": t, "b": t}, body),
        "offsets_reversed": st({"w": dict(t, data_offsets=[16, 0])}, body),
        "offsets_past_end": st({"w": dict(t, data_offsets=[0, 1 << 62])}, body),
        "size_mismatch": st({"w": dict(t, shape=[3, 3])}, body),
        "bad_dtype": st({"w": dict(t, dtype="Q9")}, body),
        "negative_shape": st({"w": dict(t, shape=[-1, 4])}, body),
        "huge_shape": st({"w": dict(t, shape=[1 << 40, 1 << 40])}, body),
        "shape_not_list": st({"w": dict(t, shape="2x2")}, body),
        "not_json": st(b"{not json", body),
        "header_array": st([1, 2, 3], body),
        "gap": st({"w": dict(t, data_offsets=[8, 24])}, bytes(24)),
        "short": b"\x01\x02",
    }


def config_seeds() -> dict[str, bytes]:
    llama = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 112,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 160,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128}
    seeds = {
        "llama": llama,
        "qwen2_yarn": dict(llama, architectures=["Qwen2ForCausalLM"],
                           rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
        "llama3_rope": dict(llama, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "mistral_window": dict(llama, architectures=["MistralForCausalLM"], sliding_window=16),
        "qwen3_layer_types": dict(llama, architectures=["Qwen3ForCausalLM"], head_dim=24,
                                  layer_types=["full_attention", "sliding_attention"], sliding_window=8),
        "zero_heads": dict(llama, num_attention_heads=0),
        "heads_not_dividing": dict(llama, num_key_value_heads=3),
        "negative_layers": dict(llama, num_hidden_layers=-1),
        "huge": dict(llama, hidden_size=2**62, vocab_size=2**62),
        "strings": dict(llama, hidden_size="64"),
        "unknown_arch": dict(llama, architectures=["GPT2LMHeadModel"]),
        "nan_eps": dict(llama, rms_norm_eps=float("nan")),
    }
    out = {k: json.dumps(v).encode() for k, v in seeds.items()}
    out["not_an_object"] = b"[1, 2]"
    out["broken"] = b'{"hidden_size": 64,'
    return out


def layer_path_seeds() -> dict[str, bytes]:
    # the target reads a layer count (first bytes) and then text; seeds are plain strings
    texts = ["0..29", "0..14,12,13,14,15..39", "0..12+10..29", "0..12;10..29", "rys=10:13", "rys=2:4:3",
             "9..0", "0..-1", "1e3", "0..99999999999999999999", ",,,", "0 1 2", "rys=5:2", "a..b", "0..3,,x"]
    return {f"p{k:02d}": (b"\x1e" + t.encode()) for k, t in enumerate(texts)}


def gguf_seeds() -> dict[str, bytes]:
    sys.path.insert(0, str(ROOT.parent.parent / "tests"))
    import tempfile

    import torch

    from helpers import build_hf_model, write_gguf

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_hf_model("llama", tmp, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)
        path = Path(tmp) / "m.gguf"
        write_gguf(hf, path, qtype="Q8_0")
        data = path.read_bytes()
        del torch
    out["valid_q8"] = data
    out["truncated_half"] = data[: len(data) // 2]
    out["truncated_header"] = data[:40]
    out["bad_magic"] = b"GGUX" + data[4:]
    out["version_9"] = data[:4] + struct.pack("<I", 9) + data[8:]
    out["tensor_count_huge"] = data[:8] + struct.pack("<Q", 1 << 60) + data[16:]
    out["kv_count_huge"] = data[:16] + struct.pack("<Q", 1 << 60) + data[24:]
    return out


def main() -> None:
    for name, seeds in [("safetensors", safetensors_seeds()), ("config", config_seeds()),
                        ("layer_path", layer_path_seeds()), ("gguf", gguf_seeds())]:
        folder = ROOT / name
        folder.mkdir(parents=True, exist_ok=True)
        for key, data in seeds.items():
            (folder / key).write_bytes(data)
        print(f"{name}: {len(seeds)} seeds in {folder}")


if __name__ == "__main__":
    main()
