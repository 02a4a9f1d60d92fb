"""Weight layout for fused products: a layer's q / k / v projections and a gated MLP's gate / up
laid out one after another in one tensor (with their biases), and a mixture of experts' per-expert
matrices stacked as transformers v5 holds them ([E, 2I, H] gate|up, [E, H, I] down). The engine
(csrc/engine/weights.cpp, ``rows_in_sequence`` / ``stack_experts``) takes rows that follow one
another in memory as one matrix and runs each group as one product, stacked bf16 experts on a GPU as
grouped GEMMs. ``loading.load`` calls ``lay_out_fused`` on GPUs by default (``fuse_projections``).

Limits: a group is laid out only when all its parts are there and agree (float tensors of one dtype,
or packed blocks of one ggml type, one row length, one destination device); the parts are copied
(one group at a time), so a memory-mapped checkpoint's pages become the copies' memory.
"""

from __future__ import annotations

import re

import torch

from .quants import PackedTensor

__all__ = ["EXPERT_NAMES", "FUSED_GROUPS", "lay_out_fused"]

# A layer's q / k / v, a gated MLP's gate / up (dense, shared expert, the hub's per-expert tensors;
# Mixtral names them w1 / w3).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))
# A mixture of experts' per-expert tensors (the hub's layout): gate -> (up, down) names.
EXPERT_NAMES = {"gate_proj": ("up_proj", "down_proj"), "w1": ("w3", "w2")}
_EXPERT = re.compile(r"^(.*\.experts\.)0\.(gate_proj|w1)\.weight$")


def lay_out_fused(tensors: dict, where=lambda device: device.type == "cuda", keep=frozenset(), place=None) -> int:
    """Lays out each group of FUSED_GROUPS (``<prefix>.q_proj.weight`` ..., and the ``.bias`` names
    alike) one after another in one new tensor and puts views of it in ``tensors`` in place of the
    parts. A mixture of experts' per-expert float matrices are stacked first. A group is laid out
    when its parts are all there and agree (see the module's limits), its destination device is one
    ``where`` accepts, and none is named in ``keep``. ``place(name) -> (device, dtype or None)``:
    where the new tensor goes and in which float dtype (default: the parts' own), so a load copies
    each part once, straight to its device. Returns the number of groups laid out (a layer's
    experts count as one, a group's biases as another)."""
    place = place or (lambda name: (tensors[name].device, None))
    laid = _stack_experts(tensors, where, keep, place)
    done = len({n.rsplit(".experts.", 1)[0] for n in laid})
    for name in list(tensors):
        for group in FUSED_GROUPS:
            for suffix in (".weight", ".bias"):
                if not name.endswith(f".{group[0]}{suffix}"):
                    continue
                prefix = name[: -len(f"{group[0]}{suffix}")]
                names = [f"{prefix}{part}{suffix}" for part in group]
                if keep.isdisjoint(names) and laid.isdisjoint(names) and _fusable(tensors, names, place, where):
                    _replace_with_rows(tensors, names, *place(names[0]))
                    done += 1
    return done


def _fusable(tensors: dict, names: list[str], place, where) -> bool:
    """Whether the named parts can be one tensor: all there; float tensors of one dtype and one
    shape past the first dimension (2-D rows or 1-D biases), or 2-D packed blocks of one type and
    width; one destination device that ``where`` accepts."""
    parts = [tensors.get(n) for n in names]
    if any(p is None for p in parts) or len({place(n)[0] for n in names}) != 1 or not where(place(names[0])[0]):
        return False
    first = parts[0]
    if isinstance(first, PackedTensor):
        return all(isinstance(p, PackedTensor) and p.blocks.dim() == 2 and p.type_name == first.type_name
                   and p.cols == first.cols for p in parts)
    return all(isinstance(p, torch.Tensor) and p.is_floating_point() and p.dtype == first.dtype
               and p.dim() in (1, 2) and p.dim() == first.dim() and p.shape[1:] == first.shape[1:] for p in parts)


def _replace_with_rows(tensors: dict, names: list[str], device, dtype) -> None:
    """The named parts copied one after another into one new tensor on `device` (floats in `dtype`
    when given); each name then holds its rows of it."""
    parts = [tensors[n] for n in names]
    packed = isinstance(parts[0], PackedTensor)
    data = [p.blocks if packed else p for p in parts]
    rows = sum(d.shape[0] for d in data)
    whole = torch.empty((rows, *data[0].shape[1:]), dtype=data[0].dtype if packed or dtype is None else dtype,
                        device=device)
    row = 0
    for name, part, d in zip(names, parts, data):
        view = whole[row: row + d.shape[0]]
        view.copy_(d)
        tensors[name] = PackedTensor(view, part.type_name, part.cols, name) if packed else view
        row += d.shape[0]


def _stack_experts(tensors: dict, where, keep, place) -> set[str]:
    """Each mixture-of-experts layer's per-expert float gate / up / down matrices stacked (gate then
    up rows per expert in one [E, 2I, H] tensor, the downs in one [E, H, I]) on their destination;
    returns the names laid out so."""
    laid: set[str] = set()
    for first in [n for n in tensors if _EXPERT.match(n)]:
        prefix, gate = _EXPERT.match(first).groups()
        up, down = EXPERT_NAMES[gate]
        count = 0
        while f"{prefix}{count}.{gate}.weight" in tensors:
            count += 1
        names = [[f"{prefix}{e}.{part}.weight" for part in (gate, up, down)] for e in range(count)]
        flat = [n for expert in names for n in expert]
        if not keep.isdisjoint(flat) or not _stackable(tensors, names, place, where):
            continue
        device, dtype = place(first)
        g0, d0 = tensors[names[0][0]], tensors[names[0][2]]
        gate_up = torch.empty((count, 2 * g0.shape[0], g0.shape[1]), dtype=dtype or g0.dtype, device=device)
        downs = torch.empty((count, *d0.shape), dtype=dtype or g0.dtype, device=device)
        for e, (g, u, d) in enumerate(names):
            views = (gate_up[e, :g0.shape[0]], gate_up[e, g0.shape[0]:], downs[e])
            for name, view in zip((g, u, d), views):
                view.copy_(tensors[name])
                tensors[name] = view
        laid.update(flat)
    return laid


def _stackable(tensors: dict, names: list[list[str]], place, where) -> bool:
    """Whether experts' [gate, up, down] float matrices can stack: each kind one shape, all of one
    dtype, one destination device that ``where`` accepts."""
    gate_up, downs = [n for e in names for n in e[:2]], [e[2] for e in names]
    if not (_fusable(tensors, gate_up, place, where) and _fusable(tensors, downs, place, where)):
        return False
    parts = [tensors[n] for n in gate_up], [tensors[n] for n in downs]
    return (not isinstance(parts[0][0], PackedTensor) and parts[1][0].dtype == parts[0][0].dtype
            and place(downs[0])[0] == place(gate_up[0])[0] and parts[0][0].dim() == 2
            and len({p.shape for p in parts[0]}) == 1 and len({p.shape for p in parts[1]}) == 1)
