"""Mixture-of-experts and hybrid decode and prefill against transformers (issue #14, item 5): one row
per family (Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS; Qwen3.5, Qwen3-Next and Qwen3.5-MoE, whose Gated DeltaNet
layers transformers runs with its torch reference here) on a random model of a small shape, same weights, RYS path,
batch, dtype and device, measured by run.py's bench_forward (tokens/s, timestamps as each token
comes out; the greedy tokens compared). Where the experts run as grouped GEMMs (a GPU in bf16), the
loop over experts (our previous path, CF_MOE_GROUPED=0) is measured in the same run too.

    .venv/bin/python benchmarks/bench_moe.py                 # CPU fp32, batch 1 and 8 (~5 min on 2 cores)
    python benchmarks/bench_moe.py --device cuda --dtype bfloat16
    .venv/bin/python benchmarks/bench_moe.py --quick         # seconds: checks the script works
    .venv/bin/python benchmarks/bench_moe.py --families gpt_oss   # one family

Writes benchmarks/results/<date>-moe-<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from run import bench_forward, bench_path, cpu_name  # noqa: E402

import circuit_finder as cf  # noqa: E402
from helpers import build_hf_model, rebuilt  # noqa: E402

# hidden, expert size, layers, heads, kv heads, experts, top-k, vocab: a small MoE (~100-200M)
SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, vocab_size=8192,
             max_position_embeddings=4096, tie_word_embeddings=False, rope_scaling=None)
FAMILIES = {
    "mixtral": dict(intermediate_size=704, num_local_experts=8, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": dict(intermediate_size=1408, moe_intermediate_size=352, num_experts=16, num_experts_per_tok=4,
                      shared_expert_intermediate_size=1408, mlp_only_layers=[], norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=1408, moe_intermediate_size=256, num_experts=32, num_experts_per_tok=4,
                      norm_topk_prob=True, decoder_sparse_step=1, head_dim=64),
    "gpt_oss": dict(intermediate_size=512, num_local_experts=16, num_experts_per_tok=4, head_dim=64, sliding_window=128,
                    swiglu_limit=7.0),
    # hybrid linear attention: full attention every 4th layer (layers 3, 7), Gated DeltaNet elsewhere
    "qwen3_5_text": dict(intermediate_size=1408, head_dim=64, layer_types=None, full_attention_interval=4,
                         linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
                         linear_value_head_dim=64),
    "qwen3_next": dict(intermediate_size=1408, head_dim=64, layer_types=None, full_attention_interval=4,
                       linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
                       num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                       shared_expert_intermediate_size=512, mlp_only_layers=[]),
    "qwen3_5_moe_text": dict(head_dim=64, layer_types=None, full_attention_interval=4, linear_num_key_heads=4,
                             linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64, num_experts=16,
                             num_experts_per_tok=4, moe_intermediate_size=256, shared_expert_intermediate_size=512),
}
QUICK = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"{m['date']}, {m['machine']}, torch {m['torch']}, {m['device']} {m['dtype']}", "",
             "| family (params) | slots | batch | prefill tok/s ours / HF | ratio | decode tok/s ours / HF | ratio "
             "| same greedy tokens |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        p, d = r["prefill_tok_s"], r["decode_tok_s"]
        lines.append(f"| {r['model']} ({r['params_M']}M) | {r['slots']} | {r['batch']} | "
                     f"{p['circuit_finder']:.0f} / {p['transformers']:.0f} | {p['ratio']:.2f} | "
                     f"{d['circuit_finder']:.1f} / {d['transformers']:.1f} | **{d['ratio']:.2f}** | "
                     f"{'yes' if r['same_greedy_tokens'] else 'no'} |")
    looped = [r for r in res["rows"] if "looped_experts" in r]
    if looped:
        lines += ["", "Experts as grouped GEMMs (no host sync, graph-replayed decode) vs the loop over experts, same run:",
                  "", "| family | batch | prefill tok/s grouped / looped | decode tok/s grouped / looped | ratio |",
                  "|---|---|---|---|---|"]
        for r in looped:
            lp, p, d = r["looped_experts"], r["prefill_tok_s"]["circuit_finder"], r["decode_tok_s"]["circuit_finder"]
            lines.append(f"| {r['model']} | {r['batch']} | {p:.0f} / {lp['prefill_tok_s']:.0f} | "
                         f"{d:.1f} / {lp['decode_tok_s']:.1f} | **{d / lp['decode_tok_s']:.2f}** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for family in args.families:
        extra = FAMILIES[family]
        with tempfile.TemporaryDirectory() as tmp:
            shape = {**SHAPE, **extra, **(QUICK if args.quick else {})}
            if args.quick:
                shape = {k: v for k, v in shape.items() if k != "head_dim"}
            hf = build_hf_model(family, tmp, **shape)
            ours = cf.load(tmp, device=device, dtype=dtype)
            ref = rebuilt(hf, list(bench_path(ours))).to(device=device, dtype=dtype).eval()
            del hf
            sizes = (8, 4, 1) if args.quick else (64, 16, args.repeat)  # prompt, new tokens, repeats
            for b in ([1] if args.quick else args.batches):
                r = bench_forward(family, ours, ref, b, *sizes, None)
                if ours.engine.moe_without_host_sync():  # grouped experts: the loop over experts in the same run
                    before = os.environ.get("CF_MOE_GROUPED")
                    os.environ["CF_MOE_GROUPED"] = "0"
                    try:
                        looped = bench_forward(family, ours, ref, b, *sizes, None)
                    finally:
                        os.environ.pop("CF_MOE_GROUPED")
                        if before is not None:
                            os.environ["CF_MOE_GROUPED"] = before
                    r["looped_experts"] = {k: looped[k]["circuit_finder"]
                                           for k in ("prefill_tok_s", "decode_tok_s", "decode_steady_tok_s")}
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    date = datetime.date.today().isoformat()
    res = {"meta": {"date": date, "machine": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
                    "torch": torch.__version__, "device": device.type, "dtype": args.dtype,
                    "threads": torch.get_num_threads(), "quick": args.quick}, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"{date}-moe-{device.type}{'-quick' if args.quick else ''}.json"
    if file.exists() and set(args.families) != set(FAMILIES):  # a subset run replaces only its families' rows
        kept = [r for r in json.loads(file.read_text())["rows"] if r["model"] not in args.families]
        res["rows"] = kept + rows
    file.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
