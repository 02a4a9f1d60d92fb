"""SweepResult: the records of a sweep as a researcher reads them — a pandas table with paired
bootstrap CIs, p-values and q-values (``to_pandas``, ``top``), ``report`` (the protocol's reading
in words), heatmaps (matplotlib, and plotly with hover details), the Pareto front over several
probes, ``validate`` (the winners re-scored on held-out items with the runner) and ``evaluate``
(lm-eval tasks on the winners, paired per sample). It lives beside the runner so results.py stays
free of models.

Limits: statistics are per config against the identity baseline, adjusted across the configs of
one table (search, validation and benchmark separately); cached until the records change.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..layer_path import LayerPath
from ..results import ResultStore, paired_stats, read_records
from ..router.run import RouterConfig
from .benchmark import BENCHMARK_SPLIT, benchmark_settings, run_benchmark
from .configs import SweepConfig
from .runner import (
    THINK_TOKENS,
    item_digest,
    model_setup,
    prompting_setup,
    resolve_chat,
    resolve_probes,
    run_configs,
)
from .views import best_first, pareto_front, plotly_heatmap, tested_rows

__all__ = ["SweepResult"]


class SweepResult:
    """The records of a sweep. ``to_pandas()`` for a table, ``heatmap()``, ``top()``, ``validate()``."""

    def __init__(self, records: list[dict], num_layers: int, mode: str | None = None, path: Path | None = None,
                 model=None, probes=None, chat: bool | None = None, thinking: bool = False,
                 think_tokens: int = THINK_TOKENS, routers: dict | None = None, executor=None):
        self.records = list(records)
        self.executor = executor  # where validate() and run_held_out() run configs (None: this process)
        self.routers = dict(routers or {})  # router key -> Router, for routers this sweep ran as configs
        self._stats_cache: dict[tuple, dict] = {}
        self.num_layers = num_layers
        self.mode = mode or (self.records[0].get("mode") if self.records else None)
        self.path = Path(path) if path is not None else None
        self.model = model
        self.probes = probes
        self.chat = resolve_chat(model, chat) if chat is None and model is not None else chat  # (as the runner read it)
        self.thinking = thinking
        self.think_tokens = think_tokens
        self.search_log = None  # set by strategy="beam" / "surrogate": what the search looked at, per round
        self.shown_benchmark = None  # the settings of the last evaluate() call: the benchmark columns show them

    def __repr__(self) -> str:
        n = len(self._split("search"))
        return f"SweepResult({n} configs, mode={self.mode}, {self.num_layers} layers, file={self.path})"

    def __len__(self) -> int:
        return len(self._split("search"))

    @classmethod
    def load(cls, path: str | Path) -> SweepResult:
        """Reads a results file written by sweep() (torn or corrupt lines are skipped with a warning)."""
        header, records = read_records(path)
        if header is None:
            raise ValueError(f"{path}: not a circuit-finder sweep file (no header line)")
        return cls(records, num_layers=int(header["num_layers"]), mode=header.get("mode"), path=Path(path),
                   chat=header.get("chat"), thinking=bool(header.get("thinking", False)),
                   think_tokens=int(header.get("think_tokens", THINK_TOKENS)))

    # -------------------------------------------------------------- tables
    def configs(self, split: str = "search", routers: bool = False) -> dict[str, dict]:
        """layers -> the config's record in a split (several records of one config merged: per-item
        scores, margins, outputs, parse flags). Records a router evaluation wrote for its router
        (stage "router", layers "router:...") only with ``routers=True``: they are not configs of
        the tables (a router given in ``sweep(paths=...)`` is)."""
        return self._split(split, routers)

    def _split(self, split: str, routers: bool = False) -> dict[str, dict]:
        """layers -> record (later records of the same config extend or replace earlier ones). The
        benchmark split holds only the records of the latest evaluate() settings: a config scored
        under other settings (few-shot count, limit, tasks) is not paired with that baseline."""
        out: dict[str, dict] = {}
        latest = self.benchmark_settings() if split == BENCHMARK_SPLIT else None
        for r in self.records:
            if r.get("split", "search") != split or (self.mode and r.get("mode", self.mode) != self.mode):
                continue
            if latest is not None and _settings_of(r) != latest:
                continue
            if not routers and r.get("stage") == "router" and r["layers"].startswith("router:"):
                continue
            if r["layers"] in out:
                merged = dict(out[r["layers"]])
                for key in ("scores", "scores_norm", "margins", "outputs", "parsed", "routes"):
                    if key in r:
                        merged[key] = {**merged.get(key, {}), **r[key]}
                if r.get("in_sample"):  # a router's trained-on items: other probes' add up, a re-run's replace
                    before = int(out[r["layers"]].get("in_sample") or 0)
                    fresh = not set(r["scores"]) & set(out[r["layers"]]["scores"])
                    merged["in_sample"] = before + r["in_sample"] if fresh else max(before, r["in_sample"])
                out[r["layers"]] = merged
            else:
                out[r["layers"]] = r
        return out

    def benchmark_settings(self) -> str | None:
        """The lm-eval settings (tasks, limit, metrics, arguments) the benchmark columns show: the last
        evaluate() call's, else (a result read from a file) the newest benchmark record's; None before any."""
        if self.shown_benchmark is not None:
            return self.shown_benchmark
        bench = [r for r in self.records if r.get("split") == BENCHMARK_SPLIT]
        return _settings_of(bench[-1]) if bench else None

    def probe_names(self, split: str | None = None) -> list[str]:
        """Probe names in the records (of one split; default every split but the benchmark's)."""
        names: list[str] = []
        for r in self.records:
            here = r.get("split", "search")
            if (split is None and here == BENCHMARK_SPLIT) or (split is not None and here != split):
                continue
            for p in r["scores"]:
                if p not in names:
                    names.append(p)
        return names

    def _baseline_key(self) -> str:
        return str(LayerPath.identity(self.num_layers))

    def _stats(self, split: str, n_boot: int, seed: int, suffix: str) -> dict[str, dict]:
        """paired_stats of a split, cached while the records are unchanged (top, heatmap and the CLI
        ask for the same table several times)."""
        key = (split, n_boot, seed, suffix, len(self.records), id(self.records),
               self.benchmark_settings() if split == BENCHMARK_SPLIT else None)
        if key not in self._stats_cache:
            recs = self._split(split)
            names = list(dict.fromkeys(p for r in recs.values() for p in r["scores"]))  # (the latest benchmark's)
            combined = None
            if self.probes and split != BENCHMARK_SPLIT:  # a resumed file's other probes are shown, not combined
                mine = {getattr(p, "name", p) for p in self.probes}
                combined = [p for p in names if p in mine]
            untested = [k for k, r in recs.items() if r.get("in_sample")]  # trained on these items: not a test
            self._stats_cache[key] = paired_stats(recs, self._baseline_key(), names, n_boot, seed, suffix, combined,
                                                  untested)
        return self._stats_cache[key]

    def to_pandas(self, n_boot: int = 2000, seed: int = 0):
        """One row per config (baseline included, flagged): layers, start, end, times, extra_layers, per
        probe <p>, <p>_delta, <p>_ci_low, <p>_ci_high, <p>_p, <p>_q (BH), <p>_holm (and <p>_margin,
        <p>_margin_delta ... in likelihood mode; <p>_parse, the parse rate, in generate mode),
        combined (+ _delta/_ci_low/_ci_high/_p), seconds, in_sample (a router row's search items it
        was trained on: its scores there are optimistic); plus <p>_val... columns for configs that
        validate() re-scored on held-out items, and <task>_<metric>_bench... for configs evaluate()
        ran lm-eval tasks on."""
        import pandas as pd

        recs = self._split("search")
        stats = self._stats("search", n_boot, seed, "")
        val = self._stats("validation", n_boot, seed, "_val")
        bench = self._stats(BENCHMARK_SPLIT, n_boot, seed, "_bench")
        base_key = self._baseline_key()
        rows = []
        for key, r in recs.items():
            rows.append({"layers": key, "start": r.get("start"), "end": r.get("end"), "times": r.get("times"),
                         "extra_layers": r.get("extra_layers"), "baseline": key == base_key,
                         "stage": r.get("stage", "sweep"), "in_sample": int(r.get("in_sample") or 0), **stats[key],
                         **val.get(key, {}), **bench.get(key, {}), "seconds": r.get("seconds")})
        df = pd.DataFrame(rows)
        if df.empty:
            return df
        for col in ("start", "end", "times", "extra_layers"):
            df[col] = df[col].astype("Int64")
        return df

    def top(self, k: int = 10, by: str = "combined_delta", n_boot: int = 2000, seed: int = 0):
        """The k best configs by a column (the baseline and in-sample router rows, scored on items
        their router trained on, excluded), best first: largest first; by a p- or q-value column
        (``_p``, ``_q``, ``_holm``), the configs better than the baseline first, smallest p first
        (``views.best_first``)."""
        df = self.to_pandas(n_boot=n_boot, seed=seed)
        if df.empty:
            return df
        if by not in df.columns:
            raise ValueError(f"no column {by!r}; columns: {', '.join(df.columns)}")
        return best_first(tested_rows(df), by).head(k).reset_index(drop=True)

    def per_item(self, split: str = "search"):
        """One row per (config, probe, item) of a split ("search", "validation" or "benchmark"):
        layers, baseline, stage, probe, item, score (0-100), base_score (the baseline's on that item),
        delta; in likelihood mode margin and norm (the length-normalised score); in generate mode
        parsed and output (the text scored); route where a router chose the path. For looking at
        which items a config changed (``df[df.delta != 0]``), or for other statistics."""
        import pandas as pd

        recs, base_key = self._split(split), self._baseline_key()
        base = recs.get(base_key, {}).get("scores", {})
        extra = {"margins": "margin", "scores_norm": "norm", "parsed": "parsed", "outputs": "output",
                 "routes": "route"}
        rows = []
        for key, r in recs.items():
            for probe, scores in r["scores"].items():
                for item, score in scores.items():
                    was = base.get(probe, {}).get(item, np.nan)
                    row = {"layers": key, "baseline": key == base_key, "stage": r.get("stage", "sweep"),
                           "probe": probe, "item": item, "score": score, "base_score": was, "delta": score - was}
                    for field, column in extra.items():
                        if probe in r.get(field, {}):
                            row[column] = r[field][probe].get(item)
                    rows.append(row)
        return pd.DataFrame(rows)

    # -------------------------------------------------------------- the honest reading
    def report(self, by: str = "combined_delta", n_boot: int = 2000) -> str:
        """The sweep read as the protocol means it, in words and numbers: what was searched on how
        many items, the best search result with its CI and multiplicity-adjusted q, parse rates,
        and — once ``validate`` has run — the selected configs' held-out deltas with CIs."""
        df = self.to_pandas(n_boot=n_boot)
        if df.empty:
            return "no configs yet"
        if by not in df.columns:
            raise ValueError(f"no column {by!r}; columns: {', '.join(df.columns)}")
        return "\n".join([*self._report_search(df, by), *self._report_parse(df), *self._report_validation(df, by)])

    def item_counts(self, split: str = "search") -> str:
        """"math 6, eq 6": each probe's item count in a split, from the baseline's record."""
        rec = self._split(split).get(self._baseline_key())
        if rec is None:
            return "none"
        return ", ".join(f"{p} {len(v)}" for p, v in rec["scores"].items())

    def _report_search(self, df, by: str) -> list[str]:
        others = df[~df["baseline"]]
        fair = tested_rows(df)
        n = len(others)
        lines = [f"Search: {n} configs and the baseline, mode={self.mode}, on search items ({self.item_counts('search')})."]
        refined = int((others["stage"] == "refine").sum())
        if refined:
            lines.append(f"  {refined} of them come from refine, chosen by looking at the coarse configs' scores on "
                         f"these same items.")
        trained = [k for k, r in self._split("search").items() if r.get("in_sample")]
        if trained:
            lines.append(f"  {', '.join(trained)}: a router scored on search items it was trained on: its row is "
                         f"in-sample (optimistic), not a finding; read it on held-out items.")
        searched = sorted(set(others["stage"]) - {"sweep", "refine"})
        if searched:
            lines.append(f"  Configs of a {' / '.join(searched)} search were chosen by looking at earlier configs' scores "
                         f"on these same items, among more candidates than were run: q adjusts for the {len(fair)} "
                         f"run only, so it understates the selection.")
        if fair.empty:
            return lines
        n = len(fair)
        best = best_first(fair, by).iloc[0]
        stem = by[:-len("_delta")] if by.endswith("_delta") else None
        if stem and f"{stem}_q" in best:
            lines.append(f"  Best by {by}: {best['layers']}: {best[by]:+.2f} (95% CI {best[f'{stem}_ci_low']:+.2f} to "
                         f"{best[f'{stem}_ci_high']:+.2f}, unadjusted: it does not account for picking the best of "
                         f"{n}), p={best[f'{stem}_p']:.3g}, q={best[f'{stem}_q']:.3g} (Benjamini-Hochberg over {n} "
                         f"configs).")
            up, down = fair[by] > 0, fair[by] < 0
            sig, fw = fair[f"{stem}_q"] < 0.05, fair[f"{stem}_holm"] < 0.05
            lines.append(f"  q < 0.05 (false discovery rate 5%): {int((sig & up).sum())} of {n} configs better than "
                         f"the baseline, {int((sig & down).sum())} worse; Holm (family-wise 5%): "
                         f"{int((fw & up).sum())} better, {int((fw & down).sum())} worse.")
            lines.append(f"  A selected config's search delta is the largest of {n} noisy estimates: expect it to "
                         f"shrink on held-out items.")
        return lines

    def _report_parse(self, df) -> list[str]:
        cols = [c for c in df.columns if c.endswith("_parse") and "_val_" not in c and "_bench" not in c]
        if not cols:
            return []
        base = df[df["baseline"]]
        rates = ", ".join(f"{c[:-6]} {base[c].iloc[0]:.0f}%" for c in cols) if len(base) else "no baseline"
        others = df[~df["baseline"]]
        worse = better = sig = 0
        if len(base) and len(others):
            worse = int(((others[cols] < base[cols].iloc[0] - 10).any(axis=1)).sum())
            better = int(((others[cols] > base[cols].iloc[0] + 10).any(axis=1)).sum())
            q_cols = [f"{c}_q" for c in cols if f"{c}_q" in others.columns]
            sig = int((others[q_cols] < 0.05).any(axis=1).sum()) if q_cols else 0
        return [f"Parse rate (answers the scorer could read) of the baseline: {rates}. Of {len(others)} configs, "
                f"{worse} read 10+ points worse and {better} 10+ points better on some probe ({sig} with a parse-rate "
                f"change at q < 0.05): their deltas are partly format, not skill."]

    def _report_validation(self, df, by: str) -> list[str]:
        if "combined_val_delta" not in df.columns:
            return ["Not validated: run validate(k) (or sweep(..., validate=k)) — search columns alone cannot "
                    "tell a win from noise."]
        val = best_first(df[(~df["baseline"]) & df["combined_val_delta"].notna()], by)
        lines = [f"Held-out validation of {len(val)} selected configs on items no search saw "
                 f"({self.item_counts('validation')}); q over those {len(val)}:"]
        base = df[df["baseline"]]
        parse_cols = [c for c in df.columns if c.endswith("_val_parse")]
        for _, r in val.iterrows():
            shifts = [f"{c[:-len('_val_parse')]} {base[c].iloc[0]:.0f}% -> {r[c]:.0f}%" for c in parse_cols
                      if len(base) and abs(r[c] - base[c].iloc[0]) >= 10]
            lines.append(f"  {r['layers']}: search {r['combined_delta']:+.2f} -> held-out {r['combined_val_delta']:+.2f} "
                         f"(95% CI {r['combined_val_ci_low']:+.2f} to {r['combined_val_ci_high']:+.2f}), "
                         f"p={r['combined_val_p']:.3g}, q={r['combined_val_q']:.3g}"
                         + (f"; held-out parse rate moved: {', '.join(shifts)}" if shifts else ""))
        kept = int(((val["combined_val_q"] < 0.05) & (val["combined_val_delta"] > 0)).sum())
        lines.append(f"  {kept} of {len(val)} are better than the baseline on held-out items at q < 0.05: only those "
                     f"are evidence of an effect, and a real benchmark (evaluate) is the test of it. (A bootstrap CI "
                     f"above 0 is not: with few items that changed, it can exclude 0 where the exact test's p is "
                     f"0.1 or more.)")
        return lines

    # -------------------------------------------------------------- pictures
    def heatmap(self, metric: str = "combined_delta", times: int = 2, ax=None, n_boot: int = 2000):
        """A matplotlib Figure: RYS configs (start i on x, end j on y) coloured by a to_pandas column."""
        df = self.to_pandas(n_boot=n_boot)
        if metric not in df.columns:
            raise ValueError(f"no column {metric!r}; columns: {', '.join(df.columns)}")
        df = df[(df["times"] == times) & df["start"].notna()]
        n = self.num_layers
        grid = np.full((n + 1, n), np.nan)
        for i, j, v in zip(df["start"], df["end"], df[metric]):
            grid[int(j), int(i)] = np.nan if v is None else float(v)
        if ax is None:
            # Made through pyplot so notebooks' inline backend renders the returned figure, then released
            # from pyplot's registry so it is shown once and never leaks.
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(7, 6), layout="constrained")
            plt.close(fig)
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        diverging = metric.endswith("_delta")
        finite = grid[np.isfinite(grid)]
        if diverging:
            lim = float(np.abs(finite).max()) if finite.size else 1.0
            image = ax.imshow(grid, origin="lower", cmap="RdBu", vmin=-lim or -1, vmax=lim or 1, aspect="auto")
        else:
            image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        fig.colorbar(image, ax=ax, label=metric)
        if finite.size:  # the best config by the metric (for a p / q column: the most significant improvement)
            best = best_first(df.dropna(subset=[metric]), metric).iloc[0]
            ax.plot([int(best["start"])], [int(best["end"])], marker="*", color="gold", markersize=14,
                    markeredgecolor="black")
        ax.set_xlabel("start i (first repeated layer)")
        ax.set_ylabel("end j (repeat ends before layer j)")
        ax.set_title(f"{metric} by RYS config (times={times}), {len(df)} configs")
        return fig

    def interactive_heatmap(self, metric: str = "combined_delta", times: int = 2, html: str | Path | None = None,
                            n_boot: int = 2000):
        """A plotly Figure of RYS configs coloured by ``metric``; hover shows each config's per-probe
        deltas, CIs, q and parse rates. ``html``: also write a standalone HTML file (opens offline)."""
        fig = plotly_heatmap(self.to_pandas(n_boot=n_boot), self.num_layers, metric, times,
                             self.probe_names("search"))
        if html is not None:
            fig.write_html(str(html), include_plotlyjs=True, full_html=True)
        return fig

    def pareto(self, objectives: Sequence[str], n_boot: int = 2000):
        """The configs no other config beats on every objective (probe names mean their ``_delta``;
        any to_pandas column works, '-col' minimises), e.g. ``pareto(["math", "instruct"])``."""
        return pareto_front(self.to_pandas(n_boot=n_boot), objectives)

    # -------------------------------------------------------------- held-out validation
    def validate(self, k: int = 5, by: str = "combined_delta", model=None, probes=None, progress: bool = True):
        """Re-scores the top k configs (and the baseline) on each probe's held-out validation items,
        appending the records to the results file; returns to_pandas() rows of those configs with the
        <p>_val... columns."""
        top = self.top(k, by=by)
        keys = [self._baseline_key(), *top["layers"]]
        self.run_held_out([self._config(t) for t in keys], model, probes, progress, "validate")
        return self._rows(top["layers"])

    def run_held_out(self, configs: Sequence, model=None, probes=None, progress: bool = True,
                     stage: str = "validate") -> None:
        """Scores configs (SweepConfigs, or routers' RouterConfigs) not yet scored on the held-out
        validation items, appending their records (``stage``) to the results file and to ``records``."""
        model = model or self.model
        if model is None:
            raise ValueError("held-out scoring needs the model: pass model=circuit_finder.load(...)")
        probe_list = resolve_probes(probes if probes is not None else (self.probes or self.probe_names()))
        store = self._store(model, probe_list)
        new = run_configs(model, probe_list, list(configs), store, self.mode, "validation", None, self.chat, True,
                          progress, desc=stage, thinking=self.thinking, think_tokens=self.think_tokens,
                          executor=self.executor)  # Ray workers: a sweep's (inside sweep()), else started for this
        self.records = store.records() if store is not None else self.records + new

    def _config(self, key: str):
        """The config of a table row: a SweepConfig, or the RouterConfig of a router this sweep ran."""
        if not key.startswith("router:"):
            return SweepConfig.of(LayerPath.parse(key), self.num_layers)
        if key not in self.routers:
            raise ValueError(f"{key} is a router this SweepResult does not hold (results read from a file keep "
                             f"no routers): set result.routers[{key!r}] = circuit_finder.Router.load(...)")
        return RouterConfig(self.routers[key])

    def _rows(self, keys) -> object:
        """to_pandas() rows of the given configs, in that order."""
        df = self.to_pandas()
        return df[df["layers"].isin(list(keys))].set_index("layers").loc[list(keys)].reset_index()

    def _store(self, model, probes=()) -> ResultStore | None:
        """The results file reopened for appending (validation and benchmark records go to the same
        file; a file of another model or setup, or whose probes' search or held-out items were
        others, is refused), or None for an in-memory result."""
        if self.path is None:
            return None
        held_out = {p.name: p.items("validation") for p in probes}
        searched = (read_records(self.path)[0] or {}).get("items", {})  # each probe's search item ids
        # the probes' search items as swept: a probe changed since (an item added before the end, say)
        # holds out other items, some of which the search saw
        search = {p.name: p.items("search")[:len(searched[p.name])] for p in probes if p.name in searched}
        setup = {**model_setup(model),
                 **prompting_setup(model, probes, self.mode, self.chat, self.thinking, self.think_tokens),
                 "held_out_items": {name: [it.id for it in items] for name, items in held_out.items()},
                 "held_out_digest": {name: item_digest(items) for name, items in held_out.items()},
                 "items": {name: [it.id for it in items] for name, items in search.items()},
                 "item_digest": {name: item_digest(items) for name, items in search.items()}}
        store = ResultStore.open(self.path, model=model, mode=self.mode, resume=True, setup=setup)
        self.records = store.records()
        return store

    # -------------------------------------------------------------- real benchmarks
    def evaluate(self, top: int = 3, tasks: Sequence[str] = (), limit: int | float | None = None,
                 by: str = "combined_delta", model=None, include_path: str | None = None, batch_size: int = 8,
                 metrics: Sequence[str] | None = None, **evaluate_kwargs):
        """Does the probe win transfer? Runs lm-eval ``tasks`` (through our adapter, ``limit`` docs
        each) on the baseline and the ``top`` configs by ``by``, and returns their to_pandas() rows
        with per-sample paired columns <task>_<metric>_bench, _bench_delta, _bench_ci_low/high,
        _bench_p, _bench_q. Records go to the results file (a config already evaluated with the same
        tasks, limit, metrics and lm-eval arguments is not run again; other settings run afresh). The
        table shows this call's settings only (``benchmark_settings()``): configs evaluated under others
        drop out of it until evaluated again. ``include_path``: a folder of local task YAMLs. lm-eval's
        defaults apply (no chat template, unlike a chat sweep's probes): pass ``apply_chat_template=True``
        (and ``fewshot_as_multiturn``) to score the benchmark as the probes were."""
        model = model or self.model
        if model is None:
            raise ValueError("evaluate() needs the model: SweepResult.evaluate(k, tasks=[...], model=cf.load(...))")
        if not tasks:
            raise ValueError("evaluate() needs lm-eval task names: tasks=['arc_easy', ...]")
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        keys = [self._baseline_key(), *self.top(top, by=by)["layers"]]
        store = self._store(model)
        settings = benchmark_settings(tasks, limit, metrics, evaluate_kwargs)
        self.shown_benchmark = settings
        done = {r["layers"] for r in self.records if r.get("split") == BENCHMARK_SPLIT and _settings_of(r) == settings}
        todo = [k if not k.startswith("router:") else self._config(k).router for k in keys if k not in done]
        for record in run_benchmark(model, todo, tasks, limit, self.mode, include_path, batch_size, metrics,
                                    **evaluate_kwargs):
            record["settings"] = settings
            if store is not None:
                store.append(record)
            else:
                self.records.append(record)
        if store is not None:
            self.records = store.records()
        return self._rows(keys[1:])


def _settings_of(record: dict) -> str:
    """A benchmark record's settings (records written before settings were stored: tasks and limit)."""
    return record.get("settings") or benchmark_settings(record.get("tasks"), record.get("limit"), None, {})
