"""The `circuit-finder` command.

    circuit-finder generate [--model PATH] [--layers PATH] [--chat] "prompt" ...
    circuit-finder sweep [--model PATH] --block-sizes 3 4 5 --out sweep.jsonl --heatmap sweep.png
    circuit-finder export --model SRC --layers PATH --format gguf|hf|mergekit --out DST
    circuit-finder eval [--model PATH] [--layers PATH] --tasks TASKS [any lm-eval option]
    circuit-finder serve [--model PATH] [--layers PATH] [--host 127.0.0.1] [--port 8000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="HF model folder, .gguf file, or 'default' (SmolLM2-135M-Instruct, embedded)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")


def cmd_generate(args) -> int:
    import circuit_finder as cf

    t0 = time.time()
    model = cf.load(args.model, device=args.device, dtype=args.dtype)
    paths = [model.path(text) for text in (args.layers or [None])]
    print(f"# {model}; loaded in {time.time() - t0:.1f}s", file=sys.stderr)
    for path in paths:
        t1 = time.time()
        outs = model.generate(args.prompts, layers=path, max_new_tokens=args.max_new_tokens, chat=args.chat,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop)
        print(f"== layers {path} ({len(path)} slots, {path.extra_layers(model.num_layers):+d} vs identity)")
        for prompt, out in zip(args.prompts, outs):
            if len(args.prompts) > 1:
                print(f"### {prompt}")
            print(out)
        print(f"# generated in {time.time() - t1:.1f}s", file=sys.stderr)
    return 0


def cmd_sweep(args) -> int:
    import circuit_finder as cf

    t0 = time.time()
    model = cf.load(args.model, device=args.device, dtype=args.dtype)
    print(f"# {model}; loaded in {time.time() - t0:.1f}s", file=sys.stderr)
    result = cf.sweep(model, probes=args.probes, block_sizes=args.block_sizes, starts=args.starts, stride=args.stride,
                      times=args.times, paths=args.paths, strategy=args.strategy, mode=args.mode, results=args.out,
                      resume=not args.no_resume, progress=not args.no_progress, max_items=args.max_items)
    import pandas as pd

    df = result.to_pandas()
    probes = result.probe_names()
    base = df[df["baseline"]].iloc[0]
    print(f"# {len(df) - 1} configs + baseline, mode={args.mode}, results in {args.out}")
    print("baseline (identity path): " + ", ".join(f"{p} {base[p]:.1f}" for p in [*probes, "combined"]))
    short = {"combined_delta": "delta", "combined_ci_low": "ci_low", "combined_ci_high": "ci_high", "combined_p": "p",
             "combined_val_delta": "val_delta", "combined_val_ci_low": "val_ci_low",
             "combined_val_ci_high": "val_ci_high", "combined_val_p": "val_p"}
    short.update({f"{p}_delta": f"{p}_delta" for p in probes})
    top = result.top(args.top)
    fmt = dict(index=False, float_format=lambda v: f"{v:.2f}")
    with pd.option_context("display.width", 200, "display.max_columns", 40):
        print(f"\ntop {len(top)} by combined_delta (search items; 95% paired bootstrap CI over items, sign-flip p):")
        cols = ["layers", "combined_delta", "combined_ci_low", "combined_ci_high", "combined_p",
                *[f"{p}_delta" for p in probes]]
        print(top[cols].rename(columns=short).to_string(**fmt))
        if args.validate:
            val = result.validate(args.validate, progress=not args.no_progress)
            n_val = {p: len(next(r for r in result.records if r.get("split") == "validation")["scores"][p])
                     for p in probes}
            print(f"\nheld-out validation of the top {len(val)} ("
                  + ", ".join(f"{n} {p}" for p, n in n_val.items()) + " items):")
            cols = ["layers", "combined_delta", "combined_val_delta", "combined_val_ci_low", "combined_val_ci_high",
                    "combined_val_p"]
            print(val[cols].rename(columns=short).to_string(**fmt))
    if args.heatmap:
        fig = result.heatmap(args.metric)
        fig.savefig(args.heatmap, dpi=120)
        print(f"# heatmap of {args.metric} written to {args.heatmap}")
    return 0


def _num_layers(src: str) -> int | None:
    """Layer count of a local model folder or GGUF file from its metadata; None for other names."""
    if os.path.isfile(os.path.join(src, "config.json")):
        from .config import parse_config

        with open(os.path.join(src, "config.json")) as f:
            return parse_config(f.read(), os.path.join(src, "config.json")).num_layers
    if src.lower().endswith(".gguf") and os.path.isfile(src):
        from .gguf import _field, _open

        reader = _open(src)
        return int(_field(reader, f"{_field(reader, 'general.architecture')}.block_count"))
    return None


def cmd_export(args) -> int:
    import circuit_finder as cf

    src = cf.default_model_path() if args.model == "default" else args.model
    if args.format == "mergekit":
        name = args.mergekit_model or ("HuggingFaceTB/SmolLM2-135M-Instruct" if args.model == "default" else src)
        num_layers = _num_layers(src)  # validate the path against a local model, without loading weights
        text = cf.mergekit_config(args.layers, model=name, num_layers=num_layers, dtype=args.dtype or "bfloat16")
        if args.out == "-":
            print(text, end="")
        else:
            with open(args.out, "w") as f:
                f.write(text)
            print(f"# mergekit config written to {args.out}", file=sys.stderr)
        return 0
    if args.format == "gguf":
        if not src.lower().endswith(".gguf"):
            raise ValueError(f"--format gguf needs a .gguf source (tensor bytes are copied as they are), got {src}")
        out = cf.export_gguf(src, args.out, args.layers, overwrite=args.overwrite)
    else:
        source = cf.load(src) if src.lower().endswith(".gguf") else src
        out = cf.export_hf(source, args.out, args.layers, dtype=args.dtype, max_shard_size=args.max_shard_size,
                           overwrite=args.overwrite)
    print(f"# {args.format} export of layers {args.layers} written to {out}", file=sys.stderr)
    return 0


def model_args_text(model: str, layers: str | None, dtype: str | None) -> str:
    """lm-eval --model_args for circuit-finder; the layer path in its comma-free spelling."""
    from .layer_path import _RYS, LayerPath

    parts = [f"pretrained={model}"]
    if layers:
        parts.append("layers=" + (layers.strip() if _RYS.match(layers) else str(LayerPath.parse(layers)).replace(",", "+")))
    if dtype:
        parts.append(f"dtype={dtype}")
    return ",".join(parts)


def cmd_eval(args) -> int:
    import torch
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    import circuit_finder.lm_eval  # noqa: F401  (registers the "circuit-finder" model with lm-eval)

    # lm-eval passes its --device to the model (its own default is cuda): choose it here
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_args = model_args_text(args.model, args.layers, args.dtype)
    argv = ["lm-eval", "run", "--model", "circuit-finder", "--model_args", model_args, "--device", device,
            *args.lm_eval_args]
    print(f"# lm-eval run --model circuit-finder --model_args {model_args} {' '.join(args.lm_eval_args)}",
          file=sys.stderr)
    saved = sys.argv
    sys.argv = argv
    try:
        setup_logging()
        cli = HarnessCLI()
        cli.execute(cli.parse_args())
    finally:
        sys.argv = saved
    return 0


def cmd_serve(args) -> int:
    from .server import serve

    serve(args.model, layers=args.layers, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
          model_name=args.name, max_batch=args.max_batch, batch_window_ms=args.batch_window_ms)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuit-finder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text along a layer path")
    _add_model_args(g)
    g.add_argument("--layers", action="append", default=None,
                   help="layer path, e.g. '0..9,7..9,10..29' (default: identity); repeat to compare paths")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("prompts", nargs="+", help="prompt text(s)")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("sweep", help="score probes along many layer paths (RYS configs)")
    _add_model_args(s)
    s.add_argument("--probes", nargs="+", default=["math", "eq", "reasoning"],
                   help="built-in probes (math eq reasoning gsm8k) or .jsonl files")
    s.add_argument("--mode", choices=["generate", "likelihood"], default="generate")
    s.add_argument("--strategy", choices=["grid", "scan", "refine"], default="grid")
    s.add_argument("--block-sizes", type=int, nargs="+", default=[3, 4, 5])
    s.add_argument("--starts", type=int, nargs="+", default=None, help="block starts (default: every --stride-th)")
    s.add_argument("--stride", type=int, default=1)
    s.add_argument("--times", type=int, nargs="+", default=[2], help="runs of the block (2 = repeated once)")
    s.add_argument("--paths", nargs="+", default=None, help="explicit layer paths instead of a strategy")
    s.add_argument("--max-items", type=int, default=None, help="first N search items of each probe")
    s.add_argument("--out", required=True, help="results JSONL (appended; resumed when it exists)")
    s.add_argument("--no-resume", action="store_true", help="start --out afresh")
    s.add_argument("--heatmap", default=None, help="write a heatmap PNG of --metric")
    s.add_argument("--metric", default="combined_delta", help="heatmap column (default combined_delta)")
    s.add_argument("--top", type=int, default=10, help="print the top N configs")
    s.add_argument("--validate", type=int, default=0, help="re-score the top N on held-out items")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_sweep)

    e = sub.add_parser("export", help="write a layer path as a GGUF, a Hugging Face folder or a mergekit config")
    e.add_argument("--model", default="default", help="source: HF folder, .gguf file, or 'default'")
    e.add_argument("--layers", required=True, help="layer path, e.g. '0..12,10..29'")
    e.add_argument("--format", choices=["gguf", "hf", "mergekit"], required=True)
    e.add_argument("--out", required=True, help="output file (gguf, mergekit; '-' = stdout) or folder (hf)")
    e.add_argument("--dtype", default=None, help="hf: tensor dtype (default: as loaded); mergekit: dtype field")
    e.add_argument("--max-shard-size", default="2GB", help="hf: safetensors shard size (default 2GB)")
    e.add_argument("--mergekit-model", default=None, help="mergekit: the model name to write (default: --model)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("eval", help="run lm-evaluation-harness along a layer path (other options go to lm-eval)",
                       description="Runs `lm-eval run --model circuit-finder` with --model_args built from --model, "
                                   "--layers, --device and --dtype; every other option (--tasks, --limit, "
                                   "--batch_size, --apply_chat_template, --output_path, ...) is passed to lm-eval.")
    v.add_argument("--model", default="default", help="HF folder, .gguf file, or 'default'")
    v.add_argument("--layers", default=None, help="layer path (any spelling; rys=i:j too)")
    v.add_argument("--device", default=None)
    v.add_argument("--dtype", default=None)
    v.set_defaults(func=cmd_eval)

    sv = sub.add_parser("serve", help="OpenAI-compatible server; requests may carry their own layer path")
    _add_model_args(sv)
    sv.add_argument("--layers", default=None, help="default layer path (requests may override with \"layers\")")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--name", default=None, help="model id reported by /v1/models (default: --model)")
    sv.add_argument("--max-batch", type=int, default=16, help="requests run together at most")
    sv.add_argument("--batch-window-ms", type=float, default=10.0, help="how long to gather requests into a batch")
    sv.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "eval":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.lm_eval_args = rest
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"circuit-finder: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
