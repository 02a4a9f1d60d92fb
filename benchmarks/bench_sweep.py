"""Cost of a sweep with shared-prefix reuse vs without (every path recomputed from the embedding),
same model, probes, items and configs, in one run; checks that both give identical scores.

    .venv/bin/python benchmarks/bench_sweep.py                       # default model, likelihood
    .venv/bin/python benchmarks/bench_sweep.py --mode generate --max-items 4
    .venv/bin/python benchmarks/bench_sweep.py --model path/to/model --device cuda --block-sizes 3 4 5

Prints configs/minute for both and the ratio; --json writes the figures with machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

import circuit_finder as cf


def run(model, args, reuse: bool) -> tuple[float, cf.SweepResult]:
    t0 = time.perf_counter()
    result = cf.sweep(model, probes=args.probes, block_sizes=args.block_sizes, stride=args.stride, mode=args.mode,
                      max_items=args.max_items, reuse=reuse, progress=False)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--mode", choices=["likelihood", "generate"], default="likelihood")
    p.add_argument("--probes", nargs="+", default=["math", "eq", "reasoning"])
    p.add_argument("--block-sizes", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--max-items", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = cf.load(args.model, device=args.device, dtype=args.dtype)
    run(model, argparse.Namespace(**{**vars(args), "block_sizes": [2], "stride": 99, "max_items": 1}), True)  # warm-up
    t_reuse, with_reuse = run(model, args, True)
    t_plain, without = run(model, args, False)

    def strip(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    same = strip(with_reuse.records) == strip(without.records)
    n = len(with_reuse)
    slots = sum(len(cf.LayerPath.parse(r["layers"])) for r in with_reuse.records)
    figures = {
        "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "device": str(model.device), "dtype": str(model.dtype), "model": model.source,
        "mode": args.mode, "probes": args.probes, "max_items": args.max_items, "configs": n,
        "slots_per_config": slots / n, "threads": torch.get_num_threads(),
        "seconds_reuse": round(t_reuse, 2), "seconds_no_reuse": round(t_plain, 2),
        "configs_per_min_reuse": round(60 * n / t_reuse, 2), "configs_per_min_no_reuse": round(60 * n / t_plain, 2),
        "speedup": round(t_plain / t_reuse, 2), "identical_scores": same,
    }
    print(f"{n} configs ({args.mode}, {len(args.probes)} probes x {args.max_items} items, {model.device}, "
          f"{model.dtype}, {torch.get_num_threads()} threads)")
    print(f"  with shared-prefix reuse: {t_reuse:7.1f} s  ({figures['configs_per_min_reuse']:.1f} configs/min)")
    print(f"  without reuse:            {t_plain:7.1f} s  ({figures['configs_per_min_no_reuse']:.1f} configs/min)")
    print(f"  speedup x{figures['speedup']:.2f}; identical scores: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    if not same:
        raise SystemExit("scores differ between reuse and no reuse")


if __name__ == "__main__":
    main()
