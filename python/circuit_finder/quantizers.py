"""Float matrices packed as ggml blocks, in torch, on the matrix's own device: ``quantize_rows``
makes every type of ``cf.load(folder, quantize=...)`` (QUANTIZE_TYPES), so a checkpoint loading onto
a GPU is quantized there, and on the CPU with torch's threads.

The 32-value types round as the `gguf` package's quantizers (ggml's reference rounding) do, byte for
byte on any device (tests/test_quant.py compares them; every division is a correctly rounded one):
- Q8_0: d = max |x| / 127, q = x / d rounded half away from zero.
- Q4_0 / Q5_0: d = (the value of largest magnitude, signed) / -8 or -16, q = trunc(x / d + 8.5 or
  16.5) clipped to 0..15 / 0..31; Q5's fifth bits go to a 32-bit word.
- Q4_1 / Q5_1: d = (max - min) / 15 or 31, m = min, q = trunc((x - m) / d + 0.5) clipped.
- BF16 / F16: round to nearest even (the same bytes for finite values; a NaN stays a NaN, torch's
  canonical one).
The K-quants (the `gguf` package has no quantizer for them), 256 values a super-block:
- Q4_K (144 bytes): d, dmin (f16); eight 6-bit sub-block scales and mins in 12 bytes; 128 bytes of
  nibbles. Value = d * scale * q - dmin * min, q in 0..15, sub-blocks of 32.
- Q5_K (176 bytes): Q4_K's head, then 32 bytes of fifth bits (bit s of byte l: sub-block s's value
  l), then Q4_K's 128 bytes of low nibbles. Value = d * scale * q - dmin * min, q in 0..31.
- Q6_K (210 bytes): 128 bytes of low nibbles, 64 of high bit pairs, sixteen int8 sub-block scales,
  d (f16). Value = d * scale * (q - 32), q in 0..63, sub-blocks of 16.
  How their scales are chosen is ours. Q4_K / Q5_K: per sub-block, seven candidate scales around the
  range's (its levels - 2 to levels steps over the range), each fitted by least squares (scale and
  offset >= 0, as the format needs; from sums of values centred on the block's mean, which keep
  float32's accuracy where the offset dwarfs the spread) to its codes, the best kept and refitted
  once. Q6_K: five candidate scales mapping the largest magnitude to -31..-33, fitted and chosen
  alike. Then the sub-block scales are quantized against the super-block's largest and the codes
  rounded once more with the scales as stored. Their error is about llama.cpp's own quantizer's
  (benchmarks/bench_quantize.py: relative RMS 0.997x for Q4_K, 0.993x for Q5_K, 0.977x for Q6_K, on
  the same random Gaussian weights; a review measured 0.96-1.02x over other distributions, bimodal
  +-1 the worst).

Rows go through in chunks of 512K values on the CPU (the scratch stays in cache: 2-4x faster than
4M-value chunks) and 4M on a GPU (~100 MB of scratch at most), each chunk moved to the device alone.
Limits: the block types refuse non-finite values, and they and F16 refuse values beyond f16's
+-65504 (the scales are f16; ggml's own quantizer would write inf / NaN blocks), as they refuse rows
that are not whole blocks (ValueError naming the tensor); a block whose values are all below ~1e-4
loses resolution as its f16 scales underflow (the format's limit, in ggml's own files too); where a
K-quant's sub-block scale is stored as 0 (its super-scale rounded to 0, or an outlier elsewhere in
the super-block), that sub-block is written as its mean where that is <= 0, else as zeros: never
worse than zeros (llama.cpp's offsets are then off by the spread: errors over twice the values).
"""

from __future__ import annotations

import math

import torch

__all__ = ["BLOCK", "K_TYPES", "QUANTIZE_TYPES", "affine_fit", "quantize_rows"]

# values per block of each type quantize_rows makes, in the order error messages list them
BLOCK = {"Q8_0": 32, "Q6_K": 256, "Q5_K": 256, "Q5_1": 32, "Q5_0": 32, "Q4_K": 256, "Q4_1": 32, "Q4_0": 32, "BF16": 1, "F16": 1}
QUANTIZE_TYPES = tuple(BLOCK)
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")  # 256-value blocks
F16_MAX = 65504.0  # the blocks' scales, offsets and minima are f16: larger values would decode to inf / NaN


def quantize_rows(w: torch.Tensor, kind: str, name: str = "tensor", device=None) -> torch.Tensor:
    """w [rows, cols] float (any dtype, any device) -> uint8 [rows, row bytes] of `kind`'s blocks on
    `device` (default: w's), where each chunk of rows is moved and quantized: the float matrix is
    never copied there whole."""
    if kind not in BLOCK:
        raise ValueError(f"{name}: cannot quantize to {kind} (types: {', '.join(QUANTIZE_TYPES)})")
    if w.dim() != 2 or w.shape[1] % BLOCK[kind] or not w.shape[0] or not w.shape[1]:
        raise ValueError(f"{name}: {kind} needs rows of whole {BLOCK[kind]}-value blocks, got shape {list(w.shape)}")
    device = torch.device(device) if device is not None else w.device
    rows, cols = w.shape
    step = max(1, (1 << (22 if device.type == "cuda" else 19)) // cols)
    out = None
    for start in range(0, rows, step):
        blocks = _quantize_chunk(w[start:start + step].to(device), kind, name, start)
        if out is None:  # the row width the type's blocks take
            out = torch.empty(rows, blocks.shape[1], dtype=torch.uint8, device=device)
        out[start:start + step] = blocks
    return out


def _quantize_chunk(x: torch.Tensor, kind: str, name: str, start: int) -> torch.Tensor:
    if kind == "BF16":  # float32's range: non-finite values stay what they are
        return x.to(torch.bfloat16).contiguous().view(torch.uint8)
    x = x.to(torch.float32)
    peak = float(x.abs().amax())  # NaN or inf where any value is
    where = f"(in rows {start}..{start + len(x) - 1}); they cannot be quantized to {kind}"
    if kind == "F16":  # non-finite values stay what they are; finite ones must fit beside them too
        finite = peak if math.isfinite(peak) else float(torch.where(x.isfinite(), x.abs(), 0.0).amax())
        if finite > F16_MAX:
            raise ValueError(f"{name}: holds values up to {finite:.4g}, beyond f16's {F16_MAX:g} {where}")
        return x.to(torch.float16).contiguous().view(torch.uint8)
    if not math.isfinite(peak):
        raise ValueError(f"{name}: holds non-finite values {where}")
    if peak > F16_MAX:
        raise ValueError(f"{name}: holds values up to {peak:.4g}, beyond f16's {F16_MAX:g} {where}, whose scales are f16")
    return _QUANTIZERS[kind](x.reshape(-1, BLOCK[kind])).reshape(len(x), -1)


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """[n] or [n, 1] float32 -> [n, 2] uint8: the values as f16, little-endian."""
    return v.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def _div(a: torch.Tensor, k: float) -> torch.Tensor:
    """a / k, correctly rounded on every device: CUDA's kernel for a tensor over a Python number
    multiplies by the number's reciprocal, a float32 step off at times (and the codes of values at
    half steps with it), so k goes as a tensor of a's device."""
    return a / torch.tensor(float(k), dtype=a.dtype, device=a.device)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [n, 32] codes -> [n, 16]: value j in the low nibble, value j + 16 in the high one."""
    return (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)


def _fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """q [n, 32] codes 0..31 -> [n, 4] bytes: bit j of the little-endian word is bit 4 of code j."""
    bits = ((q >> 4) & 1).to(torch.int32).reshape(-1, 4, 8)
    return (bits << torch.arange(8, device=q.device, dtype=torch.int32)).sum(-1).to(torch.uint8)


def _signed_peak(x: torch.Tensor) -> torch.Tensor:
    """[n, 1]: each row's value of largest magnitude, with its sign (the first such, on ties)."""
    return x.gather(1, x.abs().argmax(1, keepdim=True))


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    d = _div(x.abs().amax(1, keepdim=True), 127)
    v = x * _inverse(d)
    a = v.abs()
    whole = a.floor()
    q = torch.copysign(whole + (a - whole >= 0.5), v)  # half away from zero, as ggml's roundf
    return torch.cat((_f16_bytes(d), q.to(torch.int8).view(torch.uint8)), 1)


def _symmetric(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q5_0: (d [n, 1], codes uint8 [n, 32])."""
    d = _div(_signed_peak(x), -(levels // 2))
    q = torch.trunc(x * _inverse(d) + (levels // 2 + 0.5)).clamp(0, levels - 1)
    return d, q.to(torch.uint8)


def _affine(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 / Q5_1: (d [n, 1], m [n, 1], codes uint8 [n, 32])."""
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    d = _div(hi - lo, levels - 1)
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, levels - 1)
    return d, lo, q.to(torch.uint8)


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(x, 16)
    return torch.cat((_f16_bytes(d), _nibbles(q)), 1)


def _q5_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(x, 32)
    return torch.cat((_f16_bytes(d), _fifth_bits(q), _nibbles(q)), 1)


def _q4_1(x: torch.Tensor) -> torch.Tensor:
    d, m, q = _affine(x, 16)
    return torch.cat((_f16_bytes(d), _f16_bytes(m), _nibbles(q)), 1)


def _q5_1(x: torch.Tensor) -> torch.Tensor:
    d, m, q = _affine(x, 32)
    return torch.cat((_f16_bytes(d), _f16_bytes(m), _fifth_bits(q), _nibbles(q)), 1)


# ----------------------------------------------------------------------------- K-quants

def _codes(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.round((x + offset[:, None]) * _inverse(scale)[:, None]).clamp(0, levels - 1)


def _spread(i: int, candidates: int) -> float:
    """Candidate i's offset in 0..2 (1, the middle, alone)."""
    return 2 * i / (candidates - 1) if candidates > 1 else 1.0


def _better(best: tuple | None, fit: tuple) -> tuple:
    """Per row, whichever of two fits (tensors ending with the squared error) has the smaller error."""
    if best is None:
        return fit
    return tuple(torch.where(fit[-1] < best[-1], a, b) for a, b in zip(fit, best))


def _least_squares(xc: torch.Tensor, q: torch.Tensor, mean: torch.Tensor, cxx: torch.Tensor):
    """(scale, offset >= 0, squared error) of x ~ scale * q - offset fitted to codes q [n, g] by least
    squares (the scale alone where the offset would be negative: the format's offset only subtracts),
    from x's centred values xc = x - mean and cxx = sum(xc^2): sums of centred values keep float32's
    accuracy where a block's offset dwarfs its spread (raw sums of x and x^2 lose it, and with it the
    choice of candidate). Codes all alike (a constant block) fit the mean: by the scale where it is
    positive and a code is not 0, else by the offset."""
    n = q.shape[1]
    sq, sqq, cqx = q.sum(1), (q * q).sum(1), (q * xc).sum(1)
    det = n * sqq - sq * sq  # whole numbers below 2^24: exact
    ok = det > 0
    qbar, cqq = _div(sq, n), _div(det, n)
    zero = torch.zeros_like(det)
    by_scale = (sq > 0) & (mean > 0)
    scale = torch.where(ok, cqx / torch.where(ok, cqq, 1.0), torch.where(by_scale, mean / torch.where(by_scale, qbar, 1.0), zero))
    offset = torch.where(ok, scale * qbar - mean, torch.where(by_scale, zero, -mean))
    alone = ok & (offset < 0)
    scale = torch.where(alone, (cqx + mean * sq) / sqq.clamp(min=1e-30), scale).clamp(min=0.0)
    offset = offset.clamp(min=0.0)
    err = n * (mean - scale * qbar + offset) ** 2 + cxx - 2 * scale * cqx + scale * scale * cqq
    return scale, offset, err


def affine_fit(x: torch.Tensor, levels: int, candidates: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's and Q5_K's sub-block fit (levels 16 / 32), in x's float dtype. Per row of x [n, g]:
    (scale, offset >= 0) with x ~ scale * q - offset, q in 0..levels-1: the codes of `candidates`
    scales from (levels - 2) to levels steps over the range each fitted by least squares, the fit of
    least squared error kept, then refitted once to its own codes."""
    lo = x.amin(1).clamp(max=0.0)
    per_range = _inverse(x.amax(1) - lo)
    mean = _div(x.sum(1), x.shape[1])
    mean = mean + _div((x - mean[:, None]).sum(1), x.shape[1])  # a second pass: centred values that sum to ~0
    xc = x - mean[:, None]
    cxx = (xc * xc).sum(1)
    best = None
    for i in range(candidates + 1):
        if i < candidates:  # steps (levels - 2) .. levels over the range: the range's own scale in the middle
            q = torch.round((x - lo[:, None]) * ((levels - 2 + _spread(i, candidates)) * per_range)[:, None])
            q = q.clamp(0, levels - 1)
        else:
            q = _codes(x, best[0], best[1], levels)
        best = _better(best, _least_squares(xc, q, mean, cxx))
    return best[0], best[1]


def _six_bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [n, 8] >= 0 -> (f16-rounded super scale [n], 6-bit codes [n, 8]) with values ~ super * code."""
    top = _div(values.amax(1), 63).to(torch.float16).to(torch.float32)
    return top, torch.round(values * _inverse(top)[:, None]).clamp(0, 63)


def _affine_k(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: (the super-block's head [n, 16]: d, dmin and the twelve bytes of 6-bit sub-block
    scales and mins; codes uint8 [n, 8, 32] in 0..levels-1, rounded with the scales as stored)."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    scale, offset = affine_fit(sub, levels)
    d, sc = _six_bit(scale.reshape(n, 8))
    # a sub-block whose stored scale is 0 (the super-scale underflowed f16, or another sub-block is
    # 126x wider) reads no codes: it is its offset alone, best its own mean where that is <= 0, else
    # 0 (else -offset, fitted with the codes, is off by the spread)
    flat = (sc == 0).reshape(-1)
    offset = torch.where(flat, (-sub.mean(1)).clamp(min=0.0), offset)
    dmin, mn = _six_bit(offset.reshape(n, 8))
    q = _codes(sub, (d[:, None] * sc).reshape(-1), (dmin[:, None] * mn).reshape(-1), levels).to(torch.uint8)
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    head = torch.cat((_f16_bytes(d), _f16_bytes(dmin), sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
                      mn[:, :4] | ((mn[:, 4:] >> 4) << 6), (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)), 1)
    return head, q.reshape(n, 8, 32)


def _k_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [n, 8, 32] -> [n, 128]: each 64-value chunk's first 32 codes in low nibbles, the next 32 in high."""
    q = q.reshape(len(q), 4, 2, 32)
    return ((q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)).reshape(len(q), 128)


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    head, q = _affine_k(x, 16)
    return torch.cat((head, _k_nibbles(q)), 1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    head, q = _affine_k(x, 32)
    high = ((q >> 4) & 1).to(torch.int32) << torch.arange(8, device=q.device, dtype=torch.int32)[:, None]
    return torch.cat((head, high.sum(1).to(torch.uint8), _k_nibbles(q)), 1)  # bit s of byte l: sub-block s's code l


def _signed_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [n, 16] / scale [n] rounded to -32..31 (0 where the scale is 0)."""
    zero = (scale == 0)[:, None]
    q = torch.round(x / torch.where(zero, torch.ones_like(scale[:, None]), scale[:, None])).clamp(-32, 31)
    return q.masked_fill(zero, 0.0)


def _symmetric_fit(x: torch.Tensor, candidates: int = 5) -> torch.Tensor:
    """Per row of x [n, 16]: scale s with x ~ s * q, q in -32..31: the codes of `candidates` scales
    that map the largest magnitude to -31..-33 (the wider side), each fitted by least squares, the
    fit of least squared error kept, then refitted once to its own codes."""
    peak = _signed_peak(x)[:, 0]
    sxx = (x * x).sum(1)
    best = None
    for i in range(candidates + 1):
        if i < candidates:
            step = _div(peak, -(31 + _spread(i, candidates)))
        else:
            step = best[0]
        q = _signed_codes(x, step)
        qq, qx = (q * q).sum(1), (q * x).sum(1)
        scale = torch.where(qq > 0, qx / qq.clamp(min=1e-30), step)
        best = _better(best, (scale, sxx - 2 * scale * qx + scale * scale * qq))
    return best[0]


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    scale = _symmetric_fit(sub)
    d = _div(scale.abs().reshape(n, 16).amax(1), 127).to(torch.float16).to(torch.float32)
    sc = torch.round(scale.reshape(n, 16) * _inverse(d)[:, None]).clamp(-128, 127)
    step = (d[:, None] * sc).reshape(-1)
    u = (_signed_codes(sub, step) + 32).to(torch.uint8)
    u = u.reshape(n, 2, 4, 32)  # halves of 128: four 32-value rows sharing low-nibble and high-bit bytes
    low = torch.cat(((u[:, :, 0] & 15) | ((u[:, :, 2] & 15) << 4), (u[:, :, 1] & 15) | ((u[:, :, 3] & 15) << 4)), 2)
    high = (u[:, :, 0] >> 4) | ((u[:, :, 1] >> 4) << 2) | ((u[:, :, 2] >> 4) << 4) | ((u[:, :, 3] >> 4) << 6)
    return torch.cat((low.reshape(n, 128), high.reshape(n, 64), sc.to(torch.int8).view(torch.uint8),
                      _f16_bytes(d)), 1)


_QUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k,
               "Q5_K": _q5_k, "Q6_K": _q6_k}
