"""Probes and scorers: hand-checked scores (including unparsable answers), item sets, splits,
custom JSONL probes."""

from __future__ import annotations

import json
import math
import re

import pytest

from circuit_finder.probes import Item, ItemProbe, Probe, from_jsonl, get_probe
from circuit_finder.probes.scoring import (
    eq_score,
    extract_choice,
    extract_number,
    extract_yes_no,
    math_partial_credit,
    parse_emotions,
    parsed,
    score_answer,
    strip_thinking,
)


# RYS partial credit, worked by hand from the formula in DESIGN.md: both integers as digit strings,
# the shorter right-padded with zeros to length L (p pad digits);
# score = 100 * (1 - |a - e| / max(a, e)) * (1 - p / L), 0 when unparsable.
@pytest.mark.parametrize("answer, expected, score", [
    (12345, 12345, 100.0),
    (None, 12345, 0.0),
    (-5, 5, 0.0),  # a sign mismatch scores nothing
    # same length, p = 0: 1 - 45 / 12345 = 12300 / 12345 = 0.9963547995
    (12300, 12345, 99.63547995),
    # "1234" -> "12340", p = 1, L = 5: (12340 / 12345) * (4 / 5) = 0.7996759822
    (1234, 12345, 79.96759822),
    # "12345" -> "123450" vs 123456, p = 1, L = 6: (1 - 6 / 123456) * (5 / 6) = 0.8332928331
    (123456, 12345, 83.32928331),
    # "999" -> "9990" vs 1000, p = 1, L = 4: (1 - 8990 / 9990) * (3 / 4) = 0.0750750751
    (999, 1000, 7.50750751),
    # "5" -> "50": the digits agree, only the pad costs: 1 * (1 - 1 / 2)
    (5, 50, 50.0),
    # 1 - 4 / 7 = 3 / 7 = 0.4285714286
    (3, 7, 42.85714286),
    # 1 - 89999 / 99999 = 10000 / 99999 = 0.1000010000
    (99999, 10000, 10.00010000),
    (12.5, 12, 0.0),  # not an integer
    (12.0, 12, 100.0),
])
def test_math_partial_credit(answer, expected, score):
    assert math_partial_credit(answer, expected) == pytest.approx(score, abs=1e-6)


def test_math_scorers_parse_then_score():
    """The same hand-worked values through the completion-level scorers (extraction + formula)."""
    item = Item("m", "a hand-written item", "12345", scorer="math")
    assert score_answer("math", "The answer is 1,234.", "12345") == pytest.approx(79.96759822, abs=1e-6)
    assert get_probe("math").score(item, "I think 12300") == pytest.approx(99.63547995, abs=1e-6)
    assert get_probe("math").score(item, "no idea") == 0.0
    assert score_answer("math", "", "12345") == 0.0


@pytest.mark.parametrize("text, number", [
    ("The answer is 1,234.", 1234),
    ("I think 12. Answer: 7", 7),
    ("3 + 4 = 7", 7),
    ("no digits here", None),
    ("", None),
    ("The cube root of 27 is 3", 3),
    ("Result: -15", -15),
    ("2.5 apples", 2.5),
    # the cases: a cue counts only before is / : / =
    ("The answer to 123456 * 654321 is 86556358280.", 86556358280),
    ("The result of 12 * 13 is 156", 156),
    ("123 (since 123^3 = 1860867)", 123),
    ("1860867 has cube root 123. Answer: 123", 123),
    # scientific notation
    ("8.6556358280e10", 86556358280),
    ("It is 8.6556358280 × 10^10.", 86556358280),
    ("$8.6556358280 \\times 10^{10}$", 86556358280),
    ("about 1.5E3", 1500),
    # separators: spaces, thin spaces, LaTeX, commas; signs
    ("12 345", 12345),
    ("12\u2009345\u2009678", 12345678),
    ("$12{,}345$", 12345),
    ("12\\,345", 12345),
    ("The answer is -1,234,567.", -1234567),
    ("Answer: \u22125".replace("\u2212", "\u2212"), -5),
    ("The answer is \u221242", -42),
    ("values 3,4 and 5", 5),  # 3,4 is no thousands group: not 34
    # bold, boxed, thinking
    ("**156**", 156),
    ("The final answer is $\\boxed{156}$.", 156),
    ("<think>12 * 13... maybe 146? no, 156</think>\n\n156", 156),
    ("<think>let me compute 12 * 13 and check", None),  # thinking never finished: no answer
    ("I worked it out.</think>The answer is 7", 7),  # the template opened the block
    # a numbered list is not a leading answer
    ("1. Multiply 12 by 13.\n2. That gives 156", 156),
    # working after the cue: the number after its last '='
    ("The answer is 12 * 13 = 156", 156),
    ("Answer: (12*13) = 156", 156),
    ("result = 2^10 = 1024", 1024),
    ("12 - 7 = 5", 5),
    ("The result of 12 * 13 is 156, which is more than 100.", 156),
    ("The answer is 42 (6 * 7).", 42),
    ("Answer: 7\n\nExplanation: 3 + 4 = 7, not 10", 7),
])
def test_extract_number(text, number):
    assert extract_number(text) == number


@pytest.mark.parametrize("text, number, plain", [
    ("3/4", 0.75, 4), ("The answer is 3/4.", 0.75, 3), ("\\boxed{\\frac{3}{4}}", 0.75, 4),
    ("Answer: 2 3/4 cups", 2.75, 2), ("-3/4", -0.75, 4), ("x = 10/2", 5.0, 2), ("Answer: 10 -3/4", 10, 10),
    ("On 3/4/2024 she had 5", 5, 5),  # (a date is no fraction)
    ("Answer: 45/50", 0.9, 45),  # a score: why fractions are read only for answers that are no integer
])
def test_extract_number_fractions(text, number, plain):
    """With fractions (the 'number' scorer's, for a non-integer answer) the number found is read with
    the fraction it is part of; without, as before."""
    assert extract_number(text, fractions=True) == number
    assert extract_number(text) == plain


def test_number_scorer_reads_fractions_only_for_fractional_answers():
    probe = ItemProbe("n", [Item("a", "p", "0.75", scorer="number"), Item("b", "p", "45", scorer="number")])
    a, b = probe.items("all")
    assert probe.score(a, "It is 3/4.") == 100.0 and probe.score(b, "Answer: 45/50") == 100.0


@pytest.mark.parametrize("text, letter", [
    ("(B)", "B"),
    ("The answer is C.", "C"),
    ("A) 05/28/2017", "A"),
    ("It is 05/27/2017", "C"),
    ("**B**", "B"),
    ("**Answer: B**", "B"),
    ("$\\boxed{B}$", "B"),
    ("The correct choice is option B.", "B"),
    ("I would go with (C) because the date moves forward.", "C"),
    ("Answer: (A) 05/28/2017", "A"),
    ("<think>A or B? A looks wrong.</think>B", "B"),
    ("B is correct.", "B"),
    ("A date a week later is (B)", "B"),  # the article "A" is no answer
    ("*B*", "B"),
    ("The answer is *B*", "B"),
    ("$\\boxed{\\text{B}}$", "B"),
    ("Answer: [B]", "B"),
    ("answer: b", "B"),
    ("Answer: a good question; (C) it is", "C"),
    ("Check each one. A) is too early. B) is right. So B.", "B"),  # the last mention, not the first
    ("Option A is wrong. Option C is correct.", "C"),
    ("Not A. The correct choice is C", "C"),
    ("(A) is wrong; (B) is right.", "B"),
    ("(B) is right; (A) is wrong.", "B"),  # answer first, then the rejected options
    ("(B) 05/26/2017. The other options (A) and (C) are a day off.", "B"),
    ("I'd choose (B) over (C).", "B"),
    ("Option B. Option A is a day early.", "B"),
    ("Final answer: I believe it's (B), because (A) is a day late.", "B"),
    ("Let's check:\n(A) wrong\n(B) right\n(C) wrong\nTherefore B.", "B"),
    ("D", None),
    ("no idea", None),
])
def test_extract_choice_cases(text, letter):
    assert extract_choice(text, ["05/28/2017", "05/26/2017", "05/27/2017"]) == letter


@pytest.mark.parametrize("scorer, text, kwargs, ok", [
    ("math", "The answer is 42", {}, True),
    ("math", "I cannot compute that.", {}, False),
    ("math", "<think>42 maybe", {}, False),
    ("choice", "(B)", {"options": ["x", "y"]}, True),
    ("choice", "neither", {"options": ["x", "y"]}, False),
    ("yes_no", "**Yes**", {}, True),
    ("yes_no", "It depends.", {}, False),
    ("eq", "Anger: 7\nRelief: 2\nPride: 1\nFear: 0", {"emotions": ["Anger", "Relief", "Pride", "Fear"]}, True),
    ("eq", "She feels conflicted.", {"emotions": ["Anger", "Relief", "Pride", "Fear"]}, False),
    ("exact", "   ", {}, False),
])
def test_parsed(scorer, text, kwargs, ok):
    """parsed(): could the scorer read an answer at all (right or wrong) — the parse-rate column."""
    assert parsed(scorer, text, **kwargs) is ok


def test_probe_parsed_and_score_agree_on_unreadable():
    for name in ("math", "eq", "reasoning", "gsm8k"):
        probe = get_probe(name)
        for item in probe.items()[:6]:
            assert probe.parsed(item, item.answer), (name, item.id)
            assert not probe.parsed(item, "<think>still thinking"), (name, item.id)
            assert probe.score(item, "<think>still thinking") == 0.0


def test_strip_thinking():
    assert strip_thinking("<think>a</think>b<thinking>c</thinking>d") == "bd"
    assert strip_thinking("<reasoning>x</reasoning>\nAnswer: 3") == "Answer: 3"
    assert strip_thinking("plain") == "plain"


# EQ-Bench-v2 style, by hand: d = |ref - pred| per emotion; penalty d^2 / 4 when d <= 4, else d;
# score = 100 * (1 - sum / (10 * n)), n = 4 here so the divisor is 40.
@pytest.mark.parametrize("pred, ref, score", [
    ([7, 6, 1, 0], [7, 6, 1, 0], 100.0),
    ([8, 3, 5, 0], [7, 6, 1, 0], 83.75),  # d = 1, 3, 4, 0: 0.25 + 2.25 + 4 = 6.5; 1 - 6.5 / 40 = 0.8375
    ([3, 6, 1, 0], [7, 6, 1, 0], 90.0),  # d = 4 (quadratic side): 16 / 4 = 4; 1 - 4 / 40
    ([2, 6, 1, 0], [7, 6, 1, 0], 87.5),  # d = 5 (linear side): 5, not 25 / 4; 1 - 5 / 40
    ([7.5, 6, 1, 0], [7, 6, 1, 0], 99.84375),  # d = 0.5: 0.0625; 1 - 0.0625 / 40
    ([0, 0, 10, 10], [7, 6, 1, 0], 20.0),  # d = 7, 6, 9, 10, all linear: 32; 1 - 32 / 40
    ([10, 10, 10, 10], [1, 0, 0, 0], 2.5),  # 9 + 10 + 10 + 10 = 39; 1 - 39 / 40
    ([10, 10, 10, 10], [0, 0, 0, 0], 0.0),  # 40: the floor
    (None, [7, 6, 1, 0], 0.0),  # unparsable
    ([1, 2], [7, 6, 1, 0], 0.0),  # wrong count
])
def test_eq_score_formula(pred, ref, score):
    assert eq_score(pred, ref) == pytest.approx(score, abs=1e-9)


def test_eq_probe_scores_text_by_the_formula():
    emotions = ("Anger", "Relief", "Pride", "Fear")
    item = Item("e", "scene", "Anger: 7\nRelief: 6\nPride: 1\nFear: 0", scorer="eq",
                data={"emotions": emotions, "reference": (7, 6, 1, 0)})
    probe = get_probe("eq")
    assert probe.score(item, "Anger: 8\nRelief: 3\nPride: 5\nFear: 0") == pytest.approx(83.75)
    assert probe.score(item, "fear - 0, pride 1/10, relief=2, ANGER: 7") == pytest.approx(90.0)
    assert probe.score(item, "I cannot say.") == 0.0


def test_parse_emotions():
    emotions = ["Anger", "Relief", "Pride", "Fear"]
    assert parse_emotions("Anger: 7\nRelief: 2\nPride: 10\nFear: 0", emotions) == [7, 2, 10, 0]
    assert parse_emotions("fear - 3, pride 4/10, relief=1, ANGER: 9", emotions) == [9, 1, 4, 3]
    assert parse_emotions("7, 2, 5, 12", emotions) is None  # 12 is no 0-10 score: only 3 numbers left
    assert parse_emotions("7 2 5 1", emotions) == [7, 2, 5, 1]
    assert parse_emotions("I cannot say.", emotions) is None
    assert parse_emotions("Anger: 7\nRelief: 2", emotions) is None


def test_yes_no_and_choice_extraction():
    assert extract_yes_no("Yes.") == "yes"
    assert extract_yes_no("Let me think. No, it did not. Answer: yes") == "yes"
    assert extract_yes_no("Maybe") is None
    assert extract_yes_no("There is no other cause, so yes.") == "yes"  # "no" as a determiner is no answer
    assert extract_yes_no("No matter what, the valve caused it: yes.") == "yes"
    assert extract_yes_no("No, because the valve was shut. Yes would be wrong.") == "no"  # the reply opens with it
    assert extract_yes_no("No it did not") == "no"
    assert extract_yes_no("Probably no. Yes, the valve was open, but that is not why.") == "no"  # a concession
    assert extract_yes_no("Did the valve cause it? No. Some might say yes.") == "no"  # the sentence of its own
    assert extract_yes_no("Reasoning: no alarm went off.\nConclusion: Yes") == "yes"
    assert extract_yes_no("It seems yes, but actually no.") == "no"
    options = ["05/28/2017", "05/26/2017", "05/27/2017"]
    assert extract_choice("(B)", options) == "B"
    assert extract_choice("The answer is C.", options) == "C"
    assert extract_choice("A) 05/28/2017", options) == "A"
    assert extract_choice("It is 05/27/2017", options) == "C"
    assert extract_choice("D", options) is None
    assert extract_choice("no idea", options) is None
    assert score_answer("choice", "(b)", "B", options=options) == 0.0  # letters are upper case in options
    assert score_answer("choice", "(B)", "B", options=options) == 100.0
    with pytest.raises(ValueError, match="unknown scorer"):
        score_answer("nope", "x", "y")


def test_builtin_probes_sizes_and_splits():
    # (search, held-out): held-out sets of >= 120 math / reasoning items and >= 60 EQ items
    sizes = {"math": (24, 132), "eq": (19, 75), "reasoning": (34, 136)}
    for name, (n_search, n_val) in sizes.items():
        probe = get_probe(name)
        assert isinstance(probe, Probe)
        search, val, everything = probe.items("search"), probe.items("validation"), probe.items("all")
        assert (len(search), len(val)) == (n_search, n_val)
        assert len(everything) == n_search + n_val
        assert not {i.id for i in search} & {i.id for i in val}
        assert [i.id for i in probe.items()] == [i.id for i in get_probe(name).items()]  # deterministic
        for item in everything:
            assert item.answer in item.choices, item.id
            assert len(set(item.choices)) == len(item.choices), item.id
            assert probe.score(item, item.answer) == 100.0, item.id  # the reference answer scores full marks
            assert probe.score(item, "") == 0.0, item.id
    kinds = {i.id.removeprefix("v-").split("-")[0] for i in get_probe("reasoning").items("all")}
    assert kinds == {"causal", "date", "deduction", "navigate", "arith"}


def test_eq_references_spread_over_the_scale():
    """Held-out EQ references use the whole 0-10 range (a constant answer is far from many of them)."""
    from collections import Counter

    probe = get_probe("eq")
    values = Counter(v for it in probe.items("validation") for v in it.data["reference"])
    print("held-out EQ reference histogram:", dict(sorted(values.items())))
    assert set(values) == set(range(11)) and min(values.values()) >= 10
    constant = [probe.score(it, "\n".join(f"{e}: 5" for e in it.data["emotions"])) for it in probe.items("validation")]
    print(f"a constant 5 scores {sum(constant) / len(constant):.1f} on held-out EQ (the formula is lenient; "
          f"parse rates, not scores, expose format failures)")
    assert sum(s == 100.0 for s in constant) == 0


def test_math_items_are_right():
    """Each math item's answer recomputed from its prompt with Python integers."""

    def icbrt(n: int) -> int:
        r = round(n ** (1 / 3))
        r = next(c for c in (r - 1, r, r + 1) if c ** 3 == n)
        return r

    for item in get_probe("math").items("all"):
        expr = re.fullmatch(r"What is (.*)\? Reply with only the final number, no working\.", item.prompt).group(1)
        expr = re.sub(r"the cube root of (\d+)", lambda m: str(icbrt(int(m[1]))), expr)
        expr = re.sub(r"the square root of (\d+)", lambda m: str(math.isqrt(int(m[1]))), expr)
        expr = expr.replace(", multiplied by", " *")
        assert re.fullmatch(r"[\d *+-]+", expr), item.prompt
        assert int(item.answer) == eval(expr), item.prompt  # digits and + - * only
        assert len(item.choices) == 4
        for wrong in item.choices:
            if wrong != item.answer:
                assert 0.0 < get_probe("math").score(item, wrong) < 100.0, (item.id, wrong)


def _word_problem_answer(prompt: str) -> int:
    """A reasoning word problem solved from its words (each form written out independently)."""
    n = [int(x) for x in re.findall(r"\d+", prompt)]
    if "bakery" in prompt:
        return (n[0] - n[1]) * n[2]
    if "change does she get" in prompt:
        return n[2] - n[0] * n[1]
    if "notebooks" in prompt:
        return n[0] * n[1]
    if "pump" in prompt:
        return n[0] * n[1] - n[2]
    if "groups of exactly" in prompt:
        return math.ceil((n[0] + n[1]) / n[2])
    assert "train" in prompt, prompt
    return n[0] * n[1] + n[2]


def _deduction_answer(prompt: str) -> str:
    """The object at the asked position, by trying every order against the clues."""
    import itertools

    ordinals = ["first", "second", "third", "fourth", "fifth"]
    objs = re.search(r"in a row: ([^.]+)\.", prompt)[1].split(", ")
    left = re.findall(r"The (\w+) is to the left of the (\w+)\.", prompt)
    at = [(o, ordinals.index(k)) for o, k in re.findall(r"The (\w+) is (\w+) from the left\.", prompt)]
    pos = ordinals.index(re.search(r"is (\w+) from the left\?$", prompt.split("\nOptions")[0])[1])
    alive = [p for p in itertools.permutations(objs)
             if all(p.index(a) < p.index(b) for a, b in left) and all(p[k] == o for o, k in at)]
    assert len(alive) == 1, prompt
    return f"The {alive[0][pos]}"


def test_reasoning_items_are_right():
    """Every generated reasoning item's answer recomputed from its prompt's words by another route."""
    import datetime as dt

    for item in get_probe("reasoning").items("all"):
        kind = item.id.removeprefix("v-").split("-")[0]
        chosen = item.data["options"]["ABCDE".index(item.answer)] if item.scorer == "choice" else item.answer
        if kind == "date":
            m = re.search(r"Today is (\w+ \d+, \d+)\. What was or will be the date (\d+) days (from today|ago)",
                          item.prompt)
            today = dt.datetime.strptime(m[1], "%B %d, %Y").date()
            days = int(m[2]) * (1 if m[3] == "from today" else -1)
            assert chosen == (today + dt.timedelta(days=days)).strftime("%m/%d/%Y"), item.prompt
        elif kind == "navigate":
            moves = {"forward": (0, 1), "backward": (0, -1), "left": (-1, 0), "right": (1, 0)}
            steps = re.findall(r"Take (\d+) steps? (\w+)\.", item.prompt)
            x = sum(moves[d][0] * int(s) for s, d in steps)
            y = sum(moves[d][1] * int(s) for s, d in steps)
            assert item.answer == ("Yes" if (x, y) == (0, 0) else "No"), item.prompt
        elif kind == "deduction":
            assert chosen == _deduction_answer(item.prompt), item.prompt
        elif kind == "arith":
            assert int(item.answer) == _word_problem_answer(item.prompt), item.prompt


def test_date_options_do_not_give_the_answer_away():
    """The date items' wrong options are not a fixed pattern around the answer: the answer is not
    always the option whose day before and day after are both options, nor always the same rank
    among the sorted dates (both were true of every item before)."""
    import datetime as dt

    middle, ranks, items = 0, set(), [it for it in get_probe("reasoning").items("all") if "date" in it.id]
    for it in items:
        dates = [dt.datetime.strptime(o, "%m/%d/%Y").date() for o in it.data["options"]]
        right = dates["ABCDE".index(it.answer)]
        middle += all(right + dt.timedelta(days=d) in dates for d in (-1, 1))
        ranks.add(sorted(dates).index(right))
    print(f"{len(items)} date items: answer flanked by both neighbours in {middle}; ranks among options {ranks}")
    assert len(items) >= 20 and middle < len(items) / 2 and len(ranks) >= 3


def test_scorers_refuse_copies_and_read_walkthroughs():
    """What a broken path writes must not score: a math reply that copies the question's number
    (or its first digits) earns no partial credit and is not parsed; an eq reply that copies the
    '<0-10>' template is not read as zeros. Replies that walk through the options are read at their
    verdict, and 'exact' ignores quotes and a closing full stop."""
    math = get_probe("math")
    item = next(it for it in math.items() if "cube_root" in it.id)
    number = re.search(r"cube root of (\d+)", item.prompt)[1]
    for copy in (f"The cube root of {number} is {number[:5]}", number, f"To find the cube root of {number}, we"):
        assert math.score(item, copy) == 0.0 and not math.parsed(item, copy), copy
    assert math.score(item, f"The answer is {item.answer}") == 100.0
    near = str(int(item.answer) + 1)
    assert 0 < math.score(item, near) < 100 and math.parsed(item, near)  # a real attempt keeps its credit
    emotions = ["Joy", "Worry", "Pride", "Fear"]
    assert parse_emotions("\n".join(f"{e}: <0-10>" for e in emotions), emotions) is None
    assert parse_emotions("Joy: 0-10\nWorry: 0-10\nPride: 0-10\nFear: 0-10", emotions) is None
    assert parse_emotions("Joy: 3\nWorry: 10-11\nPride: 2\nFear: 1", emotions) is None
    assert parse_emotions("Joy: 3\nWorry: 0\nPride: 2\nFear: 10", emotions) == [3, 0, 2, 10]
    options = ["03/04/2011", "03/05/2011", "03/06/2011"]
    for text in ("A) 03/04/2011 is one day early. B) 03/05/2011 is correct.",
                 "A) 03/04/2011 - incorrect\nB) 03/05/2011 - correct\nC) 03/06/2011 - incorrect",
                 "A: 03/04/2011\nB: 03/05/2011\nCorrect: B"):
        assert extract_choice(text, options) == "B", text
    assert extract_choice("Answer: A or B", options) is None and extract_choice("Answer: (A)/(B)", options) is None
    for text in ("The answer is B, because A is early.", "The answer is B, A is one day early.",
                 "Answer: B, A and C are wrong.", "Answer: B and A is wrong",
                 "A) 03/04/2011: incorrect\nB) 03/05/2011: correct", "A) 03/04/2011 \u2014 no\nB) 03/05/2011 \u2014 correct",
                 "A) 03/04/2011 is right before the date we want. B) 03/05/2011 is the answer"):
        assert extract_choice(text, options) == "B", text
    for huge in ("1e999", "8.6 × 10^400", "9" * 400):  # no integer to compare digits with: scored, not a crash
        assert 0 <= math.score(item, huge) < 100 and math.parsed(item, huge)
    for text in ('"Paris."', "Paris.", "**Paris**", " paris! "):
        assert score_answer("exact", text, "Paris") == 100.0, text
    assert score_answer("exact", "Paris is it", "Paris") == 0.0


def test_gsm8k_probe():
    probe = get_probe("gsm8k")  # its data ships with the package: nothing to skip for
    item = probe.items()[0]
    assert "eggs" in item.prompt and item.answer == "The answer is 18."
    assert probe.score(item, "So the answer is 18.") == 100.0
    assert probe.score(item, "The answer is 1,800.") == 0.0
    assert probe.score(item, "I don't know") == 0.0
    assert len(probe.items("validation")) == 20


def test_from_jsonl(tmp_path):
    f = tmp_path / "capitals.jsonl"
    rows = [
        {"id": "fr", "prompt": "Capital of France?", "answer": "Paris", "choices": ["Paris", "Lyon"]},
        {"prompt": "2 + 2?", "answer": 4, "scorer": "number"},
        {"prompt": "Pick the fruit", "answer": "apple", "choices": ["stone", "apple"], "scorer": "choice"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    probe = from_jsonl(f)
    assert probe.name == "capitals" and len(probe.items("all")) == 3
    a, b, c = probe.items("all")
    assert a.id == "fr" and probe.score(a, "paris") == 100.0 and probe.score(a, "Lyon") == 0.0
    assert probe.score(b, "It is 4.") == 100.0 and probe.score(b, "five") == 0.0
    assert c.answer == "B" and c.choices == ("A", "B") and probe.score(c, "(B) apple") == 100.0
    assert [i.id for i in probe.items("validation")] == [c.id]
    assert get_probe(str(f)).name == "capitals"


@pytest.mark.parametrize("line, message", [
    ("not json", "capitals.jsonl:1: not valid JSON"),
    ('{"answer": "x"}', "needs a string 'prompt'"),
    ('{"prompt": "p", "answer": "x", "scorer": "magic"}', "unknown scorer 'magic'"),
    ('{"prompt": "p", "answer": "x", "choices": ["a", "b"]}', "must include the answer"),
    ('{"prompt": "p", "answer": "x", "choices": "ab"}', "list of strings"),
    ('{"prompt": "p", "answer": "z", "choices": ["a", "b"], "scorer": "choice"}', "neither an option"),
    ('{"prompt": "p", "answer": "42", "choices": ["42"]}', "at least two different options"),  # no ranking
    ('{"prompt": "p", "answer": "a", "choices": ["a", "a"]}', "at least two different options"),
    # answers the scorer could only fail on mid-sweep, after the first generation
    ('{"prompt": "p", "answer": "1/2", "scorer": "number"}', r"capitals.jsonl:1: the 'number' scorer needs a numeric"),
    ('{"prompt": "p", "answer": "12.5", "scorer": "math"}', "the 'math' scorer needs an integer answer"),
    ('{"prompt": "p", "answer": "x", "scorer": "eq"}', "the 'eq' scorer needs 'emotions'"),
    ('{"prompt": "p", "answer": "x", "scorer": "eq", "emotions": ["Joy"], "reference": [11]}', "intensities in 0..10"),
    ('{"prompt": "p", "answer": true, "scorer": "yes_no"}', "the 'yes_no' scorer needs the answer 'yes' or 'no'"),
    ('{"prompt": "p", "answer": null}', r"an 'answer' \(not null\)"),
    ('{"prompt": "p", "answer": "a", "id": 2}\n{"prompt": "q", "answer": "b"}', "capitals.jsonl:2: item id '2' is "
                                                                               "line 1's too"),
])
def test_from_jsonl_errors(tmp_path, line, message):
    f = tmp_path / "capitals.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        from_jsonl(f)


def test_probe_protocol_and_errors():
    class Mine:
        name = "mine"
        max_new_tokens = 4

        def items(self, split="search"):
            return [Item("a", "p", "x", ("x", "y"))]

        def score(self, item, completion):
            return 100.0

    assert get_probe(Mine()).name == "mine"
    with pytest.raises(TypeError, match="Probe protocol"):
        get_probe(object())
    with pytest.raises(ValueError, match="unknown probe 'nope'"):
        get_probe("nope")
    with pytest.raises(ValueError, match="appears twice"):
        ItemProbe("dup", [Item("a", "p", "x"), Item("a", "q", "y")])
    with pytest.raises(ValueError, match="split must be one of"):
        get_probe("math").items("train")


def test_from_jsonl_reads_yes_no_answers_and_warns_of_tiny_files(tmp_path):
    """A yes_no answer written "Yes." is yes; a file that is not UTF-8 is named; a file of fewer
    than 3 items holds none out, and says so."""
    f = tmp_path / "yn.jsonl"
    f.write_text('{"prompt": "Is the sky blue?", "answer": "Yes.", "scorer": "yes_no"}\n')
    with pytest.warns(UserWarning, match="1 item\\(s\\): every third item is held out, so none is"):
        probe = from_jsonl(f)
    item = probe.items()[0]
    assert probe.score(item, "Yes, it is.") == 100.0 and probe.score(item, "No.") == 0.0
    f.write_bytes(b'{"prompt": "caf\xe9", "answer": "x"}\n')
    with pytest.raises(ValueError, match="yn.jsonl: not UTF-8 text"):
        from_jsonl(f)


def test_from_jsonl_reads_lowercase_letters_and_eq_lines(tmp_path):
    f = tmp_path / "mine.jsonl"
    rows = [{"prompt": "p", "answer": "b", "choices": ["x", "y"], "scorer": "choice"},
            {"prompt": "q", "answer": "", "scorer": "eq", "emotions": ["Anger", "Joy"], "reference": [7, 2]}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    choice, eq = from_jsonl(f).items("all")
    assert choice.answer == "B" and from_jsonl(f).score(choice, "(B)") == 100.0
    assert from_jsonl(f).score(eq, "Anger: 7\nJoy: 2") == 100.0
    assert from_jsonl(f).score(eq, "Anger: 7\nJoy: 6") == eq_score([7, 6], [7, 2]) < 100


def test_scorers_read_answers_before_their_working_and_bullets_unsigned():
    """'The answer is 18, since 16 - 3 - 4 = 9 ...' states 18 (the working's '=' comes after);
    a markdown bullet or dash separator before a number is no minus sign."""
    for text in ("The answer is 18, since 16 - 3 - 4 = 9 eggs are sold.", "The answer is 18 (16 - 3 - 4 = 9 eggs x $2).",
                 "Answer:\n- 18", "- **18**", "Total - 18"):
        assert extract_number(text) == 18, text
    assert extract_number("The answer is 8, not 5 + 4 = 9") == 8
    assert extract_number("The answer is 12 * 13 = 156") == 156  # working first: still the result
    assert extract_number("The answer is -5") == -5 and extract_number("x = \u22123") == -3
    for text, number in (("The answer is 6! = 720.", 720), ("Answer: 5! = 120", 120), ("Result: 3, and 3 + 1 = 4", 4),
                         ("The answer is 2(3 + 4) = 14.", 14), ("The answer is 7 - 10 = - 3", -3), ("x = - 5", -5),
                         ("Answer: - 5", -5), ("The answer is \u2013 5", -5), ("9 - 3", 3)):
        assert extract_number(text) == number, text  # working after the number, a minus set apart after = : is


def test_huge_numbers_score_zero_without_stalling():
    """Numbers past 10^100 read as +-inf (no exact value is built: '9.9e999999' once took 23 s and then
    crashed str()); they score 0 and count as parsed, in both scorers, quickly."""
    import time

    start = time.perf_counter()
    math_item = get_probe("math").items("all")[0]
    for text in ("1e5000", "The answer is 1e400.", "9.9e999999", "-1e400", "1" * 5000):
        assert abs(extract_number(text)) == float("inf"), text
        assert score_answer("number", text, "42") == 0.0 and score_answer("math", text, "42") == 0.0
        assert parsed("number", text) and get_probe("math").score(math_item, text) == 0.0
    assert extract_number("1e-500") == 0.0 and extract_number("2.5e3") == 2500
    assert extract_number("Answer: 1 \u00d7 10^150") == 10 ** 150 and extract_number("0.5e-200") == 0.5e-200
    assert time.perf_counter() - start < 2


def test_hedges_and_echoed_options_name_no_answer():
    """'Yes or No' (the instruction echoed, or a hedge) and 'A, B, C or D', '(A) (B) (C) (D)', an
    echoed options block name no single answer; a real pick among them still reads."""
    for text in ("Yes or No", "Answer: Yes or No", "Answer with only Yes or No."):
        assert extract_yes_no(text) is None, text
    assert extract_yes_no("Answer with only Yes or No. Yes.") == "yes"
    options = ["a", "b", "c", "d"]
    for text in ("It's A, B, C or D", "(A) (B) (C) (D)", "A B C D", "A or B", "Answer: A or B.",
                 "A) 03/05/2011\nB) 03/06/2011\nC) 04/05/2011\nD) 02/05/2011"):
        assert extract_choice(text, options) is None, text
    for text, letter in (("(B) Paris. (A) is London.", "B"), ("A) is too early. B) is right. So B.", "B"),
                         ("A, B and C are wrong, so D.", "D"), ("The answer is B", "B"), ("A or B? B.", "B"),
                         ("A or C? Definitely C.", "C"), ("A or B. I'd pick B.", "B"),
                         ("Eliminating A, B and C leaves D.", "D"), ("Not A, B or C, so it must be D", "D"),
                         ("After ruling out A, B and C, D", "D"), ("Between A, B, C and D, the best is C", "C")):
        assert extract_choice(text, options) == letter, text


def test_contains_matches_whole_words_and_eq_reads_signs():
    assert score_answer("contains", "I don't know", "no") == 0.0
    assert score_answer("contains", "It is 14.", "4") == 0.0 and score_answer("contains", "yesterday", "yes") == 0.0
    assert score_answer("contains", "The answer is no.", "no") == 100.0
    assert score_answer("contains", "It costs $5 in all", "$5") == 100.0
    assert parse_emotions("Anger: -3\nJoy: 2", ["Anger", "Joy"]) == [0.0, 2.0]  # not 3
    assert parse_emotions("anger - 7, joy - 2", ["anger", "joy"]) == [7.0, 2.0]
