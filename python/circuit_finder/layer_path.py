"""LayerPath: the order in which a model's decoder layers run.

Parsing, formatting and validation are done by the C++ core (csrc/engine/layer_path.cpp), so the
CLI, the server and Python all accept exactly the same text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from . import _C

__all__ = ["LayerPath", "LayerPathError"]

LayerPathError = _C.LayerPathError

_RYS = re.compile(r"^\s*rys\s*=\s*(\d+)\s*:\s*(\d+)\s*(?::\s*(\d+)\s*)?$", re.IGNORECASE)


class LayerPath:
    """An immutable sequence of layer indices, e.g. ``LayerPath.parse("0..14,12,13,14,15..39")``.

    Text form: comma-separated indices and inclusive ascending ranges ``a..b``. Items may also be
    separated by ``;``, ``+`` or whitespace (handy where commas are taken, such as lm-eval's
    ``--model_args``). ``str(path)`` is a canonical compact form that parses back to the same path.
    Where the model is known (``coerce``, ``Model.path``, every ``layers=`` argument, the CLI, the
    server, lm-eval), ``rys=i:j`` (or ``rys=i:j:times``) is short for ``LayerPath.duplicate(N, i, j)``.
    """

    __slots__ = ("_layers",)

    def __init__(self, layers: Iterable[int]):
        items = tuple(int(i) for i in layers)
        if not items:
            raise LayerPathError("layer path is empty")
        for slot, i in enumerate(items):
            if i < 0:
                raise LayerPathError(f"layer path slot {slot}: layer index {i} is negative")
        self._layers = items

    @classmethod
    def parse(cls, text: str) -> LayerPath:
        if not isinstance(text, str):
            raise TypeError(f"LayerPath.parse expects a string, got {type(text).__name__}")
        if _RYS.match(text):
            raise LayerPathError(f"'{text.strip()}' needs the model's layer count: use LayerPath.coerce(text, "
                                 f"num_layers), or pass it as layers= to a model")
        return cls(_C.parse_layer_path(text))

    @classmethod
    def identity(cls, num_layers: int) -> LayerPath:
        if num_layers <= 0:
            raise LayerPathError(f"num_layers must be positive, got {num_layers}")
        return cls(range(num_layers))

    @classmethod
    def duplicate(cls, num_layers: int, start: int, end: int, times: int = 2) -> LayerPath:
        """The RYS path: layers 0..end-1, then start..end-1 again (``times`` runs in all), then end..N-1.

        ``start`` is inclusive, ``end`` exclusive.
        """
        for name, v in (("num_layers", num_layers), ("start", start), ("end", end), ("times", times)):
            if not isinstance(v, int) or isinstance(v, bool) or not -(2**31) < v < 2**31:
                raise LayerPathError(f"duplicate(): {name} must be an integer of reasonable size, got {v!r}")
        if (end - start) * (times - 1) > 1 << 20:
            raise LayerPathError(f"duplicate(): {times} runs of {end - start} layers is too long a path")
        return cls(_C.duplicate_layers(num_layers, start, end, times))

    @classmethod
    def coerce(cls, layers: None | str | LayerPath | Iterable[int], num_layers: int) -> LayerPath:
        """None -> identity; text -> parsed; a LayerPath or a list of ints as is. Validated for the model."""
        if hasattr(layers, "candidates") or (isinstance(layers, str) and layers.strip().startswith("router:")):
            raise LayerPathError("this needs one layer path, and a router picks one per prompt: use one of its "
                                 "candidates (router.candidates, router.path_for(model, prompt))")
        if layers is None:
            path = cls.identity(num_layers)
        elif isinstance(layers, LayerPath):
            path = layers
        elif isinstance(layers, str):
            m = _RYS.match(layers)
            if m:
                path = cls.duplicate(num_layers, int(m.group(1)), int(m.group(2)), int(m.group(3) or 2))
            else:
                path = cls.parse(layers)
        else:
            path = cls(layers)
        path.validate(num_layers)
        return path

    def validate(self, num_layers: int) -> None:
        """Raises LayerPathError naming the first slot whose index is not a layer of the model."""
        _C.validate_layer_path(list(self._layers), num_layers)

    @property
    def layers(self) -> tuple[int, ...]:
        return self._layers

    def identity_prefix(self, num_layers: int) -> int:
        """How many first slots equal the identity path's (work other paths can share)."""
        n = 0
        for s, layer in enumerate(self._layers):
            if layer != s or s >= num_layers:
                break
            n += 1
        return n

    def extra_layers(self, num_layers: int) -> int:
        """How many more layer runs than the identity path (negative when layers are skipped)."""
        return len(self._layers) - num_layers

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __getitem__(self, index):
        return self._layers[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LayerPath):
            return self._layers == other._layers
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._layers)

    def __str__(self) -> str:
        return _C.format_layer_path(list(self._layers))

    def __repr__(self) -> str:
        return f"LayerPath('{self}')"
