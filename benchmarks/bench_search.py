"""How well do search strategies spend a budget? The full (i, j) scan of a model is the oracle: for
budgets of 5%, 10% and 20% of the scan and several seeds, each strategy's best config (by the
search objective, combined_delta on the search items) is ranked in the full scan.

    .venv/bin/python benchmarks/bench_search.py                        # default model, likelihood
    .venv/bin/python benchmarks/bench_search.py --seeds 10 --json out.json

The scan runs once through cf.sweep and is cached in its results file (--scan; resumed when
killed; --fresh starts it again, as a file made with other probe items must be). Strategies then run against the cached scores — no model compute — so every strategy
sees exactly the numbers the scan measured:
- random: ``budget`` configs drawn from the scan;
- grid: single blocks of sizes 2, 4, 6, 8 at a stride giving at most ``budget`` configs (the seed
  shifts the starts);
- refine: a coarse grid of half the budget, then stride-1 neighbours of its 3 best until the budget;
- surrogate: ``circuit_finder.sweep.search.surrogate_search`` (initial design: a shuffled coarse
  grid), the same code sweep(strategy="surrogate") runs.
Target (issue #18): the surrogate finds a config in the scan's top 2% with <= 15% of its
evaluations in most seeds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import numpy as np
import torch

import circuit_finder as cf
from circuit_finder.layer_path import LayerPath
from circuit_finder.results import read_records
from circuit_finder.sweep import make_configs, refine_configs
from circuit_finder.sweep.search import objective, surrogate_search

ROOT = Path(__file__).resolve().parent


def oracle_scores(path: Path, n: int) -> dict[str, float]:
    """combined_delta of every config in a scan's results file, rounded to 9 decimals (means of the
    same item scores summed in another order must tie, not rank by float noise)."""
    _, records = read_records(path)
    recs = {r["layers"]: r for r in records if r.get("split", "search") == "search"}
    base = recs[str(LayerPath.identity(n))]
    return {k: round(objective(r, base, "combined_delta"), 9) for k, r in recs.items()
            if k != str(LayerPath.identity(n))}


def _grid(n: int, budget: int, seed: int, sizes=(2, 4, 6, 8)):
    for stride in range(1, n + 1):
        configs = [c for b in sizes for c in make_configs(n, "grid", (b,), range(seed % stride, n - b + 1, stride))]
        if len(configs) <= budget:
            return configs
    return make_configs(n, "grid", (sizes[0],), [seed % n])[:budget]


def run_strategy(name: str, n: int, scores: dict[str, float], budget: int, seed: int) -> list[str]:
    """The configs a strategy looks at (each once, at most ``budget``), against cached scores."""
    scan = make_configs(n, "scan")
    if name == "random":
        order = np.random.default_rng(seed).permutation(len(scan))[:budget]
        return [scan[k].key for k in order]
    if name == "grid":
        return [c.key for c in _grid(n, budget, seed)]
    if name == "refine":
        coarse = _grid(n, max(1, budget // 2), seed)
        winners = sorted(coarse, key=lambda c: -scores[c.key])[:3]
        seen = [c.key for c in coarse]
        for c in refine_configs(n, winners, 2, (2,)):
            if len(seen) >= budget:
                break
            if c.key not in seen:
                seen.append(c.key)
        return seen
    initial = _grid(n, max(1, budget // 3), seed)
    initial = [initial[k] for k in np.random.default_rng(seed).permutation(len(initial))]
    _, log = surrogate_search(n, lambda cs: {c.key: scores[c.key] for c in cs}, budget, scan, initial, seed=seed)
    return log.looked


def rank_of_best(looked: list[str], scores: dict[str, float]) -> int:
    """1 + how many scan configs score strictly higher than the best config looked at."""
    best = max(scores[k] for k in looked)
    return 1 + sum(v > best for v in scores.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--probes", nargs="+", default=["math", "reasoning"])
    p.add_argument("--max-items", type=int, default=12)
    p.add_argument("--scan", default=str(ROOT / "results" / "scan-default-likelihood.jsonl"))
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.10, 0.20])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--fresh", action="store_true",
                   help="start the scan's results file again (needed when the probes' items changed since it was made)")
    args = p.parse_args(argv)
    model = cf.load(args.model)
    n = model.num_layers
    cf.sweep(model, probes=args.probes, strategy="scan", mode="likelihood", max_items=args.max_items,
             results=args.scan, resume=not args.fresh, progress=True)
    scores = oracle_scores(Path(args.scan), n)
    total = len(scores)
    rows = []
    for frac in args.budgets:
        budget = max(1, round(frac * total))
        for name in ("random", "grid", "refine", "surrogate"):
            ranks = [rank_of_best(run_strategy(name, n, scores, budget, s), scores) for s in range(args.seeds)]
            top2 = sum(r <= max(1, round(0.02 * total)) for r in ranks)
            rows.append({"budget_frac": frac, "budget": budget, "strategy": name, "ranks": ranks,
                         "median_rank": float(np.median(ranks)), "seeds_in_top_2pct": top2})
    print(f"# {total} scan configs of {model}; probes {args.probes}, {args.max_items} items, likelihood mode")
    print("| budget | strategy | rank of best found, per seed | median | seeds in top 2% |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget_frac']:.0%} ({r['budget']}) | {r['strategy']} | {r['ranks']} | {r['median_rank']:.0f} | "
              f"{r['seeds_in_top_2pct']}/{args.seeds} |")
    if args.json:
        meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__, "threads": torch.get_num_threads(), "scan": args.scan}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
