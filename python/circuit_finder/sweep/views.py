"""Views of a sweep table with many objectives: the Pareto front and an interactive heatmap.

``pareto_front(df, objectives)``: the configs no other config beats on every objective (at least as
good on all, better on one) — e.g. raise math without lowering instruct. ``plotly_heatmap(df,
num_layers, metric, times)``: RYS configs (start i, end j) coloured by a column, with each
config's per-probe deltas, CIs, q and parse rates on hover; ``write_html`` makes a standalone file
(plotly.js inlined, so it opens offline).

Limits: objectives are maximised ("-col" minimises); rows missing an objective are left out. The
heatmap shows RYS configs of one ``times``; other paths are listed by ``to_pandas`` only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["best_first", "objective_columns", "pareto_front", "plotly_heatmap", "tested_delta", "tested_rows"]


def tested_rows(df):
    """The rows of a ``SweepResult.to_pandas`` table that are tests of the family q and Holm adjust
    over: not the baseline, and not a router row scored on items its router trained on."""
    return df[~df["baseline"] & (df["in_sample"] == 0)]


def tested_delta(column: str, columns) -> str | None:
    """The ``_delta`` column a p-value column (``_p``, ``_q``, ``_holm``) tests, None for any other."""
    for suffix in ("_p", "_q", "_holm"):
        if column.endswith(suffix) and column[: -len(suffix)] + "_delta" in columns:
            return column[: -len(suffix)] + "_delta"
    return None


def best_first(df, by: str):
    """The rows of ``df`` best first by column ``by``: largest first, but for a p- or q-value the
    configs that improved on the baseline (their delta > 0) first, smallest p first, then the rest.
    Ties (common: few items give few distinct deltas) go by layer path, so the order never depends
    on the order records were written in (Ray workers finish in any order)."""
    ties = ["layers"] if "layers" in df.columns and by != "layers" else []
    delta = tested_delta(by, df.columns)
    if delta is None:
        return df.sort_values([by, *ties], ascending=[False] + [True] * len(ties), kind="stable")
    worse = ~(df[delta] > 0)  # NaN deltas count as not better
    return df.assign(_worse=worse).sort_values(["_worse", by, *ties], kind="stable").drop(columns="_worse")


def objective_columns(df, objectives: Sequence[str]) -> list[tuple[str, float]]:
    """(column, sign) per objective: a column name, or a probe name meaning its ``_delta``; a
    leading '-' minimises."""
    out = []
    for obj in objectives:
        sign = -1.0 if obj.startswith("-") else 1.0
        name = obj.lstrip("-")
        col = f"{name}_delta" if f"{name}_delta" in df.columns else name
        if col not in df.columns:
            raise ValueError(f"no objective column {name!r} (nor {name}_delta); columns: {', '.join(df.columns)}")
        out.append((col, sign))
    return out


def pareto_front(df, objectives: Sequence[str]):
    """The non-dominated rows of ``df`` over ``objectives`` (see the module docstring), best first
    by the first objective; the baseline takes part (a config it dominates is not on the front)."""
    if not objectives:
        raise ValueError("pareto needs at least one objective")
    cols = objective_columns(df, objectives)
    rows = df.dropna(subset=[c for c, _ in cols])
    values = np.stack([rows[c].to_numpy(dtype=np.float64) * s for c, s in cols], axis=1) if len(rows) else np.empty((0, 0))
    keep = []
    for k in range(len(rows)):
        at_least = np.all(values >= values[k], axis=1)
        better = np.any(values > values[k], axis=1)
        keep.append(not np.any(at_least & better))
    front = rows[np.array(keep, dtype=bool)] if len(rows) else rows
    first, sign = cols[0]
    return front.sort_values(first, ascending=sign < 0).reset_index(drop=True)


def _hover_text(row, probes: Sequence[str], metric: str) -> str:
    lines = [f"<b>{row['layers']}</b>", f"{metric}: {_fmt(row.get(metric))}"]
    for p in [*probes, "combined"]:
        if f"{p}_delta" not in row:
            continue
        line = (f"{p}: {_fmt(row[f'{p}_delta'])} [{_fmt(row.get(f'{p}_ci_low'))}, {_fmt(row.get(f'{p}_ci_high'))}]"
                f" q={_fmt(row.get(f'{p}_q'), 3)}")
        if f"{p}_parse" in row:
            line += f" parse={_fmt(row[f'{p}_parse'], 0)}%"
        lines.append(line)
    return "<br>".join(lines)


def _fmt(value, digits: int = 2) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if np.isnan(v) else f"{v:.{digits}f}"


def plotly_heatmap(df, num_layers: int, metric: str = "combined_delta", times: int = 2, probes: Sequence[str] = ()):
    """A plotly Figure of RYS configs (x: start i, y: end j) coloured by ``metric``, hover showing
    every probe's delta, CI, q and parse rate (see the module docstring)."""
    try:
        import plotly.graph_objects as go
    except ImportError as e:
        raise ImportError("the interactive heatmap needs plotly: pip install plotly") from e
    if metric not in df.columns:
        raise ValueError(f"no column {metric!r}; columns: {', '.join(df.columns)}")
    rys = df[(df["times"] == times) & df["start"].notna()]
    n = num_layers
    z = np.full((n + 1, n), np.nan)
    text = np.full((n + 1, n), "", dtype=object)
    for _, row in rys.iterrows():
        i, j = int(row["start"]), int(row["end"])
        z[j, i] = np.nan if row[metric] is None else float(row[metric])
        text[j, i] = _hover_text(row, probes, metric)
    finite = z[np.isfinite(z)]
    lim = (float(np.abs(finite).max()) if finite.size else 0.0) or 1.0
    diverging = metric.endswith("_delta")
    heat = go.Heatmap(z=z, x=list(range(n)), y=list(range(n + 1)), text=text, hoverinfo="text",
                      colorscale="RdBu" if diverging else "Viridis", zmid=0 if diverging else None,
                      zmin=-lim if diverging else None, zmax=lim if diverging else None, colorbar={"title": metric})
    fig = go.Figure(heat)
    fig.update_layout(title=f"{metric} by RYS config (times={times}), {len(rys)} configs",
                      xaxis_title="start i (first repeated layer)", yaxis_title="end j (repeat ends before layer j)",
                      width=760, height=640)
    return fig
