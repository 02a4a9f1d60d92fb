"""Sweep statistics against hand-computed values: Benjamini-Hochberg and Holm on a known list, exact
sign-flip p-values, reachable thresholds for large sweeps, independent resampling per probe."""

from __future__ import annotations

import math

import numpy as np

from circuit_finder.results import benjamini_hochberg, holm, paired_stats, sign_flip_p


def test_bh_and_holm_by_hand():
    p = [0.01, 0.04, 0.03, 0.005, float("nan")]
    # sorted: 0.005, 0.01, 0.03, 0.04 (m = 4). BH: 4p/k = 0.02, 0.02, 0.04, 0.04; min from the end keeps them.
    q = benjamini_hochberg(p)
    assert np.allclose(q[:4], [0.02, 0.04, 0.04, 0.02]) and math.isnan(q[4])
    # Holm: (m - k + 1) p = 0.02, 0.03, 0.06, 0.04; running max: 0.02, 0.03, 0.06, 0.06.
    h = holm(p)
    assert np.allclose(h[:4], [0.03, 0.06, 0.06, 0.02]) and math.isnan(h[4])
    assert np.allclose(benjamini_hochberg([0.5, 0.9]), [0.9, 0.9])  # capped and monotone
    assert np.allclose(holm([0.6, 0.7]), [1.0, 1.0])


def test_exact_sign_flip_p_by_hand():
    rng = np.random.default_rng(0)
    # 5 items all +1: only all-plus and all-minus of the 32 flips reach |mean| 1.
    assert sign_flip_p([np.ones(5)], rng) == 2 / 32
    # 1, 2, 3: signed sums 6, 4, 2, 0, 0, -2, -4, -6; |sum| >= 6 twice in 8.
    assert sign_flip_p([np.array([1.0, 2.0, 3.0])], rng) == 2 / 8
    assert sign_flip_p([np.zeros(4)], rng) == 1.0


def test_monte_carlo_p_reaches_adjusted_thresholds():
    """30 items all better: a Bonferroni/Holm threshold over 500 configs (1e-4) must be reachable."""
    rng = np.random.default_rng(0)
    p = sign_flip_p([np.ones(30)], rng, family=500)
    print(f"p over 30 positive items, family 500: {p:.2e}")
    assert p * 500 < 0.05
    # a null difference stays large and is not refined further
    noise = np.random.default_rng(1).choice([-1.0, 1.0], size=30)
    assert sign_flip_p([noise], rng, family=500) > 0.05


def _record(scores: dict, margins: dict | None = None) -> dict:
    r = {"scores": scores}
    if margins:
        r["margins"] = margins
    return r


def test_probes_are_resampled_independently_and_adjusted():
    ids = [str(i) for i in range(8)]
    base_scores = {i: 0.0 for i in ids}
    better = {i: (100.0 if int(i) % 2 else 0.0) for i in ids}
    recs = {"base": _record({"a": base_scores, "b": base_scores}),
            "x": _record({"a": better, "b": better}, {"a": dict.fromkeys(ids, 1.0), "b": dict.fromkeys(ids, 1.0)}),
            "y": _record({"a": base_scores, "b": better})}
    recs["base"]["margins"] = {"a": dict.fromkeys(ids, 0.5), "b": dict.fromkeys(ids, 0.5)}
    rows = paired_stats(recs, "base", ["a", "b"], n_boot=500, seed=0)
    x = rows["x"]
    # identical differences on two probes of equal size: resampled with shared indices, their mean
    # (combined) would have exactly the per-probe interval; independent resampling narrows it (~1/sqrt 2)
    assert x["a_delta"] == x["b_delta"] == x["combined_delta"] == 50.0
    width = x["a_ci_high"] - x["a_ci_low"]
    combined = x["combined_ci_high"] - x["combined_ci_low"]
    print(f"per-probe CI width {width:.1f}, combined {combined:.1f}")
    assert combined < 0.85 * width
    # exact p for 4 of 8 items +100: flips reach |mean| >= 50 only when all four agree: 2 * 2^4 / 2^8
    assert x["a_p"] == 32 / 256
    # margins get their own paired statistics
    assert x["a_margin_delta"] == 0.5 and x["a_margin_p"] == 2 / 256
    # two configs (baseline excluded): BH over [x_a_p, y_a_p] = [0.125, 1.0]
    assert rows["x"]["a_q"] == 0.25 and rows["y"]["a_q"] == 1.0 and rows["x"]["a_holm"] == 0.25
    assert "a_q" not in rows["base"] and rows["base"]["a_p"] == 1.0


def test_untested_rows_are_not_in_the_family():
    """An untested row (a router on items it trained on) keeps its unadjusted p but gets no q / Holm,
    and the other configs adjust by hand over the rest: with it in, BH would count three tests."""
    ids = [str(i) for i in range(8)]
    zero = {i: 0.0 for i in ids}
    half = {i: (100.0 if int(i) % 2 else 0.0) for i in ids}
    recs = {"base": _record({"a": zero}), "x": _record({"a": half}), "y": _record({"a": zero}),
            "router": _record({"a": dict.fromkeys(ids, 100.0)})}
    rows = paired_stats(recs, "base", ["a"], n_boot=100, seed=0, untested=["router"])
    assert rows["router"]["a_p"] == 2 / 256 and "a_q" not in rows["router"] and "a_holm" not in rows["router"]
    # BH over [0.125, 1.0] (m = 2): 0.25, 1.0; with the router as a third test x's q would be 0.1875
    assert rows["x"]["a_q"] == 0.25 and rows["x"]["a_holm"] == 0.25 and rows["y"]["a_q"] == 1.0
    assert paired_stats(recs, "base", ["a"], n_boot=100, seed=0)["x"]["a_q"] == 0.1875


def test_a_routers_in_sample_count_survives_resumed_records():
    """A router's records split over probes (a resumed sweep) keep its in-sample count: other probes'
    add up, a re-run of the same probe replaces; its row stays out of the family and of top()."""
    from circuit_finder import SweepResult

    ids = [str(i) for i in range(6)]
    zero, one = dict.fromkeys(ids, 0.0), dict.fromkeys(ids, 100.0)
    base = {"layers": "0..3", "scores": {"a": zero, "b": zero}}
    x = {"layers": "0..2,1..3", "scores": {"a": one, "b": zero}}
    router = [{"layers": "router:r@1", "scores": {"a": one}, "in_sample": 2},
              {"layers": "router:r@1", "scores": {"b": one}, "in_sample": 3},
              {"layers": "router:r@1", "scores": {"b": one}, "in_sample": 3}]
    table = SweepResult([base, x, *router], num_layers=4, mode="likelihood").to_pandas(n_boot=50).set_index("layers")
    assert table.loc["router:r@1", "in_sample"] == 5 and np.isnan(table.loc["router:r@1", "a_q"])
    assert list(SweepResult([base, x, *router], num_layers=4, mode="likelihood").top(5, n_boot=50)["layers"]) == [
        "0..2,1..3"]


def test_nan_differences_give_no_p_and_one_item_no_interval():
    """A NaN difference must not read as p = 0 (|null| >= NaN is never true); a probe of one item
    has a difference but no interval (its bootstrap cannot spread)."""
    rng = np.random.default_rng(0)
    assert math.isnan(sign_flip_p([np.array([np.nan, 0.0, 0.0, 1.0])], rng))
    recs = {"base": _record({"a": {"0": 0.0}}), "x": _record({"a": {"0": 100.0}})}
    row = paired_stats(recs, "base", ["a"], n_boot=200, seed=0)["x"]
    assert row["a_delta"] == 100.0 and row["a_p"] == 1.0
    assert math.isnan(row["a_ci_low"]) and math.isnan(row["a_ci_high"])
    assert math.isnan(row["combined_ci_low"]) and row["combined_delta"] == 100.0
    # margins a broken forward left out (None) are skipped, item by item, not propagated as NaN
    ids = [str(i) for i in range(6)]
    margins = {"base": dict.fromkeys(ids, 0.0), "x": {**dict.fromkeys(ids, 1.0), "0": None}}
    recs = {k: _record({"a": dict.fromkeys(ids, 0.0)}, {"a": m}) for k, m in margins.items()}
    row = paired_stats(recs, "base", ["a"], n_boot=200, seed=0)["x"]
    assert row["a_margin"] == 1.0 and row["a_margin_delta"] == 1.0 and row["a_margin_p"] == 2 / 32


def test_a_sweep_with_non_finite_log_probs_records_and_reads(chat_model, tmp_path, monkeypatch):
    """A forward that overflows (NaN log-probs for an item) ranks that item wrong, leaves its margin
    out (null in the file: writing NaN would stop the sweep) with a warning, and the statistics read
    the rest; a probe whose own score is NaN is an error naming the probe and item."""
    import pytest

    import circuit_finder as cf
    from circuit_finder import likelihood
    from circuit_finder.probes import Item, ItemProbe
    from circuit_finder.results import read_records

    real = likelihood.gather_logprobs

    def overflowing(head, h, batch):
        values, greedy = real(head, h, batch)
        return [math.nan, *values[1:]], greedy  # the first item's first choice

    monkeypatch.setattr(likelihood, "gather_logprobs", overflowing)
    out = tmp_path / "nan.jsonl"
    with pytest.warns(UserWarning, match=r"probe 'math': 1 of 3 items got non-finite log-probabilities"):
        result = cf.sweep(chat_model, probes=["math"], paths=["0..5", "0..3,1..5"], mode="likelihood", max_items=3,
                          results=out, progress=False)
    records = read_records(out)[1]
    first = next(iter(records[0]["margins"]["math"]))  # the first item, in the records' order
    assert all(r["margins"]["math"][first] is None and r["scores"]["math"][first] == 0.0 for r in records)
    assert all(v is not None for r in records for k, v in r["margins"]["math"].items() if k != first)
    table = result.to_pandas()
    assert table["math_margin_delta"].notna().all() and table["math_margin"].notna().all()
    monkeypatch.undo()

    class Broken(ItemProbe):
        def score(self, item, completion):
            return math.nan

    probe = Broken("broken", [Item("q1", "2 + 2 =", "4")], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"probe 'broken' scored item 'q1' nan: a score must be a finite number"):
        cf.sweep(chat_model, probes=[probe], paths=["0..5"], mode="generate", progress=False)
