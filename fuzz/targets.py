"""Fuzz targets for every parser that reads outside data, driven by atheris (libFuzzer for Python).

    .venv/bin/python fuzz/targets.py safetensors fuzz/corpus/safetensors -max_total_time=3600
    .venv/bin/python fuzz/targets.py config      fuzz/corpus/config      -max_total_time=3600
    .venv/bin/python fuzz/targets.py layer_path  fuzz/corpus/layer_path  -max_total_time=3600
    .venv/bin/python fuzz/targets.py gguf        fuzz/corpus/gguf        -max_total_time=3600

Each target feeds the bytes to the real entry point (the C++ safetensors reader and config parser
through the binding, the layer-path parser, the GGUF load path) and accepts only the documented
errors (ValueError subclasses such as FormatError, ConfigError, LayerPathError, GGUFError, or
OSError for unreadable files). Any other exception, a crash or a sanitizer report is a bug:
libFuzzer writes the input to crash-* and exits non-zero. Python code is coverage-instrumented;
the C++ core is exercised but not instrumented (build with CF_SANITIZE=address to catch memory
errors while fuzzing, see README).
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["circuit_finder"]):
    import circuit_finder as cf
    from circuit_finder import _C
    from circuit_finder.gguf import read_gguf

import torch  # noqa: E402

torch.set_num_threads(1)
EXPECTED = (ValueError, OSError)
_TMP = tempfile.mkdtemp(prefix="cf-fuzz-")


def _file(data: bytes, suffix: str) -> str:
    path = os.path.join(_TMP, "input" + suffix)
    with open(path, "wb") as f:
        f.write(data)
    return path


CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 16, 255, 256, 4096, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1]


def _seeds(target: str) -> list[bytes]:
    folder = os.path.join(CORPUS, target)
    return [open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))] if os.path.isdir(folder) else []


SEEDS = {name: _seeds(name) for name in ("safetensors", "config", "gguf")}


def _mutate(fdp, data: bytes) -> bytes:
    """A few byte-level edits of a seed: flips, interesting 4/8-byte values (length and count
    fields), truncation, insertion."""
    buf = bytearray(data)
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        if not buf:
            break
        op, at = fdp.ConsumeIntInRange(0, 4), fdp.ConsumeIntInRange(0, len(buf) - 1)
        if op == 0:
            buf[at] ^= 1 << fdp.ConsumeIntInRange(0, 7)
        elif op == 1:
            width = fdp.PickValueInList([4, 8])
            value = fdp.PickValueInList(INTERESTING) % (1 << (8 * width))
            buf[at:at + width] = value.to_bytes(width, "little")
        elif op == 2:
            del buf[at:]
        elif op == 3:
            buf[at:at] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16))
        else:
            buf[at] = fdp.ConsumeIntInRange(0, 255)
    return bytes(buf)


def _dim(fdp) -> int:
    return fdp.PickValueInList([0, 1, 2, 3, 4, 16, -1, 2**31, 2**40, 2**62]) if fdp.ConsumeBool() else \
        fdp.ConsumeIntInRange(0, 8)


def _st_header(fdp) -> bytes:
    header = {}
    for k in range(fdp.ConsumeIntInRange(0, 4)):
        name = fdp.ConsumeUnicodeNoSurrogates(6) or f"t{k}"
        entry = {"dtype": fdp.PickValueInList(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "Q9", "", 3]),
                 "shape": [_dim(fdp) for _ in range(fdp.ConsumeIntInRange(0, 4))],
                 "data_offsets": [_dim(fdp), _dim(fdp)]}
        if fdp.ConsumeIntInRange(0, 9) == 0:
            del entry[fdp.PickValueInList(sorted(entry))]
        header[name] = entry
    if fdp.ConsumeBool():
        header["__metadata__"] = {"format": "pt"} if fdp.ConsumeBool() else [1]
    import json

    return json.dumps(header).encode()


def safetensors(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:  # a generated header with fuzzed dtypes, shapes and offsets
        header = _st_header(fdp)
        length = len(header) if fdp.ConsumeIntInRange(0, 7) else fdp.PickValueInList(INTERESTING)
        data = struct.pack("<Q", length % (1 << 64)) + header + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256))
    elif mode == 1 and SEEDS["safetensors"]:
        data = _mutate(fdp, fdp.PickValueInList(SEEDS["safetensors"]))
    else:
        data = fdp.ConsumeBytes(len(data))
    try:
        tensors = _C.load_safetensors_file(_file(data, ".safetensors"))
        for t in tensors.values():  # views must be readable end to end
            t.float().sum()
    except EXPECTED:
        pass


_CONFIG_VALUES = [0, 1, -1, 3, 64, 2**31, 2**62, 2**64, 1e-5, 0.0, -0.5, 1e308, float("inf"), float("nan"), "64",
                  "", None, True, [], [1, 2], {}, {"rope_type": "yarn"}, {"rope_type": "llama3", "factor": 0},
                  ["full_attention"], ["sliding_attention", "full_attention"]]
_CONFIG_KEYS = ["architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "head_dim",
                "max_position_embeddings", "sliding_window", "layer_types", "tie_word_embeddings", "rope_parameters",
                "partial_rotary_factor", "eos_token_id", "torch_dtype", "hidden_act", "attention_bias"]


def config(data: bytes) -> None:
    import json

    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool() and SEEDS["config"]:
        try:
            obj = json.loads(fdp.PickValueInList(SEEDS["config"]))
        except ValueError:
            obj = {}
        if isinstance(obj, dict):
            for _ in range(fdp.ConsumeIntInRange(1, 4)):
                key = fdp.PickValueInList(_CONFIG_KEYS)
                if fdp.ConsumeIntInRange(0, 5) == 0:
                    obj.pop(key, None)
                else:
                    obj[key] = fdp.PickValueInList(_CONFIG_VALUES)
        text = json.dumps(obj)
    else:
        text = fdp.ConsumeBytes(len(data)).decode("utf-8", errors="replace")
    try:
        normalized = _C.parse_config(text, "fuzz.json")
        _C.parse_config(normalized, "normalized.json")  # the normalized form must parse again
    except EXPECTED:
        pass


_PATH_TOKENS = ["0", "1", "7", "29", "99", "..", ",", ";", "+", " ", "rys=", ":", "-", "x", "1e3",
                "99999999999999999999", "\t", "\u0660"]


def layer_path(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    n = fdp.ConsumeIntInRange(1, 200)
    if fdp.ConsumeBool():
        text = "".join(fdp.PickValueInList(_PATH_TOKENS) for _ in range(fdp.ConsumeIntInRange(0, 24)))
    else:
        text = fdp.ConsumeUnicodeNoSurrogates(256)
    try:
        path = cf.LayerPath.coerce(text, n)
    except EXPECTED:
        return
    assert cf.LayerPath.parse(str(path)) == path, (text, str(path))  # canonical text round-trips
    assert all(0 <= i < n for i in path)


def gguf(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeIntInRange(0, 3) and SEEDS["gguf"]:
        data = _mutate(fdp, fdp.PickValueInList(SEEDS["gguf"]))
    else:
        data = fdp.ConsumeBytes(len(data))
    try:
        read_gguf(_file(data, ".gguf"))
    except EXPECTED:
        pass


TARGETS = {"safetensors": safetensors, "config": config, "layer_path": layer_path, "gguf": gguf}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(TARGETS)}}} [corpus dir] [libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
