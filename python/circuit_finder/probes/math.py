"""math probe: hard arithmetic answered without working (the RYS "math" probe's kind of task).

Seeded generator of four kinds: cube roots and square roots of large perfect powers, products of
two 6-digit numbers, and mixed expressions. Scored with the RYS partial-credit formula
(``scoring.math_partial_credit``). In likelihood mode the right number is ranked against three
distractors that differ from it in one digit each.
"""

from __future__ import annotations

import random

from .base import Item, ItemProbe

__all__ = ["MathProbe", "make_math_items"]

_INSTRUCTION = "Reply with only the final number, no working."


def _distractors(answer: int, rng: random.Random, n: int = 3) -> list[int]:
    digits = str(answer)
    out: list[int] = []
    positions = list(range(len(digits)))
    while len(out) < n:
        pos = rng.choice(positions)
        new = (int(digits[pos]) + rng.randint(1, 9)) % 10
        if pos == 0 and new == 0:
            continue
        value = int(digits[:pos] + str(new) + digits[pos + 1:])
        if value != answer and value not in out:
            out.append(value)
    return out


def _question(kind: str, rng: random.Random) -> tuple[str, int]:
    if kind == "cube_root":
        x = rng.randint(120, 9999)
        return f"What is the cube root of {x ** 3}?", x
    if kind == "square_root":
        x = rng.randint(1200, 99999)
        return f"What is the square root of {x ** 2}?", x
    if kind == "product":
        a, b = rng.randint(100000, 999999), rng.randint(100000, 999999)
        return f"What is {a} * {b}?", a * b
    x, a, b = rng.randint(20, 999), rng.randint(1000, 9999), rng.randint(100, 999)
    form = rng.randint(0, 2)
    if form == 0:
        return f"What is the cube root of {x ** 3}, multiplied by {a}?", x * a
    if form == 1:
        return f"What is {a} * {b} + the square root of {x ** 2}?", a * b + x
    return f"What is {a} * {b} - {x} * {b}?", (a - x) * b


def make_math_items(n: int = 36, seed: int = 0) -> list[Item]:
    """n items cycling through the four kinds, reproducible from the seed."""
    rng = random.Random(seed)
    kinds = ("cube_root", "square_root", "product", "mixed")
    items = []
    for k in range(n):
        kind = kinds[k % len(kinds)]
        question, answer = _question(kind, rng)
        wrong = _distractors(answer, rng)
        choices = [str(answer), *map(str, wrong)]
        rng.shuffle(choices)
        items.append(Item(id=f"math-{k:03d}-{kind}", prompt=f"{question} {_INSTRUCTION}", answer=str(answer),
                          choices=tuple(choices), scorer="math", data={"kind": kind}))
    return items


class MathProbe(ItemProbe):
    """Hard arithmetic without chain of thought; RYS partial credit."""

    def __init__(self, n: int = 36, seed: int = 0):
        super().__init__("math", make_math_items(n, seed), max_new_tokens=24)

    def score(self, item: Item, completion: str) -> float:
        from .scoring import extract_number, math_partial_credit

        return math_partial_credit(extract_number(completion), int(item.answer))
