"""compressed-tensors checkpoints (``quantization_config.quant_method`` "compressed-tensors": what
llm-compressor writes and vLLM serves, e.g. RedHatAI's *-FP8-dynamic, *-quantized.w8a8 and
*-quantized.w4a16 repos), dequantized on load: each quantized matrix becomes (q - zero) x scale in the
compute dtype, one matrix at a time on the device it goes to, as transformers does with
``CompressedTensorsConfig(dequantize=True)``.

Formats (the config's ``format``, or each config group's for mixed-precision):
- float-quantized: a float8 ``weight`` and its ``weight_scale``;
- int-quantized / naive-quantized: an int8 ``weight``, ``weight_scale`` and, asymmetric, ``weight_zero_point``;
- pack-quantized: ``weight_packed`` (int32 words of 2-, 4- or 8-bit codes along each row, stored
  with an offset of 2^(bits-1)), ``weight_shape``, ``weight_scale`` and, asymmetric,
  ``weight_zero_point`` packed along the rows.
Scales per tensor, per row (channel), per ``group_size`` columns (or per column by ``weight_g_idx``,
GPTQ's activation order), or per ``block_structure`` block (the grid rounded up at the edges).

Limits: the FP4 / MX formats, sparsity (2:4) and transforms (SpinQuant / QuIP rotations) are refused
with a ValueError naming what; so are 3-, 5-, 6- and 7-bit packing (its layout changed between
compressed-tensors versions) and quantized tensors of more than two dimensions. Activation and
KV-cache quantization (``input_scale``, ``k_scale`` / ``v_scale``) are not applied: products and caches
stay in the compute dtype, as in transformers' dequantized model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import torch

from .quants import FP8_DTYPES, expand_blocks, unpack_words, warn_unapplied_scales

__all__ = ["FORMATS", "PARTS", "CompressedGroup", "compressed_groups", "compressed_matrices", "config_group_of", "dequantize_compressed",
           "unpack_int32"]

FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")
_PARTS = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "weight_packed", "input_scale",
          "output_scale", "weight_global_scale", "input_global_scale")
_CACHE_SCALES = (".k_scale", ".v_scale", ".q_scale")  # KV-cache quantization's: dropped, caches stay float
PARTS = (*(f".{p}" for p in _PARTS), *_CACHE_SCALES)  # name endings of the stored parts besides weights


@dataclass(frozen=True)
class CompressedGroup:
    """One config group: which modules (``targets``: ``re:`` patterns or class names), its format and
    its weights' quantization arguments (num_bits, type, symmetric, strategy, group_size, block_structure)."""

    targets: tuple[str, ...]
    format: str
    weights: dict


def compressed_groups(config: dict) -> list[CompressedGroup] | None:
    """The config groups of a compressed-tensors checkpoint's quantization_config (at the top or in
    text_config); None for any other config. ValueError naming what for what we cannot load."""
    for c in (config, config.get("text_config") or {}):
        qc = c.get("quantization_config") or {}
        if qc.get("quant_method") == "compressed-tensors":
            return _parse_groups(qc)
    return None


def _parse_groups(qc: dict) -> list[CompressedGroup]:
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(f"compressed-tensors checkpoint with quantization_status {status!r}: only compressed "
                         "checkpoints load (their weights stored quantized)")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and sparsity.get("format", "dense") != "dense":
        raise ValueError(f"compressed-tensors sparsity ({sparsity.get('format')}) is not supported")
    if qc.get("transform_config"):
        raise ValueError("compressed-tensors transforms (rotations such as SpinQuant / QuIP) are not supported: "
                         "the weights are rotated and need the transforms applied at run time")
    groups = []
    for name, g in (qc.get("config_groups") or {}).items():
        fmt = g.get("format") or qc.get("format")
        weights = g.get("weights")
        if weights is None:
            continue
        if fmt not in FORMATS:
            raise ValueError(f"compressed-tensors config group {name!r}: format {fmt!r} is not supported "
                             f"(supported: {', '.join(FORMATS)})")
        bits = int(weights.get("num_bits", 8))
        if fmt == "pack-quantized" and bits not in (2, 4, 8):
            raise ValueError(f"compressed-tensors config group {name!r}: {bits}-bit packing is not supported (2, 4 "
                             "and 8 bits are; other widths were packed differently by different versions)")
        if weights.get("strategy") not in (None, "tensor", "channel", "group", "block"):
            raise ValueError(f"compressed-tensors config group {name!r}: weight strategy "
                             f"{weights.get('strategy')!r} is not supported (tensor, channel, group, block)")
        strategy, block = _strategy(weights), weights.get("block_structure")
        if (strategy == "group" and not (weights.get("group_size") or 0) > 0) or \
                (strategy == "block" and not (isinstance(block, list) and len(block) == 2)):
            raise ValueError(f"compressed-tensors config group {name!r}: strategy {strategy} without a "
                             f"{'group_size' if strategy == 'group' else 'block_structure [rows, columns]'}")
        groups.append(CompressedGroup(tuple(g.get("targets") or ()), fmt, weights))
    return groups  # none: only activations or caches were quantized, the weights are plain floats


def config_group_of(names: tuple[str, ...], groups: list[CompressedGroup]) -> CompressedGroup:
    """The config group that quantized a module (`names`: what it may be called, as loaded first),
    by compressed-tensors' rule: each target belongs to the last group listing it; the targets are
    taken in the order (not "re:", then "re:"; each alphabetically) and the first that names the
    module (exactly, or as a "re:" pattern matching from its start) decides, else the first class
    target that fits it (``_class_fits``)."""
    module, owner = names[0], {}
    for g in groups:
        for t in g.targets:
            owner[t] = g
    ordered = sorted(owner, key=lambda t: ("re:" in t, t))
    by_name = [t for t in ordered
               if any(re.match(t[3:], n) is not None if t.startswith("re:") else t == n for n in names)]
    found = by_name or [t for t in ordered if _class_fits(t, module)]
    if found:
        return owner[found[0]]
    raise ValueError(f"'{module}' holds compressed-tensors weights but no config group targets it")


_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")


def _class_fits(target: str, module: str) -> bool:
    """Whether a class-name target ("Linear", "Embedding") fits a module whose class a checkpoint
    does not name: a linear class fits every quantized matrix but the embedding (the head is a
    Linear), "Embedding" the embedding; a target that is no such class name (a module name such as
    "lm_head", another class) fits none here."""
    if target.startswith("re:") or "." in target:
        return False
    embedding = module.rsplit(".", 1)[-1] in _EMBEDDINGS
    if target == "Linear" or (target[:1].isupper() and target.endswith("Linear")):
        return not embedding
    return target == "Embedding" and embedding


def compressed_matrices(tensors: dict, groups: list[CompressedGroup],
                        names=lambda module: (module,)) -> tuple[dict, set[str]]:
    """({'<module>.weight': (its float shape, a function (dtype, device) -> the dequantized matrix)},
    the names of the stored parts those replace, and of the scales nothing reads). ValueError naming
    the tensor for a part missing, of the wrong kind or shape. names(module): the names the config's
    targets may know it by."""
    stored, parts = {}, set()
    unapplied = [name for name in tensors if name.endswith((*_CACHE_SCALES, ".input_scale", ".output_scale"))]
    warn_unapplied_scales("compressed-tensors", unapplied, stacklevel=6)
    parts.update(unapplied)
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.dtype in FP8_DTYPES \
                and f"{name}_scale" not in tensors:
            raise ValueError(f"float8 tensor '{name}' has no '{name}_scale'")
        if not name.endswith(".weight_scale"):
            continue
        module = name.removesuffix(".weight_scale")
        group = config_group_of(names(module), groups)
        mine = {p: tensors[f"{module}.{p}"] for p in ("weight", *_PARTS) if f"{module}.{p}" in tensors}
        shape, make = _matrix(module, mine, group)
        stored[f"{module}.weight"] = (shape, make)
        parts.update(f"{module}.{p}" for p in mine)
    return stored, parts


def _matrix(module: str, t: dict, group: CompressedGroup):
    bits = int(group.weights.get("num_bits", 8))
    if group.format == "pack-quantized":
        for p in ("weight_packed", "weight_shape"):
            if p not in t:
                raise ValueError(f"'{module}' ({group.format}) has no '{module}.{p}'")
        shape = tuple(int(v) for v in t["weight_shape"].tolist())
        codes = t["weight_packed"]
        want = [shape[0], -(-shape[-1] * bits // 32)] if len(shape) == 2 else None
        if codes.dtype != torch.int32 or list(codes.shape) != want:
            raise ValueError(f"'{module}.weight_packed' is {codes.dtype} {list(codes.shape)}: expected int32 {want} "
                             f"for weight_shape {list(shape)} at {bits} bits")
    else:
        codes = t.get("weight")
        if codes is None:
            raise ValueError(f"'{module}' ({group.format}) has no '{module}.weight'")
        shape = tuple(codes.shape)
        floats = group.weights.get("type") == "float"  # FP8 weights alone are written as naive-quantized
        kinds = FP8_DTYPES if floats else (torch.int8,)
        if codes.dtype not in kinds or codes.dim() != 2:
            raise ValueError(f"'{module}.weight' is {codes.dtype} {list(codes.shape)}: a {group.format} weight is a "
                             f"matrix of {' or '.join(map(str, kinds))}")
    scale, zero = _scale_grid(module, t, shape, group, bits)
    return shape, partial(dequantize_compressed, codes, scale, zero, t.get("weight_g_idx"), shape,
                          bits if group.format == "pack-quantized" else None, group.weights)


def _strategy(weights: dict) -> str:
    """The weights' strategy; unset: by group_size, as compressed-tensors reads it (-1: per row)."""
    size = weights.get("group_size")
    return weights.get("strategy") or ("tensor" if not size else "channel" if size < 0 else "group")


def _grid(rows: int, cols: int, weights: dict) -> list[int]:
    """The scale grid's shape over a [rows, cols] weight (per tensor: [1])."""
    strategy = _strategy(weights)
    if strategy == "channel":
        return [rows, 1]
    if strategy == "group":
        return [rows, -(-cols // int(weights["group_size"]))]
    if strategy == "block":
        b0, b1 = (int(b) for b in weights["block_structure"])
        return [-(-rows // b0), -(-cols // b1)]
    return [1]


def _scale_grid(module: str, t: dict, shape: tuple, group: CompressedGroup, bits: int):
    """The weight_scale and the zero point (unpacked; None when symmetric), checked against `shape`."""
    scale, zero = t["weight_scale"], t.get("weight_zero_point")
    rows, cols = shape
    grid = _grid(rows, cols, group.weights)
    if list(scale.shape) != grid and not (grid == [1] and scale.numel() == 1):
        raise ValueError(f"'{module}.weight_scale' is {list(scale.shape)}: expected {grid} for the {list(shape)} "
                         f"weight ({_strategy(group.weights)} strategy)")
    zero = _zero_point(module, zero, scale, rows, group, bits)
    g_idx = t.get("weight_g_idx")
    if g_idx is not None and list(g_idx.shape) != [cols]:
        raise ValueError(f"'{module}.weight_g_idx' is {list(g_idx.shape)}: one group index per column ({cols})")
    if g_idx is not None and not bool((g_idx < 0).any()):  # (-1 throughout: column order)
        if g_idx.is_floating_point() or g_idx.is_complex() or g_idx.dtype == torch.bool:
            raise ValueError(f"'{module}.weight_g_idx' is {g_idx.dtype}: group indices are integers")
        if scale.dim() == 2 and int(g_idx.max()) >= scale.shape[1]:
            raise ValueError(f"'{module}.weight_g_idx' holds group {int(g_idx.max())}; the weight_scale has "
                             f"{scale.shape[1]} groups")
    return scale, zero


def _zero_point(module: str, zero, scale: torch.Tensor, rows: int, group: CompressedGroup, bits: int):
    """The zero points as a grid like the scale's, or None: symmetric weights have none (very old
    checkpoints stored zeros anyway); pack-quantized ones since compressed-tensors 0.10 are packed
    along the rows (int32 [ceil(rows * bits / 32), groups]), earlier ones stored as they are."""
    if zero is None or group.weights.get("symmetric", True):
        return None
    packed = [-(-rows * bits // 32), scale.shape[1]] if scale.dim() == 2 else None
    if group.format == "pack-quantized" and zero.dtype == torch.int32 and list(zero.shape) == packed \
            and list(scale.shape) != packed:
        zero = unpack_int32(zero.t(), bits, rows).t()
    if not (list(zero.shape) == list(scale.shape) or (scale.numel() == 1 and zero.numel() == 1)):
        raise ValueError(f"'{module}.weight_zero_point' is {zero.dtype} {list(zero.shape)}: expected one per scale "
                         f"{list(scale.shape)}" + (f" or int32 {packed} packed" if packed else ""))
    return zero


def unpack_int32(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 words [rows, n] of `bits`-bit codes (element j of each word at bit j * bits, the word's
    codes in order along the row, stored plus 2^(bits-1)) -> int32 [rows, count], the offset removed."""
    return unpack_words(words, bits, count) - (1 << (bits - 1))


def dequantize_compressed(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                          g_idx: torch.Tensor | None, shape: tuple, bits: int | None, weights: dict,
                          dtype: torch.dtype, device: str | torch.device = "cpu", chunk: int = 1 << 24) -> torch.Tensor:
    """(q - zero) x scale as a [rows, columns] matrix of `dtype` on `device`: q the float8 / int8 codes,
    or int32 words of `bits`-bit codes; scale and zero per tensor, row, group of columns (``weights``'
    group_size, or `g_idx` per column; -1 in it: column order) or block (``weights``' block_structure).
    Rows of about `chunk` elements at a time (a multiple of the block height) bound the temporaries."""
    rows, cols = shape
    block = int(weights["block_structure"][0]) if _strategy(weights) == "block" else 1
    step = max(block, chunk // max(cols, 1) // block * block)
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    g_idx = None if g_idx is None or bool((g_idx < 0).any()) else g_idx.to(device).long()  # -1: column order
    scale = scale.to(device).float()
    zero = None if zero is None else zero.to(device).float()
    for r0 in range(0, rows, step):
        part = codes[r0:r0 + step].to(device)
        q = (unpack_int32(part, bits, cols) if bits is not None else part).float()
        if zero is not None:
            q -= _expand(zero, r0, q.shape[0], cols, g_idx, weights)
        out[r0:r0 + step] = q * _expand(scale, r0, q.shape[0], cols, g_idx, weights)
    return out


def _expand(grid: torch.Tensor, r0: int, n: int, cols: int, g_idx, weights: dict) -> torch.Tensor:
    """Rows r0 .. r0 + n of a scale or zero-point grid broadcast over the weight's columns (per tensor:
    a scalar; block rows start at a multiple of the block height)."""
    strategy = _strategy(weights)
    if strategy == "tensor":
        return grid.reshape(())
    if strategy == "block":
        b0 = int(weights["block_structure"][0])
        return expand_blocks(grid[r0 // b0:-(-(r0 + n) // b0)], weights["block_structure"], n, cols)
    part = grid[r0:r0 + n]
    if strategy == "channel":
        return part
    return part[:, g_idx] if g_idx is not None else part.repeat_interleave(int(weights["group_size"]), dim=1)[:, :cols]
