"""Scorers and answer extraction shared by the probes. Every scorer returns a float in [0, 100]
(0 for an unparsable answer), so probe scores and their deltas share one scale; ``parsed`` says
whether the scorer could read an answer at all (the sweep's parse-rate columns).

Extraction reads what instruction-tuned and reasoning models write: thinking blocks are
stripped, bold/boxed answers unwrapped, a cue counts only before is / : / =, numbers may carry
signs, thousands separators (plain, spaced, LaTeX) and scientific notation, and a choice may be
written "(B)", "option B", "**B**", "\\boxed{B}" or as the option's text.

Formulas (see ../shared/DESIGN.md):
- math partial credit (RYS): both integers as digit strings, the shorter right-padded with zeros to
  a common length L (p pad digits); score = (1 - |a - e| / max(a, e)) * (1 - p / L), in [0, 1].
- EQ-Bench-v2 style: per emotion d = |ref - pred|; penalty d^2/4 when d <= 4, else d;
  score = 100 * (1 - sum(penalty) / (10 * n)), floored at 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

__all__ = [
    "SCORERS",
    "answer_text",
    "check_answer",
    "eq_score",
    "extract_choice",
    "extract_number",
    "extract_yes_no",
    "math_partial_credit",
    "parse_emotions",
    "parsed",
    "score_answer",
    "strip_thinking",
]

_THINK_TAGS = r"(?:think|thinking|reasoning)"
_THINK_BLOCK = re.compile(rf"<({_THINK_TAGS})>.*?</\1>", re.IGNORECASE | re.DOTALL)
_THINK_CLOSE = re.compile(rf"</{_THINK_TAGS}>", re.IGNORECASE)
_THINK_OPEN = re.compile(rf"<{_THINK_TAGS}>", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
# a cue counts only when followed by is / : / = ("the answer to 12 * 13 is 156" has none)
_ANSWER_CUE = re.compile(r"\b(?:final answer|answer|result)\s*(?:is\s*:?|:|=)\s*", re.IGNORECASE)
_LOOSE_CUE = re.compile(r"\b(?:answer|result)\b[^.\n=]{0,80}?\s(?:is|equals)\s+", re.IGNORECASE)

_SEP = r"(?:,|[ \u00a0\u2009\u202f]|\{,\}|\\[,;! ]|')"  # thousands separators, LaTeX ones included
_MANTISSA = rf"(?:\d{{1,3}}(?:{_SEP}\d{{3}})+(?!\d)|\d+)(?:\.\d+)?"
_EXPONENT = r"(?:[eE]([-+]?\d+)|\s*(?:[x×·*]|\\times|\\cdot)\s*10\s*(?:\^|\*\*)\s*\{?\s*([-+−]?\d+)\s*\}?)"
_NUMBER = re.compile(rf"(?<![\w.])([-−–])?({_MANTISSA})(?:{_EXPONENT})?")  # "- 18" is a bullet, not -18
_HUGE = 308  # past 10^308 (a float's range) no exact value is worth building (1e5000, a 5000-digit run): +-inf
# an answer stated before its working: "18, since ...", "8, not 5 + 4 = 9", "18 (16 - 3 - 4 = 9 ...)"
_ANSWER_FIRST = re.compile(rf"\s*{_NUMBER.pattern}(?:\s*,?\s+(?i:since|because|as|not|given|from|which|being)\b"
                           rf"|\s*\([^()]*=)")
# a minus written apart from its number after '=', ':', '(' or 'is' on the same line ("x = - 5");
# elsewhere "- 18" is a bullet or a dash ("Answer:\n- 18", "Total - 18")
_SPACED_MINUS = re.compile(r"(?:[=:(]|\bis)[ \t]*[-−–][ \t]+$")


def strip_thinking(text: str) -> str:
    """A completion without its reasoning: <think>...</think> blocks removed (also <thinking>,
    <reasoning>); text up to a lone closing tag dropped (templates that open the block in the
    prompt); an unclosed block dropped to the end (the model never reached its answer)."""
    text = _THINK_BLOCK.sub("", text)
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end():]
    opened = _THINK_OPEN.search(text)
    return (text[:opened.start()] if opened else text).strip()


def answer_text(text: str) -> str:
    """The part of a completion that holds its answer: thinking stripped, markdown emphasis
    (**x**, *x*, __x__) and LaTeX text wrappers (\\text{x}) dropped, and the content of the last
    \\boxed{...} when there is one."""
    if not isinstance(text, str):
        return ""
    text = strip_thinking(text)
    boxed = _BOXED.findall(text)
    if boxed:
        text = boxed[-1]
    text = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([A-Za-z][^*\n]{0,40}?)\*(?![\w*])", r"\1", text.replace("**", ""))
    return re.sub(r"__|(?<!\w)_(?=\w)|(?<=\w)_(?!\w)", "", text).strip()


def _cue_end(text: str) -> int | None:
    """Where the text after the last 'answer is' / 'Answer:' / 'result =' cue begins, None when there is none."""
    cues = list(_ANSWER_CUE.finditer(text))
    return cues[-1].end() if cues else None


def _after_cue(text: str) -> str | None:
    """The text after the last 'answer is' / 'Answer:' / 'result =' cue, None when there is none."""
    end = _cue_end(text)
    return None if end is None else text[end:]


def _answer_span(text: str, cue: int | None) -> tuple[int, int] | None:
    """Where the clause that states the answer lies in ``text``: after the last strict cue (``cue``:
    where ``_cue_end`` says its text begins), else
    after "answer/result ... is" in one sentence ("The answer to 12 * 13 is 156"); cut at the
    sentence's end, and after its last '=' when it shows working ("The answer is 12 * 13 = 156")
    unless it states the number first ("The answer is 18, since 16 - 3 - 4 = 9 are sold", "18 (16 -
    3 - 4 = 9 ...)"). None without a cue."""
    if cue is None:
        loose = list(_LOOSE_CUE.finditer(text))
        if not loose:
            return None
        cue = loose[-1].end()
    start = cue
    cut = re.search(r"(?<!\d)\.(?!\d)|\.\s|\n|;", text[start:])
    end = start + (cut.start() if cut else len(text) - start)
    clause = text[start:end]
    if "=" in clause and not _ANSWER_FIRST.match(clause):
        start += clause.rindex("=") + 1
    return start, end


def _number_value(match: re.Match) -> int | float | None:
    sign, mantissa, exp_e, exp_times = match.groups()
    if not sign and _SPACED_MINUS.search(match.string[max(0, match.start() - 16):match.start()]):
        sign = "-"
    digits = re.sub(_SEP, "", mantissa)
    exponent = exp_e or exp_times
    try:
        value = Decimal(digits)
        shift = int(exponent.replace("−", "-")) if exponent else 0
    except (InvalidOperation, ValueError):
        return None
    size = value.adjusted() + shift if value else 0  # the power of ten of its leading digit
    if abs(size) > _HUGE:
        return (-math.inf if sign else math.inf) if size > 0 else 0.0
    value = value.scaleb(shift)
    if sign:
        value = -value
    if value == value.to_integral_value() and ("." not in digits or exponent):
        return int(value)
    return float(value)


def _leading_number(text: str) -> re.Match | None:
    """A number the text opens with, followed by nothing or a clause break ("123 (since ...)",
    "42. Because ..."): the model gave its answer first, then its working."""
    m = _NUMBER.match(text)
    if not m or not re.match(r"\s*(?:$|[.,;!(\[\n]|\s[-–]\s+[A-Za-z])", text[m.end():]):
        return None
    if text[m.end():m.end() + 1] == "." and re.search(r"^\s*2[.)]\s", text, re.MULTILINE):
        return None  # "1. ... 2. ..." is a numbered list, not an answer
    return m


def extract_number(text: str, fractions: bool = False) -> int | float | None:
    """The answer number in a completion (see ``answer_text``), by the first rule that finds one:
    the first number of the answer clause (``_answer_span``: after "answer is" / "Answer:" /
    "result =" or "the answer to ... is", past any "=" of working); the first number after the
    cue; a number the reply opens with before a clause break ("123 (since ...)", not "12 - 7 = 5");
    the last number outside parentheses; the last number.
    Reads signs (-, −), thousands separators (1,234; 1 234; 1{,}234; 1\\,234), decimals,
    scientific notation (8.6e10, 8.6 × 10^10, 8.6 \\times 10^{10}); with ``fractions`` (the
    'number' scorer's, for an answer that is no integer) also fractions (3/4, 2 3/4,
    \\frac{3}{4}: the number found is read with the fraction it is part of; off elsewhere, where
    "45/50", "24/7" or "9/11" are more often a score, a phrase or a date than an answer). None when
    there is no number."""
    text = answer_text(text)
    cue = _cue_end(text)
    span = _answer_span(text, cue)  # (searched in place: a sign's context before the clause counts)
    match = _NUMBER.search(text, *span) if span is not None else None
    if match is None and cue is not None:
        match = _NUMBER.search(text, cue)
    if match is None:
        match = _leading_number(text)
    if match is None:
        outside = re.sub(r"\([^()]*\)", " ", text)
        found = list(_NUMBER.finditer(outside)) or list(_NUMBER.finditer(text))
        match = found[-1] if found else None
    if match is None:
        return None
    in_fraction = _fraction_at(match.string, match.start()) if fractions else None
    return in_fraction if in_fraction is not None else _number_value(match)


# a fraction: "3/4", "-3/4", a mixed "2 3/4", LaTeX's \frac{3}{4} (not a date's "3/4/2024")
# (a mixed number's fraction has no sign of its own: "10 -3/4" is 10 and -3/4)
_SLASHED = re.compile(r"(?<![\w.,/])(?:([-−]?\d+)[ \t]+(?=\d))?([-−]?\d+)[ \t]*/[ \t]*(\d+)(?![\w/]|[.,]\d)")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([-−]?\d+)\s*\}\s*\{\s*([-−]?\d+)\s*\}")


def _fraction_at(text: str, at: int) -> float | None:
    """The value of the fraction whose digits include position ``at`` of text, or None."""
    for m in _SLASHED.finditer(text):
        if m.start() <= at < m.end() and int(m.group(3)):
            whole, top = (int(g.replace("−", "-")) if g else 0 for g in m.group(1, 2))
            part = abs(top) / int(m.group(3))
            negative = (m.group(1) or m.group(2)).lstrip().startswith(("-", "−"))
            return -(abs(whole) + part) if negative else abs(whole) + part
    for m in _LATEX_FRAC.finditer(text):
        top, bottom = (int(g.replace("−", "-")) for g in m.group(1, 2))
        if m.start() <= at < m.end() and bottom:
            return top / bottom
    return None



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


_RANGE = r"<?\s*\d+(?:\.\d+)?\s*[-\u2013]\s*\d+(?:\.\d+)?\s*>?"  # '0-10', '<0-10>', '7 – 8': a range, not a value


def parse_emotions(text: str, emotions: Sequence[str]) -> list[float] | None:
    """Intensities (0-10) for each emotion from a completion such as 'Anger: 7\\nRelief: 2 ...'.

    Named values win ('Anger: 7', 'anger - 7', 'Anger 7/10'); otherwise, when the text holds exactly as
    many numbers as emotions, they are taken in order. A range ('Joy: <0-10>', the prompt's template
    copied back, or 'Joy: 6-8') is no value. Values are clamped to [0, 10]. None when unparsable."""
    text = re.sub(_RANGE, " ", answer_text(text))  # the prompt's '<0-10>' copied back is no value
    values: list[float | None] = []
    for name in emotions:  # 'Anger: -3' is -3 (clamped to 0), 'anger - 7' is 7
        m = (re.search(re.escape(name) + r"\W{0,3}?\s*[:=]\s*(-?\d+(?:\.\d+)?)", text, re.IGNORECASE)
             or re.search(re.escape(name) + r"\W{0,3}\s*(?:[:=\-]\s*)?(\d+(?:\.\d+)?)", text, re.IGNORECASE))
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
    """'yes' or 'no': the first yes/no word after the last answer cue; else a reply that opens with one
    ('No, ...', 'Yes.'); else the first yes/no standing as a sentence of its own ('... it? No.',
    'Conclusion: yes'); else the last one ending a clause ('..., so yes.'), never a determiner ('no
    other cause', 'no matter'); else the first yes/no word anywhere ('No it did not'). "Yes or no"
    (the question's instruction echoed, or a hedge) is no answer: None when nothing else is said."""
    text = re.sub(r"\b(?:yes|no)\s*(?:or|/)\s*(?:yes|no)\b", " ", answer_text(text), flags=re.IGNORECASE)
    after = _after_cue(text)
    if after is not None and (m := re.search(r"\b(yes|no)\b", after, re.IGNORECASE)):
        return m.group(1).lower()
    flags = re.IGNORECASE
    found = (re.match(r"\s*(yes|no)\b(?=\s*(?:[^\w\s]|$))", text, flags)
             or re.search(r"(?:^|[.!?:\n])\s*(yes|no)\s*(?=[.!?\n]|$)", text, flags)
             or ([*re.finditer(r"\b(yes|no)\s*(?=[.!?;:\n]|$)", text, flags)] or [None])[-1]
             or re.search(r"\b(yes|no)\b", text, flags))
    return found.group(1).lower() if found else None


def _opening_choice(letters: str) -> str:
    """A reply that opens with its option: '(B) ...', 'B) ...', 'B.', 'Option B.', a lone 'B'."""
    return rf"\s*(?:(?i:option|choice)\s+)?[(\[]?([{letters}])(?:[)\]:.,]|\s*$|\s*\n)"


def _verdict_patterns(letters: str) -> list[str]:
    """Ways a reply states which option it settles on, wherever they stand."""
    x = rf"[(\[]?([{letters}])\b[)\]]?"
    marker = rf"[(\[]?[{letters}][)\]:.]\s"  # 'B) ', 'B. ', '(B) ' opening an option's line or clause
    return [rf"(?<![\w'])[(\[]?([{letters}])[)\]]?\s+is\s+(?:correct|right|the (?:correct |right |best )?answer)",
            # an option walked through and judged: 'B) 03/05/2011 is correct', 'B) London - correct'
            rf"(?<![\w'])[(\[]?([{letters}])[)\]:.]\s(?:(?!{marker})[^\n]){{0,80}}?"
            rf"(?:\bis|\s?[-\u2013\u2014:])\s*(?:the\s+)?(?i:correct|right|answer)\b(?!\s+(?i:before|after|now|away|here|to))",
            rf"\b(?i:correct|right)(?:\s+(?i:answer|option|choice))?\s*:\s*{x}",  # 'Correct: B'

            rf"\b(?i:so|therefore|thus|hence)\b,?\s+(?i:the answer is\s+|it(?:'s| is)\s+)?{x}",
            rf"\b(?i:choose|pick|go with|select)\s+(?i:option\s+)?{x}",
            rf"\b(?i:correct|right|best)\s+(?i:option|choice|answer)\s+is\s+(?i:option\s+)?{x}",
            rf"\b(?i:the best|best one|the right one|the correct one)\s+is\s+(?i:option\s+)?{x}"]


def _choice_patterns(letters: str) -> list[str]:
    """Ways a completion names an option letter, most explicit first."""
    return [rf"\(([{letters}])\)",                                  # (B)
            rf"\b(?i:option|choice)\s+\(?([{letters}])\b",          # option B, choice (B)
            rf"^\s*([{letters}])\s*$",                             # a lone letter on a line
            rf"(?<![\w'])([{letters}])[).:](?!\w)",                # B)  B.  B:
            rf"\b([{letters}])\s+is\s+(?:correct|right|the (?:correct |right )?answer)",
            rf"(?<![\w'])([{letters}])\s*$"]                        # a letter that ends the reply


def extract_choice(text: str, options: Sequence[str]) -> str | None:
    """The option letter (A, B, ...) a completion picks: after the last answer cue if there is one
    ('Answer: B', 'the answer is (B)'), else in the reply — '(B)', 'option B', 'B)', 'B.', a lone
    letter, bold or boxed ('**B**', '\\boxed{B}'): the last verdict ('B is correct', 'so B', 'I choose
    B', 'the correct choice is B', 'B) 03/05 is correct', 'Correct: B'), else the option the reply opens with ('(B) Paris. (A) is London.'),
    else the first mention, most explicit form first — or the text of exactly one option. None when
    it names no single option: a hedge ('A or B', 'Answer: A or B.'), or, without a cue or verdict,
    every one of three or more options in order ('A, B, C or D', '(A) (B) (C) (D)', the options
    block echoed)."""
    text = answer_text(text)
    if not text:
        return None
    letters = "".join(chr(ord("A") + i) for i in range(len(options)))
    after = _after_cue(text)
    hedge = rf"\s*[(\[]?[{letters}][)\]]?\s*(?:or|and|/|,)\s*[(\[]?[{letters}][)\]]?\s*(?:[.?!]|$)"
    if (after is not None and re.match(hedge, after)) or (after is None and re.fullmatch(hedge + r"\s*", text)):
        return None  # 'A or B', 'Answer: A or B.' name no single option ('A or B? B.' and 'Answer: C, B and D are wrong' do)
    if after is not None:
        m = re.match(rf"\s*[(\[]?([{letters}])\b", after) or re.fullmatch(
            rf"\s*[(\[]?([{letters.lower()}])[)\]]?\s*[.!]?\s*", after)  # "answer: b" alone
        if m:
            return m.group(1).upper()
    for part in (after, text):
        if part is None:
            continue
        m = re.match(_opening_choice(letters), part.strip())
        verdicts = [v for pattern in _verdict_patterns(letters) for v in re.finditer(pattern, part)]
        if not verdicts and after is None and _names_every_option(part, letters):
            return None
        if verdicts or m:  # the last verdict ('A) is too early. B) is right. So B.'), else the option it opens with
            return max(verdicts, key=lambda v: v.start()).group(1) if verdicts else m.group(1)
        for pattern in _choice_patterns(letters):
            m = re.search(pattern, part.strip(), re.MULTILINE)
            if m:
                return m.group(1)
    named = [chr(ord("A") + i) for i, o in enumerate(options) if re.search(rf"\b{re.escape(o)}\b", text, re.IGNORECASE)]
    return named[0] if len(named) == 1 else None


def _names_every_option(text: str, letters: str) -> bool:
    """Whether the text lists every one of three or more options in order, in one run ('A, B, C
    or D', '(A) (B) (C) (D)') or as an options block (lines opening 'A)', 'B)', ...): an
    enumeration or the prompt echoed, not a pick ('Eliminating A, B and C leaves D' is one)."""
    if len(letters) < 3:
        return False
    one = rf"[(\[]?[{letters}][)\]]?"
    run = rf"(?<![\w']){one}(?:\s*(?:,|/|\bor\b|\band\b)?\s*{one}(?![\w']))+"
    for m in re.finditer(run, text):
        joined = re.search(r"\b(?:or|and)\b", m.group(0))  # an enumeration's 'or'/'and' comes before its last
        if "".join(re.findall(f"[{letters}]", m.group(0))) == letters and (
                not joined or re.search(rf"\b(?:or|and)\s*{one}$", m.group(0))):
            return True
    return "".join(re.findall(rf"^\s*[(\[]?([{letters}])[).:]", text, re.MULTILINE)) == letters


def _want_number(answer: str, scorer: str, integer: bool = False) -> float | int:
    try:
        raw = str(answer).replace(",", "")
        return int(raw) if integer else float(raw)
    except ValueError as e:
        kind = "an integer" if integer else "a numeric"
        raise ValueError(f"the {scorer!r} scorer needs {kind} answer, got {answer!r}") from e


def check_answer(scorer: str, answer: str) -> None:
    """ValueError when ``answer`` is one the named scorer cannot compare with (a 'number' answer
    that is no number, a 'math' answer that is no integer, a 'yes_no' answer that is neither):
    found when a probe is made, not after a sweep's first generation."""
    _check(scorer)
    if scorer in ("number", "math"):
        _want_number(answer, scorer, integer=scorer == "math")
    if scorer == "yes_no" and _bare(str(answer)) not in ("yes", "no"):
        raise ValueError(f"the 'yes_no' scorer needs the answer 'yes' or 'no', got {answer!r}")


def _bare(text: str) -> str:
    """Text without surrounding whitespace, quotes, bold or a closing full stop: '"Paris."' -> 'paris'."""
    return re.sub(r"^[\s\"'*`]+|[\s\"'*`.!?]+$", "", text).lower()


def _exact(completion: str, answer: str, **_) -> float:
    return 100.0 if _bare(answer_text(completion)) == _bare(str(answer)) else 0.0


def _contains(completion: str, answer: str, **_) -> float:
    """The answer as a whole word or phrase of the reply ("no" is not in "I don't know", "4" not in "14")."""
    want = re.escape(str(answer).strip())
    return 100.0 if re.search(rf"(?<!\w){want}(?!\w)", strip_thinking(completion), re.IGNORECASE) else 0.0


def _number(completion: str, answer: str, number=None, **_) -> float:
    want = number if number is not None else _want_number(answer, "number")
    got = extract_number(completion, fractions=not float(want).is_integer())
    return 100.0 if got is not None and abs(float(got) - float(want)) < 1e-9 else 0.0


def _math(completion: str, answer: str, given: Sequence[str] = (), **_) -> float:
    want = _want_number(answer, "math", integer=True)
    return math_partial_credit(_math_answer(completion, want, given), want)


def _math_answer(completion: str, want: int | None, given: Sequence[str] = ()):
    """The number a math completion gives, or None when it only copies a number of the question
    (``given``: its numbers as digits) or the first digits of one ('The cube root of 265971760991
    is 26597'): that is no attempt, and must earn no partial credit."""
    got = extract_number(completion)
    if got is None or got == want or (isinstance(got, float) and not got.is_integer()):
        return got  # (not float(got) == int(got): 1e999 has no int)
    digits = str(abs(int(got)))
    return None if any(str(g).startswith(digits) for g in given) else got


def _yes_no(completion: str, answer: str, **_) -> float:
    return 100.0 if extract_yes_no(completion) == _bare(str(answer)) else 0.0  # ("Yes." is yes)


def _choice(completion: str, answer: str, options: Sequence[str] = (), **_) -> float:
    if not options:
        raise ValueError("the 'choice' scorer needs the item's options")
    return 100.0 if extract_choice(completion, options) == str(answer).strip().upper() else 0.0


def _eq(completion: str, answer: str, emotions: Sequence[str] = (), reference: Sequence[float] = (), **_) -> float:
    if not emotions or len(emotions) != len(reference):
        raise ValueError("the 'eq' scorer needs the item's emotions and reference intensities")
    return eq_score(parse_emotions(completion, emotions), reference)


SCORERS = {
    "exact": _exact,
    "contains": _contains,
    "number": _number,
    "math": _math,
    "yes_no": _yes_no,
    "choice": _choice,
    "eq": _eq,
}

# what each scorer reads from a completion (None: nothing it can score)
_READERS = {
    "exact": lambda text, **_: answer_text(text) or None,
    "contains": lambda text, **_: strip_thinking(text) or None,
    "number": lambda text, **_: extract_number(text),
    "math": lambda text, given=(), **_: _math_answer(text, None, given),
    "yes_no": lambda text, **_: extract_yes_no(text),
    "choice": lambda text, options=(), **_: extract_choice(text, options),
    "eq": lambda text, emotions=(), **_: parse_emotions(text, emotions),
}


def _check(scorer: str) -> None:
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; known: {', '.join(sorted(SCORERS))}")


def score_answer(scorer: str, completion: str, answer: str, **kwargs) -> float:
    """Scores a completion with a named scorer (one of SCORERS)."""
    _check(scorer)
    return SCORERS[scorer](completion if isinstance(completion, str) else "", answer, **kwargs)


def parsed(scorer: str, completion: str, **kwargs) -> bool:
    """Whether the named scorer can read an answer in the completion (a number, a choice, the
    emotions...), right or wrong: the parse rate that makes format breakage visible."""
    _check(scorer)
    return isinstance(completion, str) and _READERS[scorer](completion, **kwargs) is not None
