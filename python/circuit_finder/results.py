"""Sweep results: the crash-safe JSONL store and the paired statistics over its records.

``SweepResult`` (sweep/result.py) is the table a researcher reads; this module is what it
reads from and computes with, free of any model or runner.

File format — one JSON object per line:
- a header ``{"kind": "header", "version": 1, "run": <16 hex digits>, "model": ..., "num_layers": N,
  "mode": ..., "fingerprint", "chat", "thinking", "max_items", "items": {probe: [item ids]}, "item_digest": {probe: sha256 of
  the items' ids, prompts, answers and choices}, "likelihood_rule"?}`` (a resume must match it);
- a ``{"kind": "probes", "items": ..., "item_digest": ...}`` line when a resume adds probes, so
  later resumes check their items too (``"held_out_items"`` / ``"held_out_digest"``: the held-out
  items validate() scored, checked by the next validate());
- one ``{"kind": "config", "layers": "0..12,10..12,13..29", "start", "end", "times",
  "extra_layers", "split", "mode", "scores": {probe: {item id: score}}, "scores_norm"?, "margins"?, "outputs"?,
  "parsed"?: {probe: {item id: bool}}, "seconds"}`` per finished config (per-item scores, so differences can be tested item by item).

Every line is written with one ``write`` and fsynced before the next config starts, so a killed
run loses at most the config in flight. Config and probes lines carry the header's ``run`` id: a
run still writing a file that another run started afresh (``resume=False``: a new header) appends
lines whose id is not the new header's, and reading skips them with a warning (files without ids
read as before). A torn last line (no newline) is cut off when the file is
opened for appending, and skipped when read.

Statistics (``paired_stats``, shown by ``SweepResult.to_pandas``): per probe, the mean item
score (0-100); ``_delta`` vs the baseline (identity path) on the same items; a 95% paired
bootstrap CI of that delta (items resampled with replacement, ``n_boot`` times, each probe from
its own random stream); ``_p``, a two-sided paired sign-flip test of "no difference" — exact
(all 2^n flips) up to 16 items, else Monte Carlo with the count raised until thresholds adjusted
over the sweep's configs are reachable; ``_q`` (Benjamini-Hochberg) and ``_holm`` (Holm), that
p adjusted across the configs of the table (the baseline excluded). Likelihood margins get the
same columns (``<p>_margin_delta``, ...). ``combined`` is the mean of the probe scores; its CI
and p resample each probe's items independently and average the probes' deltas. A config
scored on fewer of the table's probes than the others (a results file resumed with other
probes) gets no combined columns: its mean would be over other probes, not comparable. ``<p>_parse``:
the share (0-100) of completions the probe's scorer could read (generate mode), with the same
paired columns (``<p>_parse_delta``, CI, p, q), so a delta that is really a format change shows as
a change in parse rate.

Read significance from ``_p`` / ``_q``, not from the CI: a percentile bootstrap is too narrow when few
items changed (4 of 50 items going from 0 to 100: CI +2 to +16 around a delta of +8, exact p 0.125);
the CI says how large an effect may be, the test whether there is one.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
import zlib
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from .files import atomic_file

__all__ = ["ResultStore", "benjamini_hochberg", "holm", "paired_stats", "read_records", "sign_flip_p"]

VERSION = 1
LIKELIHOOD_RULE = "lm-eval-pair+end"  # context and choice encoded together, then split; end-of-answer marker


def read_records(path: str | Path) -> tuple[dict | None, list[dict]]:
    """(header, config records) of a results file. A torn or corrupt line is skipped with a warning."""
    path = Path(path)
    header, records = None, []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete = lines[:-1]  # the part after the last newline is unfinished (or empty)
    if lines[-1].strip():
        warnings.warn(f"{path}: ignoring an unfinished last line ({len(lines[-1])} bytes)", stacklevel=2)
    strays = []  # lines of a run that wrote into the file after another run replaced it
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
        elif header is not None and row.get("run", header.get("run")) != header.get("run"):
            strays.append(n)
        elif row.get("kind") == "probes" and header is not None:  # probes a resumed sweep added
            for key in _PER_PROBE:
                header[key] = {**header.get(key, {}), **row.get(key, {})}
        elif row.get("kind") == "config" and isinstance(row.get("layers"), str) and isinstance(row.get("scores"), dict):
            records.append(row)
        else:
            warnings.warn(f"{path}:{n}: skipping a line that is not a sweep record", stacklevel=2)
    if strays:
        warnings.warn(f"{path}: skipping {len(strays)} line(s) (line {strays[0]}, ...) written by another run than "
                      f"the header's: a run still writing this file when another started it afresh "
                      f"(resume=False)", stacklevel=2)
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
    def open(cls, path, model, mode: str, resume: bool = True, setup: dict | None = None,
             record: dict | None = None) -> ResultStore:
        """Opens (resume) or starts a results file. ``setup``: what the records depend on beyond the
        model's shape and the mode (model fingerprint, chat, max_items, each probe's item ids); it is
        written into a new header, and a resumed file whose header differs in any of it is refused,
        naming the difference — records of different setups are never mixed. ``record``: more header
        fields, written but not compared."""
        path = Path(path)
        header = {"kind": "header", "version": VERSION, "run": uuid.uuid4().hex[:16],
                  "model": getattr(model, "source", None),
                  "num_layers": model.num_layers, "mode": mode, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  **(record or {}), **(setup or {})}
        if mode == "likelihood":
            header["likelihood_rule"] = LIKELIHOOD_RULE
        if resume and path.exists() and path.stat().st_size > 0:
            _repair_tail(path)
            old, records = read_records(path)
            if old is not None:
                _check_resume(path, old, header, setup or {})
                _record_new_probes(path, old, setup or {})
                header = old
            elif records:  # a damaged header: what its records were run with cannot be checked
                raise ValueError(f"{path} holds {len(records)} config records but no readable header line, so "
                                 f"what they were run with cannot be checked. Use another results file or "
                                 f"resume=False (--no-resume).")
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
        record = {"kind": "config", **record, **_run_of(self.header)}
        _append_line(self.path, record)
        self._records.append(record)
        self._index(record)

    def records(self) -> list[dict]:
        return list(self._records)


# setup keys added after files were written, and what an older file that lacks them meant
_SETUP_DEFAULTS = {"thinking": False, "activations": "float"}
# setup keys an older file could not record and whose value then is unknown: not compared
_UNKNOWN_IN_OLDER = ("quantize", "dequantize", "think_tokens", "chat_template", "devices", "eos_ids")
# setup keys that hold one entry per probe: only probes both headers hold are compared, and a
# probe new to a resumed file is recorded by a {"kind": "probes"} line. Search items; validate()'s
# held-out ones; generate mode's answer budgets
_PER_PROBE = ("items", "item_digest", "held_out_items", "held_out_digest", "max_new_tokens")


def _record_new_probes(path: Path, old: dict, setup: dict) -> None:
    """Appends the item ids and digests of probes the file's header does not list yet (a resume
    that adds a probe), so the next resume checks them too; updates ``old`` in place."""
    new = {key: {p: v for p, v in setup.get(key, {}).items() if p not in old.get(key, {})} for key in _PER_PROBE
           if isinstance(setup.get(key), dict)}
    new = {k: v for k, v in new.items() if v}
    if not new:
        return
    _append_line(path, {"kind": "probes", **new, **_run_of(old)})
    for key, value in new.items():
        old[key] = {**old.get(key, {}), **value}


def _run_of(header: dict) -> dict:
    """The ``run`` field a line appended under ``header`` carries ({} for a file from before ids)."""
    return {"run": header["run"]} if "run" in header else {}


def _check_resume(path: Path, old: dict, new: dict, setup: dict) -> None:
    again = "Use another results file or resume=False (--no-resume)."
    if old.get("num_layers") != new["num_layers"]:
        raise ValueError(f"{path} holds a sweep of a {old.get('num_layers')}-layer model; this model has "
                         f"{new['num_layers']} layers. {again}")
    if old.get("mode") != new["mode"]:
        raise ValueError(f"{path} holds a mode={old.get('mode')!r} sweep; this one is mode={new['mode']!r}. {again}")
    if new["mode"] == "likelihood" and old.get("likelihood_rule") != LIKELIHOOD_RULE:
        raise ValueError(f"{path} was scored with an older likelihood tokenization (choices encoded on their own); "
                         f"this version encodes context and choice together ({LIKELIHOOD_RULE}). {again}")
    for key, value in setup.items():
        was = old.get(key, _SETUP_DEFAULTS.get(key, "not recorded (an older results file)"))
        if (key in _PER_PROBE or key in _UNKNOWN_IN_OLDER) and key not in old:
            continue  # an older file that did not record it (item ids are still compared)
        if key == "fingerprint" and was is None:
            continue  # an in-memory model's file from before tensors were fingerprinted: unknown
        if key in _PER_PROBE and isinstance(was, dict):
            # a probe new to this file has no records yet: only probes both hold must agree
            differ = sorted(p for p in set(was) & set(value) if was[p] != value[p])
            if differ:
                raise ValueError(_probe_differs(path, key, differ[0], was[differ[0]], value[differ[0]], again,
                                                "held_out_items" in setup))
        elif was != value:
            raise ValueError(f"{path} was run with {key}={was!r}; this sweep has {key}={value!r}. {again}")


def _probe_differs(path: Path, key: str, probe: str, was, now, again: str, validating: bool = False) -> str:
    """The message for a per-probe setup entry that differs between a file and this run (or, when
    ``validating``, validate()'s probes)."""
    if key == "max_new_tokens":
        return (f"{path} was run with max_new_tokens={was} for probe {probe!r}; this run gives it {now} (answers "
                f"cut at another length score differently). {again}")
    held = "held-out " if key.startswith("held_out") else ""
    fix = again if not validating else ("validate() scores each probe's current held-out items, picked by "
                                        "position: restore the probe as it was, or sweep again into a new "
                                        "results file.")
    if key.endswith("items"):
        return (f"{path} was run on other {held}items of probe {probe!r} than this sweep "
                f"({len(was)} vs {len(now)} items, or other ids). {fix}")
    return (f"{path} was run on {held}items of probe {probe!r} with the same ids but other "
            f"prompts, answers or choices (another version of the probe). {fix}")


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
EXACT_MAX_ITEMS = 16  # sign-flip tests over at most this many items enumerate all 2^n flips
PERM_START, PERM_MAX = 4000, 1_000_000


def _adjusted(pvalues, rule) -> np.ndarray:
    """Applies rule(p sorted ascending, m) -> adjusted values in that order to the non-NaN p-values;
    NaN entries are left out and stay NaN."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if len(ok):
        order = ok[np.argsort(p[ok], kind="stable")]
        out[order] = rule(p[order], len(ok))
    return out


def benjamini_hochberg(pvalues) -> np.ndarray:
    """BH q-values: for p sorted ascending p(1..m), q(k) = min over j >= k of m * p(j) / j, capped at 1
    (NaN entries are left out and stay NaN)."""
    return _adjusted(pvalues, lambda p, m: np.minimum(
        np.minimum.accumulate((p * m / np.arange(1, m + 1))[::-1])[::-1], 1.0))


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p: for p sorted ascending, max over j <= k of min(1, (m - j + 1) * p(j))."""
    return _adjusted(pvalues, lambda p, m: np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p)))


def _all_signs(n: int) -> np.ndarray:
    """Every sign pattern of n items [2^n, n]."""
    bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
    return 1.0 - 2.0 * bits


def sign_flip_p(diffs: Sequence[np.ndarray], rng: np.random.Generator, family: int = 1) -> float:
    """Two-sided paired sign-flip p of "each item's difference is as likely + as -" (symmetry about 0,
    not a zero mean alone: skewed changes whose mean is near 0 can still come out significant), by
    the mean over groups of each group's mean difference.
    One group of at most EXACT_MAX_ITEMS items: exact (every flip). Otherwise Monte Carlo, drawn
    independently per group, adaptively: the count grows tenfold while p * family is small, up to
    100 x family (at most PERM_MAX), so thresholds adjusted over ``family`` configs stay reachable
    (a Monte Carlo p is at least 1 / (N + 1))."""
    observed = float(np.mean([d.mean() for d in diffs]))
    if not math.isfinite(observed):
        return math.nan  # (|null| >= NaN is never true: a NaN difference would read as p = 0)
    if observed == 0:
        return 1.0
    if len(diffs) == 1 and len(diffs[0]) <= EXACT_MAX_ITEMS:
        null = _all_signs(len(diffs[0])) @ diffs[0] / len(diffs[0])
        return float(np.mean(np.abs(null) >= abs(observed) - 1e-12))
    cap = min(PERM_MAX, max(PERM_START, 100 * family))  # 1 / (cap + 1) is far below 0.05 / family
    chunk = max(1, 10_000_000 // sum(len(d) for d in diffs))  # bounded memory per draw
    n_perm, extreme, done = PERM_START, 0, 0
    while True:
        while done < n_perm:
            k = min(chunk, n_perm - done)
            null = np.mean([rng.choice([-1.0, 1.0], size=(k, len(d))) @ d / len(d) for d in diffs], axis=0)
            extreme += int(np.sum(np.abs(null) >= abs(observed) - 1e-12))
            done += k
        p = (1 + extreme) / (1 + done)
        if p * family >= 0.5 or n_perm >= cap:
            return p
        n_perm = min(n_perm * 10, cap)


class _Resampler:
    """Bootstrap indices per (probe, item count), each probe from its own random stream, so probes
    are resampled independently (also when they have the same number of items)."""

    def __init__(self, n_boot: int, seed: int):
        self.n_boot, self.seed, self.cache = n_boot, seed, {}

    def boot(self, probe_index: int, n: int) -> np.ndarray:
        key = (probe_index, n)
        if key not in self.cache:
            rng = np.random.default_rng([self.seed, probe_index, n])
            self.cache[key] = rng.integers(0, n, size=(self.n_boot, n))
        return self.cache[key]

    def perm_rng(self, probe_index: int, config: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, probe_index, 1 + zlib.crc32(config.encode())])


def _paired(a: dict, b: dict) -> np.ndarray | None:
    """Differences on the items both sides have a finite value for (a margin a broken forward left
    out is None), in item order; None when there are none."""
    ids = sorted(i for i in set(a) & set(b) if _finite(a[i]) and _finite(b[i]))
    return np.array([a[i] - b[i] for i in ids], dtype=np.float64) if ids else None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _mean(values) -> float | None:
    """The mean of the finite values (None when there are none)."""
    kept = [v for v in values if _finite(v)]
    return float(np.mean(kept)) if kept else None


def _as_numbers(values: dict | None) -> dict:
    """Per-item values as floats; parse flags (bools) as 0 / 100 so they share the scores' scale."""
    return {k: 100.0 * v if isinstance(v, bool) else v for k, v in (values or {}).items()}


def _ci(boot: np.ndarray, items: int = 2) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap means; NaN for fewer than 2 items, whose bootstrap
    has no spread to show (a zero-width "interval" around one item's difference)."""
    if items < 2:
        return math.nan, math.nan
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(low), float(high)


def _probe_stats(row: dict, name: str, d: np.ndarray, boot_idx: np.ndarray, rng, family: int) -> np.ndarray:
    """Fills <name>_delta/_ci_low/_ci_high/_p for paired differences d; returns the bootstrap means."""
    boot = d[boot_idx].mean(1)
    row[f"{name}_delta"] = float(d.mean())
    row[f"{name}_ci_low"], row[f"{name}_ci_high"] = _ci(boot, len(d))
    row[f"{name}_p"] = sign_flip_p([d], rng, family)
    return boot


def paired_stats(recs: dict[str, dict], baseline_key: str, probes: Sequence[str], n_boot: int, seed: int,
                 suffix: str = "", combined: Sequence[str] | None = None,
                 untested: Collection[str] = ()) -> dict[str, dict]:
    """Per config (layers -> record): per probe mean, and vs the baseline record on the same items the
    delta, its 95% paired bootstrap CI, sign-flip p, and the p adjusted across the configs (BH ``_q``,
    Holm ``_holm``); the same for likelihood margins (``_margin_delta``...) and for ``combined``
    (the mean over the ``combined`` probes, default all, each resampled independently; only for
    configs scored on all of them). The ``untested`` configs (a router scored on items it was trained
    on) get their unadjusted p but are not tests of the family: no _q / _holm, and the others' adjust
    over the rest. See the module docstring."""
    base = recs.get(baseline_key)
    skip = {baseline_key, *untested}
    family = max(1, sum(k not in skip for k in recs))
    res = _Resampler(n_boot, seed)
    joint = set(probes if combined is None else combined)
    rows: dict[str, dict] = {}
    for key, r in recs.items():
        row: dict = {}
        means, boots, diffs = [], [], []
        for k, p in enumerate(probes):
            scores = r["scores"].get(p)
            if not scores:
                continue
            row[f"{p}{suffix}"] = float(np.mean(list(scores.values())))
            if p in joint:
                means.append(row[f"{p}{suffix}"])
            margins = _mean(((r.get("margins") or {}).get(p) or {}).values())
            if margins is not None:
                row[f"{p}{suffix}_margin"] = margins
            norm = (r.get("scores_norm") or {}).get(p)
            if norm:
                row[f"{p}{suffix}_norm"] = float(np.mean(list(norm.values())))
            parsed = (r.get("parsed") or {}).get(p)
            if parsed:
                row[f"{p}{suffix}_parse"] = 100.0 * float(np.mean([bool(v) for v in parsed.values()]))
            if base is None or p not in base["scores"]:
                continue
            d = _paired(scores, base["scores"][p])
            if d is None:
                continue
            boot = _probe_stats(row, f"{p}{suffix}", d, res.boot(k, len(d)), res.perm_rng(k, key), family)
            if p in joint:
                boots.append(boot)
                diffs.append(d)
            for extra, tag in (("margins", "_margin"), ("scores_norm", "_norm"), ("parsed", "_parse")):
                dx = _paired(_as_numbers((r.get(extra) or {}).get(p)), _as_numbers((base.get(extra) or {}).get(p)))
                if dx is not None:
                    _probe_stats(row, f"{p}{suffix}{tag}", dx, res.boot(k, len(dx)), res.perm_rng(k, key + tag), family)
        if means and len(means) == len(joint):  # a config scored on fewer probes is not comparable
            row[f"combined{suffix}"] = float(np.mean(means))
        if diffs and len(diffs) == len(joint):
            row[f"combined{suffix}_delta"] = float(np.mean([d.mean() for d in diffs]))
            row[f"combined{suffix}_ci_low"], row[f"combined{suffix}_ci_high"] = _ci(
                np.mean(boots, axis=0), max(len(d) for d in diffs))
            row[f"combined{suffix}_p"] = sign_flip_p(diffs, res.perm_rng(len(probes), key), family)
        rows[key] = row
    _adjust(rows, skip)
    return rows


def _adjust(rows: dict[str, dict], skip: set[str]) -> None:
    """Adds <col>_q (Benjamini-Hochberg) and <col>_holm beside every <col>_p, across the configs
    not in ``skip`` (the baseline, compared with itself, and untested rows are not tests)."""
    keys = [k for k in rows if k not in skip]
    p_cols = sorted({c for k in keys for c in rows[k] if c.endswith("_p") and c[:-2] + "_delta" in rows[k]})
    for col in p_cols:
        p = np.array([rows[k].get(col, np.nan) for k in keys], dtype=np.float64)
        for name, adjusted in (("_q", benjamini_hochberg(p)), ("_holm", holm(p))):
            for k, v in zip(keys, adjusted):
                if not np.isnan(v):
                    rows[k][col[:-2] + name] = float(v)
