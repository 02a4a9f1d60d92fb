"""Probe base types: ``Item`` (one question), the ``Probe`` protocol, ``ItemProbe`` (a probe over
a fixed item list scored by each item's named scorer), the deterministic search/validation split,
and ``from_jsonl`` (custom probes from a file). The built-in probes and the registry
(``get_probe``) build on these; see the package docstring.

Limits: items are held in memory; the split is by position (every third item held out), plus any
``extra_validation`` items a probe holds out from the start.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from .scoring import SCORERS, check_answer, parsed, score_answer

__all__ = ["SPLITS", "Item", "ItemProbe", "Probe", "from_jsonl", "parse_rate_of", "split_items"]

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


def parse_rate_of(probe, item: Item, completion: str) -> bool | None:
    """Whether ``probe`` could read an answer in the completion: its optional ``parsed(item,
    completion)`` method (ItemProbe has one); None for probes without it."""
    check = getattr(probe, "parsed", None)
    return None if check is None else bool(check(item, completion))


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

    def __init__(self, name: str, items: Sequence[Item], max_new_tokens: int = 32, holdout_every: int = 3,
                 extra_validation: Sequence[Item] = ()):
        if not items:
            raise ValueError(f"probe {name!r} has no items")
        ids = [it.id for it in [*items, *extra_validation]]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"probe {name!r}: item id {dup!r} appears twice")
        self.name = name
        self.max_new_tokens = max_new_tokens
        self._items = list(items)
        self._extra = list(extra_validation)
        self._holdout_every = holdout_every

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self._items) + len(self._extra)} items)"

    def items(self, split: str = "search") -> list[Item]:
        """The search items, the held-out validation items (never in a search), or all."""
        out = split_items(self._items, split, self._holdout_every)
        return out if split == "search" else out + self._extra

    def score(self, item: Item, completion: str) -> float:
        return score_answer(item.scorer, completion, item.answer, **dict(item.data))

    def parsed(self, item: Item, completion: str) -> bool:
        """Whether the item's scorer can read an answer in the completion (right or wrong)."""
        return parsed(item.scorer, completion, **dict(item.data))


def _eq_data(row: dict, path: Path, n: int) -> dict:
    """An 'eq' line's "emotions" (names) and "reference" (their intensities, 0-10)."""
    emotions, reference = row.get("emotions"), row.get("reference")
    if (not isinstance(emotions, list) or not emotions or not all(isinstance(e, str) for e in emotions)
            or not isinstance(reference, list) or len(reference) != len(emotions)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 10 for v in reference)):
        raise ValueError(f"{path}:{n}: the 'eq' scorer needs 'emotions' (a list of names) and 'reference' (as many "
                         f"intensities in 0..10)")
    return {"emotions": tuple(emotions), "reference": tuple(float(v) for v in reference)}


def from_jsonl(path: str | Path, name: str | None = None, max_new_tokens: int = 32) -> ItemProbe:
    """A probe from a JSONL file: {"prompt", "answer", "choices"?, "scorer"?, "id"?} per line
    ('eq' lines also "emotions" and "reference"); answers a scorer cannot compare with, and two
    lines with one id, are refused here, naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such probe file" if not path.exists() else f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start} cannot be decoded)") from None
    items, lines = [], {}  # lines: item id -> the line that gave it
    for n, line in enumerate(text.split("\n"), 1):  # (not splitlines: JSON strings may hold U+2028 unescaped)
        if not line.strip():
            continue
        item = _line_item(line, path, n)
        if item.id in lines:
            raise ValueError(f"{path}:{n}: item id {item.id!r} is line {lines[item.id]}'s too (an item's id is its "
                             f"line number unless it has an 'id')")
        lines[item.id] = n
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    if len(items) < 3:
        warnings.warn(f"{path}: {len(items)} item(s): every third item is held out, so none is, and validate() has "
                      f"nothing to score for this probe", stacklevel=2)
    return ItemProbe(name or path.stem, items, max_new_tokens=max_new_tokens)


def _line_item(line: str, path: Path, n: int) -> Item:
    """The item of line n of a probe file (ValueError naming the line when it is not one)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or row.get("answer") is None:
        raise ValueError(f"{path}:{n}: each line needs a string 'prompt' and an 'answer' (not null)")
    scorer = row.get("scorer", "exact")
    if scorer not in SCORERS:
        raise ValueError(f"{path}:{n}: unknown scorer {scorer!r}; known: {', '.join(sorted(SCORERS))}")
    choices = row.get("choices") or ()
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{path}:{n}: 'choices' must be a list of strings")
    if len(choices) == 1 or len(set(choices)) != len(choices):
        raise ValueError(f"{path}:{n}: 'choices' must hold at least two different options (likelihood "
                         f"mode ranks them), got {list(choices)}")
    answer = str(row["answer"])
    try:
        check_answer(scorer, answer)
    except ValueError as e:
        raise ValueError(f"{path}:{n}: {e}") from None
    data = _eq_data(row, path, n) if scorer == "eq" else {}
    if scorer == "choice":
        if not choices:
            raise ValueError(f"{path}:{n}: the 'choice' scorer needs 'choices' (the options)")
        data["options"] = list(choices)
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if answer in choices:
            answer = letters[choices.index(answer)]
        elif answer.upper() in letters:
            answer = answer.upper()  # "b" is option B
        else:
            raise ValueError(f"{path}:{n}: answer {answer!r} is neither an option nor an option letter")
        choices = letters
    elif choices and answer not in choices:
        raise ValueError(f"{path}:{n}: 'choices' must include the answer {answer!r}")
    return Item(id=str(row.get("id", n)), prompt=row["prompt"], answer=answer, choices=tuple(choices), scorer=scorer,
                data=data)
