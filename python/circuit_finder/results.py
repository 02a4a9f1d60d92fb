"""Sweep results: the crash-safe JSONL store and the paired statistics over its records.

``SweepResult`` (sweep/result.py) is the table a researcher reads; this module is what it
reads from and computes with, free of any model or runner.

File format — one JSON object per line:
- a header ``{"kind": "header", "version": 1, "model": ..., "num_layers": N, "mode": ...}``;
- one ``{"kind": "config", "layers": "0..12,10..12,13..29", "start", "end", "times",
  "extra_layers", "split", "mode", "scores": {probe: {item id: score}}, "margins"?, "outputs"?,
  "seconds"}`` per finished config (per-item scores, so differences can be tested item by item).

Every line is written with one ``write`` and fsynced before the next config starts, so a killed
run loses at most the config in flight. A torn last line (no newline) is cut off when the file is
opened for appending, and skipped when read.

Statistics (``paired_stats``, shown by ``SweepResult.to_pandas``): per probe, the mean item
score (0-100); ``_delta`` vs the baseline (identity path) on the same items; a 95% paired bootstrap CI of that delta (items
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

from .files import atomic_file

__all__ = ["ResultStore", "paired_stats", "read_records"]

VERSION = 1
LIKELIHOOD_RULE = "lm-eval-pair"  # likelihood.encode_pair: context and choice encoded together, then split


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
        if mode == "likelihood":
            header["likelihood_rule"] = LIKELIHOOD_RULE
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
                if mode == "likelihood" and old.get("likelihood_rule") != LIKELIHOOD_RULE:
                    raise ValueError(f"{path} was scored with an older likelihood tokenization (choices encoded on "
                                     f"their own); this version encodes context and choice together "
                                     f"({LIKELIHOOD_RULE}). Use another results file or resume=False (--no-resume).")
                header = old
            else:
                _append_line(path, header)
            return cls(path, header, records)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            f.write(_line(header))
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


def paired_stats(recs: dict[str, dict], baseline_key: str, probes: Sequence[str], n_boot: int, seed: int,
                 suffix: str = "") -> dict[str, dict]:
    """Per config (layers -> record): per probe mean, and vs the baseline record on the same items the
    delta, its 95% paired bootstrap CI and sign-flip p; ``combined`` likewise over the probes.
    Column names are ``<probe><suffix>``, ``<probe><suffix>_delta``, ...; see the module docstring."""
    base = recs.get(baseline_key)
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



def _p_value(null: np.ndarray, observed: float) -> float:
    if observed == 0:
        return 1.0
    extreme = int(np.sum(np.abs(null) >= abs(observed) - 1e-12))
    return (1 + extreme) / (1 + len(null))
