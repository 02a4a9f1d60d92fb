"""What splitting a model over devices costs (issue #17): the same model, path, batch and dtype on
one GPU, split between the GPU and the CPU, and (for scale) on the CPU alone, in one run.

    python benchmarks/bench_placement.py --device cuda --dtype bfloat16            # 1B-shape random Llama
    python benchmarks/bench_placement.py --model PATH --split 20 --device cuda      # a real model
    .venv/bin/python benchmarks/bench_placement.py --quick                         # smoke run, any machine

Per placement: prefill tokens/s (batch 1, --prompt tokens), decode tokens/s (batch 1 and --batch,
greedy, --new tokens; seconds per step between the first and last token), the hidden-state
transfers one forward makes along the path, and the largest logit difference from the one-device
run. The path is RYS (the middle third repeated), so with the split inside the repeated block the
hidden state crosses to the CPU and back. Without a GPU the "split" is two groups on the CPU (no
transfers): the script runs, but the figures say nothing about the split's cost.

Writes benchmarks/results/<date>-placement-<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from run import RANDOM_SHAPES, best_time, random_pair, sync  # noqa: E402

import circuit_finder as cf  # noqa: E402
from circuit_finder import LayerPath  # noqa: E402
from circuit_finder.generation import generate_ids  # noqa: E402


def transfers(model: cf.Model, path: LayerPath) -> int:
    """Hidden-state hops between devices in one forward along path (the return to main included)."""
    where = [model.device] + [model.placement.layers[i] for i in path] + [model.device]
    return sum(a != b for a, b in zip(where, where[1:]))


def decode_rate(model: cf.Model, ids: torch.Tensor, path: LayerPath, new: int, repeat: int) -> float:
    """Decode tokens/s per row: steps between the first and last generated token, best of repeat."""
    best = float("inf")
    for _ in range(repeat + 1):
        stamps = []
        sampling = cf.Sampling(max_new_tokens=new, min_new_tokens=new)
        sync(model.device)
        generate_ids(model, ids, None, path, sampling, on_step=lambda *_, s=stamps: s.append(time.perf_counter()))
        best = min(best, (stamps[-1] - stamps[0]) / (len(stamps) - 1))
    return 1.0 / best


def measure(label: str, model: cf.Model, path: LayerPath, args,
            reference: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt), generator=g).to(model.device)
    with torch.inference_mode():
        logits = model.logits(prompt, layers=path)
    prefill = best_time(lambda: model.logits(prompt, layers=path), model.device, args.repeat)
    short = prompt[:, :16]
    row = {"placement": label, "map": str(model.placement), "transfers_per_forward": transfers(model, path),
           "prefill_tok_s": args.prompt / prefill,
           "decode_tok_s_b1": decode_rate(model, short, path, args.new, args.repeat),
           f"decode_tok_s_b{args.batch}": args.batch * decode_rate(model, short.expand(args.batch, -1).contiguous(),
                                                                   path, args.new, args.repeat)}
    if reference is not None:
        row["max_logit_diff_vs_one_device"] = (logits.float().cpu() - reference).abs().max().item()
    return row, logits.float().cpu()


def placements(n: int, split: int, device: str) -> list[tuple[str, dict]]:
    gpu = torch.cuda.is_available() and device.startswith("cuda")
    if not gpu:
        return [("cpu", {}), (f"cpu {split} + cpu {n - split} (no transfer)", {"device_map": f"cpu={split},cpu={n - split}"})]
    return [("cuda:0", {"device": "cuda:0"}),
            (f"cuda:0 {split} + cpu {n - split}", {"device_map": f"cuda:0={split},cpu={n - split}"}),
            ("cpu", {"device": "cpu"})]


def markdown(res: dict) -> str:
    b = res["meta"]["batch"]
    lines = [f"{res['meta']['model']}, {res['meta']['dtype']}, path {res['meta']['path']} "
             f"({res['meta']['date']}, {res['meta']['device_name']}, torch {res['meta']['torch']})", "",
             f"| placement | transfers/forward | prefill tok/s | decode tok/s b1 | decode tok/s b{b} | vs one device |",
             "| --- | --- | --- | --- | --- | --- |"]
    base = res["rows"][0]
    for r in res["rows"]:
        ratio = r["decode_tok_s_b1"] / base["decode_tok_s_b1"]
        diff = r.get("max_logit_diff_vs_one_device")
        lines.append(f"| {r['placement']} | {r['transfers_per_forward']} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s_b1']:.1f} | {r[f'decode_tok_s_b{b}']:.1f} | decode x{ratio:.2f}"
                     f"{'' if diff is None else f', max logit diff {diff:.2e}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a model folder or .gguf (default: a random Llama of --shape)")
    ap.add_argument("--shape", default="1b", choices=sorted(RANDOM_SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--split", type=int, default=None, help="layers on the GPU (default: half)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny model, short runs: checks the script works")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.prompt, args.new, args.batch, args.repeat = "tiny", 32, 4, 2, 1
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            label, first, _ = random_pair(args.shape, Path(tmp), "cpu", dtype)
            source = Path(tmp)
        else:
            source, first = args.model, cf.load(args.model, dtype=dtype)
            label = Path(str(source)).name
        n = first.num_layers
        del first
        path = LayerPath.duplicate(n, n // 3, 2 * n // 3)
        rows, reference = [], None
        for name, kw in placements(n, args.split or n // 2, args.device):
            model = cf.load(source, dtype=dtype, **kw)
            row, logits = measure(name, model, path, args, reference)
            reference = logits if reference is None else reference
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            del model
    date = datetime.date.today().isoformat()
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    res = {"meta": {"date": date, "model": label, "dtype": dtype, "path": str(path), "batch": args.batch,
                    "device_name": device_name, "torch": torch.__version__, "quick": args.quick}, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    (out / f"{date}-placement-{kind}{'-quick' if args.quick else ''}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
