"""Search beyond the grid: beam search over multi-block layer programs, and a surrogate model that
spends a budget of evaluations where it expects the best configs.

A ``Program`` is a set of edits to the identity path — repeated blocks ``(i, j)`` (layers i..j-1
run once more right after layer j-1; a block listed twice runs three times), skipped layers, and
replaced layers (layer k's slot runs layer m) — turned into one layer path by ``Program.path``.
A single repeat (i, j) is the RYS config (i, j).

Both strategies score configs through an ``evaluate(configs) -> {key: objective}`` callback (the
sweep runner; configs the results file already holds cost no compute), select on search items
only, and count every distinct non-baseline config they look at against ``budget`` — also those
found in the file — so a killed run, resumed, replays the same decisions and stops at the same
point. Both are deterministic under ``seed``.

- ``beam_search``: depth 1 is a grid of single blocks (the seeds); each further depth adds one edit
  (a repeat of one of the ``seeds`` best single blocks, and opt-in skips / replacements) to each of
  the ``beam_width`` best programs so far, never a path seen before, within ``max_extra`` extra
  layers; candidates are tried best-first by the sum of their edits' single-block scores.
- ``surrogate_search``: an initial design (a coarse grid of single blocks), then rounds that fit an
  ensemble regressor (scikit-learn's random forest) on per-layer features — how often each layer
  runs, where blocks start and end, extra layers — and evaluate the candidates with the best upper
  bound (mean + ``kappa`` x spread over the trees). Each round's held-out rank correlation
  (Spearman, 5-fold) is logged.

Limits: candidates for the surrogate are the single-block (i, j) configs of ``times``, plus any
``paths`` given; the objective is a ``<probe>_delta`` / ``combined_delta`` mean (no bootstrap).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..layer_path import LayerPath
from .configs import SweepConfig

__all__ = ["SEARCHES", "needs_sklearn", "Program", "SearchLog", "beam_search", "objective", "path_features", "surrogate_search"]

SEARCHES = ("beam", "surrogate")

Evaluate = Callable[[list[SweepConfig]], dict[str, float]]


@dataclass(frozen=True, order=True)
class Program:
    """Edits to the identity path of ``n`` layers (see the module docstring)."""

    n: int
    repeats: tuple[tuple[int, int], ...] = ()
    skips: tuple[int, ...] = ()
    replaces: tuple[tuple[int, int], ...] = ()

    def with_edit(self, kind: str, edit) -> Program:
        if kind == "repeat":
            return Program(self.n, tuple(sorted([*self.repeats, edit])), self.skips, self.replaces)
        if kind == "skip":
            return Program(self.n, self.repeats, tuple(sorted({*self.skips, edit})), self.replaces)
        return Program(self.n, self.repeats, self.skips, tuple(sorted({*self.replaces, edit})))

    def path(self) -> LayerPath:
        runs = {k: m for k, m in self.replaces}
        units: list[list[int]] = [[] if k in self.skips else [runs.get(k, k)] for k in range(self.n)]
        for i, j in self.repeats:
            units[j - 1].extend(range(i, j))
        return LayerPath([layer for unit in units for layer in unit])

    @cached_property
    def config(self) -> SweepConfig:
        """The program's path as a sweep config (built once: searches ask for it often)."""
        return SweepConfig.of(self.path(), self.n)

    @property
    def key(self) -> str:
        return self.config.key


@dataclass
class SearchLog:
    """What a search did: configs in the order it looked at them, their objectives, and per round
    (surrogate) or depth (beam) the best objective so far (and the surrogate's rank correlation)."""

    looked: list[str]
    rounds: list[dict]
    scores: dict[str, float]

    def best_so_far(self) -> list[float]:
        """Best objective after each config looked at (a "best found vs evaluations" curve)."""
        out, best = [], -np.inf
        for key in self.looked:
            best = max(best, self.scores.get(key, -np.inf))
            out.append(best)
        return out

    def plot(self, ax=None, label: str | None = None):
        """The best objective found vs configs evaluated, as a matplotlib Figure; pass ``ax`` to
        draw several searches on one axes (each with its ``label``)."""
        if ax is None:
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(6, 4), layout="constrained")
            plt.close(fig)  # shown once by notebooks, never leaked (as SweepResult.heatmap)
            ax = fig.add_subplot()
        curve = self.best_so_far()
        ax.step(range(1, len(curve) + 1), curve, where="post", label=label)
        ax.set_xlabel("configs evaluated")
        ax.set_ylabel("best objective found (search items)")
        if label:
            ax.legend()
        return ax.figure


def objective(record: dict, base: dict, by: str, probes: Sequence[str] | None = None, name: str = "") -> float:
    """A config's search objective from its record and the baseline's: ``combined_delta`` (the mean
    over ``probes``, default the baseline's, of the paired mean difference) or ``<probe>_delta``.
    A probe either record lacks is a ValueError naming the config (``name``)."""
    if not by.endswith("_delta"):
        raise ValueError(f"beam and surrogate search optimise a '<probe>_delta' or 'combined_delta', not {by!r}")
    stem = by[: -len("_delta")]
    probes = (list(base["scores"]) if probes is None else list(probes)) if stem == "combined" else [stem]
    deltas = []
    for p in probes:
        mine, theirs = record["scores"].get(p), base["scores"].get(p)
        if not mine or not theirs:
            raise ValueError(f"no scores of probe {p!r} for {'the baseline' if mine else name or 'this config'} "
                             f"to optimise {by!r} (a results file resumed with other probes?)")
        common = sorted(set(mine) & set(theirs))
        deltas.append(float(np.mean([mine[i] - theirs[i] for i in common])))
    return float(np.mean(deltas))


class _Budget:
    """Scores configs through ``evaluate``, at most ``budget`` distinct ones, each once."""

    def __init__(self, evaluate: Evaluate, budget: int):
        self.evaluate, self.budget = evaluate, budget
        self.scores: dict[str, float] = {}
        self.log = SearchLog([], [], self.scores)

    @property
    def left(self) -> int:
        return self.budget - len(self.scores)

    def score(self, configs: Sequence[SweepConfig]) -> dict[str, float]:
        fresh, seen = [], set(self.scores)
        for c in configs:
            if c.key not in seen and len(fresh) < self.left:
                fresh.append(c)
                seen.add(c.key)
        if fresh:
            got = self.evaluate(fresh)
            for c in fresh:
                self.scores[c.key] = float(got[c.key])
                self.log.looked.append(c.key)
        return {c.key: self.scores[c.key] for c in configs if c.key in self.scores}


def _seed_blocks(n: int, block_sizes: Sequence[int], stride: int) -> list[tuple[int, int]]:
    return [(i, i + b) for b in block_sizes for i in range(0, n - b + 1, stride)]


def _expansions(p: Program, pool: list[tuple[int, int]], skip: bool, replace: bool) -> list[tuple[str, object]]:
    edits: list[tuple[str, object]] = [("repeat", blk) for blk in pool]
    if skip:
        edits += [("skip", k) for k in range(1, p.n - 1) if k not in p.skips]
    if replace:
        edits += [("replace", (k, m)) for k in range(1, p.n - 1) for m in (k - 1, k + 1) if (k, m) not in p.replaces]
    return edits


def beam_search(n: int, evaluate: Evaluate, budget: int, block_sizes: Sequence[int] = (2, 3, 4, 6),
                stride: int = 2, beam_width: int = 8, depth: int = 3, seeds: int = 8, max_extra: int | None = None,
                skip: bool = False, replace: bool = False) -> tuple[dict[str, float], SearchLog]:
    """Beam search over programs (see the module docstring); returns (objective per config key, log)."""
    if budget < 1 or beam_width < 1 or depth < 1 or seeds < 1 or stride < 1:
        raise ValueError("beam search needs budget, beam_width, depth, seeds and the seed stride >= 1")
    blocks = [blk for blk in _seed_blocks(n, block_sizes, stride) if max_extra is None or blk[1] - blk[0] <= max_extra]
    if not blocks:
        raise ValueError(f"beam search has no seed block: block sizes {list(block_sizes)} every {stride} layers of "
                         f"{n}" + (f" within max_extra={max_extra}" if max_extra is not None else ""))
    run = _Budget(evaluate, budget)
    singles = {blk: Program(n, (blk,)) for blk in blocks}
    got = run.score([p.config for p in singles.values()])
    single_score = {blk: got[p.key] for blk, p in singles.items() if p.key in got}
    pool = sorted(single_score, key=lambda b: (-single_score[b], b))[:seeds]
    programs = {singles[b].key: singles[b] for b in single_score}
    beam = sorted(programs.values(), key=lambda p: (-run.scores[p.key], p))[:beam_width]
    run.log.rounds.append({"depth": 1, "evaluated": len(run.scores), "best": max(run.scores.values(), default=None)})
    for d in range(2, depth + 1):
        if run.left <= 0 or not beam:
            break
        candidates: dict[str, tuple[float, Program]] = {}
        for p in beam:
            for kind, edit in _expansions(p, pool, skip, replace):
                q = p.with_edit(kind, edit)
                key = q.key
                extra = len(q.config.layers) - n
                if key in run.scores or key in candidates or (max_extra is not None and extra > max_extra) or \
                        list(q.config.layers) == list(range(n)):  # (a skip refilled by a repeat: the baseline)
                    continue
                prior = sum(single_score.get(blk, 0.0) for blk in q.repeats)
                candidates[key] = (prior, q)
        ranked = sorted(candidates.values(), key=lambda t: (-t[0], t[1]))
        run.score([q.config for _, q in ranked])
        programs.update({q.key: q for _, q in ranked if q.key in run.scores})
        beam = sorted((p for p in programs.values() if len(p.repeats) + len(p.skips) + len(p.replaces) == d),
                      key=lambda p: (-run.scores[p.key], p))[:beam_width]
        run.log.rounds.append({"depth": d, "evaluated": len(run.scores), "best": max(run.scores.values())})
    return run.scores, run.log


def path_features(path: Sequence[int], n: int) -> np.ndarray:
    """Per-layer features of a path: how often each layer runs, where repeated blocks start and
    end (a slot whose layer does not follow the previous slot's), and the extra layer count."""
    counts = np.bincount(np.asarray(list(path), dtype=np.int64), minlength=n)[:n].astype(np.float64)
    starts, ends = np.zeros(n), np.zeros(n)
    layers = list(path)
    for a, b in zip(layers, layers[1:]):
        if b != a + 1:
            ends[a] += 1
            starts[b] += 1
    return np.concatenate([counts, starts, ends, [len(layers) - n]])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    rho = spearmanr(a, b).statistic
    return float(rho) if np.isfinite(rho) else float("nan")


def _cv_rho(x: np.ndarray, y: np.ndarray, make_model, seed: int) -> float:
    """5-fold held-out Spearman rho of the surrogate's predictions (nan with too few points)."""
    if len(y) < 10:
        return float("nan")
    order = np.random.default_rng(seed).permutation(len(y))
    pred = np.empty(len(y))
    for fold in np.array_split(order, 5):
        train = np.setdiff1d(order, fold)
        pred[fold] = make_model().fit(x[train], y[train]).predict(x[fold])
    return _spearman(pred, y)


def needs_sklearn() -> None:
    """ImportError naming the extra to install when scikit-learn (the surrogate's forest) is missing."""
    try:
        import sklearn  # noqa: F401
    except ImportError as e:
        raise ImportError("strategy='surrogate' needs scikit-learn: pip install 'circuit-finder[search]' "
                          "(from a source checkout: pip install --no-build-isolation '.[search]')") from e


def surrogate_search(n: int, evaluate: Evaluate, budget: int, candidates: Sequence[SweepConfig],
                     initial: Sequence[SweepConfig], batch: int | None = None, kappa: float = 1.0,
                     seed: int = 0) -> tuple[dict[str, float], SearchLog]:
    """Initial design, then rounds of fit -> upper bound -> evaluate (see the module docstring)."""
    needs_sklearn()
    from sklearn.ensemble import RandomForestRegressor

    if budget < 1:
        raise ValueError("surrogate search needs budget >= 1")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"surrogate batch must be a whole number >= 1 (configs per round), got {batch!r}")
    if not np.isfinite(kappa):
        raise ValueError(f"surrogate kappa must be finite, got {kappa!r}")
    run = _Budget(evaluate, budget)
    run.score(list(initial)[: max(1, min(len(initial), budget // 3))])
    pool = {c.key: c for c in candidates}
    feats = {key: path_features(c.layers, n) for key, c in pool.items()}
    step = batch or max(1, budget // 10)

    def make_model():
        return RandomForestRegressor(n_estimators=100, min_samples_leaf=2, random_state=seed, n_jobs=1)

    while run.left > 0:
        seen = [k for k in run.scores if k in feats]
        todo = [k for k in pool if k not in run.scores]
        if not todo:
            break
        x, y = np.stack([feats[k] for k in seen]), np.array([run.scores[k] for k in seen])
        model = make_model().fit(x, y)
        per_tree = np.stack([t.predict(np.stack([feats[k] for k in todo])) for t in model.estimators_])
        upper = per_tree.mean(0) + kappa * per_tree.std(0)
        chosen = [todo[i] for i in np.lexsort((np.arange(len(todo)), -upper))[:step]]
        run.log.rounds.append({"round": len(run.log.rounds) + 1, "evaluated": len(run.scores),
                               "best": float(y.max()), "rho": _cv_rho(x, y, make_model, seed)})
        if not run.score([pool[k] for k in chosen]):
            break  # (cannot happen with batch >= 1; never loop without scoring)
    return run.scores, run.log
