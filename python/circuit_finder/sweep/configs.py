"""Sweep configs: which layer paths a sweep runs.

``SweepConfig`` is one layer path (with its RYS (start, end, times) when it is one);
``make_configs`` expands a strategy — ``grid`` (block sizes x starts x times), ``scan`` (every
(i, j), the full brain-scan heatmap), ``paths`` (given paths) — into configs in a stable order
without duplicates; ``refine_configs`` adds stride-1 neighbours of winners (refine's fine pass).

Limits: RYS configs are single repeated blocks; multi-block paths come in as ``paths``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..layer_path import LayerPath

__all__ = ["MODES", "STRATEGIES", "SweepConfig", "make_configs", "refine_configs", "rys_params", "unique_configs"]

STRATEGIES = ("grid", "scan", "refine", "paths", "beam", "surrogate")
MODES = ("generate", "likelihood")


def rys_params(path: LayerPath, num_layers: int) -> tuple[int, int, int] | None:
    """(start, end, times) when path is LayerPath.duplicate(num_layers, start, end, times), else None."""
    layers = list(path)
    n = num_layers
    j = next((s for s, layer in enumerate(layers) if layer != s), None)
    if j is None or j == 0 or j > n:
        return None
    i = layers[j]
    if not (0 <= i < j):
        return None
    extra = len(layers) - n
    block = j - i
    if extra <= 0 or extra % block:
        return None
    times = extra // block + 1
    return (i, j, times) if layers == list(LayerPath.duplicate(n, i, j, times)) else None


@dataclass(frozen=True)
class SweepConfig:
    """One layer path to score; start/end/times are set for RYS configs (None otherwise)."""

    layers: LayerPath
    start: int | None = None
    end: int | None = None
    times: int | None = None

    @classmethod
    def of(cls, path: LayerPath, num_layers: int) -> SweepConfig:
        rys = rys_params(path, num_layers)
        return cls(path, *rys) if rys else cls(path)

    @property
    def key(self) -> str:
        return str(self.layers)

    def shared_prefix(self, num_layers: int) -> int:
        """How many first slots equal the identity path's (work that can be reused)."""
        return self.layers.identity_prefix(num_layers)


def _ints(name: str, values, minimum: int) -> list[int]:
    out = [int(v) for v in values]
    for v in out:
        if v < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return out


def make_configs(num_layers: int, strategy: str = "grid", block_sizes: Sequence[int] = (3, 4, 5),
                 starts: Sequence[int] | None = None, stride: int = 1, times: Sequence[int] = (2,),
                 paths: Sequence | None = None) -> list[SweepConfig]:
    """The configs a strategy names, in a stable order, without duplicates (baseline not included).

    grid: for each times t, block size b and start i (``starts``, default 0, stride, ... while
    i + b <= N): RYS (i, i + b, t). scan: every (i, j) with 0 <= i < j <= N (i from ``starts`` or
    every stride-th layer; j = i + stride, i + 2 x stride, ... and N: blocks of every multiple of the
    stride, and each start's block to the last layer). paths: the given layer paths.
    refine's coarse pass is a grid; sweep() adds its fine pass.
    """
    n = num_layers
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    times = _ints("times", times, 2)
    if starts is not None:
        starts = _ints("starts", starts, 0)
        for i in starts:
            if i >= n:
                raise ValueError(f"start {i} is not a layer of this {n}-layer model")
    out: list[SweepConfig] = []
    if strategy == "paths":
        if not paths:
            raise ValueError("strategy 'paths' needs paths=[...]")
        out = [SweepConfig.of(LayerPath.coerce(p, n), n) for p in paths]
    elif strategy in ("grid", "refine"):
        sizes = _ints("block_sizes", block_sizes, 1)
        for t in times:
            for b in sizes:
                if b > n:
                    raise ValueError(f"block size {b} is larger than the model's {n} layers")
                for i in (starts if starts is not None else range(0, n - b + 1, stride)):
                    if i + b <= n:
                        out.append(SweepConfig(LayerPath.duplicate(n, i, i + b, t), i, i + b, t))
    elif strategy == "scan":
        for t in times:
            for i in (starts if starts is not None else range(0, n, stride)):
                for j in sorted({*range(i + stride, n + 1, stride), n}):  # the stride's grid and the last layer
                    out.append(SweepConfig(LayerPath.duplicate(n, i, j, t), i, j, t))
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return unique_configs(out)


def unique_configs(configs: Sequence[SweepConfig]) -> list[SweepConfig]:
    """Configs in order, each path once."""
    seen, out = set(), []
    for c in configs:
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


def refine_configs(num_layers: int, winners: Sequence[SweepConfig], radius: int, times: Sequence[int]) -> list[SweepConfig]:
    """Stride-1 RYS configs with start and end within ``radius`` of each winner's (each path once,
    though winners' neighbourhoods overlap)."""
    out = []
    for w in winners:
        if w.start is None:
            continue
        for t in times:
            for i in range(max(0, w.start - radius), min(num_layers - 1, w.start + radius) + 1):
                for j in range(max(i + 1, w.end - radius), min(num_layers, w.end + radius) + 1):
                    out.append(SweepConfig(LayerPath.duplicate(num_layers, i, j, t), i, j, t))
    return unique_configs(out)
