"""Placement: which device holds each decoder layer, planned and checked before any weight loads.

A layer's weights live on one device (never copied), and the KV cache of every slot that runs the
layer lives there too; the engine moves hidden states only where consecutive slots sit on
different devices (``csrc/engine/model.cpp``, ``run_path``). ``plan`` turns what a user writes as
``device_map`` into a ``Placement``:

- None: every layer on ``device``; a single device ("cuda:1"): every layer there;
- "auto": GPUs in order of free memory (most first), each filled with consecutive layers up to its
  budget, the rest on the CPU;
- a list of (device, layer count) pairs in layer order, e.g. ``[("cuda:0", 20), ("cpu", 12)]``, or
  its text ``"cuda:0=20,cpu=12"`` ('+' also separates, for lm-eval's comma-split model_args);
- a dict ``{layer: device}`` naming every layer (keys may be digit strings, as JSON writes them);
  JSON text of a dict or of a list of pairs is read too.

The embedding, final norm and lm_head sit on the model's main device: the first GPU the map uses
(the head's matmul is the largest per token), else the CPU. Token ids go in and logits come out
there, and a tied head is the embedding itself (the last slot's hidden state, [B, T, H], makes the
hop back to it, smaller than the logits would be).

A device's budget is ``max_memory[device]`` (bytes, or text such as "20GiB") when given, else 90% of
its free memory now (CUDA: the driver's free memory and what torch's allocator holds unused; CPU:
MemAvailable, or what the process's memory cgroup leaves when that is less); the margin is for KV
caches and activations, which budgets do not count. A plan that needs more than a budget, names a
device this torch cannot use, or leaves a layer out raises ValueError naming it; ``device=`` alone
(no device_map) is budgeted on a GPU for a load from files, not for tensors handed over (they may be
there already).

Limits: CPU and CUDA (ROCm's torch.cuda) devices; a layer is never split across devices.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import Model

__all__ = ["CacheTooLarge", "Placement", "as_device", "cgroup_room", "check_cache_fits", "checked_cache", "free_memory", "human", "layer_of", "parse_max_memory", "parse_size", "plan"]

_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
MARGIN = 0.9  # the share of a device's free memory that weights (no budget given) or a KV cache may fill


@dataclass(frozen=True)
class Placement:
    """layers[i]: the device of layer i's weights (and its slots' KV caches); main: the device of the
    embedding, final norm and lm_head, where inputs go in and outputs come out. need: planned weight
    bytes per device (str(device) -> bytes)."""

    layers: tuple[torch.device, ...]
    main: torch.device
    need: tuple[tuple[str, int], ...] = ()

    def device_of(self, name: str) -> torch.device:
        """The device of a Hugging Face-named tensor: its layer's, or main for the others."""
        layer = layer_of(name)
        return self.main if layer is None or layer >= len(self.layers) else self.layers[layer]

    @property
    def devices(self) -> list[torch.device]:
        """The distinct devices, main first, then in layer order."""
        out = [self.main]
        for d in self.layers:
            if d not in out:
                out.append(d)
        return out

    @property
    def split(self) -> bool:
        return len(self.devices) > 1

    def as_map(self) -> dict[int, str]:
        """{layer: device text}, the explicit device_map that gives this placement again."""
        return {i: str(d) for i, d in enumerate(self.layers)}

    def __str__(self) -> str:
        need = dict(self.need)
        parts = []
        for d in self.devices:
            runs = _runs([i for i, x in enumerate(self.layers) if x == d])
            size = f", {human(need[str(d)])}" if str(d) in need else ""
            extra = " + embedding and head" if d == self.main else ""
            parts.append(f"{d}: layers {runs or 'none'}{extra}{size}")
        return "; ".join(parts)


def human(n: int) -> str:
    """Bytes as '1.50 GiB' / '12.0 MiB' / '300 B'."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} B"


def layer_of(name: str) -> int | None:
    """The decoder layer a Hugging Face tensor name belongs to (model.layers.N.*), else None."""
    m = _LAYER_NAME.match(name)
    return int(m.group(1)) if m else None


def _runs(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(out)


UNLIMITED = 1 << 62  # a budget of float("inf")


def parse_size(value, where: str) -> int:
    """Bytes from a number (float("inf"): no limit) or text such as "20GiB", "512MB", "1.5g";
    ValueError naming ``where``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value >= 0:  # (NaN is not >= 0)
        return UNLIMITED if math.isinf(value) else int(value)
    m = _SIZE.match(str(value)) if isinstance(value, str) else None
    if m is None or (m.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"max_memory[{where!r}] = {value!r} is not a size (bytes, or text like '20GiB', '512MB')")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def as_device(text, where: str) -> torch.device:
    """A device this torch can use, from text or a torch.device ("cuda" means cuda:0); ValueError
    naming ``where`` (e.g. "device_map entry 0") otherwise."""
    try:
        d = torch.device(text)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: {text!r} is not a device (cpu, cuda, cuda:1, ...)") from e
    if d.type == "cpu":
        if d.index:
            raise ValueError(f"{where}: {text!r}: the CPU is one device, cpu (for a layer count write cpu={d.index})")
        return torch.device("cpu")
    if d.type != "cuda":
        raise ValueError(f"{where}: {d} is not supported (cpu and cuda devices only)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    d = torch.device("cuda", d.index or 0)
    if d.index >= count:
        raise ValueError(f"{where} names {d}, but this torch sees {count} CUDA device(s)")
    return d


def free_memory(d: torch.device) -> int:
    """Bytes free on a device now: the CUDA driver's count, or the CPU's MemAvailable, or less where
    this process's memory cgroup (a container's, a Slurm job's) leaves less (``cgroup_room``)."""
    if d.type == "cuda":  # with what torch's allocator holds but does not use (a deleted model's, say)
        return int(torch.cuda.mem_get_info(d)[0] + torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d))
    free = None
    try:
        with open("/proc/meminfo") as f:
            free = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = cgroup_room()
    return free if room is None else min(free, room)


class CacheTooLarge(ValueError):
    """A KV cache that cannot fit a device's free memory (``check_cache_fits``)."""


def check_cache_fits(model: Model, layers: Sequence[int], batch: int, capacity: int, what: str) -> None:
    """Raises CacheTooLarge (a ValueError), naming ``what`` (the argument that sized it), where a KV
    cache of ``batch`` rows x ``capacity`` positions along ``layers`` needs more than MARGIN of a
    device's free memory now. Without it the allocation fails deep in torch, or on a CPU with
    overcommitted memory the kernel kills the process while the cache is zero-filled. Counts what
    the cache allocates: an attention slot's keys and values in the model's dtype, a linear-attention
    slot's conv inputs (model dtype) and recurrent state (fp32); meta devices are not checked."""
    c = model.config
    size = torch.empty((), dtype=model.dtype).element_size()
    channels = 2 * c.linear_k_heads * c.linear_k_dim + c.linear_v_heads * c.linear_v_dim
    linear = batch * (channels * c.linear_conv_kernel * size + c.linear_v_heads * c.linear_k_dim * c.linear_v_dim * 4)
    need: dict[str, int] = {}
    for layer in layers:
        d = str(model.engine.layer_device(layer))
        slot = linear if c.linear_layers and c.linear_layers[layer] else 2 * batch * capacity * c.num_kv_heads * c.head_dim * size
        need[d] = need.get(d, 0) + slot
    for d, bytes_ in need.items():
        if torch.device(d).type != "meta" and bytes_ > MARGIN * (free := free_memory(torch.device(d))):
            raise CacheTooLarge(f"{what}: the KV cache of {batch} row(s) x {capacity} positions along {len(layers)} "
                                f"slots needs {human(bytes_)} on {d}, which has {human(free)} free")


def checked_cache(model: Model, layers: Sequence[int], batch: int, capacity: int, what: str, share=None, begin: int = 0):
    """``model.engine.new_cache`` (its first ``begin`` slots ``share``'s) once ``check_cache_fits``
    passes for the slots it makes, against the memory the caches already made left."""
    check_cache_fits(model, list(layers)[begin:], batch, capacity, what)
    return model.engine.new_cache(layers, batch, capacity, share, begin)


_CGROUP_FILES = {"v2": ("memory.max", "memory.current", "inactive_file"),
                 "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def cgroup_room(root: str = "/sys/fs/cgroup", table: str = "/proc/self/cgroup") -> int | None:
    """Bytes this process's memory cgroup may still take (its limit less what it uses, reclaimable
    page cache not counted as used), the least over the cgroup and its parents that set a limit;
    None where none does or the files cannot be read (cgroup v2, or v1's memory controller)."""
    try:
        lines = Path(table).read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:  # (not a cgroup line)
            continue
        _, controllers, path = fields
        version = "v2" if controllers == "" else "v1" if "memory" in controllers.split(",") else None
        if version is None:
            continue
        base = Path(root) if version == "v2" else Path(root) / "memory"
        parts = [p for p in path.split("/") if p]
        for k in range(len(parts), -1, -1):  # the cgroup, then its parents (a namespaced one is the root)
            rooms.append(_room(base.joinpath(*parts[:k]), *_CGROUP_FILES[version]))
    rooms = [r for r in rooms if r is not None]
    return min(rooms) if rooms else None


def _room(folder: Path, limit_file: str, usage_file: str, inactive: str) -> int | None:
    try:
        limit = (folder / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= 1 << 60:  # no limit (v1 writes a page-rounded 2^63)
            return None
        used = int((folder / usage_file).read_text())
    except (OSError, ValueError):
        return None
    try:  # reclaimable page cache; without the file, none is counted back
        stat = (line.split() for line in (folder / "memory.stat").read_text().splitlines())
        cache = next((int(f[1]) for f in stat if len(f) == 2 and f[0] == inactive), 0)
    except (OSError, ValueError):
        cache = 0
    return max(0, int(limit) - used + cache)


def plan(device_map, num_layers: int, sizes: dict[str, int], device="cpu", max_memory=None,
         packed: dict[str, int] | None = None, budget_device: bool = False) -> Placement:
    """The Placement for ``device_map`` (see the module text) of a model with ``num_layers`` layers
    whose tensors take ``sizes`` bytes (Hugging Face name -> bytes in the dtype they will load in);
    ``packed``: name -> bytes of the matrices that stay packed on a device that runs packed
    matrices (``quants.packs_on``), counted there at that size and elsewhere at ``sizes``'.
    Checks devices, coverage and memory; loads nothing. A ready Placement is checked for its layer
    count and returned. device= alone (no device_map) is budgeted on a GPU only with
    ``budget_device`` (a load from files; tensors handed over may be on that GPU already)."""
    if isinstance(device_map, Placement):
        if max_memory is not None:
            raise ValueError("max_memory budgets a device_map that is planned here, not a ready Placement")
        return _normalised(device_map, num_layers)
    tally = _Tally(num_layers, sizes, packed or {})
    if device_map is None:
        if max_memory is not None:
            raise ValueError("max_memory budgets a device_map: pass device_map='auto' (or a map) with it")
        d = as_device(device, "device")
        placed = Placement((d,) * num_layers, d)
        return _checked(placed, tally, {}) if budget_device and d.type == "cuda" else placed
    budgets = _budgets(max_memory)
    if isinstance(device_map, str) and device_map.strip().lower() == "auto":
        layers = _auto(tally, budgets)
    else:
        layers = _explicit(device_map, num_layers)
    gpus = [d for d in layers if d.type == "cuda"]
    placed = Placement(tuple(layers), gpus[0] if gpus else torch.device("cpu"))
    return _checked(placed, tally, budgets)


def _normalised(placed: Placement, num_layers: int) -> Placement:
    """A ready Placement with its layer count checked and its devices written as ``as_device``
    writes them ("cuda" is cuda:0, cpu:0 is cpu), so that one device is never counted as two; the
    meta device (nothing loaded) is kept as it is."""
    if len(placed.layers) != num_layers:
        raise ValueError(f"the placement covers {len(placed.layers)} layers; the model has {num_layers}")
    one = lambda d, where: d if torch.device(d).type == "meta" else as_device(d, where)  # noqa: E731
    return Placement(tuple(one(d, f"placement layer {i}") for i, d in enumerate(placed.layers)),
                     one(placed.main, "placement main device"), placed.need)


class _Tally:
    """Weight bytes per layer and outside the layers (embedding, norm, head), as a device holds
    them: packed matrices at their blocks' size where the device runs them packed."""

    def __init__(self, num_layers: int, sizes: dict[str, int], packed: dict[str, int]):
        from .quants import packs_on

        self._packs_on = packs_on
        self._bytes = {}
        for packs in (False, True):
            layer_bytes, other = [0] * num_layers, 0
            for name, n in sizes.items():
                n = packed.get(name, n) if packs else n
                layer = layer_of(name)
                if layer is not None and layer < num_layers:
                    layer_bytes[layer] += n
                else:
                    other += n
            self._bytes[packs] = (layer_bytes, other)

    def on(self, d: torch.device) -> tuple[list[int], int]:
        """(bytes of each layer, bytes outside the layers) held on device d."""
        return self._bytes[self._packs_on(d)]


def _pairs(text: str, what: str, form: str, valid=lambda value: True) -> list[tuple[str, str]]:
    """'a=1,b=2' (entries separated by ',', '+' or spaces) -> [("a", "1"), ("b", "2")]; an entry
    without a name, an '=' or a ``valid`` value raises ValueError naming ``what`` and ``form``."""
    out = []
    for part in (p for p in re.split(r"[,+\s]+", text.strip()) if p):
        name, sep, value = part.rpartition("=")
        if not sep or not name or not valid(value):
            raise ValueError(f"{what}: {part!r} is not {form}")
        out.append((name, value))
    return out


def parse_max_memory(text: str) -> dict[str, str]:
    """'cuda:0=20GiB,cpu=64GiB' (or '+'-separated) -> {device: size text}; a device named twice
    raises ValueError."""
    pairs = _pairs(text, "max_memory", "DEVICE=SIZE (e.g. 'cuda:0=20GiB,cpu=64GiB')")
    return _once([name for name, _ in pairs], pairs)


def _budgets(max_memory) -> dict[str, int]:
    if max_memory is None:
        return {}
    if isinstance(max_memory, str):
        max_memory = parse_max_memory(max_memory)
    if not isinstance(max_memory, dict):
        raise ValueError(f"max_memory must be a dict {{device: size}} or text like 'cuda:0=20GiB,cpu=64GiB', "
                         f"got {type(max_memory).__name__}")
    devices = [str(as_device(k, f"max_memory key {k!r}")) for k in max_memory]
    return _once(devices, [(d, parse_size(v, str(k))) for d, (k, v) in zip(devices, max_memory.items())])


def _once(devices: list[str], pairs: list[tuple]) -> dict:
    """dict(pairs), whose keys are ``devices``; ValueError when one device is named twice (as "cuda"
    and "cuda:0", say): which budget was meant cannot be told."""
    seen = [d for k, d in enumerate(devices) if d in devices[:k]]
    if seen:
        raise ValueError(f"max_memory names {seen[0]} twice; give each device one budget")
    return dict(pairs)


def _budget(d: torch.device, budgets: dict[str, int]) -> int:
    return budgets[str(d)] if str(d) in budgets else int(free_memory(d) * MARGIN)


def _auto(tally: _Tally, budgets: dict[str, int]) -> list[torch.device]:
    """GPUs by free memory (most first), each filled with consecutive layers while they fit (the
    first also holds the embedding and head); the CPU takes the rest (and then the embedding and
    head too, when no layer fits a GPU)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = sorted((torch.device("cuda", i) for i in range(count)), key=lambda d: -_budget(d, budgets))
    num_layers = len(tally.on(torch.device("cpu"))[0])
    layers: list[torch.device] = []
    for k, gpu in enumerate(gpus):
        layer_bytes, other = tally.on(gpu)
        room = _budget(gpu, budgets) - (other if k == 0 else 0)
        while len(layers) < num_layers and layer_bytes[len(layers)] <= room:
            room -= layer_bytes[len(layers)]
            layers.append(gpu)
        if k == 0 and not layers:
            break  # not even layer 0 fits the largest GPU: everything on the CPU
    return layers + [torch.device("cpu")] * (num_layers - len(layers))


def _explicit(device_map, num_layers: int) -> list[torch.device]:
    """An explicit map (dict, list of pairs or their text) -> one device per layer."""
    if isinstance(device_map, torch.device):
        return [as_device(device_map, "device_map")] * num_layers
    if isinstance(device_map, str):
        text = device_map.strip()
        if re.fullmatch(r"[a-z]+(:\d+)?", text):  # one device for every layer
            return [as_device(text, "device_map")] * num_layers
        device_map = _parse_text(text)
    if isinstance(device_map, dict):
        return _from_dict(device_map, num_layers)
    if not isinstance(device_map, (list, tuple)):
        raise ValueError(f"device_map must be 'auto', a list of (device, layers) pairs, a dict {{layer: device}} "
                         f"or text like 'cuda:0=20,cpu=12'; got {type(device_map).__name__}")
    layers: list[torch.device] = []
    for k, entry in enumerate(device_map):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not _is_count(entry[1]):
            raise ValueError(f"device_map entry {k} must be a (device, layer count) pair, got {entry!r}")
        layers += [as_device(entry[0], f"device_map entry {k}")] * int(entry[1])
    if len(layers) != num_layers:
        raise ValueError(f"device_map places {len(layers)} layers; the model has {num_layers}")
    return layers


def _is_count(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _parse_text(text: str):
    """'cuda:0=20,cpu=12' (or '+'-separated) -> [(device, count)]; JSON text -> its dict or list."""
    if text.strip().startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"device_map: {text!r} is not valid JSON ({e})") from e
    pairs = _pairs(text, "device_map", "DEVICE=COUNT (e.g. 'cuda:0=20,cpu=12', or 'auto')", str.isdigit)
    return [(name, int(count)) for name, count in pairs]


def _from_dict(device_map: dict, num_layers: int) -> list[torch.device]:
    layers: dict[int, torch.device] = {}
    for key, value in device_map.items():
        text = str(key).strip()
        if not text.lstrip("-").isdigit():
            raise ValueError(f"device_map key {key!r} is not a layer index")
        layer = int(text)
        if not 0 <= layer < num_layers:
            raise ValueError(f"device_map names layer {layer}; the model has layers 0..{num_layers - 1}")
        if layer in layers:
            raise ValueError(f"device_map names layer {layer} twice")
        layers[layer] = as_device(value, f"device_map layer {layer}")
    missing = [i for i in range(num_layers) if i not in layers]
    if missing:
        raise ValueError(f"device_map gives no device to layer(s) {_runs(missing)} (every layer needs one)")
    return [layers[i] for i in range(num_layers)]


def _checked(placed: Placement, tally: _Tally, budgets: dict[str, int]) -> Placement:
    """placed with its bytes per device, after checking each against the device's budget."""
    need: dict[str, int] = {str(placed.main): tally.on(placed.main)[1]}
    for i, d in enumerate(placed.layers):
        need[str(d)] = need.get(str(d), 0) + tally.on(d)[0][i]
    for name, n in need.items():
        budget = _budget(torch.device(name), budgets)
        if n > budget:
            where = "max_memory" if name in budgets else f"{MARGIN:.0%} of its free memory"
            raise ValueError(f"the placement puts {human(n)} of weights on {name}, more than its budget of "
                             f"{human(budget)} ({where}); move layers to another device (device_map) or raise "
                             f"max_memory")
    return Placement(placed.layers, placed.main, tuple(need.items()))
