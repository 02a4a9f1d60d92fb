"""GGUF loading checked by routes independent of the loader.

- Golden dequantization: blocks packed here byte by byte from llama.cpp's block layouts
  (ggml-common.h), with the float each element must decode to computed by plain Python arithmetic
  from the integers that were packed (never by gguf.quants, which the loader itself calls). A few
  blocks are literal bytes with literal expected values.
- Q/K rows: the files are written with llama.cpp's row order by index arithmetic in helpers.py,
  and logits are compared with transformers loading the same GGUF file (its own un-permute).
- Clear errors for bad files.
"""

from __future__ import annotations

import os
import random
import re
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import circuit_finder as cf
from circuit_finder.generation import rows_interact
from circuit_finder.gguf import SUPPORTED_TYPES, hf_name, read_gguf
from circuit_finder.quants import PackedTensor
from helpers import build_hf_model, gguf_name, llama_cpp_or_skip, llama_cpp_permute, rebuilt, write_gguf


def report(name: str, ours: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (ours.float() - ref.float()).abs()
    print(f"{name}: max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e}")
    return diff.max().item()


# ----------------------------------------------------------------------------- block packers
# Each packer turns the integers of one block into its bytes, following ggml-common.h; each
# `*_values` gives the floats those integers stand for. Scales are fp16 values with few mantissa
# bits (k * 2**-e), so every product and sum below is exact in float32 and equality is exact.

def f16(x: float) -> bytes:
    b = struct.pack("<e", x)
    assert struct.unpack("<e", b)[0] == x, f"{x} is not an fp16 value"
    return b


def nibbles(lo: list[int], hi: list[int]) -> bytes:
    """Byte j holds lo[j] in its low 4 bits and hi[j] in its high 4 bits."""
    return bytes((a & 0xF) | ((b & 0xF) << 4) for a, b in zip(lo, hi))


def pack_q8_0(d, q):  # fp16 d, 32 x int8; value q * d
    return f16(d) + bytes(v & 0xFF for v in q)


def pack_q4_0(d, q):  # fp16 d, 16 bytes: low nibbles are elements 0..15, high 16..31; value (q - 8) * d
    return f16(d) + nibbles(q[:16], q[16:])


def pack_q4_1(d, m, q):  # fp16 d, fp16 m, nibbles as Q4_0; value q * d + m
    return f16(d) + f16(m) + nibbles(q[:16], q[16:])


def fifth_bits(q):  # uint32 (little-endian): bit i is bit 4 of element i
    return struct.pack("<I", sum(((v >> 4) & 1) << i for i, v in enumerate(q)))


def pack_q5_0(d, q):  # fp16 d, qh[4], nibbles as Q4_0; value (q - 16) * d, q in 0..31
    return f16(d) + fifth_bits(q) + nibbles(q[:16], q[16:])


def pack_q5_1(d, m, q):  # fp16 d, fp16 m, qh[4], nibbles; value q * d + m
    return f16(d) + f16(m) + fifth_bits(q) + nibbles(q[:16], q[16:])


def pack_q4_k(d, dmin, sc, mn, q):
    """256 values in 8 sub-blocks of 32: value d * sc[s] * q - dmin * mn[s], s = element // 32.
    Layout: fp16 d, fp16 dmin, 12 bytes of 6-bit (sc, mn) pairs, 128 bytes of nibbles (byte 32c + l:
    element 64c + l low, 64c + 32 + l high). Pairs 0..3 sit in the low 6 bits of bytes 0..3 (sc) and
    4..7 (mn); pairs 4..7 keep their low 4 bits in bytes 8..11 (sc low nibble, mn high nibble) and
    their top 2 bits in the top 2 bits of bytes 0..3 (sc) and 4..7 (mn)."""
    s = [0] * 12
    for j in range(4):
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6)
        s[j + 8] = (sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4)
    qs = b"".join(nibbles(q[64 * c:64 * c + 32], q[64 * c + 32:64 * c + 64]) for c in range(4))
    return f16(d) + f16(dmin) + bytes(s) + qs


def pack_q6_k(d, sc, q):
    """256 values, q in -32..31 stored as u = q + 32 (6 bits); value d * sc[element // 16] * q.
    Layout: ql[128] low 4 bits, qh[64] top 2 bits, int8 scales[16], fp16 d. In half h (elements
    128h..128h+127), for l < 32 the elements e = 128h + l + 32k (k = 0..3): ql[64h + l] holds k=0 (low
    nibble) and k=2 (high), ql[64h + 32 + l] holds k=1 and k=3, qh[32h + l] bits 2k..2k+1 hold k's top bits."""
    u = [v + 32 for v in q]
    ql, qh = [0] * 128, [0] * 64
    for h in range(2):
        for lane in range(32):
            e = [128 * h + lane + 32 * k for k in range(4)]
            ql[64 * h + lane] = (u[e[0]] & 0xF) | ((u[e[2]] & 0xF) << 4)
            ql[64 * h + 32 + lane] = (u[e[1]] & 0xF) | ((u[e[3]] & 0xF) << 4)
            qh[32 * h + lane] = sum((u[e[k]] >> 4) << (2 * k) for k in range(4))
    return bytes(ql) + bytes(qh) + bytes(v & 0xFF for v in sc) + f16(d)


def pack_q5_k(d, dmin, sc, mn, q):
    """Q4_K's scales and nibbles, q in 0..31: value d * sc[s] * q - dmin * mn[s]. Layout: fp16 d, fp16
    dmin, 12 bytes of scales, qh[32] (bit 2c of qh[l]: bit 4 of element 64c + l; bit 2c + 1: of
    element 64c + 32 + l), then Q4_K's 128 bytes of low nibbles."""
    base = pack_q4_k(d, dmin, sc, mn, [v & 0xF for v in q])
    qh = bytes(sum((((q[64 * c + lane] >> 4) & 1) << (2 * c)) | (((q[64 * c + 32 + lane] >> 4) & 1) << (2 * c + 1))
                   for c in range(4)) for lane in range(32))
    return base[:16] + qh + base[16:]


def two_bit_planes(q):
    """64 bytes: element 128n + 32j + l (l < 32) sits in bits 2j..2j+1 of byte 32n + l (Q2_K, Q3_K)."""
    out = [0] * 64
    for e, v in enumerate(q):
        n, j, lane = e // 128, (e % 128) // 32, e % 32
        out[32 * n + lane] |= (v & 3) << (2 * j)
    return bytes(out)


def pack_q2_k(d, dmin, sc, mn, q):
    """256 values in 16 sub-blocks of 16, q in 0..3: value d * sc[s] * q - dmin * mn[s] (sc, mn 4 bits).
    Layout: scales[16] (low nibble sc, high nibble mn), 64 bytes of 2-bit planes, fp16 d, fp16 dmin."""
    return nibbles(sc, mn) + two_bit_planes(q) + f16(d) + f16(dmin)


def pack_q3_k(d, sc, q):
    """256 values in 16 sub-blocks of 16, q in -4..3: value d * (sc[s] - 32) * q (sc 6 bits). Layout:
    hmask[32] (bit 4n + j of byte l: 1 if element 128n + 32j + l is >= 0), 2-bit planes of q (+4 where
    negative), 12 bytes of scales (byte k < 4: low nibbles of sc[k] and sc[8 + k]; 4 + k: of sc[4 + k]
    and sc[12 + k]; 8 + k: the top 2 bits of sc[k], sc[4 + k], sc[8 + k], sc[12 + k]), fp16 d."""
    hmask = [0] * 32
    for e, v in enumerate(q):
        hmask[e % 32] |= int(v >= 0) << (4 * (e // 128) + (e % 128) // 32)
    top = [(sc[k] >> 4) | ((sc[4 + k] >> 4) << 2) | ((sc[8 + k] >> 4) << 4) | ((sc[12 + k] >> 4) << 6) for k in range(4)]
    scales = nibbles(sc[0:4], sc[8:12]) + nibbles(sc[4:8], sc[12:16]) + bytes(top)
    return bytes(hmask) + two_bit_planes([v if v >= 0 else v + 4 for v in q]) + scales + f16(d)


# The 16 levels of IQ4_NL / IQ4_XS (ggml-common.h's kvalues_iq4nl): a 4-bit index picks one.
IQ4_LEVELS = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def pack_iq4_nl(d, q):  # fp16 d, 16 bytes of nibbles as Q4_0; value d * IQ4_LEVELS[q]
    return f16(d) + nibbles(q[:16], q[16:])


def pack_iq4_xs(d, ls, q):
    """256 values in 8 sub-blocks of 32: value d * (ls[s] - 32) * IQ4_LEVELS[q], ls in 0..63.
    Layout: fp16 d, uint16 scales_h (bits 2s..2s+1: top 2 bits of ls[s]), 4 bytes scales_l (byte
    j: ls[2j] low nibble, ls[2j + 1] high nibble), then per sub-block 16 bytes of nibbles as Q4_0."""
    high = sum(((v >> 4) & 3) << (2 * s) for s, v in enumerate(ls))
    qs = b"".join(nibbles(q[32 * s:32 * s + 16], q[32 * s + 16:32 * s + 32]) for s in range(8))
    return f16(d) + struct.pack("<H", high) + nibbles(ls[0::2], ls[1::2]) + qs


def scale(rng: random.Random, lo: int, hi: int, e: int, signed: bool = False) -> float:
    """An fp16-exact scale k * 2**-e with k in [lo, hi] (optionally of either sign)."""
    k = rng.randint(lo, hi)
    return (rng.choice((-1, 1)) if signed else 1) * k * 2.0 ** -e


def random_block(kind: str, rng: random.Random) -> tuple[bytes, list[float]]:
    """One block of `kind` from random integers -> (bytes, the floats they decode to)."""
    ints = lambda n, a, b: [rng.randint(a, b) for _ in range(n)]  # noqa: E731
    if kind == "Q8_0":
        d, q = scale(rng, 1, 31, 14, signed=True), ints(32, -128, 127)
        return pack_q8_0(d, q), [v * d for v in q]
    if kind == "Q4_0":
        d, q = scale(rng, 1, 31, 10, signed=True), ints(32, 0, 15)
        return pack_q4_0(d, q), [(v - 8) * d for v in q]
    if kind == "Q4_1":
        d, m, q = scale(rng, 1, 31, 11), -scale(rng, 1, 63, 9), ints(32, 0, 15)
        return pack_q4_1(d, m, q), [v * d + m for v in q]
    if kind == "Q5_0":
        d, q = scale(rng, 1, 31, 11, signed=True), ints(32, 0, 31)
        return pack_q5_0(d, q), [(v - 16) * d for v in q]
    if kind == "Q5_1":
        d, m, q = scale(rng, 1, 31, 12), -scale(rng, 1, 63, 9), ints(32, 0, 31)
        return pack_q5_1(d, m, q), [v * d + m for v in q]
    if kind == "Q4_K":
        d, dmin = scale(rng, 1, 15, 15), scale(rng, 1, 15, 14)
        sc, mn, q = ints(8, 0, 63), ints(8, 0, 63), ints(256, 0, 15)
        return pack_q4_k(d, dmin, sc, mn, q), [d * sc[i // 32] * q[i] - dmin * mn[i // 32] for i in range(256)]
    if kind == "Q6_K":
        d, sc, q = scale(rng, 1, 15, 18), ints(16, -128, 127), ints(256, -32, 31)
        return pack_q6_k(d, sc, q), [d * sc[i // 16] * q[i] for i in range(256)]
    if kind == "Q5_K":
        d, dmin = scale(rng, 1, 15, 15), scale(rng, 1, 15, 14)
        sc, mn, q = ints(8, 0, 63), ints(8, 0, 63), ints(256, 0, 31)
        return pack_q5_k(d, dmin, sc, mn, q), [d * sc[i // 32] * q[i] - dmin * mn[i // 32] for i in range(256)]
    if kind == "Q2_K":
        d, dmin, sc, mn, q = scale(rng, 1, 15, 12), scale(rng, 1, 15, 12), ints(16, 0, 15), ints(16, 0, 15), ints(256, 0, 3)
        return pack_q2_k(d, dmin, sc, mn, q), [d * sc[i // 16] * q[i] - dmin * mn[i // 16] for i in range(256)]
    if kind == "Q3_K":
        d, sc, q = scale(rng, 1, 15, 14), ints(16, 0, 63), ints(256, -4, 3)
        return pack_q3_k(d, sc, q), [d * (sc[i // 16] - 32) * q[i] for i in range(256)]
    if kind == "IQ4_NL":
        d, q = scale(rng, 1, 31, 14, signed=True), ints(32, 0, 15)
        return pack_iq4_nl(d, q), [d * IQ4_LEVELS[v] for v in q]
    if kind == "IQ4_XS":
        d, ls, q = scale(rng, 1, 15, 16), ints(8, 0, 63), ints(256, 0, 15)
        return pack_iq4_xs(d, ls, q), [d * (ls[i // 32] - 32) * IQ4_LEVELS[q[i]] for i in range(256)]
    if kind == "F16":
        v = [scale(rng, 0, 255, 12, signed=True) for _ in range(32)]
        return b"".join(f16(x) for x in v), v
    if kind == "BF16":  # the top 16 bits of a float32 whose low 16 bits are zero
        v = [rng.choice((-1, 1)) * (128 + rng.randint(0, 127)) * 2.0 ** -rng.randint(10, 14) for _ in range(32)]
        return b"".join(struct.pack("<f", x)[2:] for x in v), v
    raise ValueError(kind)


# Literal blocks: bytes written out, expected values written out. They pin the nibble order, the
# fp16 scale decoding and the sign handling that random blocks only cover statistically.
LITERAL = {
    # d = 0.25, q = -16..15
    "Q8_0": (b"\x00\x34" + bytes(v & 0xFF for v in range(-16, 16)),
             [-4.0, -3.75, -3.5, -3.25, -3.0, -2.75, -2.5, -2.25, -2.0, -1.75, -1.5, -1.25, -1.0, -0.75, -0.5,
              -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 3.75]),
    # d = fp16(0.1) = 0.0999755859375 (bits 0x2E66); q = 1, 2, -1, -128, 127, then 0s
    "Q8_0b": (b"\x66\x2e" + bytes([0x01, 0x02, 0xFF, 0x80, 0x7F]) + bytes(27),
              [0.0999755859375, 0.199951171875, -0.0999755859375, -12.796875, 12.6968994140625] + [0.0] * 27),
    # d = 0.5; byte j = j | (15 - j) << 4: elements 0..15 are (j - 8) / 2, 16..31 are (7 - j) / 2
    "Q4_0": (b"\x00\x38" + bytes(j | ((15 - j) << 4) for j in range(16)),
             [-4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5,
              3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -2.5, -3.0, -3.5, -4.0]),
    # d = 0.25, m = -1.0; byte j = j | 0xF0: elements 0..15 are j / 4 - 1, 16..31 are 15 / 4 - 1
    "Q4_1": (b"\x00\x34\x00\xbc" + bytes(j | 0xF0 for j in range(16)),
             [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75]
             + [2.75] * 16),
    # d = 1, scales 1 except scales[2] = 2; ql[0] = 0x21, qh[0] = 0b11100100, all else 0:
    # element 0 = (1 | 0 << 4) - 32 = -31; element 32 = (0 | 1 << 4) - 32 = -16, times scales[2] = -32;
    # element 64 = (2 | 2 << 4) - 32 = 2; element 96 = (0 | 3 << 4) - 32 = 16; the rest -32 * scale.
    "Q6_K": (bytes([0x21]) + bytes(127) + bytes([0b11100100]) + bytes(63) + bytes([1, 1, 2] + [1] * 13) + b"\x00\x3c",
             [-31.0] + [-32.0] * 31 + [-32.0] + [-64.0] * 15 + [-32.0] * 16 + [2.0] + [-32.0] * 31
             + [16.0] + [-32.0] * 159),
}

TYPE_OF_LITERAL = {"Q8_0": "Q8_0", "Q8_0b": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q6_K": "Q6_K"}

HIDDEN, HEADS, KV_HEADS = 256, 4, 2
# Which type each matrix of the golden model gets. attn_q / attn_k rows are in llama.cpp's order in
# the file, so those also check the un-permute on quantized rows.
GOLDEN_TYPES = {
    "blk.0.attn_q.weight": "Q4_1", "blk.0.attn_k.weight": "Q3_K", "blk.0.attn_v.weight": "Q6_K",
    "blk.0.attn_output.weight": "Q4_K", "blk.0.ffn_gate.weight": "Q4_0", "blk.0.ffn_up.weight": "Q5_0",
    "blk.0.ffn_down.weight": "Q5_1",
    "blk.1.attn_q.weight": "Q5_K", "blk.1.attn_k.weight": "IQ4_NL", "blk.1.attn_v.weight": "F16",
    "blk.1.attn_output.weight": "BF16", "blk.1.ffn_gate.weight": "Q8_0", "blk.1.ffn_up.weight": "IQ4_XS",
    "blk.1.ffn_down.weight": "Q2_K",
    "output.weight": "Q6_K",
}
# Row 0 of these tensors starts with the literal blocks.
LITERAL_AT = {"blk.1.ffn_gate.weight": ["Q8_0", "Q8_0b"], "blk.0.ffn_gate.weight": ["Q4_0"],
              "blk.0.attn_q.weight": ["Q4_1"], "blk.0.attn_v.weight": ["Q6_K"]}


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A 2-layer Llama GGUF whose matrices are hand-packed blocks -> (path, {hf name: expected tensor}, hf model)."""
    folder = tmp_path_factory.mktemp("golden")
    hf = build_hf_model("llama", folder / "hf", hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2,
                        vocab_size=32, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                        tie_word_embeddings=False, rope_scaling=None)
    shapes = {gguf_name(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    rng = random.Random(1234)
    extra, expected = {}, {}
    for name, kind in GOLDEN_TYPES.items():
        rows, cols = shapes[name]
        block_len = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0] if kind not in ("F16", "BF16") else 32
        raw, values = bytearray(), []
        literals = [LITERAL[k] for k in LITERAL_AT.get(name, [])]
        for r in range(rows):
            for b in range(cols // block_len):
                if r == 0 and b < len(literals):
                    data, vals = literals[b]
                else:
                    data, vals = random_block(kind, rng)
                raw += data
                values += vals
        kind_enum = gguf.GGMLQuantizationType[kind]
        extra[name] = (np.frombuffer(bytes(raw), dtype=np.uint8).reshape(rows, -1), kind_enum)
        exp = torch.tensor(values, dtype=torch.float64).reshape(rows, cols)
        assert torch.equal(exp.float().double(), exp), f"{name}: expected values not exact in float32"
        exp = exp.float()
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            # the file holds llama.cpp's row order: file row r is Hugging Face row order[r]
            heads = HEADS if "attn_q" in name else KV_HEADS
            order = llama_cpp_permute(np.arange(rows), heads)
            hf_rows = torch.empty_like(exp)
            hf_rows[torch.from_numpy(order)] = exp
            exp = hf_rows
        expected[hf_name(name)] = exp
    path = folder / "golden.gguf"
    write_gguf(hf, path, skip=set(GOLDEN_TYPES), extra_tensors=extra)
    return path, expected, hf


def test_literal_blocks_are_what_the_layout_says():
    """The packers reproduce the literal bytes (so random blocks follow the same layout)."""
    assert pack_q8_0(0.25, list(range(-16, 16))) == LITERAL["Q8_0"][0]
    assert pack_q4_0(0.5, list(range(16)) + [15 - j for j in range(16)]) == LITERAL["Q4_0"][0]
    assert pack_q4_1(0.25, -1.0, list(range(16)) + [15] * 16) == LITERAL["Q4_1"][0]
    q6 = [-32] * 256
    q6[0], q6[32], q6[64], q6[96] = -31, -16, 2, 16
    assert pack_q6_k(1.0, [1, 1, 2] + [1] * 13, q6) == LITERAL["Q6_K"][0]
    for key, (data, values) in LITERAL.items():
        size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[TYPE_OF_LITERAL[key]]]
        assert (len(data), len(values)) == (size[1], size[0]), key


@pytest.mark.parametrize("name", sorted(GOLDEN_TYPES))
def test_read_gguf_decodes_hand_packed_blocks_exactly(golden, name):
    path, expected, _ = golden
    _, tensors = read_gguf(path, torch.float32)
    hf = hf_name(name)
    ours, ref = tensors[hf], expected[hf]
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    print(f"{name} ({GOLDEN_TYPES[name]})", end=": ")
    assert report("vs hand-computed values", ours, ref) == 0.0
    start = 0
    for lit in LITERAL_AT.get(name, []):  # the literal values as written above (file row 0 is HF row 0 for Q/K too)
        values = LITERAL[lit][1]
        assert ours[0, start:start + len(values)].tolist() == values, lit
        start += len(values)


@pytest.mark.parametrize("name", sorted(GOLDEN_TYPES))
def test_packed_blocks_decode_to_the_hand_computed_values(golden, name):
    """read_gguf(keep_packed=True): every quantized matrix stays packed, as the file's bytes, and our
    kernel decodes it to the hand-computed values exactly (F16 / BF16 too: float32 compute)."""
    path, expected, _ = golden
    _, tensors = read_gguf(path, torch.float32, keep_packed=True)
    hf = hf_name(name)
    packed = tensors[hf]
    assert isinstance(packed, PackedTensor) and packed.type_name == GOLDEN_TYPES[name]
    assert packed.shape == expected[hf].shape
    print(f"{name} ({GOLDEN_TYPES[name]})", end=": ")
    assert report("packed, decoded by our kernel, vs hand-computed values", packed.dequantize(), expected[hf]) == 0.0


@pytest.mark.parametrize("dequantize", [False, True])
def test_load_runs_the_golden_weights(golden, dequantize):
    """cf.load on the golden file, packed (the default) and dequantized: the engine's tensors are the
    hand-computed values, and logits match transformers running those same values."""
    path, expected, hf = golden
    model = cf.load(path, dequantize=dequantize)
    for name, ref in expected.items():
        ours = model.tensors[name]
        assert isinstance(ours, PackedTensor) != dequantize, name
        assert torch.equal(ours if dequantize else ours.dequantize(), ref), name
    state = hf.state_dict()
    with torch.no_grad():
        for name, ref in expected.items():
            state[name].copy_(ref)
    ids = torch.randint(3, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    for layers in ("0,1", "0,1,1,0"):
        with torch.no_grad():
            ref = rebuilt(hf, [int(x) for x in layers.split(",")])(ids).logits
        assert report(f"golden gguf logits, path {layers}", model.logits(ids, layers=layers), ref) < 1e-4


def test_every_supported_quant_type_is_in_the_golden_model():
    """Each block type the loader accepts decodes against hand-computed values above (MXFP4: test_moe)."""
    assert set(SUPPORTED_TYPES) - {"F32", "MXFP4"} == set(GOLDEN_TYPES.values())


def test_qk_rows_restored_to_hugging_face_order(tmp_path):
    """An F32 llama GGUF (rows permuted by index arithmetic, GQA so Q and K have different head
    counts): the loader's q/k_proj are exactly transformers' weights."""
    hf = build_hf_model("llama", tmp_path / "hf", rope_scaling=None)
    path = tmp_path / "m.gguf"
    write_gguf(hf, path)
    _, tensors = read_gguf(path)
    state = hf.state_dict()
    for layer in range(hf.config.num_hidden_layers):
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            assert report(name, tensors[name], state[name]) == 0.0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f32_gguf_logits_match_transformers(tmp_path, arch):
    overrides = {"qwen3": dict(head_dim=16)}.get(arch, {})
    hf = build_hf_model(arch, tmp_path / "hf", rope_scaling=None, **overrides)
    path = tmp_path / "m.gguf"
    write_gguf(hf, path)
    model = cf.load(path)
    assert model.config.architecture == hf.config.architectures[0]
    ids = torch.randint(3, 160, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    assert report(f"{arch} gguf f32", model.logits(ids), ref) < 1e-4


@pytest.mark.parametrize("orig, kind", [(8192, "llama3"), (64, "longrope")])
def test_llama3_rope_freqs_match_transformers(tmp_path, orig, kind):
    """Llama 3.1-3.3 files carry their RoPE scaling only as rope_freqs (per-frequency divisors the
    converter computes): Meta's parameters (original context 8192) read back as llama3 scaling, others
    (here 64, a synthetic file of other divisors) as longrope with those divisors. Logits against transformers on the original llama3
    config, identity and a repeated path, and the export's HF folder in transformers."""
    from transformers import AutoModelForCausalLM

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": orig}
    hf = build_hf_model("llama", tmp_path / "hf", rope_theta=500000.0, rope_scaling=rope, head_dim=16,
                        max_position_embeddings=4 * orig)
    write_gguf(hf, tmp_path / "m.gguf", permute=True)
    model = cf.load(tmp_path / "m.gguf")
    read = model.config.raw["rope_parameters"]
    print(read)
    assert read["rope_type"] == kind
    if kind == "llama3":
        assert {k: read[k] for k in rope} == rope
    assert not rows_interact(model)  # one table at every length: the sweep's batching stays on
    ids = torch.randint(3, 160, (2, 40), generator=torch.Generator().manual_seed(2))
    for layers in ("0..5", "0..3,2,3,4,5"):
        path = [int(x) for x in cf.LayerPath.parse(layers)]
        with torch.no_grad():
            ref = rebuilt(hf, path)(ids).logits
        assert report(f"llama3 rope (orig {orig}) gguf vs transformers, path {layers}",
                      model.logits(ids, layers=layers), ref) < 1e-4
    with torch.no_grad():  # the scaling matters at these positions: the check is not vacuous
        assert (rebuilt(hf, [0, 1, 2, 3, 4, 5])(ids).logits - build_hf_model(
            "llama", tmp_path / "plain", rope_theta=500000.0, rope_scaling=None, head_dim=16)(ids).logits).abs().max() > 1e-3
    cf.export_gguf(tmp_path / "m.gguf", tmp_path / "out.gguf", "0..3,2,3,4,5")  # rope_freqs copied as it is
    assert report("its GGUF export, reloaded", cf.load(tmp_path / "out.gguf").logits(ids),
                  model.logits(ids, layers="0..3,2,3,4,5")) < 1e-6
    cf.export_hf(tmp_path / "m.gguf", tmp_path / "out", "0..3,2,3,4,5")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert report("its export in transformers", exported(ids).logits,
                      rebuilt(hf, [0, 1, 2, 3, 2, 3, 4, 5])(ids).logits) < 1e-4


@pytest.mark.parametrize("key", ["llama.rope.scale_linear", "llama.rope.scaling.factor"])
def test_a_linear_rope_factor_without_a_type_is_linear(tmp_path, key):
    """llama.cpp reads a RoPE factor with no rope.scaling.type as linear, and takes it from the older
    rope.scale_linear key when rope.scaling.factor is absent (2023 conversions of linear-scaled
    fine-tunes): both match transformers on a linear-scaled config, which differs from unscaled."""
    hf = build_hf_model("llama", tmp_path / "hf", rope_scaling={"rope_type": "linear", "factor": 4.0})
    write_gguf(hf, tmp_path / "m.gguf", extra_floats={key: 4.0})
    model = cf.load(tmp_path / "m.gguf")
    ids = torch.randint(3, 160, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        plain = build_hf_model("llama", tmp_path / "plain", rope_scaling=None)(ids).logits
    assert report("unscaled vs linear x4 (transformers)", plain, ref) > 1e-3
    assert report(f"gguf with only {key} vs transformers", model.logits(ids), ref) < 1e-4


def test_gemma2_without_soft_cap_keys_soft_caps_at_50_and_30(tmp_path):
    """Gemma 2 always soft-caps; a file without the two keys gets 50 (attention) and 30 (final), as
    llama.cpp and transformers' Gemma2Config default to, not no capping."""
    hf = build_hf_model("gemma2", tmp_path / "hf", attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        query_pre_attn_scalar=16)  # head_dim: what llama.cpp assumes where the file has no scale
    ids = torch.randint(3, 160, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    hf.config.attn_logit_softcapping = hf.config.final_logit_softcapping = None  # the file leaves both out
    with torch.no_grad():
        uncapped = hf(ids).logits
    write_gguf(hf, tmp_path / "m.gguf")
    assert report("uncapped vs capped (transformers)", uncapped, ref) > 1e-3
    assert report("gemma2 gguf without soft-cap keys vs transformers at 50 / 30", cf.load(tmp_path / "m.gguf").logits(ids),
                  ref) < 1e-4


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_gguf_matches_transformers_loading_the_same_file(tmp_path, arch, qtype):
    """transformers' own GGUF loader (its dequantize + its Q/K un-permute) is the reference: the
    same file through both, identity and a repeated path."""
    from transformers import AutoModelForCausalLM

    hf = build_hf_model(arch, tmp_path / "hf", intermediate_size=128, rope_scaling=None, tie_word_embeddings=False)
    write_gguf(hf, tmp_path / "m.gguf", qtype=qtype)
    ref_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    model = cf.load(tmp_path / "m.gguf")
    ids = torch.randint(3, 160, (2, 12), generator=torch.Generator().manual_seed(1))
    for layers in ("0..5", "0..3,2,3,4,5"):
        path = [int(x) for x in cf.LayerPath.parse(layers)]
        with torch.no_grad():
            ref = rebuilt(ref_model, path)(ids).logits
        out = model.logits(ids, layers=layers)
        assert report(f"{arch} {qtype} gguf vs transformers' gguf loader, path {layers}", out, ref) < 1e-4
        with torch.no_grad():  # quantization really changed the weights: the check is not vacuous
            assert (rebuilt(hf, path)(ids).logits - ref).abs().max() > 1e-3


# ----------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A random Llama whose rows are multiples of 256, so every quant type (K-quants too) applies."""
    folder = tmp_path_factory.mktemp("wide")
    return build_hf_model("llama", folder, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          vocab_size=64, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                          rope_scaling=None)


def test_bf16_compute_dtype_from_gguf(wide_llama, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(wide_llama, path, qtype="Q8_0")
    model, dense = cf.load(path, dtype="bfloat16"), cf.load(path, dtype="bfloat16", dequantize=True)
    exact = cf.load(path, dequantize=True)
    assert model.dtype == dense.dtype == torch.bfloat16
    assert model.tensors["model.layers.0.self_attn.q_proj.weight"].type_name == "Q8_0"  # packed: not converted
    assert model.tensors["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    assert dense.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = exact.logits(ids)
    packed_logits = model.logits(ids)
    assert packed_logits.dtype == torch.bfloat16
    # packed bf16 multiplies the exact weights in fp32 and rounds activations: no further from fp32
    # than bf16 with the weights rounded too
    packed_err = report("packed bf16 vs fp32", packed_logits, ref)
    assert packed_err <= report("dequantized bf16 vs fp32", dense.logits(ids), ref) * 1.5 + 1e-3


def test_truncated_gguf(wide_llama, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(wide_llama, path, qtype="Q4_0")
    data = path.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(cf.GGUFError) as e:
            cf.load(bad)
        print(f"cut at {cut}: {e.value}")
        assert f"cut{cut}.gguf" in str(e.value)
        if cut > 1000:  # past the metadata: the first tensor cut off is named
            assert re.search(r"tensor '[^']+' needs bytes \d+\.\.\d+, but the file has", str(e.value))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(cf.GGUFError, match="empty.gguf: 0 bytes, too short to be a GGUF file"):
        cf.load(empty)


def test_bad_tensor_table_and_metadata_name_the_file_and_tensor(wide_llama, tmp_path, monkeypatch):
    from circuit_finder.gguf import metadata_keys

    path = tmp_path / "m.gguf"
    write_gguf(wide_llama, path)
    data = bytearray(path.read_bytes())
    end, _ = metadata_keys(str(path))
    (length,) = struct.unpack_from("<Q", data, end)  # the first tensor: name, n_dims, dims, then its type
    name = data[end + 8:end + 8 + length].decode()
    (dims,) = struct.unpack_from("<I", data, end + 8 + length)
    struct.pack_into("<I", data, end + 8 + length + 4 + 8 * dims, 99)
    bad = tmp_path / "type99.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(cf.GGUFError, match=rf"type99.gguf: tensor '{re.escape(name)}' has ggml type 99"):
        cf.load(bad)
    # Q/K rows the metadata's head count cannot split: the file and the tensor
    write_gguf(wide_llama, path, extra_uints={"llama.attention.head_count": 6})
    with pytest.raises(cf.GGUFError, match=r"m.gguf: tensor 'blk.0.attn_q.weight': cannot undo the Q/K permutation"):
        cf.load(path)
    # token ids outside the vocabulary: warned about and left out, not a later error blamed on the input
    write_gguf(wide_llama, path, extra_uints={"tokenizer.ggml.padding_token_id": 10**6})
    with pytest.warns(UserWarning, match=r"tokenizer.ggml.padding_token_id = 1000000 is outside the vocabulary"):
        assert cf.load(path).config.raw.get("pad_token_id") != 10**6
    # tokenizer metadata transformers cannot build from (a llama vocabulary without scores): a
    # GGUFError naming the file, before any weight is decoded
    monkeypatch.setenv("CF_CACHE_DIR", str(tmp_path / "cache"))
    import circuit_finder.gguf as cf_gguf

    tokens = ["<unk>", "<s>", "</s>", *[f"t{i}" for i in range(wide_llama.config.vocab_size - 3)]]
    write_gguf(wide_llama, path, extra_strings={"tokenizer.ggml.model": "llama"},
               extra_arrays={"tokenizer.ggml.tokens": tokens})

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was decoded before the tokenizer was built")

    monkeypatch.setattr(cf_gguf, "read_gguf", refuse)
    with pytest.raises(cf.GGUFError, match=r"m.gguf: cannot build the tokenizer from its tokenizer.ggml.\* metadata"):
        cf.load(path)


def test_a_truncated_file_with_a_tokenizer_is_named_truncated(tmp_path, monkeypatch):
    """A cut download of a real file (the default model: transformers reads its tokenizer with the
    gguf package's reader, which fails on the cut tensors) is named truncated, not a bad tokenizer."""
    try:
        source = cf.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("CF_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached: the tokenizer would be built
    cut = tmp_path / "cut.gguf"
    with open(source, "rb") as f:
        cut.write_bytes(f.read(os.path.getsize(source) // 2))
    with pytest.raises(cf.GGUFError, match=r"cut.gguf: tensor '[^']+' needs bytes .* \(truncated\?"):
        cf.load(cut)


def test_unsupported_quant_type(wide_llama, tmp_path):
    path = tmp_path / "m.gguf"
    arr = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    extra = {"blk.0.attn_q.weight": (gguf.quants.quantize(arr, gguf.GGMLQuantizationType.TQ2_0),
                                     gguf.GGMLQuantizationType.TQ2_0)}
    write_gguf(wide_llama, path, skip={"blk.0.attn_q.weight"}, extra_tensors=extra)
    with pytest.raises(cf.GGUFError, match=r"'blk.0.attn_q.weight' has type TQ2_0.*supported: .*Q4_K"):
        cf.load(path)


def test_other_i_quants_are_dequantized_with_a_warning(wide_llama, tmp_path):
    """An IQ2_XXS matrix (no packed kernel) loads as the gguf package decodes it, with one warning
    naming the type; the file's other matrices stay packed."""
    from circuit_finder.gguf import DEQUANTIZED_TYPES
    from circuit_finder.quants import PackedTensor

    path = tmp_path / "m.gguf"
    raw = np.random.default_rng(0).integers(0, 256, size=(256, 66), dtype=np.uint8)  # 256 rows of one block
    raw[:, :2] = np.full((256, 1), 0.01, dtype=np.float16).view(np.uint8)  # a sane scale
    extra = {"blk.0.attn_q.weight": (raw, gguf.GGMLQuantizationType.IQ2_XXS)}
    write_gguf(wide_llama, path, qtype="Q8_0", skip={"blk.0.attn_q.weight"}, extra_tensors=extra)
    with pytest.warns(UserWarning, match="IQ2_XXS tensors have no packed kernel: dequantized to torch.float32"):
        model = cf.load(path)
    q = model.tensors["model.layers.0.self_attn.q_proj.weight"]
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.IQ2_XXS)
    heads = wide_llama.config.num_attention_heads
    want = torch.from_numpy(want[llama_cpp_permute(np.arange(256), heads).argsort()])  # back to HF row order
    assert isinstance(q, torch.Tensor) and torch.equal(q, want)
    assert isinstance(model.tensors["model.layers.0.self_attn.k_proj.weight"], PackedTensor)
    assert "IQ2_XXS" in DEQUANTIZED_TYPES
    assert torch.isfinite(model.logits(torch.tensor([[1, 2, 3]]))).all()


def test_unknown_architecture(wide_llama, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(wide_llama, path, arch="gpt2", permute=False)
    with pytest.raises(cf.GGUFError, match="'gpt2' is not supported.*llama, qwen2, qwen3"):
        cf.load(path)


def test_biases_in_a_llama_file_are_read(tmp_path):
    """llama.cpp reads each bias a llama file holds; so do we (the config says so from the file), an
    absent one is zero, and a bias the family cannot read is refused, never dropped."""
    hf = build_hf_model("llama", tmp_path / "hf", rope_scaling=None, attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for name, t in hf.named_parameters():
            if name.endswith("bias"):
                t.normal_(0, 0.5)  # transformers starts biases at zero: give them values to miss
    ids = torch.randint(3, 160, (2, 12), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "biased.gguf"
    write_gguf(hf, path)
    with torch.no_grad():
        ref = hf(ids).logits
    assert report("llama q/k/v/o + MLP biases", cf.load(path).logits(ids), ref) < 1e-4
    # a file without output biases (llama.cpp: optional): zero ones
    write_gguf(hf, path, skip={f"blk.{i}.attn_output.bias" for i in range(hf.config.num_hidden_layers)})
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.bias.zero_()
        ref = hf(ids).logits
    assert report("llama, o biases absent", cf.load(path).logits(ids), ref) < 1e-4
    # Qwen2 holds no output bias (transformers cannot read one): refused, naming it
    qwen = build_hf_model("qwen2", tmp_path / "qwen", rope_scaling=None)
    extra = {"blk.0.attn_output.bias": (np.ones(qwen.config.hidden_size, np.float32), gguf.GGMLQuantizationType.F32)}
    write_gguf(qwen, path, extra_tensors=extra)
    with pytest.raises(cf.GGUFError, match="biased.gguf: tensor 'blk.0.attn_output.bias' is a bias the qwen2"):
        cf.load(path)


def test_blocks_past_block_count_and_unread_tensors(wide_llama, tmp_path):
    path = tmp_path / "m.gguf"
    n = wide_llama.config.num_hidden_layers - 1  # the last block's tensors go past the count
    write_gguf(wide_llama, path, block_count=n)
    with pytest.raises(cf.GGUFError, match=rf"m.gguf: tensor 'blk.{n}.attn_q.weight' belongs to block {n}, but "
                                           rf"llama.block_count says the file has {n} blocks"):
        cf.load(path)
    extra = {"blk.0.ffn_mystery.weight": (np.ones(4, np.float32), gguf.GGMLQuantizationType.F32)}
    write_gguf(wide_llama, path, extra_tensors=extra)
    with pytest.warns(UserWarning, match="does not read for llama: blk.0.ffn_mystery.weight"):
        cf.load(path)


def test_big_endian_files_load_float_tensors_and_refuse_quantized_ones(wide_llama, tmp_path):
    """A big-endian file's F32 tensors read right (logits match transformers); quantized blocks,
    whose scales every decoder reads little-endian, are refused naming the type and tensor rather
    than decoded into wrong values. A GGUF version 1 file is named as one."""
    hf = build_hf_model("qwen2", tmp_path / "hf", rope_scaling=None)
    write_gguf(hf, tmp_path / "be.gguf", big_endian=True)
    ids = torch.randint(3, 160, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    assert report("big-endian F32 gguf vs transformers", cf.load(tmp_path / "be.gguf").logits(ids), ref) < 1e-4
    write_gguf(wide_llama, tmp_path / "be-q8.gguf", qtype="Q8_0", big_endian=True)
    with pytest.raises(cf.GGUFError, match=r"be-q8.gguf: a big-endian GGUF file with a Q8_0 tensor \('blk\.0\.|"
                                           r"be-q8.gguf: a big-endian GGUF file with a Q8_0 tensor \('token_embd"):
        cf.load(tmp_path / "be-q8.gguf")
    old = tmp_path / "v1.gguf"
    old.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + (0).to_bytes(4, "little") * 2 + bytes(64))
    with pytest.raises(cf.GGUFError, match="v1.gguf: a GGUF version 1 file"):
        cf.load(old)


def test_end_of_turn_tokens_named_by_text_end_generation(tmp_path):
    """As in llama.cpp, a control token whose text ends a turn (<|eot_id|>, <|im_end|>, ...) ends
    generation even where the metadata names another EOS and no eot id (early Llama 3 Instruct
    files); the same text as a normal token does not. On the default model, the ids we stop at are
    ones llama.cpp stops at (it adds fill-in-the-middle tokens we leave alone)."""
    hf = build_hf_model("llama", tmp_path / "hf")
    tokens = [f"t{i}" for i in range(hf.config.vocab_size)]
    types = [1] * len(tokens)
    tokens[9], types[9] = "<|eot_id|>", 3
    tokens[10] = "<|eot_id|>"  # (a normal token)
    write_gguf(hf, tmp_path / "m.gguf", extra_arrays={"tokenizer.ggml.tokens": tokens,
                                                      "tokenizer.ggml.token_type": types})
    assert cf.load(tmp_path / "m.gguf").codec.eos_ids == [2, 9]
    # gpt-oss's harmony format: <|end|> closes the analysis and the answer follows; <|return|> and
    # <|call|> end (transformers' gpt-oss generation_config has those, not <|end|>)
    tokens[9], tokens[11], tokens[12] = "<|end|>", "<|return|>", "<|call|>"
    types[11] = types[12] = 3
    write_gguf(hf, tmp_path / "h.gguf", extra_arrays={"tokenizer.ggml.tokens": tokens,
                                                      "tokenizer.ggml.token_type": types})
    assert cf.load(tmp_path / "h.gguf").codec.eos_ids == [2, 11, 12]
    llama_cpp = llama_cpp_or_skip()
    path = str(cf.default_model_path())
    ref = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(ref.model)
    theirs = [t for t in range(ref.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    ours = cf.load(path).codec.eos_ids
    print("end-of-generation ids: ours", ours, "llama.cpp", theirs)
    assert set(ours) <= set(theirs) and {0, 2} <= set(ours)


def test_missing_tensor(wide_llama, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(wide_llama, path, skip={"blk.1.ffn_up.weight"})
    with pytest.raises(cf.WeightError, match=r"m.gguf: missing tensor 'model.layers.1.mlp.up_proj.weight' "
                                             r"\('blk.1.ffn_up.weight' in the file\)"):
        cf.load(path)
    # a matrix whose shape the metadata does not give: the file, both names, the shapes
    write_gguf(wide_llama, path, extra_uints={"llama.feed_forward_length": wide_llama.config.intermediate_size + 32})
    with pytest.raises(cf.WeightError, match=r"m.gguf: .*'model.layers.0.mlp.gate_proj.weight' "
                                             r"\('blk.0.ffn_gate.weight' in the file\).*shape"):
        cf.load(path)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(cf.GGUFError, match="junk.gguf"):
        cf.load(bad)
    with pytest.raises(FileNotFoundError):
        cf.load(tmp_path / "absent.gguf")
    with pytest.raises(FileNotFoundError, match="a folder, not a GGUF file"):
        cf.export_gguf(tmp_path, tmp_path / "out.gguf", "0..1")


def test_a_part_of_a_split_gguf_is_refused(wide_llama, tmp_path):
    """llama.cpp's split files (split.count > 1) hold some of the tensors each: refused naming the merge."""
    path = tmp_path / "m-00001-of-00002.gguf"
    write_gguf(wide_llama, path, extra_uints={"split.count": 2})
    for call in (lambda: cf.load(path), lambda: cf.export_gguf(path, tmp_path / "out.gguf", "0..1")):
        with pytest.raises(cf.GGUFError, match="split into 2 files; merge them into one first"):
            call()


def test_name_mapping():
    assert hf_name("blk.12.attn_q_norm.weight") == "model.layers.12.self_attn.q_norm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("rope_freqs.weight") is None


# ------------------------------------------------------------------ the tokenizer, built once per file
def _same_tokenizer(a, b) -> None:
    for text in ["Hello world", " 2 + 2 = 4\n\nOK", "<|im_start|>user\nhi<|im_end|>", "ünïcödé 😀"]:
        for special in (True, False):
            assert a(text, add_special_tokens=special).input_ids == b(text, add_special_tokens=special).input_ids
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    assert (a.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == b.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    assert (a.eos_token_id, a.bos_token_id, a.pad_token_id, len(a)) == (b.eos_token_id, b.bos_token_id, b.pad_token_id,
                                                                         len(b))


def test_gguf_tokenizer_is_built_once_then_read_from_the_cache(tmp_path, monkeypatch):
    import time

    from circuit_finder import gguf

    path = cf.default_model_path()
    monkeypatch.setenv("CF_CACHE_DIR", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    built = gguf.gguf_tokenizer(path)
    t1 = time.perf_counter()
    entries = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    build = gguf.build_tokenizer

    def refuse(path):
        raise AssertionError("the tokenizer was built again")

    monkeypatch.setattr(gguf, "build_tokenizer", refuse)
    cached = gguf.gguf_tokenizer(path)
    t2 = time.perf_counter()
    print(f"built in {t1 - t0:.2f}s, read from the cache in {t2 - t1:.2f}s")
    _same_tokenizer(built, cached)
    (entries[0] / "tokenizer.json").write_text("{")  # a damaged entry is rebuilt
    monkeypatch.setattr(gguf, "build_tokenizer", build)
    _same_tokenizer(built, gguf.gguf_tokenizer(path))
    assert (entries[0] / "tokenizer.json").stat().st_size > 1000  # and written again


def test_each_load_of_a_gguf_gets_its_own_tokenizer():
    """Two models loaded from one file do not share a tokenizer object: a change to the first's
    (padding side, an added token) leaves the second's as the file says."""
    path = cf.default_model_path()
    first = cf.load(path).tokenizer
    side, size = first.padding_side, len(first)
    first.padding_side = "left" if side == "right" else "right"
    first.add_tokens(["<my-new-token>"])
    second = cf.load(path).tokenizer
    assert second is not first and (second.padding_side, len(second)) == (side, size)


def test_gguf_tokenizer_cache_key_follows_the_metadata(tmp_path, monkeypatch):
    from circuit_finder import gguf

    src = Path(cf.default_model_path())
    copy = tmp_path / "copy.gguf"
    data = bytearray(src.read_bytes())
    copy.write_bytes(data)
    end, keys = gguf.metadata_keys(str(src))
    assert "tokenizer.chat_template" in keys and end < gguf.open_gguf(src).data_offset
    key = gguf.metadata_digest(str(src), end)
    assert gguf.metadata_digest(str(copy), end) == key  # the same bytes: the same entry
    at = data.index(b"helpful AI assistant")  # inside the chat template, deep in the metadata
    assert at < end
    data[at] = ord("H")
    copy.write_bytes(data)
    assert gguf.metadata_digest(str(copy), gguf.metadata_keys(str(copy))[0]) != key
    import tokenizers  # another tokenizers version writes another tokenizer.json: another entry

    monkeypatch.setattr(tokenizers, "__version__", tokenizers.__version__ + ".post1")
    assert gguf.metadata_digest(str(src), end) != key
    monkeypatch.undo()
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CF_CACHE_DIR", str(tmp_path / "a-file" / "cache"))  # cannot be made: built, no error
    assert "Helpful AI assistant" in gguf.gguf_tokenizer(copy).apply_chat_template([{"role": "user", "content": "x"}],
                                                                                   tokenize=False)


def test_special_token_ids_outside_the_vocabulary_leave_the_tokenizer_buildable(tmp_path, monkeypatch):
    """A published file whose pad (or eos) id lies past the vocabulary loads, as in llama.cpp: those
    ids are warned about and the tokenizer is built without them (transformers' build fails on them
    with an IndexError); it tokenizes as the untouched file's tokenizer does."""
    from gguf import GGUFReader

    from circuit_finder import gguf

    src = Path(cf.default_model_path())
    monkeypatch.setenv("CF_CACHE_DIR", str(tmp_path / "cache"))
    reference = gguf.gguf_tokenizer(src)
    copy = tmp_path / "padded.gguf"
    copy.write_bytes(src.read_bytes())
    reader = GGUFReader(copy, "r+")
    n = len(reader.fields["tokenizer.ggml.tokens"].data)
    for key, value in (("eos_token_id", n), ("padding_token_id", 10**6)):
        field = reader.fields[f"tokenizer.ggml.{key}"]
        field.parts[field.data[0]][0] = value
    del reader
    with pytest.warns(UserWarning, match=rf"padded.gguf: tokenizer.ggml.eos_token_id = {n}, "
                                         rf"tokenizer.ggml.padding_token_id = 1000000 outside the vocabulary"):
        model = cf.load(copy)
    text = "The quick brown fox, 12345 times: <|im_start|>user"
    assert model.tokenizer(text).input_ids == reference(text).input_ids
    assert model.tokenizer.eos_token is None and model.tokenizer.bos_token == reference.bos_token
    assert model.config.raw.get("eos_token_id") == [0, 2]  # not the file's: <|endoftext|> and <|im_end|> by text


def test_mapped_reader_reads_what_the_package_reader_reads(golden):
    """The loader's reader (the package's, served from a plain view of the map) gives the same fields
    (types, values, parts and their dtypes) and the same tensors (bytes, types, offsets, shapes), as
    views of the mapped file, not copies."""
    from circuit_finder.gguf import fast_reader_class

    paths = [golden[0]]
    try:
        paths.append(cf.default_model_path())  # a real vocabulary: 49k strings
    except FileNotFoundError:
        pass
    for path in paths:
        ours, theirs = fast_reader_class()(str(path)), gguf.GGUFReader(str(path))
        assert type(ours) is not gguf.GGUFReader and list(ours.fields) == list(theirs.fields)
        for name, a in theirs.fields.items():
            b = ours.fields[name]
            assert (a.types, a.data, a.offset) == (b.types, b.data, b.offset), name
            assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a.parts, b.parts)), name
        assert len(ours.tensors) == len(theirs.tensors) > 0
        for a, b in zip(theirs.tensors, ours.tensors):
            assert (a.name, a.tensor_type, a.data_offset, list(a.shape)) == (b.name, b.tensor_type, b.data_offset,
                                                                              list(b.shape))
            assert b.data.dtype == a.data.dtype and np.array_equal(b.data, a.data), a.name
            assert not b.data.flags.owndata  # a view of the map


def test_a_corrupt_string_length_in_a_metadata_array_names_the_key(tmp_path):
    """The metadata walk skips vocabulary strings by their lengths alone: a length past the end of
    the file is a GGUFError naming the key and the offset, and a sound file walks to its end."""
    from circuit_finder.gguf import GGUFError, check_metadata_sizes, metadata_keys

    path = tmp_path / "words.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("test.words", ["a", "bbbbbbbbbbbb", "ccc"])
    w.add_uint32("test.after", 7)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    end, keys = metadata_keys(str(path))
    assert keys[-2:] == ["test.words", "test.after"] and end == path.stat().st_size
    raw = bytearray(path.read_bytes())
    at = raw.index(b"bbbbbbbbbbbb") - 8
    assert struct.unpack_from("<Q", raw, at)[0] == 12
    struct.pack_into("<Q", raw, at, 1 << 40)
    path.write_bytes(bytes(raw))
    with pytest.raises(GGUFError, match=rf"metadata 'test.words' needs {1 << 40} bytes at offset {at + 8}"):
        check_metadata_sizes(str(path))
