"""GPTQ and AWQ checkpoints (``quantization_config.quant_method`` "gptq": what AutoGPTQ, GPTQModel and
optimum write, e.g. Qwen's *-GPTQ-Int4 / -Int8 repos; "awq": AutoAWQ's GEMM layout, e.g. Qwen's *-AWQ and
hugging-quants' *-AWQ-INT4), dequantized on load: each quantized linear layer's weight becomes
(q - zero) x scale in the compute dtype, one matrix at a time on the device it goes to. These are the
numbers transformers' GPTQ / AWQ layers multiply by (they dequantize the same codes; their integer
kernels only reorder the sums).

Layouts (in / out: the layer's input / output features; per = 32 / bits codes in an int32 word, code j
at bit j x bits; a group is `group_size` consecutive inputs, or all of them for -1):
- GPTQ: ``qweight`` int32 [in / per, out], packed along the inputs; ``qzeros`` int32 [groups, out / per],
  packed along the outputs (``checkpoint_format`` "gptq", the default: stored minus one in each code
  by subtracting 0x11111111 (4-bit; 0x01010101, 0x55555555) from each word, so a zero point of 0
  borrows from the next code, and read back by adding it, as GPTQModel does; "gptq_v2": as they are); ``scales`` [groups, out]; ``g_idx`` int32 [in], each input's group (GPTQ's
  activation order; absent: input // group_size). 2, 4 or 8 bits; GPTQModel's per-module ``dynamic``
  overrides of bits and group_size apply (the first pattern that matches, as there).
- AWQ (``version`` "gemm"): ``qweight`` int32 [in, out / 8], packed along the outputs with a word's
  eight 4-bit codes in the order 0 2 4 6 1 3 5 7 (output 2k at bits 4k, 2k + 1 at bits 4k + 16);
  ``qzeros`` int32 [groups, out / 8] alike (``zero_point`` false: none stored, every zero 8; GPTQModel's
  symmetric AWQ stores 8s); ``scales`` [groups, out].
Layers left float (``modules_to_not_convert``, a negative ``dynamic`` pattern, routers, the head)
are stored as plain weights and load as they are; a ``bias`` beside a quantized layer is a plain bias.

Limits: 3-bit GPTQ (its codes straddle words), GPTQ's other checkpoint formats (marlin, bitblas, ...),
AWQ's other versions (gemv, gemv_fast, marlin, exllama) and quantized embeddings are refused with a
ValueError naming what; so are parts missing or misshapen and group indices out of range. ``dynamic``
patterns are matched against a module's name as loaded and, for a multimodal wrapper's decoder, the
names its quantizer saw (``loading.quantizer_module_names``): an override they miss fails a shape
check. (transformers reads no ``dynamic``; GPTQModel reads both methods', vLLM GPTQ's.) Asymmetric
v1 files not written by GPTQModel load with a warning: AutoGPTQ wrote a zero point of 0 over the
rest of its word.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import partial

import torch

from .quants import unpack_words

__all__ = ["AWQ_ORDER", "METHODS", "PARTS", "GptqLayout", "dequantize_gptq", "dynamic_along", "gptq_config",
           "gptq_matrices"]

METHODS = ("gptq", "awq")
PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")  # a quantized layer's stored parts
AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AWQ: output j of a word's eight is its code AWQ_ORDER[j] (at bits 4 x that)
_GPTQ_FORMATS = ("gptq", "gptq_v2")  # checkpoint_format: zero points stored minus one (v1), or as they are


@dataclass(frozen=True)
class GptqLayout:
    """How one layer's parts are stored: the method, bits and group_size, and whether the zero points
    are stored minus one (GPTQ v1)."""

    method: str
    bits: int
    group_size: int
    zeros_minus_one: bool = False
    zero_point: bool = True  # zero points stored (AWQ's zero_point: false stores none)


def gptq_config(config: dict) -> dict | None:
    """The quantization_config of a GPTQ or AWQ checkpoint (at the top or in text_config); None for any
    other config. ValueError naming what for what we cannot load."""
    for c in (config, config.get("text_config") or {}):
        qc = c.get("quantization_config") or {}
        if qc.get("quant_method") == "gptq":
            fmt = _gptq_format(qc)
            if fmt not in _GPTQ_FORMATS or qc.get("is_marlin_format"):
                fmt = "marlin" if qc.get("is_marlin_format") else fmt
                raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported ({', '.join(_GPTQ_FORMATS)} are): "
                                 "load the checkpoint saved in the gptq format")
            if qc.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
                raise ValueError(f"GPTQ pack_dtype {qc['pack_dtype']!r} is not supported (int32 is)")
            _check_bits("GPTQ", qc, qc.get("bits", 4), (2, 4, 8))
            if fmt == "gptq" and qc.get("sym") is False and "gptqmodel" not in str((qc.get("meta") or {}).get("quantizer")):
                warnings.warn("asymmetric GPTQ in the v1 format, not written by GPTQModel: AutoGPTQ wrote a zero "
                              "point of 0 over the rest of its int32 word, so such layers read wrong (GPTQModel "
                              "refuses these files); prefer a symmetric or gptq_v2 checkpoint", stacklevel=5)
            return qc
        if qc.get("quant_method") == "awq":
            version = str(qc.get("version", "gemm")).lower()
            if version != "gemm":
                raise ValueError(f"AWQ version {version!r} is not supported (gemm is: AutoAWQ's default layout)")
            _check_bits("AWQ", qc, qc.get("bits", qc.get("w_bit", 4)), (4,))
            return qc
    return None


def _check_bits(method: str, qc: dict, bits, allowed: tuple) -> None:
    """ValueError unless the config's bits and every ``dynamic`` override's are `allowed`."""
    overrides = [o.get("bits", bits) for o in (qc.get("dynamic") or {}).values() if isinstance(o, dict)]
    for b in (bits, *overrides):
        if b not in allowed:
            why = ": its codes straddle int32 words" if b == 3 else ""
            raise ValueError(f"{b}-bit {method} weights are not supported{why} "
                             f"({', '.join(map(str, allowed))}-bit are)")


def _layout(names: tuple[str, ...], qc: dict) -> GptqLayout:
    """The layout of a module's parts (`names`: what it may be called): the config's, or GPTQModel's
    first ``dynamic`` override matching it (GPTQModel writes ``dynamic`` for its AWQ checkpoints too)."""
    awq = qc["quant_method"] == "awq"
    bits, size = qc.get("bits", 4), qc.get("group_size", qc.get("q_group_size", 128) if awq else 128)
    rule = _first_match(qc.get("dynamic"), *names)
    if rule is not None and rule[0] == "+":
        bits, size = rule[1].get("bits", bits), rule[1].get("group_size", size)
    if awq:
        return GptqLayout("awq", 4, int(size), zero_point=bool(qc.get("zero_point", True)))
    return GptqLayout("gptq", int(bits), int(size), _gptq_format(qc) == "gptq")


def _first_match(dynamic: dict | None, *names: str) -> tuple[str, dict] | None:
    """GPTQModel's rule for a module (under any of `names`): its first ``dynamic`` pattern that matches
    it (re.match), as ("-", {}) (left float) or ("+", its overrides); None: the config's own bits and
    group_size."""
    for pattern, override in (dynamic or {}).items():
        body = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        if any(re.match(body, name) for name in names):
            return ("-", {}) if pattern.startswith("-:") else ("+", dict(override or {}))
    return None


def dynamic_along(dynamic: dict, modules, names=lambda module: (module,)) -> dict:
    """GPTQModel's ``dynamic`` for an export in which each output module holds a source module
    ((output name, source name) pairs): an exact entry first for each output module whose rule would
    differ from its source's, then the source's patterns, so every module keeps its source's rule.
    names(module): the names patterns may know a module by (an exact entry names them all). vLLM
    looks its fused layers up by their own names (qkv_proj, gate_up_proj): where an exact entry names
    a member of one, the fused name gets one too when all its members keep the same rule."""
    exact, rules = {}, {}
    for out, src in modules:
        rules[out] = _first_match(dynamic, *names(src))
        if rules[out] != _first_match(dynamic, *names(out)):
            exact[out] = rules[out]
    for fused, members in _fused_entries(exact, rules).items():
        exact[fused] = rules[members[0]]
    exact = {_exact_pattern(out, rule, names): (rule or ("+", {}))[1] for out, rule in exact.items()}
    bodies = {k[2:] for k in exact}  # an older entry for one of these names (either sign): replaced
    return {**exact, **{k: v for k, v in dynamic.items() if (k[2:] if k[:2] in ("+:", "-:") else k) not in bodies}}


_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # vLLM's


def _fused_entries(exact: dict, rules: dict) -> dict[str, list[str]]:
    """{vLLM's fused module: its members} for each fused module one of whose members has an exact entry
    and whose members present all keep one rule (members that disagree cannot be fused by vLLM)."""
    fused = {}
    for out in exact:
        parent, _, leaf = out.rpartition(".")
        for name, parts in _FUSED.items():
            members = [f"{parent}.{p}" for p in parts if f"{parent}.{p}" in rules]
            if leaf in parts and len({repr(rules[m]) for m in members}) == 1:
                fused[f"{parent}.{name}"] = members
    return fused


def _exact_pattern(module: str, rule: tuple[str, dict] | None, names) -> str:
    """A ``dynamic`` key matching `module` under any of its names (an exact, anchored pattern)."""
    forms = [re.escape(n) for n in names(module)]
    return f"{(rule or ('+',))[0]}:^{forms[0] if len(forms) == 1 else '(?:' + '|'.join(forms) + ')'}$"


def _gptq_format(qc: dict) -> str:
    return str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()


def gptq_matrices(tensors: dict, qc: dict, names=lambda module: (module,)) -> tuple[dict, set[str]]:
    """({'<module>.weight': (its float shape [out, in], a function (dtype, device) -> the dequantized
    matrix)}, the names of the stored parts those replace). ValueError naming the tensor for a part
    missing, of the wrong kind or shape. names(module): the names ``dynamic`` patterns may know it by."""
    stored, parts = {}, set()
    for name in [n for n in tensors if n.endswith(".qweight")]:
        module = name.removesuffix(".qweight")
        if module.endswith("embed_tokens"):
            raise ValueError(f"'{name}': quantized embeddings are not supported (GPTQModel's quantized "
                             "nn.Embedding); quantize the linear layers only")
        mine = {p: tensors[module + p] for p in PARTS if module + p in tensors}
        layout = _layout(names(module), qc)
        shape, g_idx = _checked(module, mine, layout)
        stored[f"{module}.weight"] = (shape, partial(dequantize_gptq, mine[".qweight"],
                                                     mine.get(".qzeros"), mine[".scales"], g_idx, layout))
        parts.update(module + p for p in mine)
    return stored, parts


def _checked(module: str, t: dict, layout: GptqLayout) -> tuple[tuple[int, int], torch.Tensor]:
    """The float shape [out, in] of `module`'s weight and each input's group, the parts checked."""
    qweight, what = t[".qweight"], f"{layout.bits}-bit {layout.method.upper()}"
    if ".scales" not in t or (".qzeros" not in t and (layout.method == "gptq" or layout.zero_point)):
        missing = ".scales" if ".scales" not in t else ".qzeros"
        raise ValueError(f"'{module}' ({what}) has '{module}.qweight' but no '{module}{missing}'")
    scales, per = t[".scales"], 32 // layout.bits
    if scales.dim() != 2 or not scales.is_floating_point():
        raise ValueError(f"'{module}.scales' is {scales.dtype} {list(scales.shape)}: expected floats [groups, out]")
    groups, out = scales.shape
    g_idx = t.get(".g_idx")
    inputs = (qweight.shape[0] if layout.method == "awq" else
              g_idx.numel() if g_idx is not None else qweight.shape[0] * per)
    _expect(module, ".qweight", qweight, [inputs, -(-out // per)] if layout.method == "awq"
            else [-(-inputs // per), out], what)
    if ".qzeros" in t:
        _expect(module, ".qzeros", t[".qzeros"], [groups, -(-out // per)], what)
    if g_idx is None:
        size = inputs if layout.group_size <= 0 else layout.group_size
        if groups != -(-inputs // size):
            raise ValueError(f"'{module}.scales' is {list(scales.shape)}: {inputs} inputs in groups of {size} "
                             f"make {-(-inputs // size)} groups")
        g_idx = torch.arange(inputs) // size
    elif g_idx.dim() != 1 or g_idx.is_floating_point() or (g_idx.numel() and not 0 <= int(g_idx.min())
                                                            <= int(g_idx.max()) < groups):
        raise ValueError(f"'{module}.g_idx' is {g_idx.dtype} {list(g_idx.shape)}: expected one group index in "
                         f"0..{groups - 1} per input")
    return (out, inputs), g_idx


def _expect(module: str, part: str, t: torch.Tensor, shape: list, what: str) -> None:
    if t.dtype != torch.int32 or list(t.shape) != shape:
        raise ValueError(f"'{module}{part}' is {t.dtype} {list(t.shape)}: expected int32 {shape} ({what})")


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor, g_idx: torch.Tensor,
                    layout: GptqLayout, dtype: torch.dtype, device: str | torch.device = "cpu",
                    chunk: int = 1 << 24) -> torch.Tensor:
    """The weight [out, in] in `dtype` on `device`: (q - zero) x scale, q, zero and scale those of each
    input's group (`g_idx`). Outputs of about `chunk` elements at a time bound the temporaries."""
    groups, out = scales.shape
    inputs, per = g_idx.numel(), 32 // layout.bits
    order = AWQ_ORDER if layout.method == "awq" else None
    step = max(per, chunk // max(inputs, 1) // per * per)
    result = torch.empty(out, inputs, dtype=dtype, device=device)
    g = g_idx.to(device).long()
    size = inputs // groups  # groups of consecutive inputs (no activation order): broadcast, not gathered
    in_order = inputs % groups == 0 and torch.equal(g, torch.arange(inputs, device=device) // size)
    for o0 in range(0, out, step):
        n = min(step, out - o0)
        words = slice(o0 // per, -(-(o0 + n) // per))
        if layout.method == "awq":
            q = unpack_words(qweight[:, words].to(device), layout.bits, n, dim=1, order=order)
        else:
            q = unpack_words(qweight[:, o0:o0 + n].to(device), layout.bits, inputs, dim=0)
        zero = (unpack_words(_stored_zeros(qzeros[:, words].to(device), layout), layout.bits, n, dim=1, order=order)
                if qzeros is not None else torch.full((groups, n), 1 << (layout.bits - 1), device=device))
        s = scales[:, o0:o0 + n].to(device).float()
        if in_order:
            w = ((q.view(groups, size, n) - zero[:, None]).float() * s[:, None]).view(inputs, n)
        else:
            w = (q - zero[g]).float() * s[g]
        result[o0:o0 + n] = w.t()
    return result


def _stored_zeros(words: torch.Tensor, layout: GptqLayout) -> torch.Tensor:
    """qzeros words as their zero points' codes: GPTQ v1 words plus one in every code, added to the
    whole word modulo 2^32 (a stored 0 - 1 borrowed from the next code: the add carries it back)."""
    if not layout.zeros_minus_one:
        return words
    ones = sum(1 << (j * layout.bits) for j in range(32 // layout.bits))
    added = (words.long() + ones) % (1 << 32)
    return (added - (added >= 1 << 31).long() * (1 << 32)).int()
