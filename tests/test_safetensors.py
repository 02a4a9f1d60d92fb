"""The C++ safetensors loader: real files round-trip, sharded folders load, and every kind of bad
file is a clear Python exception naming the file and tensor (never a crash)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import circuit_finder as cf


def write_raw(path, header: dict | bytes, data: bytes, header_len: int | None = None) -> str:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + text + data)
    return str(path)


def test_roundtrip_dtypes_and_zero_copy(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.float16),
        "c": torch.randn(2, 2, 3).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
    }
    f = tmp_path / "x.safetensors"
    save_file(tensors, str(f))
    got = cf.load_safetensors(str(f))
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
    # views of the mapping: writing to one changes only our private copy-on-write page
    got["a"].add_(1)
    again = cf.load_safetensors(str(f))
    assert torch.equal(again["a"], tensors["a"])


def test_sharded_folder(tmp_path):
    t1 = {"x": torch.randn(4), "y": torch.randn(2, 2)}
    t2 = {"z": torch.randn(3)}
    save_file(t1, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(t2, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {"x": "model-00001-of-00002.safetensors", "y": "model-00001-of-00002.safetensors",
                  "z": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    got = cf.load_safetensors(str(tmp_path))
    assert set(got) == {"x", "y", "z"}
    assert torch.equal(got["z"], t2["z"])


def test_sharded_index_listing_missing_tensor(tmp_path):
    save_file({"x": torch.randn(4)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "w": "a.safetensors"}}))
    with pytest.raises(cf.FormatError, match="'w'"):
        cf.load_safetensors(str(tmp_path))


def test_sharded_index_rejects_paths_outside_folder(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../evil.safetensors"}}))
    with pytest.raises(cf.FormatError, match="plain file name"):
        cf.load_safetensors(str(tmp_path))


GOOD = {"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize(
    "case, header, data, header_len, match",
    [
        ("truncated", None, b"", None, "truncated"),
        ("header beyond file", GOOD, bytes(16), 10_000, "beyond the file"),
        ("offset past end", GOOD, bytes(8), None, "past the end"),
        ("overlap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), None, "overlapping"),
        ("size mismatch", {"t": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16), None,
         "does not match"),
        ("invalid json", b"{not json", bytes(16), None, "invalid JSON"),
        ("not an object", b"[1, 2]", b"", None, "not a JSON object"),
        ("bad dtype", {"t": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, bytes(1), None,
         "unsupported dtype Q9"),
        ("negative dim", {"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), None,
         "negative"),
        ("reversed offsets", {"t": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, bytes(8), None,
         "reversed"),
        ("huge shape", {"t": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, bytes(4), None,
         "overflows"),
        ("missing fields", {"t": {"dtype": "F32"}}, b"", None, "needs dtype, shape and data_offsets"),
        ("empty but huge", {"t": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}, b"", None,
         "tensor 't': tensor size overflows"),
        ("name twice", b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                       b'"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', bytes(8), None,
         "names tensor 't' twice"),
        ("not utf-8", b'{"t\xff": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4), None,
         "invalid JSON header: .*ill-formed UTF-8"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path, case, header, data, header_len, match):
    f = tmp_path / "bad.safetensors"
    if case == "truncated":
        f.write_bytes(b"\x01\x02\x03")
    else:
        write_raw(f, header, data, header_len)
    with pytest.raises(cf.FormatError, match=match) as e:
        cf.load_safetensors(str(f))
    assert "bad.safetensors" in str(e.value)
    print(f"{case}: {e.value}")


def test_missing_file(tmp_path):
    with pytest.raises(cf.FormatError, match="no such file"):
        cf.load_safetensors(str(tmp_path / "nope.safetensors"))


def test_misaligned_offsets_are_copied(tmp_path):
    header = {"b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "f": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}
    payload = b"\x07" + struct.pack("<2f", 1.5, -2.0)
    f = write_raw(tmp_path / "m.safetensors", header, payload)
    got = cf.load_safetensors(f)
    assert got["f"].tolist() == [1.5, -2.0] and got["b"].tolist() == [7]
