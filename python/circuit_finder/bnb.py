"""bitsandbytes checkpoints (``quantization_config.quant_method`` "bitsandbytes": transformers models
loaded with ``load_in_4bit`` / ``load_in_8bit`` and saved, e.g. unsloth's *-bnb-4bit repos),
dequantized on load: each quantized linear layer's weight becomes the floats bitsandbytes multiplies
by, in the compute dtype, one matrix at a time on the device it goes to.

4-bit (NF4 or FP4): ``weight`` holds the matrix's elements in row-major order, two 4-bit codes per
byte (the first in the high nibble), as uint8 [elements / 2, 1] or the same bytes in the
``bnb_4bit_quant_storage`` dtype. Element i is ``weight.quant_map``[code] (the 16 NF4 / FP4 values)
x ``weight.absmax``[i // blocksize]. With double quantization the absmax are uint8 codes: absmax =
``weight.nested_quant_map``[code] x ``weight.nested_absmax``[block // nested_blocksize] +
nested_offset. ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``) is the JSON of the shape,
dtype, blocksize and the nested ones, as uint8 bytes.
8-bit (LLM.int8): ``weight`` int8 [out, in] and ``SCB`` [out]: weight x SCB / 127 (computed as
bitsandbytes does, times 1/127 in fp32). Its outlier threshold only changes how bitsandbytes
multiplies (in int8, outliers in fp16), not the weights: products here stay in the compute dtype.

Limits: ``weight_format`` other than row-major (bitsandbytes' old col32 / turing layouts) and parts
missing or misshapen are refused with a ValueError naming the tensor.
"""

from __future__ import annotations

import json
import math
from functools import partial

import torch

__all__ = ["PARTS", "bnb_matrices", "dequantize_4bit", "dequantize_int8", "holds_codes", "is_bnb"]

_STATE = ".quant_state.bitsandbytes__"
_FOUR_BIT = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")  # beside a 4-bit weight's codes
PARTS = (*_FOUR_BIT, f"{_STATE}nf4", f"{_STATE}fp4", ".SCB", ".weight_format")  # a layer's parts besides its weight
_INV_127 = 7.874015718698502e-3  # 1 / 127 as bitsandbytes multiplies by it


def is_bnb(config: dict) -> bool:
    """Whether the config (or its text_config) says bitsandbytes (transformers before 4.32 wrote only
    load_in_4bit / load_in_8bit)."""
    qcs = [c.get("quantization_config") or {} for c in (config, config.get("text_config") or {})]
    return any(qc.get("quant_method") == "bitsandbytes" or (qc.get("quant_method") is None and (
        qc.get("load_in_4bit") or qc.get("load_in_8bit"))) for qc in qcs)


def holds_codes(name: str, tensors) -> bool:
    """Whether tensors[name] is a 4-bit layer's packed codes (a quant state beside it): bytes, even
    when stored in a float dtype."""
    return any(f"{name}{_STATE}{kind}" in tensors for kind in ("nf4", "fp4"))


def bnb_matrices(tensors: dict) -> tuple[dict, set[str]]:
    """({'<module>.weight': (its float shape, a function (dtype, device) -> the dequantized matrix)},
    the names of the stored parts those replace). ValueError naming the tensor for a part missing,
    of the wrong kind or shape."""
    stored, parts = {}, set()
    for name in tensors:
        if _STATE in name:
            weight = name.split(_STATE)[0]
            mine = {p: tensors[weight + p] for p in _FOUR_BIT if weight + p in tensors}
            shape, make = _four_bit(weight, tensors, name, mine)
            parts.update({weight, name, *(weight + p for p in mine)})
        elif name.endswith(".SCB"):
            weight = name.removesuffix(".SCB") + ".weight"
            shape, make = _eight_bit(weight, tensors, name)
            parts.update({weight, name, weight + "_format"})
        else:
            continue
        stored[weight] = (shape, make)
    return stored, parts


def _four_bit(weight: str, tensors: dict, state_name: str, mine: dict):
    try:
        state = json.loads(bytes(tensors[state_name].reshape(-1).to(torch.uint8).tolist()).decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"'{state_name}' is not a bitsandbytes quant state (JSON bytes): {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"'{state_name}' is JSON but not an object: not a bitsandbytes quant state")
    if not isinstance(state.get("shape"), list) or not isinstance(state.get("blocksize"), int) or state["blocksize"] < 1:
        raise ValueError(f"'{state_name}' gives shape {state.get('shape')!r} and blocksize {state.get('blocksize')!r}: "
                         "expected a list of sizes and a positive block size")
    for p in (".absmax", ".quant_map"):
        if p not in mine:
            raise ValueError(f"'{weight}' (bitsandbytes {state.get('quant_type')}) has no '{weight}{p}'")
    if weight not in tensors:
        raise ValueError(f"'{state_name}' has no '{weight}' (its packed codes)")
    shape, block = tuple(int(d) for d in state["shape"]), int(state["blocksize"])
    n = math.prod(shape)
    codes, absmax, quant_map = tensors[weight], mine[".absmax"], mine[".quant_map"]
    if codes.numel() * codes.element_size() != -(-n // 2):
        raise ValueError(f"'{weight}' is {codes.dtype} {list(codes.shape)}: expected {-(-n // 2)} bytes of 4-bit codes "
                         f"for shape {list(shape)}")
    if list(quant_map.shape) != [16]:
        raise ValueError(f"'{weight}.quant_map' is {list(quant_map.shape)}: expected the 16 values of the 4-bit codes")
    if absmax.numel() != -(-n // block):
        raise ValueError(f"'{weight}.absmax' has {absmax.numel()} values: expected one per {block} elements "
                         f"({-(-n // block)})")
    nested = None
    if absmax.dtype == torch.uint8:
        if ".nested_absmax" not in mine or ".nested_quant_map" not in mine or \
                not {"nested_blocksize", "nested_offset"} <= set(state):
            raise ValueError(f"'{weight}.absmax' is uint8 (double quantization) but '{weight}.nested_absmax', "
                             f"'{weight}.nested_quant_map' or the quant state's nested_blocksize / nested_offset "
                             "is missing")
        nested_block = int(state["nested_blocksize"])
        if mine[".nested_absmax"].numel() != -(-absmax.numel() // nested_block) or mine[".nested_quant_map"].numel() != 256:
            raise ValueError(f"'{weight}.nested_absmax' / '.nested_quant_map' have {mine['.nested_absmax'].numel()} / "
                             f"{mine['.nested_quant_map'].numel()} values: expected one per {nested_block} absmax / 256")
        nested = (mine[".nested_absmax"], mine[".nested_quant_map"], nested_block, float(state["nested_offset"]))
    return shape, partial(dequantize_4bit, codes, absmax, quant_map, nested, shape, block)


def _eight_bit(weight: str, tensors: dict, scb_name: str):
    codes, scb = tensors.get(weight), tensors[scb_name]
    fmt = tensors.get(weight + "_format")
    if fmt is not None and int(fmt.reshape(-1)[0]) != 0:
        raise ValueError(f"'{weight}_format' is {int(fmt.reshape(-1)[0])}: only bitsandbytes' row-major int8 "
                         f"layout (0) is supported")
    if codes is None or codes.dtype != torch.int8 or codes.dim() != 2 or list(scb.shape) != [codes.shape[0]]:
        got = "missing" if codes is None else f"{codes.dtype} {list(codes.shape)}"
        raise ValueError(f"'{weight}' is {got} with '{scb_name}' {list(scb.shape)}: expected an int8 matrix and one "
                         f"scale per row")
    return tuple(codes.shape), partial(dequantize_int8, codes, scb)


def dequantize_4bit(codes: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, nested, shape: tuple,
                    block: int, dtype: torch.dtype, device: str | torch.device = "cpu",
                    chunk: int = 1 << 24) -> torch.Tensor:
    """The 4-bit matrix of `shape` in `dtype` on `device` (products in fp32, rounded once), about
    `chunk` elements (whole blocks) at a time."""
    n = math.prod(shape)
    scales = absmax.to(device)
    if nested is not None:  # double quantization: the absmax are 8-bit codes, blockwise themselves
        outer, table, nested_block, offset = nested
        scales = table.to(device).float()[scales.long()] * outer.to(device).float().repeat_interleave(nested_block)[
            :scales.numel()] + offset
    scales, table = scales.float().reshape(-1), quant_map.to(device).float()
    data = codes.reshape(-1).view(torch.uint8)  # the codes' bytes, whatever dtype stores them
    out = torch.empty(n, dtype=dtype, device=device)
    step = max(2 * block, chunk // (2 * block) * (2 * block))
    for e0 in range(0, n, step):
        e1 = min(n, e0 + step)
        byte = data[e0 // 2:-(-e1 // 2)].to(device)
        nibbles = torch.stack([byte >> 4, byte & 15], dim=-1).reshape(-1)[:e1 - e0]
        per_block = scales[e0 // block:-(-e1 // block)].repeat_interleave(block)[:e1 - e0]
        out[e0:e1] = table[nibbles.long()] * per_block
    return out.reshape(shape)


def dequantize_int8(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype,
                    device: str | torch.device = "cpu", chunk: int = 1 << 24) -> torch.Tensor:
    """The LLM.int8 matrix in `dtype` on `device`: codes x SCB x (1 / 127) per row, in fp32, rows of
    about `chunk` elements at a time."""
    per_row = scb.to(device).float()[:, None]
    out = torch.empty(codes.shape, dtype=dtype, device=device)
    step = max(1, chunk // max(1, codes.shape[1]))
    for r0 in range(0, codes.shape[0], step):  # (codes x SCB) x 1/127, as bitsandbytes rounds it
        out[r0:r0 + step] = codes[r0:r0 + step].to(device).float() * per_row[r0:r0 + step] * _INV_127
    return out
