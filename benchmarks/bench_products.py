"""One packed product at a time (issue #15): G weights/s (N x K x rows / time) of x [rows, K] times
a packed [N, K] matrix of random blocks, per instruction set this CPU has — packed with float
activations, packed with 8-bit activations (``activations="q8"``'s kernels; and as a CPU without VNNI runs them, the ``-novnni``
column, which differs from the other only where the tiled int8 kernels take the rows), and our skinny fp32
GEMM and ATen's on the same matrix dequantized — best of --repeat, one process, same threads.
What sets the row rules in csrc/kernels/cpu/quant_blocks.h (q8_max_rows, quant_k_major) and
what a CPU without AVX-512 gets (the avx2 columns run here on an AVX-512 machine measure that code,
at this machine's speed). Limits: random blocks, no model around the product (caches warm).

    .venv/bin/python benchmarks/bench_products.py                 # ~3 min on 2 cores
    .venv/bin/python benchmarks/bench_products.py --types Q4_K --rows 1 4 16 --shapes 4096x4096
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bench_quant import best  # noqa: E402  (the script's folder is on the path)

from circuit_finder import _C  # noqa: E402
from circuit_finder.quants import PACKED_TYPES  # noqa: E402
from helpers import random_packed  # noqa: E402

ISAS = [isa for isa in ("avx2", "avx512") if _C.cpu_isa().removesuffix("-novnni") in (isa, "avx512")]


def measure(kind: str, n: int, k: int, rows: int, repeat: int) -> dict:
    """G weights/s of each route for one type, shape and row count."""
    raw = torch.from_numpy(random_packed(kind, n, k))
    ident = PACKED_TYPES[kind]
    dense = _C.dequantize_packed(raw, ident, k, torch.float32, "")
    x = torch.randn(rows, k)
    rate = {}

    def put(name, fn):
        rate[name] = round(n * k * rows / best(fn, repeat) / 1e9, 3)

    for isa in ISAS:
        put(f"{isa} packed", lambda isa=isa: _C.linear_packed(x, raw, ident, k, None, isa, False))
        put(f"{isa} packed q8", lambda isa=isa: _C.linear_packed(x, raw, ident, k, None, isa, True))
        put(f"{isa}-novnni packed q8", lambda isa=f"{isa}-novnni": _C.linear_packed(x, raw, ident, k, None, isa, True))
        put(f"{isa} dequantized", lambda isa=isa: _C.skinny_linear(x, dense, None, isa))
    put("aten dequantized", lambda: torch.nn.functional.linear(x, dense))
    return {"type": kind, "shape": f"{n}x{k}", "rows": rows, "g_weights_s": rate}


def markdown(rows: list[dict]) -> str:
    routes = list(rows[0]["g_weights_s"])
    lines = ["| type | N x K | rows | " + " | ".join(routes) + " |", "|---|---|---|" + "---|" * len(routes)]
    for r in rows:
        lines.append(f"| {r['type']} | {r['shape']} | {r['rows']} | "
                     + " | ".join(f"{r['g_weights_s'][name]:.1f}" for name in routes) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="+", default=["Q4_K", "Q6_K", "Q8_0", "Q4_1", "Q5_0"])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "1536x576"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs (seconds)")
    args = ap.parse_args(argv)
    if args.quick:
        args.types, args.shapes, args.rows, args.repeat = ["Q4_K", "Q4_1"], ["64x256"], [1, 17], 1
    torch.set_num_threads(args.threads)
    results = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        for kind in args.types:
            try:
                _C.packed_row_bytes(PACKED_TYPES[kind], k)
            except _C.WeightError as e:  # a K that is not whole blocks of this type (K-quants: 256)
                print(f"skipped: {e}", flush=True)
                continue
            for rows in args.rows:
                results.append(measure(kind, n, k, rows, args.repeat))
                print(json.dumps(results[-1]), flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    meta = {"date": date, "machine": platform.processor() or platform.machine(), "threads": args.threads,
            "torch": torch.__version__, "cpu_kernels": _C.cpu_isa(), "repeat": args.repeat}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{date}-products-cpu" + ("-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "products": results}, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
