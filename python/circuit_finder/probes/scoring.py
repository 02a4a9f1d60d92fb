"""Scorers and answer extraction shared by the probes. Every scorer returns a float in [0, 100]
(0 for an unparsable answer), so probe scores and their deltas share one scale.

Formulas (see ../shared/DESIGN.md):
- math partial credit (RYS): both integers as digit strings, the shorter right-padded with zeros to
  a common length L (p pad digits); score = (1 - |a - e| / max(a, e)) * (1 - p / L), in [0, 1].
- EQ-Bench-v2 style: per emotion d = |ref - pred|; penalty d^2/4 when d <= 4, else d;
  score = 100 * (1 - sum(penalty) / (10 * n)), floored at 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "SCORERS",
    "eq_score",
    "extract_choice",
    "extract_number",
    "extract_yes_no",
    "math_partial_credit",
    "parse_emotions",
    "score_answer",
]

_NUMBER = re.compile(r"[-−]?\d[\d,]*(?:\.\d+)?")
_ANSWER_CUE = re.compile(r"(?:final answer|answer|result)\s*(?:is|:|=)?\s*", re.IGNORECASE)


def _after_cue(text: str) -> str:
    """The text after the last 'answer is' / 'Answer:' cue, or the whole text when there is none."""
    cues = list(_ANSWER_CUE.finditer(text))
    return text[cues[-1].end():] if cues else text


def extract_number(text: str) -> int | float | None:
    """The answer number in a completion: the first number after the last 'answer' cue, else the last
    number in the text. Thousands separators are dropped. None when there is no number."""
    if not isinstance(text, str):
        return None
    cues = list(_ANSWER_CUE.finditer(text))
    after = _NUMBER.findall(text[cues[-1].end():]) if cues else []
    anywhere = _NUMBER.findall(text)
    if not after and not anywhere:
        return None
    raw = after[0] if after else anywhere[-1]
    raw = raw.replace(",", "").replace("−", "-").rstrip(".")
    try:
        value = float(raw)
    except ValueError:
        return None
    return int(value) if value.is_integer() and "." not in raw else value


def math_partial_credit(answer: int | float | None, expected: int) -> float:
    """RYS partial credit in [0, 100] for an integer answer (None or a sign mismatch -> 0)."""
    if answer is None:
        return 0.0
    if isinstance(answer, float):
        if not answer.is_integer():
            return 0.0
        answer = int(answer)
    if (answer < 0) != (expected < 0):
        return 0.0
    a_digits, e_digits = str(abs(answer)), str(abs(expected))
    width = max(len(a_digits), len(e_digits))
    pad = width - min(len(a_digits), len(e_digits))
    a, e = int(a_digits.ljust(width, "0")), int(e_digits.ljust(width, "0"))
    if a == e == 0:
        closeness = 1.0
    else:
        closeness = 1.0 - abs(a - e) / max(a, e)
    return 100.0 * min(1.0, max(0.0, closeness * (1.0 - pad / width)))


def parse_emotions(text: str, emotions: Sequence[str]) -> list[float] | None:
    """Intensities (0-10) for each emotion from a completion such as 'Anger: 7\\nRelief: 2 ...'.

    Named values win ('Anger: 7', 'anger - 7', 'Anger 7/10'); otherwise, when the text holds exactly as
    many numbers as emotions, they are taken in order. Values are clamped to [0, 10]. None when
    unparsable."""
    if not isinstance(text, str):
        return None
    values: list[float | None] = []
    for name in emotions:
        m = re.search(re.escape(name) + r"\W{0,3}\s*(?:[:=\-]\s*)?(\d+(?:\.\d+)?)", text, re.IGNORECASE)
        values.append(float(m.group(1)) if m else None)
    if any(v is None for v in values):
        numbers = [float(x) for x in re.findall(r"(?<![\d.])\d+(?:\.\d+)?(?![\d.])", text)]
        numbers = [n for n in numbers if n <= 10]
        if len(numbers) != len(emotions):
            return None
        values = numbers
    return [min(10.0, max(0.0, v)) for v in values]


def eq_score(predicted: Sequence[float] | None, reference: Sequence[float]) -> float:
    """EQ-Bench-v2-style score in [0, 100] of predicted vs reference intensities (None -> 0)."""
    if predicted is None or len(predicted) != len(reference):
        return 0.0
    penalty = 0.0
    for p, r in zip(predicted, reference):
        d = abs(float(r) - float(p))
        penalty += d * d / 4.0 if d <= 4 else d
    return max(0.0, 100.0 * (1.0 - penalty / (10.0 * len(reference))))


def extract_yes_no(text: str) -> str | None:
    """'yes' or 'no': the first yes/no word after the last answer cue, else the first in the text."""
    if not isinstance(text, str):
        return None
    for part in (_after_cue(text), text):
        m = re.search(r"\b(yes|no)\b", part, re.IGNORECASE)
        if m:
            return m.group(1).lower()
    return None


def extract_choice(text: str, options: Sequence[str]) -> str | None:
    """The option letter (A, B, ...) a completion picks: '(B)', 'B)', 'B.', 'answer is B', a lone
    letter, or the text of exactly one option. None when it names no single option."""
    if not isinstance(text, str):
        return None
    letters = [chr(ord("A") + i) for i in range(len(options))]
    letter_set = "".join(letters)
    for part in (_after_cue(text), text):
        m = re.search(rf"\(([{letter_set}])\)|\b([{letter_set}])[).:]|^\s*([{letter_set}])\s*$|\b([{letter_set}])\b(?=\s*$)",
                      part.strip(), re.MULTILINE)
        if m:
            return next(g for g in m.groups() if g)
    named = [letters[i] for i, o in enumerate(options) if re.search(rf"\b{re.escape(o)}\b", text, re.IGNORECASE)]
    return named[0] if len(named) == 1 else None


def _exact(completion: str, answer: str, **_) -> float:
    return 100.0 if completion.strip().lower() == str(answer).strip().lower() else 0.0


def _contains(completion: str, answer: str, **_) -> float:
    return 100.0 if str(answer).strip().lower() in completion.lower() else 0.0


def _number(completion: str, answer: str, **_) -> float:
    got = extract_number(completion)
    try:
        want = float(str(answer).replace(",", ""))
    except ValueError as e:
        raise ValueError(f"the 'number' scorer needs a numeric answer, got {answer!r}") from e
    return 100.0 if got is not None and abs(float(got) - want) < 1e-9 else 0.0


def _math(completion: str, answer: str, **_) -> float:
    try:
        want = int(str(answer).replace(",", ""))
    except ValueError as e:
        raise ValueError(f"the 'math' scorer needs an integer answer, got {answer!r}") from e
    return math_partial_credit(extract_number(completion), want)


def _yes_no(completion: str, answer: str, **_) -> float:
    return 100.0 if extract_yes_no(completion) == str(answer).strip().lower() else 0.0


def _choice(completion: str, answer: str, options: Sequence[str] = (), **_) -> float:
    if not options:
        raise ValueError("the 'choice' scorer needs the item's options")
    return 100.0 if extract_choice(completion, options) == str(answer).strip().upper() else 0.0


SCORERS = {
    "exact": _exact,
    "contains": _contains,
    "number": _number,
    "math": _math,
    "yes_no": _yes_no,
    "choice": _choice,
}


def score_answer(scorer: str, completion: str, answer: str, **kwargs) -> float:
    """Scores a completion with a named scorer (one of SCORERS)."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; known: {', '.join(sorted(SCORERS))}")
    return SCORERS[scorer](completion, answer, **kwargs)
