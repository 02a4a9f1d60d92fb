"""sweep(): run probes along many layer paths and collect per-item scores.

Configs come from a strategy — ``grid`` (block sizes x starts x times), ``scan`` (every (i, j),
the full brain-scan heatmap), ``refine`` (a coarse grid, then stride-1 blocks around the best) —
or an explicit list of ``paths``. The identity path (the baseline) always runs once.

Shared work: configs run in order of how many of their first slots agree with the identity path
(for the RYS config (i, j): slots 0..j-1). For each probe, the identity pass is advanced slot by
slot and its hidden states (and, when generating, its KV cache slots, shared without copies) are
reused by every config, so the prefix of each path is computed once for the whole sweep.

Each finished config is appended to a JSONL file and fsynced (see results.py); ``resume=True``
skips the configs that file already holds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .layer_path import LayerPath
from .model import Model
from .probes import Item, Probe, get_probe
from .results import ResultStore, SweepResult

__all__ = ["SweepConfig", "make_configs", "rys_params", "sweep"]

STRATEGIES = ("grid", "scan", "refine", "paths")
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
        n = 0
        for s, layer in enumerate(self.layers):
            if layer != s or s >= num_layers:
                break
            n += 1
        return n


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
    every stride-th layer; j every stride-th from i + 1). paths: the given layer paths.
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
                for j in range(i + 1, n + 1, stride):
                    out.append(SweepConfig(LayerPath.duplicate(n, i, j, t), i, j, t))
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return _unique(out)


def _unique(configs: Sequence[SweepConfig]) -> list[SweepConfig]:
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
    return _unique(out)


# --------------------------------------------------------------------------------------------- runner
class _ProbeBatch:
    """One probe's items encoded once: the rows run in one batch, and the identity pass over them."""

    def __init__(self, model: Model, probe: Probe, items: list[Item], mode: str, chat: bool):
        self.model, self.probe, self.items, self.mode = model, probe, items, mode
        tok = model._need_tokenizer(f"probe {probe.name!r}")
        if chat:
            contexts = model._encode_prompts([it.prompt for it in items], chat=True)
        else:  # a plain LM: the prompt, then an answer cue
            contexts = [tok(f"{it.prompt}\nAnswer:")["input_ids"] for it in items]
        if mode == "likelihood":
            self._pack_choices(tok, contexts, chat)
            self.capacity = None
        else:
            self.ids, mask = model._left_pad(contexts)
            self.capacity = self.ids.shape[1] + probe.max_new_tokens
            self.positions, self.full_mask = model._generation_masks(self.ids, mask, probe.max_new_tokens)
            self.prefix_mask = None if self.full_mask is None else mask
        self._h = None
        self._done = 0
        self._cache = None

    def _pack_choices(self, tok, contexts, chat: bool) -> None:
        """One row per item: the context once, then every choice (but its last token), each choice
        seeing the context and itself only, its positions continuing from the context's end. The
        log-prob of choice c sums the predictions of its tokens: the first from the context's last
        position, the others from the choice's own previous token."""
        dev = self.model.device
        self.pairs: list[tuple[int, int]] = []  # (item index, choice index), one per scored choice
        rows = []
        for k, (it, ctx) in enumerate(zip(self.items, contexts)):
            if not it.choices or it.answer not in it.choices:
                raise ValueError(f"probe {self.probe.name!r} item {it.id!r}: likelihood mode needs 'choices' that "
                                 f"include the answer")
            seq, pos, segs, targets = list(ctx), list(range(len(ctx))), [], []
            for c, choice in enumerate(it.choices):
                cont = tok(choice if chat else " " + choice, add_special_tokens=False)["input_ids"]
                if not cont:
                    raise ValueError(f"probe {self.probe.name!r} item {it.id!r}: choice {choice!r} encodes to no tokens")
                start = len(seq)
                seq += cont[:-1]
                pos += range(len(ctx), len(ctx) + len(cont) - 1)
                segs.append((start, len(seq)))
                pair = len(self.pairs)
                self.pairs.append((k, c))
                targets += [(pair, len(ctx) - 1 if q == 0 else start + q - 1, t) for q, t in enumerate(cont)]
            rows.append((seq, pos, len(ctx), segs, targets))
        width = max(len(r[0]) for r in rows)
        B = len(rows)
        ids = torch.full((B, width), self.model._pad_id(), dtype=torch.long)
        positions = torch.zeros((B, width), dtype=torch.long)
        allowed = torch.zeros((B, width, width), dtype=torch.bool)
        pair_idx, row_idx, pos_idx, tgt = [], [], [], []
        for b, (seq, pos, n_ctx, segs, targets) in enumerate(rows):
            off = width - len(seq)
            ids[b, off:] = torch.tensor(seq)
            positions[b, off:] = torch.tensor(pos)
            allowed[b, off:off + n_ctx, off:off + n_ctx] = torch.ones(n_ctx, n_ctx, dtype=torch.bool).tril()
            for start, end in segs:
                n = end - start
                allowed[b, off + start:off + end, off:off + n_ctx] = True
                allowed[b, off + start:off + end, off + start:off + end] = torch.ones(n, n, dtype=torch.bool).tril()
            for pair, at, t in targets:
                pair_idx.append(pair)
                row_idx.append(b)
                pos_idx.append(off + at)
                tgt.append(t)
        self.ids, self.positions = ids.to(dev), positions.to(dev)
        self.prefix_mask = allowed.to(dev)
        self.full_mask = None
        self.pair_idx = torch.tensor(pair_idx, device=dev)
        self.row_idx = torch.tensor(row_idx, device=dev)
        self.pos_idx = torch.tensor(pos_idx, device=dev)
        self.targets = torch.tensor(tgt, device=dev)

    # identity prefix, advanced monotonically as configs are run in order of shared prefix
    def _prefix(self, slots: int, num_layers: int) -> torch.Tensor:
        engine = self.model.engine
        identity = list(range(num_layers))
        if self._h is None or slots < self._done:
            self._h = engine.embed(self.ids)
            self._done = 0
            if self.mode == "generate":
                self._cache = engine.new_cache(num_layers, self.ids.shape[0], self.capacity)
        if slots > self._done:
            self._h = engine.run_slots(self._h, self.positions, self.prefix_mask, identity, self._cache,
                                       self._done, slots)
            self._done = slots
        return self._h

    def run(self, config: SweepConfig, num_layers: int, reuse: bool) -> dict:
        engine = self.model.engine
        layers = list(config.layers)
        begin = config.shared_prefix(num_layers) if reuse else 0
        B, T = self.ids.shape
        h = self._prefix(begin, num_layers) if reuse else engine.embed(self.ids)
        cache = None
        if self.mode == "generate":
            cache = engine.new_cache(len(layers), B, self.capacity, self._cache if begin else None, begin)
        h = engine.run_slots(h, self.positions, self.prefix_mask, layers, cache, begin, len(layers))
        if self.mode == "likelihood":
            return self._likelihood(h)
        cache.advance(T)
        logits = engine.head(h[:, -1:])[:, -1].float()
        new = self.model._decode(logits, cache, layers, self.positions[:, -1:], self.full_mask,
                                 self.probe.max_new_tokens)
        outputs = [self.model._finish_text(row, []) for row in new.tolist()]
        scores = [float(self.probe.score(it, out)) for it, out in zip(self.items, outputs)]
        return {"scores": {it.id: s for it, s in zip(self.items, scores)},
                "outputs": {it.id: o for it, o in zip(self.items, outputs)}}

    def _likelihood(self, h: torch.Tensor) -> dict:
        engine = self.model.engine
        totals = torch.zeros(len(self.pairs), dtype=torch.float64, device=h.device)
        chunk = 512
        for a in range(0, self.row_idx.numel(), chunk):
            r, p, t = self.row_idx[a:a + chunk], self.pos_idx[a:a + chunk], self.targets[a:a + chunk]
            logp = torch.log_softmax(engine.head(h[r, p]).float(), dim=-1)
            totals.index_add_(0, self.pair_idx[a:a + chunk], logp.gather(-1, t.unsqueeze(-1)).squeeze(-1).double())
        totals = totals.tolist()
        per_item: dict[int, list[float]] = {}
        for (k, _c), v in zip(self.pairs, totals):
            per_item.setdefault(k, []).append(v)
        scores, margins = {}, {}
        for k, it in enumerate(self.items):
            lp = per_item[k]
            right = it.choices.index(it.answer)
            best_wrong = max(v for c, v in enumerate(lp) if c != right) if len(lp) > 1 else float("-inf")
            scores[it.id] = 100.0 if lp[right] > best_wrong else 0.0
            margins[it.id] = lp[right] - best_wrong
        return {"scores": scores, "margins": margins}


class _Runner:
    def __init__(self, model: Model, probes: list[Probe], mode: str, split: str, max_items: int | None,
                 chat: bool | None, reuse: bool):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if chat is None:
            chat = getattr(model.tokenizer, "chat_template", None) is not None
        self.model, self.mode, self.split, self.reuse = model, mode, split, reuse
        self.num_layers = model.num_layers
        self.batches = []
        for probe in probes:
            items = probe.items(split)
            if max_items is not None:
                items = items[:max_items]
            if not items:
                raise ValueError(f"probe {probe.name!r} has no {split} items")
            self.batches.append(_ProbeBatch(model, probe, items, mode, chat))

    def run(self, config: SweepConfig) -> dict:
        t0 = time.perf_counter()
        record = {"layers": config.key, "start": config.start, "end": config.end, "times": config.times,
                  "extra_layers": config.layers.extra_layers(self.num_layers), "split": self.split,
                  "mode": self.mode, "scores": {}}
        with torch.inference_mode():
            for b in self.batches:
                out = b.run(config, self.num_layers, self.reuse)
                record["scores"][b.probe.name] = out["scores"]
                for key in ("margins", "outputs"):
                    if key in out:
                        record.setdefault(key, {})[b.probe.name] = out[key]
        record["seconds"] = round(time.perf_counter() - t0, 4)
        return record


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="config", dynamic_ncols=True)


def run_configs(model: Model, probes: list[Probe], configs: list[SweepConfig], store: ResultStore | None,
                mode: str, split: str, max_items: int | None, chat: bool | None, reuse: bool, progress: bool,
                desc: str = "sweep") -> list[dict]:
    """Runs the configs not yet in the store (in shared-prefix order), appending each record as it finishes."""
    names = [p.name for p in probes]
    todo = [c for c in configs if store is None or not store.has(c.key, split, mode, names)]
    n = model.num_layers
    todo.sort(key=lambda c: (c.shared_prefix(n), c.key))
    records = []
    if not todo:
        return records
    runner = _Runner(model, probes, mode, split, max_items, chat, reuse)
    bar = _progress(len(todo), progress, desc)
    try:
        for config in todo:
            record = runner.run(config)
            if store is not None:
                store.append(record)
            records.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(config.key[:40])
    finally:
        if bar is not None:
            bar.close()
    return records


def resolve_probes(probes) -> list[Probe]:
    if isinstance(probes, str) or not isinstance(probes, Sequence):
        probes = [probes]
    out = [get_probe(p) for p in probes]
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ValueError(f"two probes share a name: {names}")
    if not out:
        raise ValueError("no probes given")
    return out


def sweep(model: Model, probes=("math", "eq", "reasoning"), block_sizes: Sequence[int] = (3, 4, 5),
          starts: Sequence[int] | None = None, stride: int = 1, times: Sequence[int] = (2,),
          paths: Sequence | None = None, strategy: str = "grid", mode: str = "generate", results=None,
          resume: bool = True, progress: bool = True, *, max_items: int | None = None, chat: bool | None = None,
          reuse: bool = True, refine_top: int = 3, refine_stride: int | None = None,
          by: str = "combined_delta") -> SweepResult:
    """Scores probes along many layer paths; returns a SweepResult (``.to_pandas()``, ``.heatmap()``...).

    model: a loaded Model. probes: built-in names ("math", "eq", "reasoning", "gsm8k"), .jsonl
    paths or Probe objects. strategy: "grid" (block_sizes x starts x times; starts default to every
    ``stride``-th layer), "scan" (every (i, j) with i < j), "refine" (a grid with stride
    ``refine_stride`` (default max(2, N // 8)), then stride-1 blocks within that distance of the
    ``refine_top`` best configs by ``by``), or "paths" (given ``paths``; implied when paths are given).
    mode: "generate" (greedy, chat template, parse, score) or "likelihood" (rank the answer among
    choices by log-probability: accuracy, plus the mean log-prob margin).
    results: a JSONL path; each finished config is appended and fsynced. resume=True skips configs
    the file already holds; resume=False starts the file afresh.
    max_items: use only the first n search items of each probe. chat: apply the chat template
    (default: when the tokenizer has one). reuse=False recomputes every path from the embedding
    (for checking and benchmarking the shared-prefix reuse).
    """
    if not isinstance(model, Model):
        raise TypeError(f"sweep() needs a circuit_finder Model (circuit_finder.load), got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    probe_list = resolve_probes(probes)
    n = model.num_layers
    if paths is not None:
        strategy = "paths"
    coarse_stride = refine_stride or max(2, n // 8)
    if strategy == "refine":
        configs = make_configs(n, "grid", block_sizes, starts, coarse_stride, times)
    else:
        configs = make_configs(n, strategy, block_sizes, starts, stride, times, paths)
    store = ResultStore.open(results, model=model, mode=mode, resume=resume) if results is not None else None
    records: list[dict] = []

    def run(batch: list[SweepConfig], desc: str) -> SweepResult:
        records.extend(run_configs(model, probe_list, batch, store, mode, "search", max_items, chat, reuse, progress,
                                   desc=desc))
        return SweepResult(store.records() if store is not None else records, num_layers=n, mode=mode,
                           path=store.path if store is not None else None, model=model, probes=probe_list, chat=chat)

    result = run([SweepConfig(LayerPath.identity(n)), *configs], "sweep")
    if strategy == "refine":
        coarse_keys = {c.key for c in configs}
        ranked = result.to_pandas()
        ranked = ranked[ranked["layers"].isin(coarse_keys)].sort_values(by, ascending=False)
        winners = [SweepConfig.of(LayerPath.parse(t), n) for t in ranked["layers"].head(refine_top)]
        fine = [c for c in refine_configs(n, winners, coarse_stride, times) if c.key not in coarse_keys]
        result = run(fine, "refine")
    return result
