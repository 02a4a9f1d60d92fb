"""Probes and scorers: hand-checked scores (including unparsable answers), item sets, splits,
custom JSONL probes."""

from __future__ import annotations

import json

import pytest

from circuit_finder.probes import Item, ItemProbe, Probe, from_jsonl, get_probe
from circuit_finder.probes.scoring import (
    eq_score,
    extract_choice,
    extract_number,
    extract_yes_no,
    math_partial_credit,
    parse_emotions,
    score_answer,
)


@pytest.mark.parametrize("answer, expected, score", [
    (12345, 12345, 100.0),
    (None, 12345, 0.0),
    (-5, 5, 0.0),
    # same length: 1 - |12300 - 12345| / 12345
    (12300, 12345, 100.0 * (1 - 45 / 12345)),
    # one digit short: "1234" -> 12340, p = 1, L = 5
    (1234, 12345, 100.0 * (1 - 5 / 12345) * (1 - 1 / 5)),
    # one digit long: "123456" vs "12345" -> 123450, p = 1, L = 6
    (123456, 12345, 100.0 * (1 - 6 / 123456) * (1 - 1 / 6)),
    # far off: clamped at 0
    (99999, 10000, 100.0 * (1 - 89999 / 99999)),
    (12.5, 12, 0.0),
    (12.0, 12, 100.0),
])
def test_math_partial_credit(answer, expected, score):
    assert math_partial_credit(answer, expected) == pytest.approx(score)


@pytest.mark.parametrize("text, number", [
    ("The answer is 1,234.", 1234),
    ("I think 12. Answer: 7", 7),
    ("3 + 4 = 7", 7),
    ("no digits here", None),
    ("", None),
    ("The cube root of 27 is 3", 3),
    ("Result: -15", -15),
    ("2.5 apples", 2.5),
])
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_eq_score_formula():
    ref = [7, 6, 1, 0]
    assert eq_score(ref, ref) == 100.0
    # d = 2, 0, 0, 0 -> penalty 1; d = 6 -> penalty 6 (linear past 4)
    assert eq_score([5, 6, 1, 0], ref) == pytest.approx(100 * (1 - 1 / 40))
    assert eq_score([7, 0, 1, 0], ref) == pytest.approx(100 * (1 - 6 / 40))
    assert eq_score([0, 0, 10, 10], ref) == pytest.approx(100 * (1 - (7 + 6 + 9 + 10) / 40))
    assert eq_score([10, 10, 10, 10], [0, 0, 0, 0]) == 0.0  # floored
    assert eq_score(None, ref) == 0.0
    assert eq_score([1, 2], ref) == 0.0


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
    sizes = {"math": 36, "eq": 28, "reasoning": 50}
    for name, size in sizes.items():
        probe = get_probe(name)
        assert isinstance(probe, Probe)
        search, val, everything = probe.items("search"), probe.items("validation"), probe.items("all")
        assert len(everything) == size
        assert len(search) + len(val) == size and len(val) == size // 3
        assert not {i.id for i in search} & {i.id for i in val}
        assert [i.id for i in probe.items()] == [i.id for i in get_probe(name).items()]  # deterministic
        for item in everything:
            assert item.answer in item.choices, item.id
            assert len(set(item.choices)) == len(item.choices), item.id
            assert probe.score(item, item.answer) == 100.0, item.id  # the reference answer scores full marks
            assert probe.score(item, "") == 0.0, item.id
    assert sizes["eq"] >= 24 and sizes["reasoning"] >= 40
    kinds = {i.id.split("-")[0] for i in get_probe("reasoning").items("all")}
    assert kinds == {"causal", "date", "deduction", "navigate", "arith"}


def test_reasoning_items_are_right():
    from circuit_finder.probes.reasoning import make_reasoning_items

    for item in make_reasoning_items():
        if item.id.startswith("navigate"):
            moves = {"forward": (0, 1), "backward": (0, -1), "left": (-1, 0), "right": (1, 0)}
            import re

            steps = re.findall(r"Take (\d+) steps? (\w+)\.", item.prompt)
            x = sum(moves[d][0] * int(s) for s, d in steps)
            y = sum(moves[d][1] * int(s) for s, d in steps)
            assert item.answer == ("Yes" if (x, y) == (0, 0) else "No"), item.prompt


def test_gsm8k_probe():
    try:
        probe = get_probe("gsm8k")
    except FileNotFoundError as e:
        pytest.skip(str(e))
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
    ('{"prompt": "p", "answer": "z", "choices": ["a"], "scorer": "choice"}', "neither an option"),
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
