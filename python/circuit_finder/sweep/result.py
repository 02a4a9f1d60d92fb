"""SweepResult: the records of a sweep as a researcher reads them — a pandas table with paired
bootstrap CIs and p-values (``to_pandas``, ``top``), a heatmap of RYS configs, and ``validate``,
which re-scores the winners on held-out items with the runner (it lives beside the runner so
results.py stays free of models).

Limits: statistics are per config against the identity baseline, adjusted across the configs of
one table (search and validation separately); recomputed on every to_pandas() call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import fingerprint
from ..layer_path import LayerPath
from ..results import ResultStore, paired_stats, read_records
from .configs import SweepConfig
from .runner import resolve_chat, resolve_probes, run_configs

__all__ = ["SweepResult"]


class SweepResult:
    """The records of a sweep. ``to_pandas()`` for a table, ``heatmap()``, ``top()``, ``validate()``."""

    def __init__(self, records: list[dict], num_layers: int, mode: str | None = None, path: Path | None = None,
                 model=None, probes=None, chat: bool | None = None):
        self.records = list(records)
        self._stats_cache: dict[tuple, dict] = {}
        self.num_layers = num_layers
        self.mode = mode or (self.records[0].get("mode") if self.records else None)
        self.path = Path(path) if path is not None else None
        self.model = model
        self.probes = probes
        self.chat = chat

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
                   chat=header.get("chat"))

    # -------------------------------------------------------------- tables
    def _split(self, split: str) -> dict[str, dict]:
        """layers -> record (later records of the same config extend or replace earlier ones)."""
        out: dict[str, dict] = {}
        for r in self.records:
            if r.get("split", "search") != split or (self.mode and r.get("mode", self.mode) != self.mode):
                continue
            if r["layers"] in out:
                merged = dict(out[r["layers"]])
                for key in ("scores", "scores_norm", "margins", "outputs"):
                    if key in r:
                        merged[key] = {**merged.get(key, {}), **r[key]}
                out[r["layers"]] = merged
            else:
                out[r["layers"]] = r
        return out

    def probe_names(self) -> list[str]:
        names: list[str] = []
        for r in self.records:
            for p in r["scores"]:
                if p not in names:
                    names.append(p)
        return names

    def _baseline_key(self) -> str:
        return str(LayerPath.identity(self.num_layers))

    def _stats(self, split: str, n_boot: int, seed: int, suffix: str) -> dict[str, dict]:
        """paired_stats of a split, cached while the records are unchanged (top, heatmap and the CLI
        ask for the same table several times)."""
        key = (split, n_boot, seed, suffix, len(self.records), id(self.records))
        if key not in self._stats_cache:
            self._stats_cache[key] = paired_stats(self._split(split), self._baseline_key(), self.probe_names(),
                                                  n_boot, seed, suffix)
        return self._stats_cache[key]

    def to_pandas(self, n_boot: int = 2000, seed: int = 0):
        """One row per config (baseline included, flagged): layers, start, end, times, extra_layers, per
        probe <p>, <p>_delta, <p>_ci_low, <p>_ci_high, <p>_p, <p>_q (BH), <p>_holm (and <p>_margin,
        <p>_margin_delta ... in likelihood mode),
        combined (+ _delta/_ci_low/_ci_high/_p), seconds; plus <p>_val... columns for configs that
        validate() re-scored on held-out items."""
        import pandas as pd

        recs = self._split("search")
        stats = self._stats("search", n_boot, seed, "")
        val = self._stats("validation", n_boot, seed, "_val")
        base_key = self._baseline_key()
        rows = []
        for key, r in recs.items():
            rows.append({"layers": key, "start": r.get("start"), "end": r.get("end"), "times": r.get("times"),
                         "extra_layers": r.get("extra_layers"), "baseline": key == base_key, **stats[key],
                         **val.get(key, {}), "seconds": r.get("seconds")})
        df = pd.DataFrame(rows)
        if df.empty:
            return df
        for col in ("start", "end", "times", "extra_layers"):
            df[col] = df[col].astype("Int64")
        return df

    def top(self, k: int = 10, by: str = "combined_delta", n_boot: int = 2000, seed: int = 0):
        """The k best configs by a column (baseline excluded), best first."""
        df = self.to_pandas(n_boot=n_boot, seed=seed)
        if df.empty:
            return df
        if by not in df.columns:
            raise ValueError(f"no column {by!r}; columns: {', '.join(df.columns)}")
        return df[~df["baseline"]].sort_values(by, ascending=False).head(k).reset_index(drop=True)

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
        if finite.size:
            j, i = np.unravel_index(np.nanargmax(grid), grid.shape)
            ax.plot([i], [j], marker="*", color="gold", markersize=14, markeredgecolor="black")
        ax.set_xlabel("start i (first repeated layer)")
        ax.set_ylabel("end j (repeat ends before layer j)")
        ax.set_title(f"{metric} by RYS config (times={times}), {len(df)} configs")
        return fig

    # -------------------------------------------------------------- held-out validation
    def validate(self, k: int = 5, by: str = "combined_delta", model=None, probes=None, progress: bool = True):
        """Re-scores the top k configs (and the baseline) on each probe's held-out validation items,
        appending the records to the results file; returns to_pandas() rows of those configs with the
        <p>_val... columns."""
        model = model or self.model
        if model is None:
            raise ValueError("validate() needs the model: SweepResult.validate(k, model=circuit_finder.load(...))")
        probe_list = resolve_probes(probes if probes is not None else (self.probes or self.probe_names()))
        top = self.top(k, by=by)
        keys = [self._baseline_key(), *top["layers"]]
        configs = [SweepConfig.of(LayerPath.parse(t), self.num_layers) for t in keys]
        store = None
        if self.path is not None:  # validation records are appended to the same file
            setup = {"fingerprint": fingerprint(model.source), "chat": resolve_chat(model, self.chat)}
            store = ResultStore.open(self.path, model=model, mode=self.mode, resume=True, setup=setup)
            self.records = store.records()
        new = run_configs(model, probe_list, configs, store, self.mode, "validation", None, self.chat, True,
                          progress, desc="validate")
        self.records = store.records() if store is not None else self.records + new
        df = self.to_pandas()
        return df[df["layers"].isin(top["layers"])].set_index("layers").loc[list(top["layers"])].reset_index()
