"""Does a per-prompt router beat the best fixed path? Router vs best fixed path vs oracle on
held-out items, and what routing costs per request.

    .venv/bin/python benchmarks/bench_router.py                  # default model, both modes
    .venv/bin/python benchmarks/bench_router.py --modes likelihood --json out.json

For each mode: a sweep of RYS configs (block sizes 2, 4, 6, 8 at every --stride-th start: 4 in likelihood
mode, 8 in generate mode by default) over every search item of the math, eq and reasoning probes
(results in benchmarks/results/router-<mode>.jsonl, resumed when killed: another --stride adds its
configs to that file, and the routers then train on a sweep other than the one RESULTS.md reports); two routers trained on it with cf.train_router (4 candidates: identity and
the top 3 by combined_delta; mean-pooled features): one with the default fallback (a constant
choice unless cross-validation on search items says routing wins) and one forced to route
(fallback=False). Each router's held-out reading — vs the baseline, the best fixed path (best
search score) and the oracle, paired bootstrap CIs over items — comes from train_router's own
evaluation, which also reads it against a fixed path per probe (the candidate with
each probe's best search score). Overhead: single-prompt greedy generation (16 new tokens, chat template) along the
router vs along the path it chose, best of 3, on 12 held-out prompts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

import circuit_finder as cf
from circuit_finder.probes import get_probe

ROOT = Path(__file__).resolve().parent
PROBES = ("math", "eq", "reasoning")


def run_mode(model, mode: str, seed: int, stride: int) -> dict:
    results = ROOT / "results" / f"router-{mode}.jsonl"
    t0 = time.perf_counter()
    sweep = cf.sweep(model, probes=PROBES, block_sizes=(2, 4, 6, 8), stride=stride, mode=mode, results=results,
                     progress=True)
    sweep_s = time.perf_counter() - t0
    out = {"mode": mode, "configs": len(sweep), "stride": stride, "sweep_s": round(sweep_s, 1), "routers": {}}
    for label, fallback in (("default", True), ("forced", False)):
        t0 = time.perf_counter()
        router = cf.train_router(sweep, candidates=4, fallback=fallback, seed=seed, name=f"bench-{mode}-{label}")
        router.save(ROOT / "results" / f"router-{mode}-{label}.json")
        out["routers"][label] = {"seconds": round(time.perf_counter() - t0, 1), "kind": router.kind,
                                 "candidates": [str(c) for c in router.candidates], "layer": router.layer,
                                 "training": {k: router.training[k] for k in ("items", "informative", "labels", "cv",
                                                                              "fit", "C")},
                                 "evaluation": router.evaluation, "report": router.report()}
        print(router.report(), flush=True)
    out["overhead"] = overhead(model, router)
    return out


def overhead(model, router, prompts: int = 12, repeats: int = 3, new_tokens: int = 16) -> dict:
    """Per request: generation along the router vs along the path it picked (same prompt, batch 1)."""
    items = get_probe("math").items("validation")[:prompts]
    routed, fixed, choose = [], [], []
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, chat=True)
    for it in items:
        path = router.path_for(model, it.prompt, chat=True)
        ids = model.codec.encode_prompt(it.prompt, True)
        routed.append(_best_of(lambda: model.generate(it.prompt, layers=router, **gen), repeats))  # noqa: B023
        fixed.append(_best_of(lambda: model.generate(it.prompt, layers=path, **gen), repeats))  # noqa: B023
        choose.append(_best_of(lambda: router.choose(model, [ids]), repeats))  # noqa: B023
    r, f, c = (sum(x) / len(x) * 1e3 for x in (routed, fixed, choose))
    return {"prompts": len(items), "new_tokens": new_tokens, "routed_ms": round(r, 2), "fixed_ms": round(f, 2),
            "overhead_ms": round(r - f, 2), "overhead_pct": round(100 * (r - f) / f, 1),
            "choose_alone_ms": round(c, 2), "router": router.name}


def _best_of(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls, in seconds (called right away: loop variables are current)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def markdown(report: dict) -> str:
    roles = ("baseline", "best_fixed", "best_per_probe", "oracle")
    lines = [f"Router benchmark, {report['date']}, {report['machine']}, torch {report['torch']}, "
             f"{report['threads']} threads, default model fp32.", "",
             "| mode | router | kind | baseline | best fixed | best fixed per probe | router | oracle | "
             "router - best fixed (95% CI) | router - best fixed per probe (95% CI) | router - baseline (95% CI) | "
             "router - oracle (95% CI) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in report["modes"]:
        for label, r in m["routers"].items():
            ev = r["evaluation"]
            mean = {k: ev["means"][k]["combined"] for k in (*roles, "router")}
            v = {k: ev["versus"][k] for k in roles}
            lines.append(f"| {m['mode']} | {label} | {r['kind']} | {mean['baseline']:.2f} | {mean['best_fixed']:.2f} | "
                         f"{mean['best_per_probe']:.2f} | {mean['router']:.2f} | {mean['oracle']:.2f} | "
                         + " | ".join(f"{v[k]['combined_delta']:+.2f} ({v[k]['combined_ci_low']:+.2f}, "
                                      f"{v[k]['combined_ci_high']:+.2f}), p={v[k]['combined_p']:.3g}"
                                      for k in ("best_fixed", "best_per_probe", "baseline", "oracle")) + " |")
    lines += ["", "| mode | routed ms/request | fixed path ms/request | overhead | routing decision alone |",
              "|---|---|---|---|---|"]
    for m in report["modes"]:
        o = m["overhead"]
        lines.append(f"| {m['mode']} | {o['routed_ms']} | {o['fixed_ms']} | {o['overhead_ms']} ms "
                     f"({o['overhead_pct']}%) | {o['choose_alone_ms']} ms |")
    return "\n".join(lines)


STRIDE = {"likelihood": 4, "generate": 8}  # generate mode's configs take ~66 s each on 2 cores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--modes", nargs="+", default=["likelihood", "generate"], choices=["likelihood", "generate"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stride", type=int, default=None,
                    help="grid stride of the sweep's starts (default: 4 in likelihood mode, 8 in generate mode, "
                         "as the runs RESULTS.md reports and their cached sweeps in results/ were made)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = cf.load(args.model, dtype="float32")
    report = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "modes": [run_mode(model, mode, args.seed, args.stride or STRIDE[mode]) for mode in args.modes]}
    text = markdown(report)
    print(text)
    path = Path(args.json) if args.json else ROOT / "results" / f"{report['date']}-router-{'-'.join(args.modes)}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"# written to {path}")


if __name__ == "__main__":
    main()
