"""Compare a model's answers on the identity path and on a few RYS paths (a block of middle
layers run twice), with one load and no weight copies.

    .venv/bin/python examples/rys_compare.py [--model default] [--block 3]
"""

from __future__ import annotations

import argparse

import circuit_finder as cf
from circuit_finder import LayerPath

QUESTIONS = ["What is 15 + 27?", "Name the largest planet in the solar system.", "Spell 'cat' backwards."]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--block", type=int, default=3, help="size of the repeated block")
    args = ap.parse_args()
    model = cf.load(args.model)
    n = model.num_layers
    paths = [LayerPath.identity(n)] + [LayerPath.duplicate(n, i, i + args.block) for i in (n // 4, n // 3, n // 2)]
    for path in paths:
        print(f"== {path} ({len(path)} slots)")
        for q, a in zip(QUESTIONS, model.generate(QUESTIONS, layers=path, chat=True, max_new_tokens=24)):
            print(f"  {q} -> {a.strip()!r}")


if __name__ == "__main__":
    main()
