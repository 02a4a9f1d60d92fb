"""Mixture-of-experts and hybrid decode and prefill against transformers (issue #14, item 5): one row
per family (Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS; Qwen3.5, Qwen3-Next and Qwen3.5-MoE, whose Gated DeltaNet
layers transformers runs with its torch reference here) on a random model of a small shape, same weights, RYS path,
batch, dtype and device, measured by run.py's bench_forward (tokens/s, timestamps as each token
comes out; the greedy tokens compared). Where the experts run without a host sync (grouped products
on a GPU: Engine::expert_route), the other routes are measured in the same run too: the grouped GEMV
kernel (CF_MOE_GROUPED=0, where _grouped_mm is the default; "(default)" where the kernel is) and the
loop over experts (our previous path, CF_MOE_GROUPED=0 CF_MOE_GEMV=0). --gguf QTYPE runs ours on the
model written as a GGUF of that type (packed experts; transformers keeps the float model, so its
tokens are not compared).

    .venv/bin/python benchmarks/bench_moe.py                 # CPU fp32, batch 1 and 8 (~5 min on 2 cores)
    python benchmarks/bench_moe.py --device cuda --dtype bfloat16
    python benchmarks/bench_moe.py --device cuda --dtype bfloat16 --gguf Q4_0 --families mixtral qwen3_moe
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
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from run import bench_forward, bench_path, cpu_name  # noqa: E402

import circuit_finder as cf  # noqa: E402
from helpers import build_hf_model, rebuilt, write_gguf  # noqa: E402

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
GGUF_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")  # the ones helpers.write_gguf lays out
# The other expert routes measured beside the default one (names: the table's columns)
ROUTES = {"grouped_gemv": {"CF_MOE_GROUPED": "0"}, "looped": {"CF_MOE_GROUPED": "0", "CF_MOE_GEMV": "0"}}
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
                     f"{'- (GGUF)' if m.get('gguf') else 'yes' if r['same_greedy_tokens'] else 'no'} |")
    routed = [r for r in res["rows"] if "routes" in r]
    if routed:
        lines += ["", "Expert routes, same run (decode tok/s; default: the route Engine::expert_route takes, without a "
                  "host sync, graph-replayed decode; grouped_gemv: CF_MOE_GROUPED=0; looped: our previous path):", "",
                  "| family | batch | prefill tok/s default / " + " / ".join(ROUTES) + " | decode tok/s default / "
                  + " / ".join(ROUTES) + " | default / looped |", "|---|---|---|---|---|"]
        for r in routed:
            p, d = r["prefill_tok_s"]["circuit_finder"], r["decode_tok_s"]["circuit_finder"]

            def rates(key: str, spec: str, routes=r["routes"]) -> str:
                return " / ".join(format(routes[n][key], spec) if n in routes else "(default)" for n in ROUTES)

            lines.append(f"| {r['model']} | {r['batch']} | {p:.0f} / {rates('prefill_tok_s', '.0f')} | "
                         f"{d:.1f} / {rates('decode_tok_s', '.1f')} | "
                         f"**{d / r['routes']['looped']['decode_tok_s']:.2f}** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--gguf", metavar="QTYPE", help="ours from the model written as a GGUF of this type (Q8_0, Q4_0, ...)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    if args.gguf and set(args.families) - set(GGUF_FAMILIES):
        ap.error(f"--gguf writes {', '.join(GGUF_FAMILIES)} only")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for family in args.families:
        extra = FAMILIES[family]
        with tempfile.TemporaryDirectory() as tmp:
            shape = {**SHAPE, **extra, **(QUICK if args.quick else {})}
            if args.quick:
                shape = {k: v for k, v in shape.items() if k != "head_dim"}
            hf = build_hf_model(family, tmp, **shape)
            if args.gguf:
                write_gguf(hf, Path(tmp) / "m.gguf", args.gguf)
            ours = cf.load(Path(tmp) / "m.gguf" if args.gguf else tmp, device=device, dtype=dtype)
            ref = rebuilt(hf, list(bench_path(ours))).to(device=device, dtype=dtype).eval()
            del hf
            sizes = (8, 4, 1) if args.quick else (64, 16, args.repeat)  # prompt, new tokens, repeats
            for b in ([1] if args.quick else args.batches):
                r = bench_forward(family, ours, ref, b, *sizes, None)
                if ours.engine.moe_without_host_sync(b):  # grouped products: the other routes in the same run
                    with mock.patch.dict(os.environ, {"CF_MOE_GEMV": "0"}):  # sync-free without the GEMV kernel: _grouped_mm's
                        grouped_mm = ours.engine.moe_without_host_sync(b)
                    r["routes"] = {}
                    for name, env in ROUTES.items():
                        if name == "grouped_gemv" and not grouped_mm:
                            continue  # the default route already
                        with mock.patch.dict(os.environ, env):
                            other = bench_forward(family, ours, ref, b, *sizes, None)
                        r["routes"][name] = {k: other[k]["circuit_finder"]
                                             for k in ("prefill_tok_s", "decode_tok_s", "decode_steady_tok_s")}
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    date = datetime.date.today().isoformat()
    res = {"meta": {"date": date, "machine": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
                    "torch": torch.__version__, "device": device.type, "dtype": args.dtype,
                    "threads": torch.get_num_threads(), "quick": args.quick, "gguf": args.gguf}, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"{date}-moe-{device.type}{'-' + args.gguf if args.gguf else ''}{'-quick' if args.quick else ''}.json"
    if file.exists() and set(args.families) != set(FAMILIES):  # a subset run replaces only its families' rows
        kept = [r for r in json.loads(file.read_text())["rows"] if r["model"] not in args.families]
        res["rows"] = kept + rows
    file.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
