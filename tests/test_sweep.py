"""sweep(): config generation, shared-prefix reuse (== no reuse), packed likelihood == plain
log-probs, generate == Model.generate, the results file (resume, torn lines, SIGKILL), the
pandas table with bootstrap CIs, heatmap, top, validate and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import circuit_finder as cf
from circuit_finder.likelihood import gather_logprobs
from circuit_finder.probes import Item, ItemProbe, get_probe
from circuit_finder.results import read_records
from circuit_finder.sweep import (
    ProbeBatch,
    SweepConfig,
    SweepResult,
    make_configs,
    refine_configs,
    rys_params,
)

PROBES = ("math", "eq", "reasoning")


# ------------------------------------------------------------------------------------ configs
def test_grid_configs():
    configs = make_configs(6, "grid", block_sizes=(2, 3))
    assert [(c.start, c.end, c.times) for c in configs] == (
        [(i, i + 2, 2) for i in range(5)] + [(i, i + 3, 2) for i in range(4)])
    for c in configs:
        assert c.layers == cf.LayerPath.duplicate(6, c.start, c.end, c.times)
        assert c.layers.extra_layers(6) == c.end - c.start
    assert len(make_configs(6, "grid", block_sizes=(2,), times=(2, 3))) == 10
    assert [(c.start, c.end) for c in make_configs(6, "grid", block_sizes=(2, 5), starts=[1, 3])] == [(1, 3), (3, 5), (1, 6)]
    assert [c.start for c in make_configs(12, "grid", block_sizes=(3,), stride=4)] == [0, 4, 8]


def test_scan_and_paths_configs():
    scan = make_configs(6, "scan")
    assert len(scan) == 21 and {(c.start, c.end) for c in scan} == {(i, j) for i in range(6) for j in range(i + 1, 7)}
    assert {(c.start, c.end) for c in make_configs(6, "scan", stride=2)} == {  # a coarse heatmap: even blocks
        (0, 2), (0, 4), (0, 6), (2, 4), (2, 6), (4, 6)}
    assert {(c.start, c.end) for c in make_configs(7, "scan", stride=3)} == {  # and each start's block to the end
        (0, 3), (0, 6), (0, 7), (3, 6), (3, 7), (6, 7)}
    paths = make_configs(6, "paths", paths=["0..5,3..5", [0, 1, 2, 2, 3, 4, 5], "0..2,4,5", "0..3,1..5"])
    assert [(c.start, c.end, c.times) for c in paths] == [(3, 6, 2), (2, 3, 2), (None, None, None), (1, 4, 2)]
    assert [c.key for c in paths][2] == "0..2,4,5"


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="grid", block_sizes=(7,)), "larger than the model"),
    (dict(strategy="grid", times=(1,)), "times must be >= 2"),
    (dict(strategy="grid", stride=0), "stride must be >= 1"),
    (dict(strategy="grid", starts=[6]), "start 6 is not a layer"),
    (dict(strategy="spiral"), "strategy must be one of"),
    (dict(strategy="paths"), "needs paths"),
    (dict(strategy="paths", paths=["0..6"]), "slot 6"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_configs(6, **kwargs)


def test_rys_params_roundtrip():
    n = 8
    for t in (2, 3):
        for i in range(n):
            for j in range(i + 1, n + 1):
                assert rys_params(cf.LayerPath.duplicate(n, i, j, t), n) == (i, j, t)
    for text in ("0..7", "0..6", "0..3,5,4,6,7", "0..7,0", "1..7", "0..7,7..7,3"):
        assert rys_params(cf.LayerPath.parse(text), n) is None, text


def test_refine_configs():
    winner = SweepConfig(cf.LayerPath.duplicate(10, 4, 6), 4, 6, 2)
    fine = refine_configs(10, [winner], radius=1, times=(2,))
    assert {(c.start, c.end) for c in fine} == {(i, j) for i in (3, 4, 5) for j in (5, 6, 7) if i < j}


# ------------------------------------------------------------------------------------ engine pieces
def test_run_slots_and_shared_cache(chat_model):
    m = chat_model
    ids = torch.tensor([[5, 9, 200, 7, 31]])
    pos = torch.arange(5).unsqueeze(0)
    path = list(cf.LayerPath.duplicate(6, 2, 4))
    with torch.inference_mode():
        full = m.engine.forward(ids, pos, None, path, None, False)
        h = m.engine.embed(ids)
        h = m.engine.run_slots(h, pos, None, path, None, 0, 3)
        h = m.engine.run_slots(h, pos, None, path, None, 3, len(path))
        assert torch.equal(m.engine.head(h), full)
        # slots 0..3 of the identity cache reused (shared, not copied) by the RYS path
        ident = m.engine.new_cache(list(range(6)), 1, 16)
        h4 = m.engine.run_slots(m.engine.embed(ids), pos, None, list(range(6)), ident, 0, 4)
        cache = m.engine.new_cache(path, 1, 16, ident, 4)
        out = m.engine.head(m.engine.run_slots(h4, pos, None, path, cache, 4, len(path)))
        cache.advance(5)
        assert torch.equal(out, full)
        ref_cache = m.engine.new_cache(path, 1, 16)
        m.engine.forward(ids, pos, None, path, ref_cache, False)
        nxt = torch.tensor([[11]])
        a = m.engine.forward(nxt, torch.tensor([[5]]), None, path, cache, True)
        b = m.engine.forward(nxt, torch.tensor([[5]]), None, path, ref_cache, True)
        assert torch.equal(a, b)


def test_engine_piece_errors(chat_model):
    e = chat_model.engine
    ids = torch.tensor([[5, 9, 2]])
    pos = torch.arange(3).unsqueeze(0)
    h = e.embed(ids)
    with pytest.raises(cf.InputError, match=r"slots \[2, 9\) are not a range of the 6-slot path"):
        e.run_slots(h, pos, None, list(range(6)), None, 2, 9)
    with pytest.raises(cf.InputError, match=r"hidden states must be \[batch, tokens, 64\]"):
        e.run_slots(h[..., :10], pos, None, list(range(6)), None, 0, 6)
    with pytest.raises(cf.InputError, match="hidden states are BFloat16"):
        e.run_slots(h.bfloat16(), pos, None, list(range(6)), None, 0, 6)
    with pytest.raises(cf.InputError, match=r"positions must be \[1, 3\]"):
        e.run_slots(h, pos[:, :2], None, list(range(6)), None, 0, 6)
    with pytest.raises(cf.InputError, match=r"attention_mask must be \[1, 3, 3\]"):
        e.run_slots(h, pos, torch.ones(1, 3, 4, dtype=torch.bool), list(range(6)), None, 0, 6)
    base = e.new_cache(list(range(6)), 1, 8)
    with pytest.raises(cf.InputError, match="the shared cache holds 6 slots of batch 1 and capacity 8"):
        e.new_cache([0, 1, 2, 3, 4, 5, 5], 2, 8, base, 3)
    with pytest.raises(cf.InputError, match="shared_slots must be in"):
        e.new_cache([0, 1, 2, 3, 4, 5, 5], 1, 8, None, 3)
    with pytest.raises(cf.InputError, match="cannot advance the KV cache by 9"):
        base.advance(9)
    with pytest.raises(cf.InputError, match="outside the vocabulary"):
        e.embed(torch.tensor([[10 ** 6]]))


# ------------------------------------------------------------------------------------ sweeps
EXPLICIT = ["0..5,2..5", "0..3,2,3,2,3,4,5", "0..2,4,5", "0,2,1,3..5", "3..5"]


def _strip(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "kind", "run")} for r in records]


@pytest.mark.parametrize("mode", ["likelihood", "generate"])
def test_reuse_equals_no_reuse(chat_model, mode):
    kw = dict(probes=PROBES, mode=mode, max_items=3, progress=False)
    grid = cf.sweep(chat_model, block_sizes=(1, 2, 3), times=(2, 3), **kw)
    grid_plain = cf.sweep(chat_model, block_sizes=(1, 2, 3), times=(2, 3), reuse=False, **kw)
    assert len(grid) == 1 + 15 + 15
    assert _strip(grid.records) == _strip(grid_plain.records)
    paths = cf.sweep(chat_model, paths=EXPLICIT, **kw)
    paths_plain = cf.sweep(chat_model, paths=EXPLICIT, reuse=False, **kw)
    assert _strip(paths.records) == _strip(paths_plain.records)
    assert {r["layers"] for r in paths.records} == {str(cf.LayerPath.parse(p)) for p in [*EXPLICIT, "0..5"]}


def test_an_empty_context_is_bos_once():
    """lm-eval's rule for an empty context: BOS is the context, and the continuation is encoded
    without special tokens (a tokenizer that prepends BOS must not give log p(BOS | BOS)); a
    continuation that starts with BOS gives that BOS as the context; a context whose text starts
    with BOS's text gets no second BOS (lm-eval's has_bos_prefix)."""
    from circuit_finder.likelihood import encode_pair

    class BosCodec:  # a Llama-style tokenizer: one id per character, BOS (1, written "§") first with special tokens
        bos_id = 1

        class tokenizer:  # noqa: N801
            @staticmethod
            def decode(ids):
                return "".join("§" if i == 1 else chr(i) for i in ids)

        def require(self, what):
            return self

        def encode(self, text, add_special_tokens=True):
            return [1] * add_special_tokens + [1 if c == "§" else ord(c) for c in text]

    yes = [ord(" "), ord("y"), ord("e"), ord("s")]
    assert encode_pair(BosCodec(), "", " yes") == ([1], yes)
    assert encode_pair(BosCodec(), "", "§ yes") == ([1], yes)
    assert encode_pair(BosCodec(), "Q:", " A") == ([1, ord("Q"), ord(":")], [ord(" "), ord("A")])
    assert encode_pair(BosCodec(), "§Q:", " A") == ([1, ord("Q"), ord(":")], [ord(" "), ord("A")])


def test_likelihood_equals_plain_log_probs(chat_model):
    """The packed batch (choices after one shared context) gives the log-probs of separate rows."""
    m = chat_model
    probe = get_probe("eq")
    items = probe.items()[:3]
    path = cf.LayerPath.duplicate(6, 1, 4)
    batch = ProbeBatch(m, probe, items, "likelihood", chat=True)
    with torch.inference_mode():
        got = batch.run(SweepConfig.of(path, 6), 6, reuse=True)["margins"]
    tok = m.tokenizer
    diffs = []
    for it in items:
        # lm-eval's rule, by hand: trailing whitespace moves to the continuation, the whole text is
        # encoded and split after the context's own tokens, the end-of-turn token closes the answer;
        # scored by a plain full forward per choice.
        text = tok.apply_chat_template([{"role": "user", "content": it.prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ctx_text = text.rstrip()
        ctx = tok(ctx_text, add_special_tokens=False)["input_ids"]
        lps = []
        end = tok.convert_tokens_to_ids("<|im_end|>")  # what this template writes after an answer
        for choice in it.choices:
            whole = tok(text + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):] + [end]
            logp = torch.log_softmax(m.logits(torch.tensor([ctx + cont]), layers=path).double(), -1)[0]
            lps.append(sum(float(logp[len(ctx) - 1 + q, t]) for q, t in enumerate(cont)))
        right = it.choices.index(it.answer)
        want = lps[right] - max(v for c, v in enumerate(lps) if c != right)
        diffs.append(abs(want - got[it.id]))
    print(f"packed vs separate margins: max abs diff {max(diffs):.3g}, mean {np.mean(diffs):.3g}")
    assert max(diffs) < 1e-3


def test_generate_mode_matches_model_generate(chat_model):
    m = chat_model
    probe = get_probe("reasoning")
    path = cf.LayerPath.duplicate(6, 2, 5)
    result = cf.sweep(m, probes=[probe], paths=[path], mode="generate", max_items=4, progress=False)
    record = next(r for r in result.records if r["layers"] == str(path))
    items = probe.items()[:4]
    want = m.generate([it.prompt for it in items], layers=path, max_new_tokens=probe.max_new_tokens, chat=True)
    assert [record["outputs"]["reasoning"][it.id] for it in items] == want
    assert [record["scores"]["reasoning"][it.id] for it in items] == [probe.score(it, w) for it, w in zip(items, want)]


def test_refine_strategy(chat_model):
    result = cf.sweep(chat_model, probes=["math"], strategy="refine", block_sizes=(2,), refine_stride=2,
                      refine_top=1, mode="likelihood", max_items=3, progress=False)
    keys = [r["layers"] for r in result.records]
    assert len(keys) == len(set(keys))
    coarse = {(c.start, c.end) for c in make_configs(6, "grid", block_sizes=(2,), stride=2)}
    df = result.to_pandas()
    best = df[df["layers"].isin([str(cf.LayerPath.duplicate(6, i, j)) for i, j in coarse])].sort_values(
        "combined_delta", ascending=False).iloc[0]
    fine = {(int(s), int(e)) for s, e in zip(df["start"].dropna(), df["end"].dropna())} - coarse
    assert fine and all(abs(s - best["start"]) <= 2 and abs(e - best["end"]) <= 2 for s, e in fine)
    several = cf.sweep(chat_model, probes=["math"], strategy="refine", block_sizes=(2,), refine_stride=2,
                       refine_top=3, mode="likelihood", max_items=3, progress=False)
    keys = [r["layers"] for r in several.records]
    assert len(keys) == len(set(keys))  # overlapping neighbourhoods of winners run each path once


# ------------------------------------------------------------------------------------ results
def _fake_record(layers, scores, split="search", **extra):
    return {"kind": "config", "layers": layers, "split": split, "mode": "generate", "scores": scores,
            "seconds": 1.0, **extra}


def test_statistics_hand_checked():
    ids = [f"i{k}" for k in range(10)]
    base = _fake_record("0..5", {"p": {i: 0.0 for i in ids}, "q": {i: 50.0 for i in ids}})
    better = _fake_record("0..5,3..5", {"p": {i: 100.0 for i in ids}, "q": {i: 50.0 for i in ids}},
                          start=3, end=6, times=2, extra_layers=3)
    same = _fake_record("0..5,2..5", {"p": {i: 0.0 for i in ids}, "q": {i: 50.0 for i in ids}},
                        start=2, end=6, times=2, extra_layers=4)
    mixed = _fake_record("0..5,1..5", {"p": {i: (100.0 if k < 5 else -0.0) for k, i in enumerate(ids)},
                                       "q": {i: (0.0 if k < 5 else 100.0) for k, i in enumerate(ids)}},
                         start=1, end=6, times=2, extra_layers=5)
    df = SweepResult([base, better, same, mixed], num_layers=6).to_pandas().set_index("layers")
    assert len(df) == 4 and df.loc["0..5", "baseline"] and not df.loc["0..5,3..5", "baseline"]
    b = df.loc["0..5,3..5"]
    assert (b["p"], b["p_delta"], b["p_ci_low"], b["p_ci_high"]) == (100.0, 100.0, 100.0, 100.0)
    assert b["p_p"] < 0.01  # every item improved: only 2 of 1024 sign patterns are as extreme
    assert b["q_delta"] == 0.0 and b["q_p"] == 1.0
    assert b["combined"] == 75.0 and b["combined_delta"] == 50.0
    s = df.loc["0..5,2..5"]
    assert s["p_delta"] == 0.0 and s["p_ci_low"] == 0.0 and s["p_ci_high"] == 0.0 and s["p_p"] == 1.0
    x = df.loc["0..5,1..5"]
    assert x["p_delta"] == 50.0 and x["p_ci_low"] < 50.0 < x["p_ci_high"]
    assert 0.0 <= x["p_ci_low"] and x["p_ci_high"] <= 100.0
    assert x["q_delta"] == 0.0 and x["q_ci_low"] < 0 < x["q_ci_high"]
    top = SweepResult([base, better, same, mixed], num_layers=6).top(2)
    assert list(top["layers"]) == ["0..5,3..5", "0..5,1..5"]


def test_per_item_table(chat_model, tmp_path):
    """per_item(): one row per config, probe and item, read back here from the results file's raw
    JSON lines; its means per config and probe are to_pandas()'s scores and deltas."""
    out = tmp_path / "items.jsonl"
    result = cf.sweep(chat_model, probes=PROBES, block_sizes=(2,), mode="likelihood", max_items=3, progress=False,
                      results=out)
    items = result.per_item()
    print(items.head().to_string())
    raw = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    assert len(items) == sum(len(v) for r in raw for v in r["scores"].values())
    base = next(r for r in raw if r["layers"] == "0..5")
    for r in raw:
        for probe, scores in r["scores"].items():
            for item, score in scores.items():
                row = items[(items.layers == r["layers"]) & (items.probe == probe) & (items["item"] == item)]
                assert len(row) == 1 and row.score.iloc[0] == score
                assert row.delta.iloc[0] == score - base["scores"][probe][item]
                assert row.margin.iloc[0] == r["margins"][probe][item] and row.norm.iloc[0] == r["scores_norm"][probe][item]
    means = items.groupby(["layers", "probe"])[["score", "delta"]].mean()
    table = result.to_pandas().set_index("layers")
    for (layers, probe), row in means.iterrows():
        assert np.isclose(row.score, table.loc[layers, probe]) and np.isclose(row.delta, table.loc[layers, f"{probe}_delta"])
    gen = cf.sweep(chat_model, probes=["math"], paths=["0..3,2,3,4,5"], mode="generate", max_items=2, progress=False)
    rows = gen.per_item()
    rec = next(r for r in gen.records if r["layers"] == "0..3,2..5")
    assert list(rows[rows.layers == "0..3,2..5"].output) == list(rec["outputs"]["math"].values())
    assert {"parsed", "output"} <= set(rows.columns) and "margin" not in rows.columns
    assert result.per_item("validation").empty


def test_dataframe_columns_and_rows(chat_model):
    result = cf.sweep(chat_model, probes=PROBES, block_sizes=(2, 3), mode="likelihood", max_items=3, progress=False)
    df = result.to_pandas()
    print(df.head().to_string())
    assert len(df) == 1 + 5 + 4 and df["baseline"].sum() == 1
    for col in ("layers", "start", "end", "times", "extra_layers", "combined", "combined_delta", "combined_ci_low",
                "combined_ci_high", "combined_p", "seconds"):
        assert col in df.columns, col
    for p in PROBES:
        for suffix in ("", "_delta", "_ci_low", "_ci_high", "_p", "_margin"):
            assert f"{p}{suffix}" in df.columns
        assert ((df[f"{p}_ci_low"] <= df[f"{p}_delta"] + 1e-9) & (df[f"{p}_delta"] <= df[f"{p}_ci_high"] + 1e-9)).all()
        assert df[p].between(0, 100).all()
    rys = df[~df["baseline"]]
    assert (rys["extra_layers"] == rys["end"] - rys["start"]).all() and (rys["times"] == 2).all()
    assert np.allclose(df["combined"], df[[*PROBES]].mean(axis=1))
    from matplotlib.figure import Figure

    fig = result.heatmap("combined_delta")
    assert isinstance(fig, Figure)
    data = fig.axes[0].images[0].get_array()
    assert np.isfinite(data).sum() == 9
    with pytest.raises(ValueError, match="no column 'nope'"):
        result.heatmap("nope")


def test_results_file_resume_and_validate(chat_model, tmp_path):
    out = tmp_path / "sweep.jsonl"
    kw = dict(probes=PROBES, mode="likelihood", max_items=3, progress=False, results=out)
    first = cf.sweep(chat_model, block_sizes=(2,), **kw)
    header, records = read_records(out)
    assert header["num_layers"] == 6 and header["mode"] == "likelihood" and len(records) == 6
    # a torn last line (a run killed mid-write) is cut off; done configs are not run again
    with open(out, "ab") as f:
        f.write(b'{"kind": "config", "layers": "0..5,1')
    with pytest.warns(UserWarning, match="unfinished last line"):
        assert len(SweepResult.load(out)) == 6
    second = cf.sweep(chat_model, block_sizes=(2, 3), **kw)
    header, records = read_records(out)
    assert len(records) == 6 + 4 and len({r["layers"] for r in records}) == 10
    assert out.read_bytes().endswith(b"\n")
    assert _strip(second.records[:6]) == _strip(first.records)
    loaded = SweepResult.load(out)
    assert loaded.to_pandas().drop(columns="seconds").equals(second.to_pandas().drop(columns="seconds"))
    # held-out validation, appended to the same file
    val = second.validate(2)
    assert len(val) == 2 and "combined_val_delta" in val.columns and "math_val_ci_low" in val.columns
    _, records = read_records(out)
    assert sum(r["split"] == "validation" for r in records) == 3  # top 2 + baseline
    val_ids = set(records[-1]["scores"]["math"])
    assert val_ids == {it.id for it in get_probe("math").items("validation")}
    assert SweepResult.load(out).validate(2, model=chat_model).equals(val)  # nothing re-run
    # a mode mismatch is refused, resume=False starts afresh
    with pytest.raises(ValueError, match="mode='likelihood' sweep"):
        cf.sweep(chat_model, block_sizes=(2,), probes=PROBES, mode="generate", max_items=3, progress=False, results=out)
    cf.sweep(chat_model, block_sizes=(5,), **{**kw, "probes": ["math"]}, resume=False)
    assert len(read_records(out)[1]) == 3
    # a likelihood file scored by the old tokenization (no likelihood_rule in its header) is not mixed in
    lines = out.read_text().splitlines()
    header = json.loads(lines[0])
    del header["likelihood_rule"]
    out.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="older likelihood tokenization"):
        cf.sweep(chat_model, block_sizes=(5,), **{**kw, "probes": ["math"]})


def test_corrupt_lines_are_skipped(tmp_path):
    f = tmp_path / "r.jsonl"
    good = _fake_record("0..5", {"p": {"a": 1.0}})
    f.write_text(json.dumps({"kind": "header", "num_layers": 6, "mode": "generate"}) + "\n" + "garbage\n"
                 + json.dumps(good) + "\n" + "[1, 2]\n")
    with pytest.warns(UserWarning) as caught:
        result = SweepResult.load(f)
    assert len(result.records) == 1
    messages = [str(w.message) for w in caught]
    assert any("r.jsonl:2: skipping a line that is not valid JSON" in m for m in messages)
    assert any("r.jsonl:4: skipping a line that is not a JSON object" in m for m in messages)
    f.write_text(json.dumps(good) + "\n")
    with pytest.raises(ValueError, match="not a circuit-finder sweep file"):
        SweepResult.load(f)


def test_custom_probe_in_sweep(chat_model, tmp_path):
    f = tmp_path / "yesno.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"Is {k} even?", "answer": "Yes" if k % 2 == 0 else "No",
                                       "choices": ["Yes", "No"], "scorer": "yes_no"}) for k in range(6)))
    for mode in ("likelihood", "generate"):
        result = cf.sweep(chat_model, probes=[str(f)], block_sizes=(3,), mode=mode, progress=False)
        assert "yesno_delta" in result.to_pandas().columns
    for choices in ((), ("hi",), ("hi", "hi", "yo")):  # nothing to rank (one choice once crashed the record writer)
        probe = ItemProbe("plain", [Item("a", "Say hi", "hi", choices=choices)])
        with pytest.raises(ValueError, match="item 'a': likelihood mode needs at least two different 'choices'"):
            cf.sweep(chat_model, probes=[probe], block_sizes=(3,), mode="likelihood", progress=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        cf.sweep(chat_model, mode="sample")
    with pytest.raises(TypeError, match="needs a circuit_finder Model"):
        cf.sweep("default")


_CHILD = """
import sys, circuit_finder as cf
model = cf.load(sys.argv[1])
cf.sweep(model, probes=("math", "eq", "reasoning"), strategy="scan", times=(2, 3), mode="generate",
         max_items=3, results=sys.argv[2], progress=False)
"""


def _resume_and_compare(chat_model, out, total):
    """Resumes the killed sweep: no corrupt line, every config once, results of an uninterrupted run."""
    kw = dict(probes=PROBES, strategy="scan", times=(2, 3), mode="generate", max_items=3, progress=False)
    resumed = cf.sweep(chat_model, results=out, **kw)
    for line in out.read_bytes().splitlines():
        json.loads(line)  # no corrupt line
    keys = [r["layers"] for r in resumed.records]
    assert len(keys) == total and len(set(keys)) == total
    by_key = {r["layers"]: r for r in _strip(cf.sweep(chat_model, **kw).records)}
    assert all(by_key[r["layers"]] == r for r in _strip(resumed.records))


def test_sigkill_and_resume(chat_model_dir, chat_model, tmp_path):
    """A sweep subprocess killed with SIGKILL loses at most the config in flight; resuming finishes the
    sweep with every config exactly once, no corrupt line, and the scores of an uninterrupted run."""
    out = tmp_path / "killed.jsonl"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_CHILD))
    total = 1 + 2 * 21
    for round_, wait_for in enumerate((3, 12)):
        proc = subprocess.Popen([sys.executable, str(script), str(chat_model_dir), str(out)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 300
        while time.time() < deadline:
            n = out.read_bytes().count(b"\n") - 1 if out.exists() else 0
            if n >= wait_for or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"round {round_}: the sweep finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        header, records = read_records(out)
        keys = [r["layers"] for r in records]
        print(f"round {round_}: killed after {len(records)} finished configs")
        assert len(keys) == len(set(keys)) and wait_for <= len(records) < total
    _resume_and_compare(chat_model, out, total)


def test_cli_sweep(chat_model_dir, tmp_path, capsys):
    from circuit_finder.cli import main

    out, png = tmp_path / "s.jsonl", tmp_path / "s.png"
    rc = main(["sweep", "--model", str(chat_model_dir), "--mode", "likelihood", "--block-sizes", "2", "3",
               "--max-items", "3", "--out", str(out), "--heatmap", str(png), "--top", "3", "--validate", "2",
               "--no-progress"])
    text = capsys.readouterr().out
    print(text)
    assert rc == 0 and png.stat().st_size > 1000
    assert "baseline (identity path)" in text and "ci_low" in text and "held-out validation of the top 2" in text
    assert "val_delta" in text
    assert len(SweepResult.load(out)) == 10
    rc = main(["sweep", "--model", str(chat_model_dir), "--block-sizes", "9", "--out", str(out), "--no-progress"])
    assert rc == 2 and "larger than the model" in capsys.readouterr().err
    # refine, ranked by p, without the chat template: the options reach sweep()
    ref = tmp_path / "refine.jsonl"
    rc = main(["sweep", "--model", str(chat_model_dir), "--mode", "likelihood", "--strategy", "refine",
               "--block-sizes", "2", "--refine-stride", "3", "--refine-top", "1", "--by", "combined_p", "--no-chat",
               "--probes", "math", "--max-items", "3", "--top", "2", "--out", str(ref), "--no-progress"])
    text = capsys.readouterr().out
    header, records = read_records(ref)
    assert rc == 0 and header["chat"] is False and "top 2 by combined_p" in text
    assert {r.get("stage") for r in records} == {"sweep", "refine"}
    coarse = {r["layers"] for r in records if r.get("stage") == "sweep"}
    assert coarse == {"0..5", *(c.key for c in make_configs(6, "grid", (2,), None, 3))} and len(coarse) == 3
    # several --times: a heatmap per times (each draws only its own configs)
    rc = main(["sweep", "--model", str(chat_model_dir), "--mode", "likelihood", "--block-sizes", "2", "--times", "2",
               "3", "--probes", "math", "--max-items", "2", "--out", str(tmp_path / "t.jsonl"), "--heatmap",
               str(tmp_path / "h.png"), "--html", str(tmp_path / "h.html"), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "(times=3) written to" in text and not (tmp_path / "h.png").exists()
    assert all((tmp_path / f"h-x{t}.{ext}").stat().st_size > 1000 for t in (2, 3) for ext in ("png", "html"))


def _run_child(script, model_dir, out):
    return subprocess.Popen([sys.executable, str(script), str(model_dir), str(out)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _check_partial(out):
    """Every complete line of a killed sweep's file parses and names a config once; only an unfinished
    last line may be torn. Returns the finished configs' layer paths."""
    lines = out.read_bytes().split(b"\n")
    for line in lines[:-1]:
        json.loads(line)
    keys = [json.loads(line)["layers"] for line in lines[1:-1]]
    assert len(keys) == len(set(keys))
    return keys


@pytest.mark.slow
def test_twenty_sigkills(chat_model_dir, chat_model, tmp_path):
    """SIGKILL a sweep subprocess at 20 random moments (during start-up, mid-config, mid-write),
    resuming each time: every finished config is present exactly once, no complete line is
    corrupt, and the final results equal an uninterrupted run. The moments are drawn within the
    duration of one uninterrupted child run, measured first, so they land however fast the sweep
    is; children start until 20 kills have landed (at most 80 tries); a child that is not killed
    must exit cleanly, and a file it finishes is checked against that run and started anew."""
    import random

    rng = random.Random(1234)
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_CHILD))
    total = 1 + 2 * 21
    full = tmp_path / "uninterrupted.jsonl"
    began = time.time()
    assert _run_child(script, chat_model_dir, full).wait() == 0
    duration = time.time() - began
    expected = {r["layers"]: r for r in _strip(read_records(full)[1])}
    out = tmp_path / "killed20.jsonl"
    kills = finished = tries = mid_sweep = 0
    while kills < 20 and tries < 80:
        tries += 1
        proc = _run_child(script, chat_model_dir, out)
        time.sleep(rng.uniform(0.05, 0.95) * duration)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # a child that exits between poll and kill is not killed
        code = proc.wait()
        assert code in (0, -signal.SIGKILL)
        killed = code == -signal.SIGKILL
        kills += killed
        keys = _check_partial(out) if out.exists() else []
        mid_sweep += killed and 0 < len(keys) < total
        if len(keys) == total:  # this child finished the sweep: its results are the uninterrupted run's
            assert all(expected[r["layers"]] == r for r in _strip(read_records(out)[1]))
            out.unlink()
            finished += 1
    done = len(read_records(out)[1]) if out.exists() else 0
    print(f"child run {duration:.1f} s; {kills} SIGKILLs landed in {tries} tries, {mid_sweep} with some configs "
          f"written; {finished} files finished by a resumed sweep; {done} of {total} configs in the last file")
    assert kills == 20 and mid_sweep >= 5
    _resume_and_compare(chat_model, out, total)


def test_resume_refuses_another_setup(chat_model, chat_model_dir, tmp_path):
    """A results file is resumed only by the sweep it was written for: the same model file, chat
    setting, max_items and items — a mismatch is refused naming what differs, never mixed."""
    import shutil

    out = tmp_path / "setup.jsonl"
    kw = dict(probes=["math"], block_sizes=(2,), mode="likelihood", progress=False, results=out)
    cf.sweep(chat_model, max_items=2, **kw)
    header = read_records(out)[0]
    assert header["max_items"] == 2 and header["chat"] is True and len(header["items"]["math"]) == 2
    with pytest.raises(ValueError, match="other items of probe .math. than this sweep \\(2 vs 4 items"):
        cf.sweep(chat_model, max_items=4, **kw)
    with pytest.raises(ValueError, match="chat=True; this sweep has chat=False"):
        cf.sweep(chat_model, max_items=2, chat=False, **kw)
    # the same shape, other weights: a copy of the folder with one weight file's bytes changed
    other = tmp_path / "other-model"
    shutil.copytree(chat_model_dir, other)
    weights = next(other.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fingerprint="):
        cf.sweep(cf.load(other), max_items=2, **kw)
    n = len(read_records(out)[1])
    cf.sweep(chat_model, max_items=2, **kw)  # the same setup resumes: nothing re-run
    assert len(read_records(out)[1]) == n
    # the kinds of device the layers ran on: a GPU's records are not resumed by a CPU run (an older
    # file that did not record them resumes)
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["devices"] == ["cpu"]
    for devices, name in ((["cuda"], "gpu.jsonl"), (None, "older.jsonl")):
        head = json.loads(lines[0])
        head.pop("devices") if devices is None else head.update(devices=devices)
        (tmp_path / name).write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"devices=\['cuda'\]; this sweep has devices=\['cpu'\]"):
        cf.sweep(chat_model, max_items=2, **dict(kw, results=tmp_path / "gpu.jsonl"))
    cf.sweep(chat_model, max_items=2, **dict(kw, results=tmp_path / "older.jsonl"))
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="max_items must be None .* or an integer >= 1"):
            cf.sweep(chat_model, max_items=bad, **dict(kw, results=None))
    lines = out.read_text().splitlines()  # a damaged header: its records cannot be checked, so not resumed
    (tmp_path / "damaged.jsonl").write_text("\n".join(["{not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="config records but no readable header line"):
        with pytest.warns(UserWarning, match="skipping"):
            cf.sweep(chat_model, max_items=2, **dict(kw, results=tmp_path / "damaged.jsonl"))
    # the identity among paths= is the baseline, run once
    ran = cf.sweep(chat_model, max_items=2, paths=["0..5", "0..3,2,3,4,5"], probes=["math"], mode="likelihood",
                   progress=False)
    assert sorted(r["layers"] for r in ran.records) == ["0..3,2..5", "0..5"]  # the baseline once


def test_resume_refuses_another_template_or_budget(chat_model, tmp_path):
    """The chat template and (generate mode) each probe's max_new_tokens are part of the setup: a
    file swept under another template, or with answers cut at another length, is not resumed. A
    file written before these were recorded resumes as before."""
    import json

    from circuit_finder.probes import from_jsonl

    out = tmp_path / "template.jsonl"
    kw = dict(probes=["math"], block_sizes=(2,), mode="likelihood", max_items=2, progress=False, results=out)
    cf.sweep(chat_model, **kw)
    header = read_records(out)[0]
    assert len(header["chat_template"]) == 32 and "max_new_tokens" not in header  # likelihood: no budget
    tok = chat_model.tokenizer
    original = tok.chat_template
    try:
        tok.chat_template = original.replace("<|im_start|>", "<|im_start|> ")
        with pytest.raises(ValueError, match="chat_template="):
            cf.sweep(chat_model, **kw)
    finally:
        tok.chat_template = original
    # an older file (no chat_template key) resumes; nothing re-run
    lines = out.read_text().splitlines()
    old_header = {k: v for k, v in json.loads(lines[0]).items() if k != "chat_template"}
    older = tmp_path / "older.jsonl"
    older.write_text("\n".join([json.dumps(old_header), *lines[1:]]) + "\n")
    n = len(read_records(older)[1])
    cf.sweep(chat_model, **dict(kw, results=older))
    assert len(read_records(older)[1]) == n

    items = tmp_path / "add.jsonl"
    items.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(4)))
    gen = tmp_path / "generate.jsonl"
    gkw = dict(block_sizes=(3,), starts=(0,), mode="generate", chat=False, progress=False, results=gen)
    cf.sweep(chat_model, probes=[from_jsonl(items, max_new_tokens=3)], **gkw)
    assert read_records(gen)[0]["max_new_tokens"] == {"add": 3}
    assert read_records(gen)[0]["eos_ids"] == list(chat_model.codec.eos_ids)
    with pytest.raises(ValueError, match="max_new_tokens=3 for probe 'add'; this run gives it 5"):
        cf.sweep(chat_model, probes=[from_jsonl(items, max_new_tokens=5)], **gkw)
    cf.sweep(chat_model, probes=[from_jsonl(items, max_new_tokens=3)], **gkw)  # the same budget resumes


def test_validate_refuses_a_probe_changed_since_the_search(chat_model, tmp_path):
    """Held-out items are picked by position: an item added before the end of a probe's file moves
    search items into the held-out set. validate() checks the probe's search items against the
    file's and refuses, rather than call items the search saw held-out."""
    from circuit_finder.probes import from_jsonl

    def probe_file(values):
        f = tmp_path / "add.jsonl"
        f.write_text("".join(json.dumps({"id": f"q{a}", "prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n"
                             for a in values))
        return from_jsonl(f, max_new_tokens=2)

    out = tmp_path / "r.jsonl"
    result = cf.sweep(chat_model, probes=[probe_file(range(9))], block_sizes=(3,), starts=(0,), mode="generate",
                      chat=False, results=out, progress=False)
    changed = probe_file([99, *range(9)])
    print("held out before/after:", [it.id for it in probe_file(range(9)).items("validation")],
          [it.id for it in changed.items("validation")])
    with pytest.raises(ValueError, match="other items of probe 'add'"):
        SweepResult.load(out).validate(1, model=chat_model, probes=[changed], progress=False)
    assert len(result.validate(1, progress=False)) == 1  # unchanged: validates


def test_a_template_that_opens_thinking_records_its_extra_tokens(chat_model, tmp_path):
    """A template that opens a thinking block itself gives answers think_tokens more tokens even with
    thinking off: that budget is recorded, a resume with another is refused, and a loaded result
    validates with it."""
    tok = chat_model.tokenizer
    original = tok.chat_template
    out = tmp_path / "think.jsonl"
    kw = dict(probes=["math"], paths=["0..3,2..5"], mode="generate", max_items=1, results=out, progress=False)
    try:
        tok.chat_template = original + "<think>\n"
        with pytest.warns(UserWarning, match="opens a thinking block"):
            cf.sweep(chat_model, think_tokens=3, **kw)
        assert read_records(out)[0]["think_tokens"] == 3
        with pytest.raises(ValueError, match="think_tokens=3; this sweep has think_tokens=5"):
            cf.sweep(chat_model, think_tokens=5, **kw)
        assert SweepResult.load(out).think_tokens == 3
    finally:
        tok.chat_template = original
    assert "think_tokens" not in read_records(cf.sweep(chat_model, **dict(kw, results=tmp_path / "plain.jsonl")).path)[0]


def test_in_memory_models_with_other_weights_do_not_resume_each_other(chat_model, chat_model_dir, tmp_path):
    """Models built from tensors have no file to fingerprint: their tensors are, so a fine-tune of
    the same base (here one weight changed) does not resume the base's results file."""
    from safetensors.torch import load_file

    tensors = load_file(str(next(chat_model_dir.glob("*.safetensors"))))
    base = cf.load_from_tensors(chat_model.config, dict(tensors), chat_model.tokenizer)
    tuned = dict(tensors)
    tuned["model.layers.3.mlp.down_proj.weight"] = tensors["model.layers.3.mlp.down_proj.weight"] * 1.01
    other = cf.load_from_tensors(chat_model.config, tuned, chat_model.tokenizer)
    same = cf.load_from_tensors(chat_model.config, dict(tensors), chat_model.tokenizer)
    print("fingerprints:", base.fingerprint(), other.fingerprint(), same.fingerprint())
    assert base.fingerprint() == same.fingerprint() != other.fingerprint()
    kw = dict(probes=["math"], paths=["0..3,2..5"], mode="likelihood", max_items=2, results=tmp_path / "r.jsonl",
              progress=False)
    cf.sweep(base, **kw)
    with pytest.raises(ValueError, match="fingerprint="):
        cf.sweep(other, **kw)
    cf.sweep(same, **kw)
    lines = (tmp_path / "r.jsonl").read_text().splitlines()  # a file from before: its fingerprint unknown
    (tmp_path / "old.jsonl").write_text("\n".join([json.dumps({**json.loads(lines[0]), "fingerprint": None}),
                                                   *lines[1:]]) + "\n")
    n = len(read_records(tmp_path / "old.jsonl")[1])
    cf.sweep(same, **dict(kw, results=tmp_path / "old.jsonl"))
    assert len(read_records(tmp_path / "old.jsonl")[1]) == n


def test_lines_of_a_run_replaced_by_another_are_skipped(chat_model, tmp_path):
    """A run still writing a file that another run started afresh (resume=False) appends records
    under the new header: they carry the old run's id and are skipped on reading, with a warning."""
    from circuit_finder.results import ResultStore

    out = tmp_path / "r.jsonl"
    first = ResultStore.open(out, chat_model, "generate", resume=False)
    first.append(_fake_record("0..5", {"p": {"a": 1.0}}))
    second = ResultStore.open(out, chat_model, "generate", resume=False)
    second.append(_fake_record("0..5", {"p": {"a": 0.0}}))
    first.append(_fake_record("0..3,2..5", {"p": {"a": 1.0}}))
    with pytest.warns(UserWarning, match="skipping 1 line.*written by another run than the header's"):
        header, records = read_records(out)
    assert header["run"] == second.header["run"] != first.header["run"]
    assert [(r["layers"], r["scores"]) for r in records] == [("0..5", {"p": {"a": 0.0}})]


def test_likelihood_length_normalised_scores(chat_model):
    """Beside the summed log-prob ranking, each item is ranked by log-prob per byte of the choice
    (lm-eval's acc_norm idea), recomputed here from the packed margins' inputs by hand."""
    probe = get_probe("reasoning")
    items = probe.items()[:4]
    path = cf.LayerPath.duplicate(6, 1, 4)
    batch = ProbeBatch(chat_model, probe, items, "likelihood", chat=True)
    with torch.inference_mode():
        h = chat_model.engine.run_slots(chat_model.engine.embed(batch.ids), batch.positions, batch.prefix_mask,
                                        list(path), None, 0, len(path))
        out = batch.run(SweepConfig.of(path, 6), 6, reuse=False)
    sums, _ = gather_logprobs(chat_model.engine.head, h, batch.scoring)
    at = 0
    for it in items:
        lp = sums[at:at + len(it.choices)]
        at += len(it.choices)
        per_byte = [v / len(c.encode()) for v, c in zip(lp, it.choices)]
        right = it.choices.index(it.answer)
        want = 100.0 if per_byte[right] > max(v for k, v in enumerate(per_byte) if k != right) else 0.0
        assert out["scores_norm"][it.id] == want
    result = cf.sweep(chat_model, probes=[probe], paths=[path], mode="likelihood", max_items=4, progress=False)
    df = result.to_pandas()
    assert {"reasoning_norm", "reasoning_norm_delta", "reasoning_norm_p", "reasoning_norm_q"} <= set(df.columns)


def test_end_of_answer_marker(chat_model):
    """Chat: the template's end of turn (<|im_end|> here); plain text: EOS; a template that writes
    no special token after an answer: EOS, with a warning."""
    import copy

    from circuit_finder.generation import TextCodec

    tok = chat_model.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert chat_model.codec.end_of_answer(True) == [im_end]
    assert chat_model.codec.end_of_answer(False) == [chat_model.codec.eos_ids[0]]
    plain = copy.deepcopy(tok)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    codec = TextCodec(plain, chat_model.config.eos_token_ids, chat_model.config.pad_token_id, "plain-template")
    with pytest.warns(UserWarning, match="no special token after an answer"):
        assert codec.end_of_answer(True) == codec.eos_ids[:1]


def test_validate_refuses_another_chat_setting(chat_model, tmp_path):
    """A results file swept without the chat template is not validated with it."""
    out = tmp_path / "plain.jsonl"
    cf.sweep(chat_model, probes=["math"], block_sizes=(2,), mode="likelihood", max_items=2, chat=False,
             progress=False, results=out)
    loaded = SweepResult.load(out)
    assert loaded.chat is False
    loaded.chat = True
    with pytest.raises(ValueError, match="chat=False; this sweep has chat=True"):
        loaded.validate(1, model=chat_model, progress=False)
