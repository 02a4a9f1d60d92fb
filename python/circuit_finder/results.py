"""Sweep results: a crash-safe JSONL store and SweepResult (pandas, bootstrap CIs, heatmaps).

File format — one JSON object per line:
- a header ``{"kind": "header", "version": 1, "model": ..., "num_layers": N, "mode": ...}``;
- one ``{"kind": "config", "layers": "0..12,10..12,13..29", "start", "end", "times",
  "extra_layers", "split", "mode", "scores": {probe: {item id: score}}, "margins"?, "outputs"?,
  "seconds"}`` per finished config (per-item scores, so differences can be tested item by item).

Every line is written with one ``write`` and fsynced before the next config starts, so a killed
run loses at most the config in flight. A torn last line (no newline) is cut off when the file is
opened for appending, and skipped when read.

Statistics (``SweepResult.to_pandas``): per probe, the mean item score (0-100); ``_delta`` vs the
baseline (identity path) on the same items; a 95% paired bootstrap CI of that delta (items
resampled with replacement, ``n_boot`` times); ``_p``, a two-sided paired sign-flip permutation
test of "no difference". ``combined`` is the mean of the probe scores; its CI and p resample each
probe's items independently and average the probes' deltas.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["ResultStore", "SweepResult", "read_records"]

VERSION = 1


def read_records(path: str | Path) -> tuple[dict | None, list[dict]]:
    """(header, config records) of a results file. A torn or corrupt line is skipped with a warning."""
    path = Path(path)
    header, records = None, []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete = lines[:-1]  # the part after the last newline is unfinished (or empty)
    if lines[-1].strip():
        warnings.warn(f"{path}: ignoring an unfinished last line ({len(lines[-1])} bytes)", stacklevel=2)
    for n, raw in enumerate(complete, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            warnings.warn(f"{path}:{n}: skipping a line that is not valid JSON", stacklevel=2)
            continue
        if not isinstance(row, dict):
            warnings.warn(f"{path}:{n}: skipping a line that is not a JSON object", stacklevel=2)
        elif row.get("kind") == "header":
            header = header or row
        elif row.get("kind") == "config" and isinstance(row.get("layers"), str) and isinstance(row.get("scores"), dict):
            records.append(row)
        else:
            warnings.warn(f"{path}:{n}: skipping a line that is not a sweep record", stacklevel=2)
    return header, records


class ResultStore:
    """Append-only JSONL file of finished configs (see the module docstring)."""

    def __init__(self, path: Path, header: dict, records: list[dict]):
        self.path = path
        self.header = header
        self._records = records
        self._done = {}
        for r in records:
            self._index(r)

    def _index(self, r: dict) -> None:
        key = (r["layers"], r.get("split", "search"), r.get("mode"))
        self._done.setdefault(key, set()).update(r["scores"])

    @classmethod
    def open(cls, path, model, mode: str, resume: bool = True) -> ResultStore:
        path = Path(path)
        header = {"kind": "header", "version": VERSION, "model": getattr(model, "source", None),
                  "num_layers": model.num_layers, "mode": mode, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if resume and path.exists() and path.stat().st_size > 0:
            _repair_tail(path)
            old, records = read_records(path)
            if old is not None:
                if old.get("num_layers") != model.num_layers:
                    raise ValueError(f"{path} holds a sweep of a {old.get('num_layers')}-layer model; this model has "
                                     f"{model.num_layers} layers. Use another results file or resume=False.")
                if old.get("mode") != mode:
                    raise ValueError(f"{path} holds a mode={old.get('mode')!r} sweep; this one is mode={mode!r}. "
                                     f"Use another results file or resume=False.")
                header = old
            else:
                _append_line(path, header)
            return cls(path, header, records)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_line(header))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return cls(path, header, [])

    def has(self, layers: str, split: str, mode: str, probes: Sequence[str]) -> bool:
        return set(probes) <= self._done.get((layers, split, mode), set())

    def append(self, record: dict) -> None:
        record = {"kind": "config", **record}
        _append_line(self.path, record)
        self._records.append(record)
        self._index(record)

    def records(self) -> list[dict]:
        return list(self._records)


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


def _append_line(path: Path, obj: dict) -> None:
    data = _line(obj)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _repair_tail(path: Path) -> None:
    """Cuts an unfinished last line (a run killed mid-write) so appends start on a fresh line."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------------- statistics
def _bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _signs(n: int, n_perm: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 1).choice(np.array([-1.0, 1.0]), size=(n_perm, n))


class SweepResult:
    """The records of a sweep. ``to_pandas()`` for a table, ``heatmap()``, ``top()``, ``validate()``."""

    def __init__(self, records: list[dict], num_layers: int, mode: str | None = None, path: Path | None = None,
                 model=None, probes=None, chat: bool | None = None):
        self.records = list(records)
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
        return cls(records, num_layers=int(header["num_layers"]), mode=header.get("mode"), path=Path(path))

    # -------------------------------------------------------------- tables
    def _split(self, split: str) -> dict[str, dict]:
        """layers -> record (later records of the same config extend or replace earlier ones)."""
        out: dict[str, dict] = {}
        for r in self.records:
            if r.get("split", "search") != split or (self.mode and r.get("mode", self.mode) != self.mode):
                continue
            if r["layers"] in out:
                merged = dict(out[r["layers"]])
                for key in ("scores", "margins", "outputs"):
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
        from .layer_path import LayerPath

        return str(LayerPath.identity(self.num_layers))

    def _stats(self, split: str, n_boot: int, seed: int, suffix: str) -> dict[str, dict]:
        recs = self._split(split)
        base = recs.get(self._baseline_key())
        probes = self.probe_names()
        rows: dict[str, dict] = {}
        cache: dict[tuple, tuple] = {}
        for key, r in recs.items():
            row: dict = {}
            means, deltas_boot, deltas_perm, deltas = [], [], [], []
            for p in probes:
                scores = r["scores"].get(p)
                if not scores:
                    continue
                row[f"{p}{suffix}"] = float(np.mean(list(scores.values())))
                means.append(row[f"{p}{suffix}"])
                if "margins" in r and p in r["margins"]:
                    row[f"{p}{suffix}_margin"] = float(np.mean(list(r["margins"][p].values())))
                if base is None or p not in base["scores"]:
                    continue
                ids = sorted(set(scores) & set(base["scores"][p]))
                if not ids:
                    continue
                d = np.array([scores[i] - base["scores"][p][i] for i in ids], dtype=np.float64)
                n = len(d)
                if (n, "b") not in cache:
                    cache[(n, "b")] = _bootstrap_indices(n, n_boot, seed)
                    cache[(n, "s")] = _signs(n, n_boot, seed)
                boot = d[cache[(n, "b")]].mean(1)
                perm = (cache[(n, "s")] * d).mean(1)
                row[f"{p}{suffix}_delta"] = float(d.mean())
                row[f"{p}{suffix}_ci_low"], row[f"{p}{suffix}_ci_high"] = map(float, np.percentile(boot, [2.5, 97.5]))
                row[f"{p}{suffix}_p"] = _p_value(perm, d.mean())
                deltas.append(d.mean())
                deltas_boot.append(boot)
                deltas_perm.append(perm)
            if means:
                row[f"combined{suffix}"] = float(np.mean(means))
            if deltas and len(deltas) == len(means):
                observed = float(np.mean(deltas))
                boot = np.mean(deltas_boot, axis=0)
                row[f"combined{suffix}_delta"] = observed
                row[f"combined{suffix}_ci_low"], row[f"combined{suffix}_ci_high"] = map(
                    float, np.percentile(boot, [2.5, 97.5]))
                row[f"combined{suffix}_p"] = _p_value(np.mean(deltas_perm, axis=0), observed)
            rows[key] = row
        return rows

    def to_pandas(self, n_boot: int = 2000, seed: int = 0):
        """One row per config (baseline included, flagged): layers, start, end, times, extra_layers, per
        probe <p>, <p>_delta, <p>_ci_low, <p>_ci_high, <p>_p (and <p>_margin in likelihood mode),
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
        from .layer_path import LayerPath
        from .sweep import SweepConfig, resolve_probes, run_configs

        model = model or self.model
        if model is None:
            raise ValueError("validate() needs the model: SweepResult.validate(k, model=circuit_finder.load(...))")
        probe_list = resolve_probes(probes if probes is not None else (self.probes or self.probe_names()))
        top = self.top(k, by=by)
        keys = [self._baseline_key(), *top["layers"]]
        configs = [SweepConfig.of(LayerPath.parse(t), self.num_layers) for t in keys]
        store = None
        if self.path is not None:  # validation records are appended to the same file
            store = ResultStore.open(self.path, model=model, mode=self.mode, resume=True)
            self.records = store.records()
        new = run_configs(model, probe_list, configs, store, self.mode, "validation", None, self.chat, True,
                          progress, desc="validate")
        self.records = store.records() if store is not None else self.records + new
        df = self.to_pandas()
        return df[df["layers"].isin(top["layers"])].set_index("layers").loc[list(top["layers"])].reset_index()


def _p_value(null: np.ndarray, observed: float) -> float:
    if observed == 0:
        return 1.0
    extreme = int(np.sum(np.abs(null) >= abs(observed) - 1e-12))
    return (1 + extreme) / (1 + len(null))
