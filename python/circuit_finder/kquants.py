"""K-quant quantizers: float matrices packed as ggml's Q4_K and Q6_K blocks (the pair a Q4_K_M
file mixes), for ``cf.load(folder, quantize="q4_k")``; the `gguf` package decodes K-quants but has
no quantizer for them.

The block layouts are ggml's (ggml-common.h), 256 values a super-block:
- Q4_K (144 bytes): d, dmin (f16); 12 bytes holding eight 6-bit sub-block scales and eight 6-bit
  mins; 128 bytes of nibbles. Value = d * scale * q - dmin * min, q in 0..15, sub-blocks of 32.
- Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of high bit pairs, sixteen int8 sub-block
  scales, d (f16). Value = d * scale * (q - 32), q in 0..63, sub-blocks of 16.

How the scales are chosen is ours: per sub-block, the range's scale and offset (offset >= 0 for
Q4_K, as the format needs), refined by a few rounds of least squares on the rounded codes; then
the sub-block scales are themselves quantized against the super-block's largest and the codes
rounded once more with the scales as stored. Vectorised numpy, one matrix at a time.

Limits: rows must be whole super-blocks (columns a multiple of 256); non-finite values are refused;
a super-block whose values are all below ~1e-4 loses resolution, as the f16 super-scales underflow
(the format's limit, in ggml's own files too).
"""

from __future__ import annotations

import numpy as np

__all__ = ["K_TYPES", "quantize_q4_k", "quantize_q6_k"]

QK = 256
K_TYPES = {"Q4_K": 144, "Q6_K": 210}  # bytes per 256-value block


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _affine_fit(x: np.ndarray, levels: int, rounds: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x [n, g]: (scale, offset >= 0) with x ~ scale * q - offset, q in 0..levels-1:
    the range to start, then least squares on the rounded codes (offset clamped at 0)."""
    lo = np.minimum(x.min(1), 0.0)
    scale = (x.max(1) - lo) / (levels - 1)
    offset = -lo
    for _ in range(rounds):
        q = _codes(x, scale, offset, levels)
        n = x.shape[1]
        sq, sqq, sx, sqx = q.sum(1), (q * q).sum(1), x.sum(1), (q * x).sum(1)
        det = n * sqq - sq * sq
        ok = det > 0
        new_scale = np.where(ok, (n * sqx - sq * sx) / np.where(ok, det, 1), scale)
        new_offset = np.where(ok, (sq * sqx - sqq * sx) / np.where(ok, det, 1), offset)
        alone = new_offset < 0  # the format's offset only subtracts: fit the scale alone
        new_scale = np.where(alone, sqx / np.maximum(sqq, 1e-30), new_scale)
        scale, offset = np.maximum(new_scale, 0.0), np.maximum(new_offset, 0.0)
    return scale, offset


def _codes(x: np.ndarray, scale: np.ndarray, offset: np.ndarray, levels: int) -> np.ndarray:
    inv = np.where(scale > 0, 1.0 / np.where(scale > 0, scale, 1.0), 0.0)
    return np.clip(np.rint((x + offset[:, None]) * inv[:, None]), 0, levels - 1)


def _six_bit(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """values [n, 8] >= 0 -> (f16 super scale [n], 6-bit codes [n, 8]) with values ~ super * code."""
    top = _f16(values.max(1) / 63).astype(np.float32)
    inv = np.where(top > 0, 1.0 / np.where(top > 0, top, 1.0), 0.0)
    return top, np.clip(np.rint(values * inv[:, None]), 0, 63)


def _rows(w: np.ndarray, name: str) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % QK:
        raise ValueError(f"{name}: K-quants need rows of whole {QK}-value blocks, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError(f"{name}: holds non-finite values; they cannot be quantized")
    return w.reshape(-1, QK)


def quantize_q4_k(w: np.ndarray, name: str = "tensor") -> np.ndarray:
    """w [rows, cols] float -> Q4_K blocks uint8 [rows, cols / 256 * 144]."""
    rows = w.shape[0]
    x = _rows(w, name)
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    scale, offset = _affine_fit(sub, 16)
    d, sc = _six_bit(scale.reshape(n, 8))
    dmin, mn = _six_bit(offset.reshape(n, 8))
    q = _codes(sub, (d[:, None] * sc).reshape(-1), (dmin[:, None] * mn).reshape(-1), 16).astype(np.uint8)
    q = q.reshape(n, 4, 2, 32)  # 64-value chunks: the first 32 in low nibbles, the next 32 in high
    out = np.empty((n, 144), dtype=np.uint8)
    out[:, 0:2] = _f16(d).view(np.uint8).reshape(n, 2)
    out[:, 2:4] = _f16(dmin).view(np.uint8).reshape(n, 2)
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out[:, 4:8] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    out[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return out.reshape(rows, -1)


def quantize_q6_k(w: np.ndarray, name: str = "tensor") -> np.ndarray:
    """w [rows, cols] float -> Q6_K blocks uint8 [rows, cols / 256 * 210]."""
    rows = w.shape[0]
    x = _rows(w, name)
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    scale = _symmetric_fit(sub)
    top = np.abs(scale).reshape(n, 16).max(1)
    d = _f16(top / 127).astype(np.float32)
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)
    sc = np.clip(np.rint(scale.reshape(n, 16) * inv[:, None]), -128, 127)
    step = (d[:, None] * sc).reshape(-1)
    safe = np.where(step != 0, step, 1.0)
    u = (np.where(step[:, None] != 0, np.clip(np.rint(sub / safe[:, None]), -32, 31), 0) + 32).astype(np.uint8)
    u = u.reshape(n, 2, 4, 32)  # halves of 128: four 32-value rows sharing low-nibble and high-bit bytes
    out = np.empty((n, 210), dtype=np.uint8)
    out[:, :128] = np.concatenate([(u[:, :, 0] & 15) | ((u[:, :, 2] & 15) << 4),
                                   (u[:, :, 1] & 15) | ((u[:, :, 3] & 15) << 4)], axis=2).reshape(n, 128)
    out[:, 128:192] = ((u[:, :, 0] >> 4) | ((u[:, :, 1] >> 4) << 2) | ((u[:, :, 2] >> 4) << 4)
                       | ((u[:, :, 3] >> 4) << 6)).reshape(n, 64)
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    out[:, 208:210] = _f16(d).view(np.uint8).reshape(n, 2)
    return out.reshape(rows, -1)


def _symmetric_fit(x: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Per row of x [n, 16]: scale s with x ~ s * q, q in -32..31: the largest magnitude maps to
    -32 (the wider side), then least squares on the rounded codes."""
    at = np.abs(x).argmax(1)
    peak = x[np.arange(len(x)), at]
    scale = -peak / 32
    for _ in range(rounds):
        safe = np.where(scale != 0, scale, 1.0)
        q = np.where(scale[:, None] != 0, np.clip(np.rint(x / safe[:, None]), -32, 31), 0)
        qq = (q * q).sum(1)
        scale = np.where(qq > 0, (q * x).sum(1) / np.maximum(qq, 1e-30), scale)
    return scale
