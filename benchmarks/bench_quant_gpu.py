"""Packed GGUF matrices on a GPU (issue #15's GPU half): a random Llama of a real shape (default
Llama-3-8B's) whose every matrix is blocks of one ggml type (Q4_K by default; rows of quantized
N(0, 0.02^2) weights), run in one process on the same weights three ways — packed (the blocks on the
device: cuda/quant.cu), our engine on the blocks dequantized to the compute dtype, and transformers
on those dequantized tensors — measured by run.py's bench_forward along the RYS path: prefill and
decode tokens/s at batch 1 and 16, the weights' bytes, and each route's share of the memory
roofline at batch 1 (weight bytes a step reads / step time over the copy bandwidth of the run).
Before the models, per product of the 8B shape's matrices (q/o, gate/up, down, LM head) in Q4_K,
BF16 (ggml's rows of bf16: the dense bf16 matrix itself, so its rows say whether our gemv beats
cuBLAS's split-K GEMV on a plain bf16 model), Q6_K and Q8_0: the packed product's time at 1, 8, 16
and 64 rows of x (GPU_ROWS; up to 8 the blocks are read directly, beyond that dequantized to the
compute dtype a slice at a time for cuBLAS; at 16 and 64 also the direct kernels 8 rows a launch,
direct_rows) through the chunk kernels (eight elements a lane; the default) and the per-element
kernels (chunks=False, the first version), and cuBLAS on the same weights dense in the compute
dtype; and the dequantization to the compute dtype alone through both kernels. Each is replayed
from a CUDA graph of 20 calls, so launch gaps do not count.

    python benchmarks/bench_quant_gpu.py --device cuda            # H100: ~3 min
    python benchmarks/bench_quant_gpu.py --device cuda --type Q8_0 --shape 1b
    .venv/bin/python benchmarks/bench_quant_gpu.py --quick        # CPU, seconds: checks the script works

Writes benchmarks/results/<date>-quant-<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from run import RANDOM_SHAPES, bench_forward, bench_path, copy_bandwidth, cpu_name, device_pair  # noqa: E402

import circuit_finder as cf  # noqa: E402
from circuit_finder import _C  # noqa: E402
from circuit_finder.quants import PACKED_TYPES, PackedTensor, is_matrix_name, quantize_matrix  # noqa: E402
from helpers import rebuilt  # noqa: E402

BLOCK = {"Q4_K": 256, "Q6_K": 256, "Q8_0": 32, "Q4_0": 32}  # elements per block of the types offered
SEED_ROWS = 64


def random_blocks(kind: str, rows: int, cols: int, device, gen: torch.Generator, made: dict) -> torch.Tensor:
    """uint8 [rows, row_bytes] of `kind`: each row one of SEED_ROWS rows of N(0, 0.02^2) weights
    (transformers' initialisation scale) packed by quants.quantize_matrix, drawn at random — real
    blocks (scales fitted to their values) without quantizing an 8B model's every row on the host."""
    if (kind, cols) not in made:
        made[kind, cols] = quantize_matrix(torch.randn(SEED_ROWS, cols, generator=gen) * 0.02, kind).blocks
    return made[kind, cols][torch.randint(0, SEED_ROWS, (rows,), generator=gen)].to(device)


def packed_models(shape: str, kind: str, device, dtype):
    """(label, packed Model, dense Model, transformers model): the dense two share the tensors the
    packed blocks decode to."""
    label, dense, hf = device_pair(shape, device, dtype)
    gen = torch.Generator().manual_seed(0)
    decode = _C.gpu_dequantize_packed if torch.device(device).type == "cuda" else _C.dequantize_packed
    state, packed, made = dict(hf.state_dict()), {}, {}
    with torch.no_grad():
        for name, p in state.items():
            if is_matrix_name(name) and p.dim() == 2 and p.shape[1] % BLOCK[kind] == 0:
                blocks = random_blocks(kind, p.shape[0], p.shape[1], device, gen, made)
                p.copy_(decode(blocks, PACKED_TYPES[kind], p.shape[1], dtype))
                packed[name] = PackedTensor(blocks, kind, p.shape[1], name)
    ours = cf.load_from_tensors(hf.config.to_dict(), {**state, **packed}, device=device, dtype=dtype,
                                source=f"random-{shape}-{kind}")
    return f"{label}, {kind}", ours, dense, hf


PRODUCTS = {"q/o": (4096, 4096), "gate/up": (14336, 4096), "down": (4096, 14336), "head": (128256, 4096)}
GPU_ROWS = (1, 8, 16, 64)


def graph_time(fn, calls: int = 20, repeat: int = 5) -> float:
    """Seconds per call of fn, replayed from a CUDA graph of `calls` calls (best of `repeat`); warmed
    up on a side stream first, as torch's capture advice says (cuBLAS's workspace set up there)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return min(times)


def product_row(kind: str, name: str, blocks: torch.Tensor, k: int, dtype, bandwidth: float) -> dict:
    """One packed matrix: weight GB/s and share of the copy bandwidth at GPU_ROWS rows of x for the
    chunk kernels, the per-element kernels and cuBLAS on the dense weights; dequantization GB/s
    (bytes written) through both kernels."""
    t, n = PACKED_TYPES[kind], blocks.shape[0]
    dense = _C.gpu_dequantize_packed(blocks, t, k, dtype)
    row = {"type": kind, "product": name, "N": n, "K": k, "packed_MB": blocks.nbytes / 1e6}
    for m in GPU_ROWS:
        x = torch.randn(m, k, device=blocks.device, dtype=dtype)
        routes = {"chunks": (lambda x=x: _C.gpu_linear_packed(x, blocks, t, k), blocks.nbytes),
                  "elements": (lambda x=x: _C.gpu_linear_packed(x, blocks, t, k, None, False), blocks.nbytes),
                  "cublas": (lambda x=x: torch.nn.functional.linear(x, dense), dense.nbytes)}
        if m > 8:  # the direct kernels 8 rows of x per launch, the blocks read once per launch
            routes["groups"] = (lambda x=x, m=m: _C.gpu_linear_packed(x, blocks, t, k, None, True, m),
                                blocks.nbytes * -(-m // 8))
        for route, (fn, read) in routes.items():
            sec = graph_time(fn)
            row[f"{route}_{m}_us"], row[f"{route}_{m}_roofline"] = sec * 1e6, read / sec / bandwidth
    for route, chunks in (("chunks", True), ("elements", False)):
        sec = graph_time(lambda chunks=chunks: _C.gpu_dequantize_packed(blocks, t, k, dtype, chunks))
        row[f"dequant_{route}_GB_s"] = dense.nbytes / sec / 1e9
    return row


def product_rows(device, dtype, bandwidth: float) -> list[dict]:
    """product_row for every type and matrix of PRODUCTS."""
    gen, made, rows = torch.Generator().manual_seed(1), {}, []
    for kind in ("Q4_K", "BF16", "Q6_K", "Q8_0"):  # BF16: our gemv against cuBLAS on the very same dense matrix
        for name, (n, k) in PRODUCTS.items():
            rows.append(product_row(kind, name, random_blocks(kind, n, k, device, gen, made), k, dtype, bandwidth))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def product_markdown(rows: list[dict]) -> str:
    lines = ["| type | product | rows of x | chunks us (roofline) | elements us (roofline) | chunks / elements | "
             "cuBLAS dense us (roofline) | direct, 8 rows a launch, us (roofline) | dequant GB/s chunks / elements |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for m in GPU_ROWS:
            groups = (f"{r[f'groups_{m}_us']:.1f} ({100 * r[f'groups_{m}_roofline']:.0f}%)"
                      if f"groups_{m}_us" in r else "")
            lines.append(f"| {r['type']} | {r['product']} {r['N']}x{r['K']} | {m} | {r[f'chunks_{m}_us']:.1f} "
                         f"({100 * r[f'chunks_{m}_roofline']:.0f}%) | {r[f'elements_{m}_us']:.1f} "
                         f"({100 * r[f'elements_{m}_roofline']:.0f}%) | "
                         f"**{r[f'elements_{m}_us'] / r[f'chunks_{m}_us']:.2f}x** | {r[f'cublas_{m}_us']:.1f} "
                         f"({100 * r[f'cublas_{m}_roofline']:.0f}%) | {groups} | {r['dequant_chunks_GB_s']:.0f} / "
                         f"{r['dequant_elements_GB_s']:.0f} |")
    return "\n".join(lines)


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"{m['date']}, {m['machine']}, torch {m['torch']}, {m['device']} {m['dtype']}, copy bandwidth "
             f"{m['copy_bandwidth_GB_s']:.0f} GB/s", "",
             "| route | weights GB | batch | prefill tok/s ours / HF | decode tok/s ours / HF | ratio | b1 roofline |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        p, d = r["prefill_tok_s"], r["decode_tok_s"]
        roof = f"{100 * r['decode_roofline']:.0f}%" if "decode_roofline" in r else ""
        lines.append(f"| {r['route']} | {r['weight_GB']:.2f} | {r['batch']} | {p['circuit_finder']:.0f} / "
                     f"{p['transformers']:.0f} | {d['circuit_finder']:.1f} / {d['transformers']:.1f} | "
                     f"**{d['ratio']:.2f}** | {roof} |")
    return "\n".join(lines)


def model_rows(args, device, dtype, bandwidth: float) -> list[dict]:
    """bench_forward's rows for the packed model and the same weights dequantized (transformers on
    them in each row)."""
    label, packed, dense, hf = packed_models(args.shape, args.type, device, dtype)
    ref = rebuilt(hf, list(bench_path(dense))).to(device=device, dtype=dtype).eval()
    rows = []
    for route, model in (("packed", packed), ("dequantized", dense)):
        for b in args.batches:
            r = bench_forward(label, model, ref, b, 8 if args.quick else 64, 4 if args.quick else 32, args.repeat,
                              bandwidth)
            r["route"], r["weight_GB"] = route, sum(model.weight_bytes().values()) / 1e9
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shape", default="8b", choices=sorted(RANDOM_SHAPES))
    ap.add_argument("--type", default="Q4_K", choices=sorted(BLOCK))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sections", nargs="+", default=["products", "models"], choices=["products", "models"],
                    help="the per-product table (CUDA only) and / or the model routes")
    ap.add_argument("--quick", action="store_true", help="CPU fp32, tiny shape, batch 1: checks the script runs")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.device, args.dtype, args.shape, args.batches, args.repeat = "cpu", "float32", "tiny", [1], 1
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    bandwidth = copy_bandwidth(device)
    products = product_rows(device, dtype, bandwidth) if device.type == "cuda" and "products" in args.sections else []
    rows = model_rows(args, device, dtype, bandwidth) if "models" in args.sections else []
    date = datetime.date.today().isoformat()
    res = {"meta": {"date": date, "machine": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
                    "torch": torch.__version__, "device": device.type, "dtype": args.dtype, "type": args.type,
                    "shape": args.shape, "copy_bandwidth_GB_s": bandwidth / 1e9, "quick": args.quick}, "rows": rows,
           "products": products}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    part = "" if len(set(args.sections)) == 2 else f"-{args.sections[0]}"
    file = out / f"{date}-quant{part}-{device.type}{'-quick' if args.quick else ''}.json"
    file.write_text(json.dumps(res, indent=1))
    if rows:
        print(markdown(res))
    if products:
        print(product_markdown(products))
    print(f"written: {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
