"""eq probe: emotional understanding, EQ-Bench-v2 style, on 94 scenarios written for this project.

Each item describes a situation and asks how strongly one character feels four named emotions
(0-10). The answer is parsed (``scoring.parse_emotions``) and scored against the reference
intensities with the EQ-Bench-v2-style penalty (``scoring.eq_score``). In likelihood mode the
reference answer is ranked against three distractor answers (the intensities reversed, mirrored
around 5 and rotated), each written in the same format.

Splits: ``data/eq_scenarios.json`` (28: 19 searched, 9 held out) and ``data/eq_validation.json``
(66 more, all held out), so validation has 75 items; the references of the held-out file use the
whole 0-10 range (each value 15-37 times of 264).
"""

from __future__ import annotations

import json
from importlib import resources

from .base import Item, ItemProbe

__all__ = ["EQProbe", "format_intensities", "load_eq_items"]


def format_intensities(emotions, values) -> str:
    return "\n".join(f"{e}: {int(round(v))}" for e, v in zip(emotions, values))


def _distractor_values(ref: list[int]) -> list[list[int]]:
    candidates = [list(reversed(ref)), [10 - v for v in ref], ref[1:] + ref[:1], [min(10, v + 3) for v in ref]]
    out: list[list[int]] = []
    for c in candidates:
        if c != ref and c not in out:
            out.append(c)
    return out[:3]


def _prompt(s: dict) -> str:
    names = ", ".join(s["emotions"])
    lines = "\n".join(f"{e}: <0-10>" for e in s["emotions"])
    return (f"{s['scenario']}\n\nAt the end of this scene, how strongly does {s['character']} feel each of these "
            f"emotions, on a scale of 0 (not at all) to 10 (extremely)? Emotions: {names}.\n"
            f"Answer with exactly four lines and nothing else:\n{lines}")


def load_eq_items(data_file: str = "data/eq_scenarios.json") -> list[Item]:
    text = resources.files(__package__).joinpath(data_file).read_text(encoding="utf-8")
    items = []
    for s in json.loads(text):
        if len(s["emotions"]) != 4 or len(s["reference"]) != 4:
            raise ValueError(f"{data_file}: eq scenario {s['id']}: needs 4 emotions and 4 reference values")
        answer = format_intensities(s["emotions"], s["reference"])
        choices = [answer] + [format_intensities(s["emotions"], d) for d in _distractor_values(s["reference"])]
        items.append(Item(id=s["id"], prompt=_prompt(s), answer=answer, choices=tuple(choices), scorer="eq",
                          data={"emotions": tuple(s["emotions"]), "reference": tuple(s["reference"])}))
    return items


class EQProbe(ItemProbe):
    """Emotion-intensity judgements scored EQ-Bench-v2 style (0-100)."""

    def __init__(self):
        super().__init__("eq", load_eq_items(), max_new_tokens=40,
                         extra_validation=load_eq_items("data/eq_validation.json"))
