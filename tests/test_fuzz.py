"""Fuzzing: a short atheris run of every parser target (fuzz/targets.py) over the committed seed
corpus, and regression tests for what fuzzing found."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import circuit_finder as cf
from circuit_finder import _C
from circuit_finder.gguf import read_gguf
from helpers import build_hf_model, write_gguf

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 160}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["safetensors", "config", "layer_path", "gguf"])
def test_short_fuzz_run(target, tmp_path):
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / target, corpus)
    proc = subprocess.run([sys.executable, str(FUZZ / "targets.py"), target, str(corpus), "-max_total_time=12",
                           f"-artifact_prefix={tmp_path}/", "-rss_limit_mb=4096"],
                          capture_output=True, text=True, timeout=300)
    tail = "\n".join(proc.stderr.splitlines()[-25:])
    print(tail)
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-", "timeout-", "leak-"))]
    assert proc.returncode == 0 and not crashes, f"{target}: fuzzing found {crashes}\n{tail}"
    assert "DONE" in proc.stderr


# ------------------------------------------------------------------ regressions found by fuzzing
@pytest.mark.parametrize("field, value, message", [
    ("num_hidden_layers", 2**40, "over the supported maximum"),  # used to allocate per-layer tables (OOM)
    ("vocab_size", 2**62, "over the supported maximum"),
    ("head_dim", -4, "head_dim must be even, positive"),
    ("rms_norm_eps", -1.0, "rms_norm_eps must be a finite"),
    ("rope_theta", 0.5, "rope_theta must be a finite number"),
])
def test_config_bounds(field, value, message):
    with pytest.raises(cf.ConfigError, match=message):
        _C.parse_config(json.dumps({**LLAMA, field: value}), "config.json")


def test_json_number_overflow_is_a_format_error(tmp_path):
    with pytest.raises(cf.ConfigError, match="invalid JSON"):  # used to escape as RuntimeError
        _C.parse_config('{"hidden_size": 8e888888888}', "config.json")
    header = b'{"w": {"dtype": "F32", "shape": [1e99999], "data_offsets": [0, 4]}}'
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(cf.FormatError, match="invalid JSON header"):
        _C.load_safetensors_file(str(f))


def test_rys_with_huge_numbers():
    with pytest.raises(cf.LayerPathError):  # used to raise TypeError from the binding
        cf.LayerPath.coerce("rys=99999999999999999999:1", 30)
    with pytest.raises(cf.LayerPathError, match="too long a path"):
        cf.LayerPath.duplicate(30, 0, 30, 10**6)


def test_gguf_with_bad_head_counts(tmp_path):
    hf = build_hf_model("llama", tmp_path / "m", vocab_size=64, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    zero = tmp_path / "zero.gguf"
    write_gguf(hf, zero, extra_arrays={"llama.attention.head_count": [0]})  # used to divide by zero
    with pytest.raises(ValueError, match="num_attention_heads"):
        cf.load(zero)
    bad = tmp_path / "strings.gguf"
    write_gguf(hf, bad, extra_arrays={"llama.feed_forward_length": ["x"]})  # used to raise TypeError
    with pytest.raises(cf.GGUFError, match="malformed metadata|feed_forward_length"):
        cf.load(bad)


@pytest.mark.parametrize("value, message", [
    # an array of strings claiming 2^62 items: the gguf reader used to build entries until out of memory
    (struct.pack("<IIQ", 9, 8, 2**62), r"'general.architecture' \(4611686018427387904 items\)"),
    (struct.pack("<IQ", 8, 2**40), "'general.architecture' needs 1099511627776 bytes"),  # a string's length
    (struct.pack("<I", 42), "unknown value type 42"),
])
def test_gguf_metadata_sizes_are_checked(tmp_path, value, message):
    key = b"general.architecture"
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + value
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(cf.GGUFError, match=message):
        read_gguf(str(path))
