"""sweep(): run probes along many layer paths and collect per-item scores.

The package, in the order a sweep flows through it:
- ``configs``: which paths (SweepConfig, make_configs for grid / scan / paths, refine_configs);
- ``runner``: scoring probes along paths with the shared identity prefix reused (run_configs);
- ``result``: SweepResult — the table, CIs, heatmap, and held-out ``validate``.
Records are stored by ``circuit_finder.results.ResultStore`` (crash-safe JSONL; resume skips
configs the file holds).

The protocol (``sweep(..., validate=k)`` runs all of it): search every config on the probes'
search items; select the top k by ``by``; re-score them and the baseline on held-out items no
search saw; read the held-out deltas (``<p>_val_delta`` with CIs, q over the k). ``refine`` ranks
the neighbours of the coarse winners on the same search items (their records say
``stage="refine"``): its search deltas are as optimistic as the coarse ones, and only the held-out
columns estimate a config's effect. ``SweepResult.report()`` says this with the numbers.

Limits: one model per process (Ray workers each load their own: sweep.distributed).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import numpy as np

from ..layer_path import LayerPath
from ..model import Model
from ..results import ResultStore
from ..router import run as routing
from ..router.run import RouterConfig
from .configs import MODES, STRATEGIES, SweepConfig, make_configs, refine_configs, rys_params, unique_configs
from .distributed import RayExecutor
from .result import SweepResult
from .runner import (
    THINK_TOKENS,
    ProbeBatch,
    Runner,
    check_max_items,
    resolve_chat,
    resolve_probes,
    run_configs,
    sweep_setup,
)
from .search import SEARCHES, beam_search, needs_sklearn, objective, surrogate_search
from .views import best_first

__all__ = ["MODES", "STRATEGIES", "THINK_TOKENS", "ProbeBatch", "RayExecutor", "Runner", "SweepConfig", "STAT_SUFFIXES", "SweepResult", "check_by", "check_placement",
           "make_configs", "refine_configs", "resolve_chat", "resolve_probes", "resolve_strategy", "run_configs", "rys_params", "sweep", "sweep_setup",
           "unique_configs"]


def sweep(model: Model, probes=("math", "eq", "reasoning"), block_sizes: Sequence[int] = (3, 4, 5),
          starts: Sequence[int] | None = None, stride: int = 1, times: Sequence[int] = (2,),
          paths: Sequence | None = None, strategy: str = "grid", mode: str = "generate", results=None,
          resume: bool = True, progress: bool = True, *, max_items: int | None = None, chat: bool | None = None,
          reuse: bool = True, refine_top: int = 3, refine_stride: int | None = None,
          by: str = "combined_delta", validate: int = 0, thinking: bool = False,
          think_tokens: int = THINK_TOKENS, budget: int | None = None, seed: int = 0,
          search: dict | None = None, executor=None) -> SweepResult:
    """Scores probes along many layer paths; returns a SweepResult (``.to_pandas()``, ``.heatmap()``...).

    model: a loaded Model. probes: built-in names ("math", "eq", "reasoning", "gsm8k", "instruct",
    "code"; the last two in generate mode only), .jsonl paths or Probe objects. strategy: "grid" (block_sizes x starts x times; starts default to every
    ``stride``-th layer), "scan" (every (i, j) with i < j), "refine" (a grid with stride
    ``refine_stride`` (default max(2, N // 8)), then stride-1 blocks within that distance of the
    ``refine_top`` best configs by ``by``), "paths" (given ``paths``, implied when given; Routers or
    "router:FILE" among them run each item along the path the router picks, rows
    ``router:NAME@digest``),
    "beam" (multi-block paths grown from the best single blocks) or "surrogate" (a model of the
    score picks what to evaluate) — both within ``budget`` configs, selecting on search items by
    ``by``, deterministic under ``seed``; ``search`` holds their options (beam: beam_width=8,
    depth=3, seeds=8, max_extra=None, skip=False, replace=False; surrogate: batch, kappa=1.0);
    see ``circuit_finder.sweep.search``.
    mode: "generate" (greedy, chat template, parse, score) or "likelihood" (rank the answer among
    choices by log-probability: accuracy, plus the mean log-prob margin).
    results: a JSONL path; each finished config is appended and fsynced. resume=True skips configs
    the file already holds (a file written for another model file, dtype, chat setting or
    template, answer budget or items is refused); resume=False starts the file afresh.
    max_items: use only the first n search items of each probe. chat: apply the chat template
    (default: when the tokenizer has one). reuse=False recomputes every path from the embedding
    (for checking and benchmarking the shared-prefix reuse).
    validate: after the search, re-score the top ``validate`` configs by ``by`` and the baseline on
    each probe's held-out items (``SweepResult.validate``); 0 = search only.
    thinking: False (default) sets the chat template's ``enable_thinking`` switch off where it has
    one; True leaves thinking on and gives each probe ``think_tokens`` more tokens. Either way
    <think>...</think> blocks are stripped before scoring.
    executor: None (this process), "ray" (Ray workers: the running Ray, RAY_ADDRESS, or a local
    one) or a ``RayExecutor(address=..., workers=...)``; records come back to this process, which
    alone writes ``results`` (see ``circuit_finder.sweep.distributed``).
    """
    if not isinstance(model, Model):
        raise TypeError(f"sweep() needs a circuit_finder Model (circuit_finder.load), got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    probe_list = resolve_probes(probes)
    n = model.num_layers
    strategy = resolve_strategy(strategy, paths, budget, search, times)
    check_placement(strategy, stride, starts, refine_stride)
    check_max_items(max_items)
    check_by(by, [p.name for p in probe_list], mode, strategy)
    coarse_stride = refine_stride or max(2, n // 8)
    if strategy in SEARCHES and (not budget or budget < 1):
        raise ValueError(f"strategy {strategy!r} needs budget=N (configs to evaluate, N >= 1)")
    if strategy == "surrogate":
        needs_sklearn()  # before the baseline runs, not after
    configs, routers = _first_configs(model, strategy, block_sizes, starts, stride, coarse_stride, times, paths)
    ex = resolve_executor(executor)
    store = None
    if results is not None:
        setup = sweep_setup(model, probe_list, chat, max_items, thinking, think_tokens, mode=mode)
        store = ResultStore.open(results, model=model, mode=mode, resume=resume, setup=setup,
                                 record={"max_items": max_items})
    records: list[dict] = []

    def run(batch: list[SweepConfig], desc: str) -> SweepResult:
        records.extend(run_configs(model, probe_list, batch, store, mode, "search", max_items, chat, reuse, progress,
                                   desc=desc, thinking=thinking, think_tokens=think_tokens, executor=ex))
        return SweepResult(store.records() if store is not None else records, num_layers=n, mode=mode,
                           path=store.path if store is not None else None, model=model, probes=probe_list, chat=chat,
                           thinking=thinking, think_tokens=think_tokens, routers=routers, executor=ex)

    with ex.session() if ex is not None else contextlib.nullcontext():  # Ray workers kept over the stages
        result = run([SweepConfig(LayerPath.identity(n)), *configs], "sweep")
        if strategy == "refine":
            result = run(_refine_pass(result, configs, n, refine_top, coarse_stride, times, by), "refine")
        if strategy in SEARCHES:
            result = _search(strategy, run, n, by, budget, seed, dict(search or {}), block_sizes, coarse_stride, times,
                             [p.name for p in probe_list])
        if validate:
            result.validate(validate, by=by, progress=progress)
    return result


def resolve_strategy(strategy: str, paths, budget, search, times) -> str:
    """The strategy that runs ("paths" when paths= is given to the default grid); options of
    another strategy are refused, not dropped."""
    if paths is not None:
        if strategy not in ("grid", "paths"):  # grid: the default, which paths= replaces
            raise ValueError(f"paths= runs the given paths (strategy 'paths'); strategy {strategy!r} does not take "
                             "them")
        strategy = "paths"
    if strategy not in SEARCHES and (budget is not None or search):
        raise ValueError(f"budget= and search= apply to strategies {' and '.join(SEARCHES)}, not {strategy!r}")
    if strategy == "beam" and tuple(times) != (2,):
        raise ValueError(f"strategy 'beam' grows blocks that run twice; times={tuple(times)} applies to grid, scan, "
                         "refine and surrogate")
    return strategy


def resolve_executor(executor) -> RayExecutor | None:
    """None / "local" -> None (this process); "ray" -> RayExecutor(); a RayExecutor as is."""
    if executor is None or executor == "local":
        return None
    if executor == "ray":
        return RayExecutor()
    if isinstance(executor, RayExecutor):
        return executor
    raise ValueError(f"executor must be None, 'local', 'ray' or a RayExecutor, got {executor!r}")


STAT_SUFFIXES = r"(?:_delta|_ci_low|_ci_high|_p|_q|_holm)?"  # what to_pandas() puts after a score's name


def check_by(by: str, probes: Sequence[str], mode: str, strategy: str = "grid") -> None:
    """Refuses, before anything runs, a ``by`` that names no search column of this sweep's table
    (``<probe>`` or combined, with _delta / _ci_low / _ci_high / _p / _q / _holm; _margin / _norm
    ones in likelihood mode, _parse in generate mode; seconds, extra_layers) or, for beam and
    surrogate, one they cannot optimise (only combined_delta and <probe>_delta)."""
    names = "|".join(re.escape(p) for p in probes)
    if strategy in SEARCHES:
        if not re.fullmatch(f"(?:combined|{names})_delta", by):
            raise ValueError(f"by={by!r}: strategy {strategy!r} optimises combined_delta or <probe>_delta "
                             f"(probes: {', '.join(probes)})")
        return
    extra = r"(?:_margin|_norm)" if mode == "likelihood" else "(?!)"
    if by in ("seconds", "extra_layers") or re.fullmatch(f"(?:combined|{names}){STAT_SUFFIXES}", by) or \
            re.fullmatch(f"(?:{names}){extra}{STAT_SUFFIXES}", by) or (mode == "generate" and re.fullmatch(f"(?:{names})_parse", by)):
        return
    raise ValueError(f"by={by!r} is not a search column of a mode={mode!r} sweep of {', '.join(probes)}: use "
                     f"combined_delta, <probe>[_delta|_ci_low|_ci_high|_p|_q|_holm]"
                     + (", <probe>_margin... / _norm..." if mode == "likelihood" else ", <probe>_parse"))


def check_placement(strategy: str, stride: int, starts, refine_stride: int | None) -> None:
    """Refuses block placement options the strategy would ignore: refine, beam and surrogate place
    their first blocks every ``refine_stride`` layers (beam and surrogate at every start)."""
    coarse = ("refine", *SEARCHES)
    if strategy in coarse and stride != 1:
        raise ValueError(f"strategy {strategy!r} places its first blocks every refine_stride layers; stride= applies "
                         f"to grid and scan (pass refine_stride={stride})")
    if strategy in SEARCHES and starts is not None:
        raise ValueError(f"strategy {strategy!r} tries blocks at every start; starts= applies to grid, scan and refine")
    if refine_stride is not None and (isinstance(refine_stride, bool) or not isinstance(refine_stride, int)
                                      or refine_stride < 1):
        raise ValueError(f"refine_stride must be a whole number >= 1, got {refine_stride!r}")
    if strategy not in coarse and refine_stride is not None:
        raise ValueError(f"refine_stride= applies to strategies refine, beam and surrogate, not {strategy!r} "
                         f"(grid and scan take stride=)")


def _first_configs(model: Model, strategy: str, block_sizes, starts, stride: int, coarse_stride: int, times,
                   paths) -> tuple[list, dict]:
    """The configs a strategy runs before any result is known, and {key: Router} of the routers
    given among ``paths`` (run as RouterConfigs)."""
    n = model.num_layers
    if strategy in SEARCHES:
        return [], {}
    if strategy == "refine":
        return make_configs(n, "grid", block_sizes, starts, coarse_stride, times), {}
    if strategy != "paths":
        return make_configs(n, strategy, block_sizes, starts, stride, times, paths), {}
    routers = {r.key: r for r in (model.router(p) for p in paths or () if routing.is_router(p))}
    plain = [p for p in paths or () if not routing.is_router(p)]
    if not plain and not routers:
        raise ValueError("strategy 'paths' needs paths=[...]")
    identity = str(LayerPath.identity(n))  # the baseline runs first anyway: given again, it would run twice
    configs = [c for c in make_configs(n, "paths", paths=plain) if c.key != identity] if plain else []
    return configs + [RouterConfig(r) for r in routers.values()], routers


def _search(strategy: str, run, n: int, by: str, budget: int, seed: int, options: dict,
            block_sizes: Sequence[int], coarse_stride: int, times: Sequence[int],
            probes: Sequence[str]) -> SweepResult:
    """Runs beam or surrogate search through ``run`` (the sweep's runner and store) on this sweep's
    ``probes`` (a resumed file's records of one config merged); the result carries the search's
    log (``result.search_log``)."""
    state = {"result": None}
    base_key = str(LayerPath.identity(n))

    def evaluate(configs: list[SweepConfig]) -> dict[str, float]:
        state["result"] = result = run(configs, strategy)
        recs = result.configs("search")
        return {c.key: objective(recs[c.key], recs[base_key], by, probes, c.key) for c in configs}

    if strategy == "beam":
        unknown = set(options) - {"beam_width", "depth", "seeds", "max_extra", "skip", "replace"}
        if unknown:
            raise ValueError(f"unknown beam search options: {', '.join(sorted(unknown))}")
        _, log = beam_search(n, evaluate, budget, block_sizes, coarse_stride, **options)
    else:
        unknown = set(options) - {"batch", "kappa"}
        if unknown:
            raise ValueError(f"unknown surrogate search options: {', '.join(sorted(unknown))}")
        candidates = make_configs(n, "scan", times=times)
        initial = make_configs(n, "grid", block_sizes, None, coarse_stride, times)
        initial = [initial[k] for k in np.random.default_rng(seed).permutation(len(initial))]
        _, log = surrogate_search(n, evaluate, budget, candidates, initial, seed=seed, **options)
    result = state["result"] or run([], strategy)
    result.search_log = log
    return result


def _refine_pass(result: SweepResult, coarse: list[SweepConfig], n: int, top: int, radius: int,
                 times: Sequence[int], by: str) -> list[SweepConfig]:
    """Stride-1 neighbours of the ``top`` best coarse configs by ``by``, not already run."""
    coarse_keys = {c.key for c in coarse}
    ranked = result.to_pandas()
    ranked = best_first(ranked[ranked["layers"].isin(coarse_keys)], by)
    winners = [SweepConfig.of(LayerPath.parse(t), n) for t in ranked["layers"].head(top)]
    return [c for c in refine_configs(n, winners, radius, times) if c.key not in coarse_keys]
