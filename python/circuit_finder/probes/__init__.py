"""Probes: small scored task sets that a sweep runs along each layer path.

Built in: ``math`` (hard arithmetic, no chain of thought, RYS partial credit), ``eq`` (emotion
intensities, EQ-Bench-v2-style score), ``reasoning`` (BBH-style items with final-answer
extraction), ``gsm8k`` (the first 60 GSM8K test problems, shipped in ``data/``; MIT, OpenAI),
``instruct`` (IFEval-style verifiable instructions) and ``code`` (Python functions scored by unit
tests in a sandboxed process); the last two are generate-mode only (``modes``).
Each probe's items are split into a ``"search"`` set (used by sweeps) and a held-out
``"validation"`` set (used by ``SweepResult.validate``) that no search ever sees: math 24 / 132,
reasoning 34 / 136, eq 19 / 75, gsm8k 40 / 20, instruct 24 / 72, code 20 / 40.

The Probe protocol — any object with these members can be passed to ``sweep(probes=[...])``:

    name: str                       # column prefix in results
    max_new_tokens: int             # generation budget in mode="generate"
    items(split="search") -> list[Item]
    score(item, completion) -> float   # 0..100, 0 when unparsable
    # optional:
    parsed(item, completion) -> bool   # could an answer be read at all (the parse-rate columns)
    modes: tuple[str, ...]              # the sweep modes it supports (default both)

An ``Item`` holds the user prompt (the chat template is applied by the runner), the right answer
as the model should write it, and ``choices`` — the right answer plus distractors — that
``mode="likelihood"`` ranks by log-probability instead of generating.

Base types live in ``probes.base``. Custom probes from a file: ``from_jsonl(path)``, one JSON object per line with ``prompt``,
``answer``, optional ``choices`` (a list including the answer), ``scorer`` (one of
``scoring.SCORERS``; default ``exact``) and ``id``.
"""

from __future__ import annotations

from pathlib import Path

from .base import SPLITS, Item, ItemProbe, Probe, from_jsonl, parse_rate_of, split_items

__all__ = ["SPLITS", "Item", "ItemProbe", "Probe", "from_jsonl", "get_probe", "parse_rate_of", "probe_names",
           "split_items"]


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
    if name == "instruct":
        from .instruct import InstructProbe

        return InstructProbe()
    if name == "code":
        from .code import CodeProbe

        return CodeProbe()
    return None


def probe_names() -> list[str]:
    return ["math", "eq", "reasoning", "gsm8k", "instruct", "code"]


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
