"""The `circuit-finder` command.

    circuit-finder generate [--model PATH] [--layers PATH|router:FILE] [--chat] "prompt" ...
    circuit-finder sweep [--model PATH] --block-sizes 3 4 5 --out sweep.jsonl --heatmap sweep.png
    circuit-finder sweep --strategy scan --executor ray --address auto --out scan.jsonl
    circuit-finder export --model SRC --layers PATH --format gguf|hf|mergekit --out DST
    circuit-finder eval [--model PATH] [--layers PATH] --tasks TASKS [any lm-eval option]
    circuit-finder serve [--model PATH] [--layers PATH] [--router FILE] [--host 127.0.0.1] [--port 8000]

Every command checks its arguments (the model path, layer paths against the model's layer count read
from its metadata, probes, output locations, options that do not apply) before loading a model.
Errors are one line, `circuit-finder: error: ...`, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import time
from pathlib import Path

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded default model was converted from


# ------------------------------------------------------------------------- argument checks
def _model_file(model: str) -> str:
    if model == "default":
        from .loading import default_model_path

        return default_model_path()
    return model


def _model_layers(model: str) -> int:
    """Layer count of --model from its metadata; FileNotFoundError when it is not a local model."""
    from .export import source_num_layers

    return source_num_layers(_model_file(model))


def _is_rys(text: str) -> bool:
    return text.strip().lower().startswith("rys")


def _check_layers(texts, num_layers: int, flag: str = "--layers", routers: bool = False) -> list:
    """Each layer path text, parsed and checked against the model (rys=i:j resolved); with
    ``routers``, "router:FILE" loads that router file."""
    from .layer_path import LayerPath

    paths = []
    for text in texts or ():
        if routers and text.strip().startswith("router:"):  # a router file, used where the command runs paths
            paths += _check_routers([text.strip()[len("router:"):].strip()], num_layers)
            continue
        try:
            paths.append(LayerPath.coerce(text, num_layers))
        except ValueError as e:
            raise ValueError(f"{flag} {text!r}: {e}") from e
    return paths


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from e
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None:
        from .loading import resolve_dtype

        resolve_dtype(dtype, None)


def _check_output_file(path: str, flag: str) -> None:
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; it needs a file name")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: no such folder {p.parent}")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise PermissionError(f"{flag} {path}: not writable")


def _needs(module: str, extra: str, command: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{command} needs {module}: pip install 'circuit-finder[{extra}]'")


def _check_model_args(args) -> int:
    """Device, dtype, --model (a local model) and --device-map / --max-memory (devices and layer
    coverage; memory is checked on load); returns the model's layer count."""
    _check_device(args.device)
    _check_dtype(args.dtype)
    n = _model_layers(args.model)
    if args.max_memory and not args.device_map:
        raise ValueError("--max-memory budgets a --device-map; pass --device-map auto (or a map) with it")
    if args.device_map:
        from .placement import plan

        plan(args.device_map, n, {}, args.device or "cpu", args.max_memory)
    return n


def _load(args):
    """The model the command line names, placed as it says."""
    import circuit_finder as cf

    return cf.load(args.model, device=args.device or "cpu", dtype=args.dtype, device_map=args.device_map,
                   max_memory=args.max_memory, **_weight_format(args))


def _weight_format(args) -> dict:
    """--dequantize / --quantize / --activations as load()'s arguments."""
    return {"dequantize": getattr(args, "dequantize", False), "quantize": getattr(args, "quantize", None),
            "activations": getattr(args, "activations", "float")}


# ------------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    import circuit_finder as cf

    n = _check_model_args(args)
    paths = _check_layers(args.layers, n, routers=True) or [None]
    cf.Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                stops=tuple(args.stop or ()))  # checks the settings now, before loading
    t0 = time.time()
    model = _load(args)
    print(f"# {model}; loaded in {time.time() - t0:.1f}s", file=sys.stderr)
    for path in paths:
        path = model.router(path) or model.path(path)
        t1 = time.time()
        outs = model.generate(args.prompts, layers=path, max_new_tokens=args.max_new_tokens, chat=args.chat,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop)
        if isinstance(path, cf.Router):
            print(f"== router {path.name} ({len(path.candidates)} candidates)")
        else:
            print(f"== layers {path} ({len(path)} slots, {path.extra_layers(model.num_layers):+d} vs identity)")
        for prompt, out in zip(args.prompts, outs):
            if len(args.prompts) > 1 or isinstance(path, cf.Router):
                routed = f" (layers {path.path_for(model, prompt, args.chat)})" if isinstance(path, cf.Router) else ""
                print(f"### {prompt}{routed}")
            print(out)
        print(f"# generated in {time.time() - t1:.1f}s", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------- sweep


def _check_metric(metric: str, names: list[str], validate: bool, flag: str = "--metric") -> None:
    """--metric (or --pareto) must name a column the sweep's table will have (see SweepResult.to_pandas)."""
    from .sweep import STAT_SUFFIXES

    prefixes = "|".join(re.escape(n) for n in [*names, "combined"])
    val = "(?:_val)?" if validate else ""
    probe_part = "|".join(re.escape(n) for n in names)
    if metric in ("seconds", "extra_layers") or re.fullmatch(f"(?:{prefixes}){val}{STAT_SUFFIXES}", metric) or (
            re.fullmatch(f"(?:{probe_part}){val}(?:_margin|_norm){STAT_SUFFIXES}", metric)) or (
            re.fullmatch(f"(?:{probe_part}){val}_parse", metric)):
        return
    raise ValueError(f"{flag} {metric!r} is not a column of the results; use combined_delta, or "
                     f"<probe>[_margin|_norm][_delta|_ci_low|_ci_high|_p|_q|_holm] or <probe>_parse for a probe of "
                     f"{', '.join(names)}"
                     + (" (with _val after the probe for held-out scores)" if validate else ""))


def _check_heatmap(path: str) -> None:
    _check_output_file(path, "--heatmap")
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    ext = Path(path).suffix.lower().lstrip(".")
    if ext and ext not in formats:
        raise ValueError(f"--heatmap {path}: unknown image format {ext!r} (known: {', '.join(sorted(formats))})")


def _sweep_probes(args) -> list:
    """The probes, resolved (files read and checked; errors name the file and line) before any model loads."""
    from .probes import get_probe

    probes = [get_probe(spec) for spec in args.probes]
    names = [p.name for p in probes]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"--probes: two probes are named {dup!r}")
    return probes


def _print_sweep(result, args) -> None:
    import pandas as pd

    from .sweep.views import tested_rows

    df = result.to_pandas()
    probes = result.probe_names()
    base = df[df["baseline"]].iloc[0]
    print(f"# {len(df) - 1} configs + baseline, mode={args.mode}, results in {args.out}")
    print("baseline (identity path): " + ", ".join(f"{p} {base[p]:.1f}" for p in [*probes, "combined"]))
    short = {f"combined_{s}": s for s in ("delta", "ci_low", "ci_high", "p", "q")}
    short.update({f"combined_val_{s}": f"val_{s}" for s in ("delta", "ci_low", "ci_high", "p", "q")})
    top = result.top(args.top, by=args.by)
    fmt = dict(index=False, float_format=lambda v: f"{v:.2f}")
    with pd.option_context("display.width", 200, "display.max_columns", 40):
        print(f"\ntop {len(top)} by {args.by} (search items; 95% paired bootstrap CI over items, sign-flip p, "
              f"q: Benjamini-Hochberg over all {len(tested_rows(df))} configs):")
        cols = ["layers", "combined_delta", "combined_ci_low", "combined_ci_high", "combined_p", "combined_q",
                *[f"{p}_delta" for p in probes], *[f"{p}_parse" for p in probes if f"{p}_parse" in top.columns]]
        cols += [args.by] if args.by not in cols else []
        print(top[cols].rename(columns=short).to_string(**fmt))
        if args.validate:
            val = result.validate(args.validate, by=args.by, progress=not args.no_progress)
            print(f"\nheld-out validation of the top {len(val)} ({result.item_counts('validation')} items):")
            cols = ["layers", "combined_delta", "combined_val_delta", "combined_val_ci_low", "combined_val_ci_high",
                    "combined_val_p", "combined_val_q"]
            print(val[cols].rename(columns=short).to_string(**fmt))
        if args.pareto:
            front = result.pareto(args.pareto)
            from .sweep.views import objective_columns

            cols = ["layers", *[c for c, _ in objective_columns(front, args.pareto)]]
            print(f"\nPareto front over {', '.join(args.pareto)} ({len(front)} configs no other beats on all):")
            print(front[cols].to_string(**fmt))
    if result.search_log is not None:
        print(f"\n{args.strategy} search: {len(result.search_log.looked)} configs looked at")
        for r in result.search_log.rounds:
            print("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    print("\nhow to read it:\n" + result.report(by=args.by))


def _search_options(args) -> dict | None:
    if args.strategy == "beam":
        return {"beam_width": args.beam_width, "depth": args.depth, "max_extra": args.max_extra, "seeds": args.seeds,
                "skip": args.skip, "replace": args.replace}
    if args.strategy == "surrogate":
        return {"kappa": args.kappa, "batch": args.surrogate_batch}
    return None


# options that mean something to some strategies only, with their defaults
_STRATEGY_ONLY = {"beam_width": (("beam",), 8), "depth": (("beam",), 3), "max_extra": (("beam",), None),
                  "seeds": (("beam",), 8), "skip": (("beam",), False), "replace": (("beam",), False),
                  "kappa": (("surrogate",), 1.0), "surrogate_batch": (("surrogate",), None),
                  "refine_top": (("refine",), 3), "budget": (("beam", "surrogate"), None)}


def _check_strategy_options(args) -> None:
    """Options of another strategy than --strategy are refused, not dropped (sweep() checks --stride,
    --starts and --refine-stride the same way)."""
    from .sweep import check_placement, resolve_strategy

    strategy = resolve_strategy(args.strategy, args.paths, None, None, args.times)  # (before the model loads)
    for name, (strategies, default) in _STRATEGY_ONLY.items():
        if getattr(args, name) != default and strategy not in strategies:
            raise ValueError(f"--{name.replace('_', '-')} applies to --strategy {' / '.join(strategies)}, "
                             f"not {strategy}")
    if strategy in ("beam", "surrogate") and not args.budget:
        raise ValueError(f"--strategy {strategy} needs --budget N (configs to evaluate)")
    check_placement(strategy, args.stride, args.starts, args.refine_stride)
    if args.think_tokens is not None and not args.thinking:
        raise ValueError("--think-tokens is the budget of --thinking; pass --thinking with it")


def _executor(args):
    """--executor ray [--address A] [--workers N] [--config-timeout S] -> a RayExecutor (checked
    before the model loads)."""
    if args.executor != "ray":
        if args.address or args.workers or args.config_timeout:
            raise ValueError("--address, --workers and --config-timeout go with --executor ray")
        return None
    _needs("ray", "ray", "circuit-finder sweep --executor ray")
    from .sweep import RayExecutor

    return RayExecutor(address=args.address, workers=args.workers, config_timeout=args.config_timeout)


def cmd_sweep(args) -> int:
    import circuit_finder as cf

    n = _check_model_args(args)
    probes = _sweep_probes(args)
    _check_layers(args.paths, n, "--paths")
    _check_metric(args.metric, [p.name for p in probes], bool(args.validate))
    _check_strategy_options(args)
    from .sweep import check_by

    check_by(args.by, [p.name for p in probes], args.mode, "paths" if args.paths else args.strategy)
    _check_output_file(args.out, "--out")
    if args.heatmap:
        _check_heatmap(args.heatmap)
    if args.html:
        _check_output_file(args.html, "--html")
    executor = _executor(args)
    names = [p.name for p in probes]
    for objective in args.pareto or ():  # a probe name means its delta
        name = objective.lstrip("-")
        _check_metric(f"{name}_delta" if name in [*names, "combined"] else name, names, bool(args.validate),
                      "--pareto")
    t0 = time.time()
    model = _load(args)
    print(f"# {model}; loaded in {time.time() - t0:.1f}s", file=sys.stderr)
    result = cf.sweep(model, probes=probes, block_sizes=args.block_sizes, starts=args.starts, stride=args.stride,
                      times=args.times, paths=args.paths, strategy=args.strategy, mode=args.mode, results=args.out,
                      resume=not args.no_resume, progress=not args.no_progress, max_items=args.max_items,
                      chat=args.chat, thinking=args.thinking, budget=args.budget, seed=args.seed,
                      search=_search_options(args), executor=executor, by=args.by, refine_top=args.refine_top,
                      refine_stride=args.refine_stride,
                      **({"think_tokens": args.think_tokens} if args.think_tokens is not None else {}))
    _print_sweep(result, args)
    for times, path in _per_times(args.heatmap, args.times):
        result.heatmap(args.metric, times=times).savefig(path, dpi=120)
        print(f"# heatmap of {args.metric} (times={times}) written to {path}")
    for times, path in _per_times(args.html, args.times):
        result.interactive_heatmap(args.metric, times=times, html=path)
        print(f"# interactive heatmap of {args.metric} (times={times}) written to {path}")
    return 0


def _per_times(path: str | None, times: list[int]) -> list[tuple[int, str]]:
    """(times, file) per heatmap to write: ``path`` for one --times; for several, one file each,
    named with -x<times> before the suffix (h.png -> h-x2.png, h-x3.png)."""
    if not path:
        return []
    times = list(dict.fromkeys(times))
    if len(times) == 1:
        return [(times[0], path)]
    p = Path(path)
    return [(t, str(p.with_name(f"{p.stem}-x{t}{p.suffix}"))) for t in times]


# --------------------------------------------------------------------------------- export
_EXPORT_ONLY = {"dtype": ("hf", "mergekit"), "max_shard_size": ("hf",), "mergekit_model": ("mergekit",),
                "num_layers": ("mergekit",)}


def _check_export_options(args) -> None:
    for option, formats in _EXPORT_ONLY.items():
        if getattr(args, option) is not None and args.format not in formats:
            raise ValueError(f"--{option.replace('_', '-')} does not apply to --format {args.format} "
                             f"(only to {' and '.join(formats)})")
    if args.force and args.format == "mergekit":
        raise ValueError("--force does not apply to --format mergekit (only to gguf and hf)")
    if args.out == "-" and args.format != "mergekit":
        raise ValueError(f"--out - (standard output) is only for --format mergekit; {args.format} needs a path")


def _export_mergekit(args, src: str) -> None:
    from .export import export_mergekit, mergekit_source, mergekit_text

    model = args.mergekit_model or (DEFAULT_HUB_ID if args.model == "default" else None)
    dtype = args.dtype or "bfloat16"
    name, n = mergekit_source(src, model, args.num_layers)
    if n is None:
        print(f"# {src} is not a local model: the layer path is not checked against its layer count "
              "(--num-layers N checks it)", file=sys.stderr)
    if args.out == "-":
        print(mergekit_text(src, args.layers, model, args.num_layers, dtype), end="")
        return
    export_mergekit(src, args.out, args.layers, model=model, num_layers=args.num_layers, dtype=dtype,
                    overwrite=args.overwrite)
    print(f"# mergekit config written to {args.out}", file=sys.stderr)


def cmd_export(args) -> int:
    from .export import export_gguf, export_hf

    _check_export_options(args)
    src = _model_file(args.model)
    if args.format == "mergekit":
        _export_mergekit(args, src)
        return 0
    if args.format == "gguf":
        if not src.lower().endswith(".gguf"):
            raise ValueError(f"--format gguf needs a .gguf source (tensor bytes are copied as they are), got {src}")
        out = export_gguf(src, args.out, args.layers, overwrite=args.overwrite, force=args.force)
    else:
        out = export_hf(src, args.out, args.layers, dtype=args.dtype, max_shard_size=args.max_shard_size or "2GB",
                        overwrite=args.overwrite, force=args.force)
    print(f"# {args.format} export of layers {args.layers} written to {out}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- eval, serve
def model_args_text(model: str, layers: str | None, dtype: str | None, num_layers: int | None = None,
                    device_map: str | None = None, max_memory: str | None = None,
                    weights: dict | None = None) -> str:
    """lm-eval --model_args for circuit-finder; the layer path in its comma-free spelling
    (checked against ``num_layers`` when given; ``rys=i:j`` kept as written), a device map and
    memory budget with '+' between their entries, and ``weights`` (load()'s dequantize /
    quantize / activations) where they differ from load()'s defaults."""
    from .layer_path import LayerPath

    parts = [f"pretrained={model}"]
    if layers and layers.strip().startswith("router:"):
        if num_layers is not None:
            _check_routers([layers.strip()[len("router:"):].strip()], num_layers)
        if "," in layers:
            raise ValueError(f"--layers {layers}: lm-eval splits --model_args on commas; use a router path without one")
        parts.append("layers=" + layers.strip())
    elif layers:
        if num_layers is not None:
            path = LayerPath.coerce(layers, num_layers)
        elif not _is_rys(layers):
            path = LayerPath.parse(layers)
        parts.append("layers=" + (layers.strip() if _is_rys(layers) else str(path).replace(",", "+")))
    if dtype:
        parts.append(f"dtype={dtype}")
    for key, value in (("device_map", device_map), ("max_memory", max_memory)):
        if value:
            if value.strip().startswith("{"):
                raise ValueError(f"--{key.replace('_', '-')}: lm-eval splits --model_args on commas; "
                                 "use the DEVICE=COUNT form (e.g. cuda:0=20,cpu=12)")
            parts.append(f"{key}=" + "+".join(p for p in value.replace(",", " ").replace("+", " ").split()))
    weights = weights or {}
    if weights.get("dequantize"):
        parts.append("dequantize=true")
    if weights.get("quantize"):
        parts.append(f"quantize={weights['quantize']}")
    if weights.get("activations", "float") != "float":
        parts.append(f"activations={weights['activations']}")
    return ",".join(parts)


def cmd_eval(args) -> int:
    n = _check_model_args(args)  # the arguments' own mistakes first, whatever is installed
    model_args = model_args_text(args.model, args.layers, args.dtype, n, args.device_map, args.max_memory,
                                 _weight_format(args))
    _needs("lm_eval", "eval", "circuit-finder eval")
    import torch
    from lm_eval.__main__ import cli_evaluate  # the `lm-eval` console script's entry point

    import circuit_finder.lm_eval  # noqa: F401  (registers the "circuit-finder" model with lm-eval)

    # lm-eval passes its --device to the model (its own default is cuda): choose it here
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    argv = ["lm-eval", "run", "--model", "circuit-finder", "--model_args", model_args, "--device", device,
            *args.lm_eval_args]
    print(f"# lm-eval run --model circuit-finder --model_args {model_args} {' '.join(args.lm_eval_args)}",
          file=sys.stderr)
    saved = sys.argv
    sys.argv = argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def cmd_serve(args) -> int:
    for module in ("fastapi", "uvicorn"):
        _needs(module, "serve", "circuit-finder serve")
    n = _check_model_args(args)
    routers = _check_routers(args.router or [], n)
    if args.layers and args.layers.strip().startswith("router:"):
        name = args.layers.strip()[len("router:"):].strip()
        if name not in {r.name for r in routers}:
            raise ValueError(f"--layers {args.layers}: no --router FILE is named {name!r} "
                             f"(names: {', '.join(r.name for r in routers) or 'none'})")
    else:
        _check_layers([args.layers] if args.layers else [], n)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: not a TCP port (0..65535)")
    from .server import serve

    serve(args.model, layers=args.layers, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
          device_map=args.device_map, max_memory=args.max_memory, model_name=args.name, max_batch=args.max_batch,
          batch_window_ms=args.batch_window_ms, routers=routers, **_weight_format(args), **_limits(args))
    return 0


def _limits(args) -> dict:
    """--max-tokens-limit, --context-length, --max-prompt-tokens, --max-pending, --max-path-slots as
    the server's Limits (only those given)."""
    names = ("max_tokens_limit", "context_length", "max_prompt_tokens", "max_pending", "max_path_slots")
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _check_routers(files: list[str], num_layers: int) -> list:
    """--router files -> Routers (before the model loads), each made for a model of this depth."""
    from .router import Router

    routers = [Router.load(f) for f in files]
    for r in routers:
        if r.num_layers != num_layers:
            raise ValueError(f"--router {r.source}: trained for a {r.num_layers}-layer model, --model has {num_layers}")
    return routers


# --------------------------------------------------------------------------------- parser
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="HF model folder, .gguf file, or 'default' (SmolLM2-135M-Instruct, embedded)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    _add_weight_format_args(p)
    _add_placement_args(p)


def _add_weight_format_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dequantize", action="store_true",
                   help="GGUF: convert every tensor to --dtype (default: quantized matrices stay packed on the CPU)")
    p.add_argument("--quantize", default=None, help="HF folder: pack its matrices on load as q8_0, q6_k, q5_k, q5_1, "
                                                   "q5_0, q4_k, q4_1, q4_0, bf16 or f16, or as llama.cpp's mixes "
                                                   "q4_k_m / q5_k_m")
    p.add_argument("--activations", default="float", choices=["float", "q8"],
                   help="q8: packed matrices' CPU products (decode, and prefill: with VNNI for every type, without "
                        "it for all but Q8_0 / IQ4) round their "
                        "inputs to 8 bits, as llama.cpp does: faster, not identical (default float)")


def _add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-map", default=None,
                   help="split the layers over devices: 'auto' (GPUs by free memory, the rest on CPU), "
                        "'cuda:0=20,cpu=12' (layer counts in order) or a JSON {layer: device}; overrides --device")
    p.add_argument("--max-memory", default=None,
                   help="weights' budget per device for --device-map, e.g. 'cuda:0=20GiB,cpu=64GiB' "
                        "(default: 90%% of each device's free memory)")


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate text along a layer path")
    _add_model_args(g)
    g.add_argument("--layers", action="append", default=None,
                   help="layer path, e.g. '0..9,7..9,10..29' or rys=7:10 (default: identity), or router:FILE "
                        "(each prompt along the path a saved router picks); repeat to compare")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--max-new-tokens", type=_positive, default=64)
    g.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("prompts", nargs="+", help="prompt text(s)")
    g.set_defaults(func=cmd_generate)


def _add_sweep(sub) -> None:
    s = sub.add_parser("sweep", help="score probes along many layer paths (RYS configs)")
    _add_model_args(s)
    s.add_argument("--probes", nargs="+", default=["math", "eq", "reasoning"],
                   help="built-in probes (math eq reasoning gsm8k instruct code; the last two in generate mode) "
                        "or .jsonl files")
    s.add_argument("--mode", choices=["generate", "likelihood"], default="generate")
    s.add_argument("--strategy", choices=["grid", "scan", "refine", "beam", "surrogate"], default="grid",
                   help="beam / surrogate: search within --budget configs (see --beam-width, --depth, --seed)")
    s.add_argument("--budget", type=_positive, default=None, help="configs to evaluate (beam, surrogate)")
    s.add_argument("--seed", type=int, default=0, help="seed of the surrogate's design and model")
    s.add_argument("--by", default="combined_delta",
                   help="what ranks configs for --top, --validate, refine and the searches: a column as --metric "
                        "takes (default combined_delta; a _p / _q column ranks improvements, smallest first)")
    s.add_argument("--beam-width", type=_positive, default=8)
    s.add_argument("--depth", type=_positive, default=3, help="beam: most edits (repeated blocks) per path")
    s.add_argument("--max-extra", type=_non_negative, default=None, help="beam: most extra layers per path")
    s.add_argument("--seeds", type=_positive, default=8, help="beam: the best single blocks it repeats")
    s.add_argument("--skip", action="store_true", help="beam: also try skipping a layer")
    s.add_argument("--replace", action="store_true", help="beam: also try running a neighbour in a layer's slot")
    s.add_argument("--kappa", type=_non_negative_float, default=1.0,
                   help="surrogate: exploration (upper bound = mean + kappa x spread over the trees)")
    s.add_argument("--surrogate-batch", type=_positive, default=None,
                   help="surrogate: configs per round (default budget / 10)")
    s.add_argument("--refine-top", type=_positive, default=3, help="refine: neighbours of this many best")
    s.add_argument("--refine-stride", type=_positive, default=None,
                   help="refine / beam / surrogate: the coarse grid's stride (default max(2, layers // 8))")
    s.add_argument("--block-sizes", type=_positive, nargs="+", default=[3, 4, 5])
    s.add_argument("--starts", type=_non_negative, nargs="+", default=None,
                   help="block starts (default: every --stride-th)")
    s.add_argument("--stride", type=_positive, default=1)
    s.add_argument("--times", type=_positive, nargs="+", default=[2], help="runs of the block (2 = repeated once)")
    s.add_argument("--paths", nargs="+", default=None, help="explicit layer paths instead of a strategy")
    s.add_argument("--max-items", type=_positive, default=None, help="first N search items of each probe")
    s.add_argument("--out", required=True, help="results JSONL (appended; resumed when it exists)")
    s.add_argument("--no-resume", action="store_true", help="start --out afresh")
    s.add_argument("--heatmap", default=None, help="write a heatmap image (.png, .svg, .pdf...) of --metric (several --times: one "
                        "file each, h-x2.png, h-x3.png)")
    s.add_argument("--metric", default="combined_delta",
                   help="heatmap column: combined_delta (default), <probe>[_margin|_norm][_delta|_ci_low|_ci_high|_p|_q|_holm], "
                        "with _val after the name for held-out scores (--validate), or seconds")
    s.add_argument("--top", type=_positive, default=10, help="print the top N configs")
    s.add_argument("--validate", type=_non_negative, default=0, help="re-score the top N on held-out items")
    s.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the chat template to the probes (default: when the tokenizer has one)")
    s.add_argument("--thinking", action="store_true",
                   help="leave the chat template's thinking on (default: its enable_thinking switch off) and give "
                        "each probe --think-tokens more tokens; <think> blocks are stripped before scoring either way")
    s.add_argument("--think-tokens", type=_positive, default=None,
                   help="with --thinking: extra tokens per probe (default 1024)")
    s.add_argument("--pareto", nargs="+", default=None, metavar="PROBE",
                   help="print the Pareto front over these probes' deltas or columns ('-name' minimises)")
    s.add_argument("--html", default=None, help="write an interactive (plotly) heatmap of --metric as standalone HTML "
                                                "(several --times: one file each, h-x2.html, h-x3.html)")
    s.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="ray: spread the configs over Ray workers (this process writes --out; see README)")
    s.add_argument("--address", default=None,
                   help="with --executor ray: the cluster (auto, ray://host:10001); default RAY_ADDRESS or a local one")
    s.add_argument("--workers", type=_positive, default=None,
                   help="with --executor ray: workers (default one per GPU, or the cluster's CPUs / threads)")
    s.add_argument("--config-timeout", type=_positive_seconds, default=None, metavar="S",
                   help="with --executor ray: a worker spending over S seconds on one config is taken for hung, "
                        "killed and replaced (default: no limit)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_sweep)


def _add_export(sub) -> None:
    e = sub.add_parser("export", help="write a layer path as a GGUF, a Hugging Face folder or a mergekit config",
                       description="Writes the layer path as an ordinary model. An existing --out is replaced "
                                   "only with --overwrite (an hf folder only when it holds nothing but a model "
                                   "export). mergekit: --model is a local folder or .gguf (its layer count checks "
                                   "the path and resolves rys=i:j) or a hub id org/name (unchecked unless "
                                   "--num-layers is given).")
    e.add_argument("--model", default="default", help="source: HF folder, .gguf file, 'default', or (mergekit) "
                                                      "a hub id org/name")
    e.add_argument("--layers", required=True, help="layer path, e.g. '0..12,10..29' or rys=10:13")
    e.add_argument("--format", choices=["gguf", "hf", "mergekit"], required=True)
    e.add_argument("--out", required=True, help="output file (gguf, mergekit; '-' = stdout for mergekit) or "
                                                "folder (hf)")
    e.add_argument("--dtype", default=None, help="hf: tensor dtype (default: as loaded; float32 from GGUF); "
                                                 "mergekit: dtype field (default bfloat16)")
    e.add_argument("--max-shard-size", default=None, help="hf: safetensors shard size (default 2GB)")
    e.add_argument("--mergekit-model", default=None,
                   help="mergekit: the model name to write (default: --model; needed for a .gguf --model)")
    e.add_argument("--num-layers", type=_positive, default=None,
                   help="mergekit with a hub id: the model's layer count (checks the path, resolves rys=)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output")
    e.add_argument("--force", action="store_true",
                   help="gguf / hf: export an architecture circuit-finder does not run (unchecked; with a warning)")
    e.set_defaults(func=cmd_export)


def _add_eval(sub) -> None:
    v = sub.add_parser("eval", help="run lm-evaluation-harness along a layer path (other options go to lm-eval)",
                       description="Runs `lm-eval run --model circuit-finder` with --model_args built from --model, "
                                   "--layers, --device, --dtype, the weight format and placement options; every other option (--tasks, --limit, "
                                   "--batch_size, --apply_chat_template, --output_path, ...) is passed to lm-eval.")
    v.add_argument("--model", default="default", help="HF folder, .gguf file, or 'default'")
    v.add_argument("--layers", default=None, help="layer path (any spelling; rys=i:j too), or router:FILE")
    v.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    v.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    _add_weight_format_args(v)
    _add_placement_args(v)
    v.set_defaults(func=cmd_eval)


def _add_serve(sub) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible server; requests may carry their own layer path")
    _add_model_args(sv)
    sv.add_argument("--layers", default=None, help="default layer path, or router:NAME of a --router "
                                                   "(requests may override with \"layers\")")
    sv.add_argument("--router", action="append", default=None, metavar="FILE",
                    help="a router file (circuit_finder.Router.save) requests may name as \"layers\": "
                         "\"router:NAME\"; repeatable")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--name", default=None, help="model id reported by /v1/models (default: --model)")
    sv.add_argument("--max-batch", type=_positive, default=16, help="requests run together at most")
    sv.add_argument("--max-tokens-limit", type=_positive, default=None, help="largest max_tokens (default 4096)")
    sv.add_argument("--context-length", type=_positive, default=None,
                    help="prompt + max_tokens at most (default: the model's max_position_embeddings)")
    sv.add_argument("--max-prompt-tokens", type=_positive, default=None, help="longest prompt (default: no limit)")
    sv.add_argument("--max-pending", type=_positive, default=None, help="requests waiting at most (default 256)")
    sv.add_argument("--max-path-slots", type=_positive, default=None,
                    help="longest layer path a request may ask for (default 4 x the model's layers)")
    sv.add_argument("--batch-window-ms", type=_non_negative_float, default=10.0,
                    help="how long to gather requests into a batch")
    sv.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuit-finder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_generate, _add_sweep, _add_export, _add_eval, _add_serve):
        add(sub)
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
