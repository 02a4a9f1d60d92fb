"""The `circuit-finder` command.

    circuit-finder generate [--model PATH] [--layers PATH] [--chat] "prompt" ...
"""

from __future__ import annotations

import argparse
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"circuit-finder: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
