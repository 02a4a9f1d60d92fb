"""Wrong answers that likelihood mode ranks the right one against, shared by the probes.

``near_miss_numbers(answer)``: the mistakes an arithmetic word problem invites — off by one
either way, off by ten, doubled. Used by the gsm8k probe and the reasoning probe's word problems.

Limits: integers only; for small answers fewer than ``n`` distinct near misses may exist (0 has
two: 1 and 10), and callers keep what there is.
"""

from __future__ import annotations

__all__ = ["near_miss_numbers"]


def near_miss_numbers(answer: int, n: int = 3) -> list[int]:
    """The ``n`` smallest of answer ± 1, answer + 10 and 2 × answer, without the answer itself and,
    for a non-negative answer, without negative numbers (a count is never offered as -1)."""
    candidates = {answer + 1, answer - 1, answer + 10, answer * 2} - {answer}
    if answer >= 0:
        candidates = {c for c in candidates if c >= 0}
    return sorted(candidates)[:n]
