"""Beam and surrogate search: programs build the paths they name, and the strategies' contracts —
budget respected, no path evaluated twice, deterministic under a seed, a killed run resumed
replays the same decisions — on synthetic objectives, then through sweep() on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest

import circuit_finder as cf
from circuit_finder.layer_path import LayerPath
from circuit_finder.results import read_records
from circuit_finder.sweep import make_configs
from circuit_finder.sweep.search import Program, beam_search, path_features, surrogate_search

N = 12


def test_program_paths():
    assert Program(N, ((3, 6),)).path() == LayerPath.duplicate(N, 3, 6)
    assert Program(N, ((3, 6), (3, 6))).path() == LayerPath.duplicate(N, 3, 6, 3)
    two = list(Program(N, ((1, 3), (6, 9))).path())
    assert two == [0, 1, 2, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9, 10, 11]
    assert list(Program(N, (), (4, 5)).path()) == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11]
    assert list(Program(N, (), (), ((4, 3),)).path())[:6] == [0, 1, 2, 3, 3, 5]
    f = path_features(two, N)
    assert f[:N].tolist() == [1, 2, 2, 1, 1, 1, 2, 2, 2, 1, 1, 1] and f[-1] == 5
    assert f[N + 1] == 1 and f[N + 6] == 1 and f[2 * N + 2] == 1 and f[2 * N + 8] == 1  # starts, ends


def _synthetic(calls: list[str], fail_after: int | None = None):
    """An objective peaked at repeating layers 4..7, penalising length; records every call."""

    def evaluate(configs):
        out = {}
        for c in configs:
            if fail_after is not None and len(calls) >= fail_after:
                raise KeyboardInterrupt("killed")
            calls.append(c.key)
            f = path_features(c.layers, N)
            out[c.key] = float(f[4:8].sum() - 0.4 * f[:N].sum() - 0.1 * abs(f[-1] - 6))
        return out

    return evaluate


@pytest.mark.parametrize("kind", ["beam", "surrogate"])
def test_budget_uniqueness_and_determinism(kind):
    def search(evaluate, budget):
        if kind == "beam":
            return beam_search(N, evaluate, budget, block_sizes=(2, 3), stride=2, beam_width=3, depth=3, seeds=4,
                               max_extra=8, skip=True)
        scan = make_configs(N, "scan")
        grid = make_configs(N, "grid", (2, 4), None, 3)
        return surrogate_search(N, evaluate, budget, scan, grid, seed=3)

    calls: list[str] = []
    scores, log = search(_synthetic(calls), 25)
    print(kind, log.rounds)
    assert len(calls) == len(set(calls)) == 25 == len(scores)
    assert log.looked == calls and log.best_so_far()[-1] == max(scores.values())
    assert all(len(LayerPath.parse(k)) - N <= 8 for k in calls) if kind == "beam" else True
    again: list[str] = []
    assert search(_synthetic(again), 25)[0] == scores and again == calls  # deterministic
    # killed after 10 evaluations, resumed with those results remembered (the results file's role)
    first: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        search(_synthetic(first, fail_after=10), 25)
    memory = dict(scores)
    fresh: list[str] = []

    def resumed(configs):
        new = [c for c in configs if c.key not in first]
        got = _synthetic(fresh)(new) if new else {}
        return {c.key: got.get(c.key, memory[c.key]) for c in configs}

    scores2, log2 = search(resumed, 25)
    assert log2.looked == calls and scores2 == scores
    assert sorted(first + fresh) == sorted(calls)  # nothing evaluated twice across the kill


def test_beam_grows_multi_block_paths():
    calls: list[str] = []
    scores, log = beam_search(N, _synthetic(calls), 60, block_sizes=(2, 3), stride=1, beam_width=4, depth=3, seeds=5)
    depths = [r["depth"] for r in log.rounds]
    assert depths == [1, 2, 3]
    best = max(scores, key=scores.get)
    assert len(LayerPath.parse(best)) > N and log.rounds[-1]["best"] >= log.rounds[0]["best"]


def test_surrogate_finds_the_peak_with_few_evaluations():
    scan = make_configs(N, "scan")
    calls: list[str] = []
    scores, log = surrogate_search(N, _synthetic(calls), len(scan) // 5, scan,
                                   make_configs(N, "grid", (2, 4), None, 3), seed=0)
    truth = _synthetic([])(scan)
    ranked = sorted(truth, key=truth.get, reverse=True)
    best = max(scores, key=scores.get)
    print(f"surrogate: best found is #{ranked.index(best) + 1} of {len(scan)} after {len(calls)} evaluations; "
          f"rho per round {[round(r['rho'], 2) for r in log.rounds]}")
    assert ranked.index(best) < 0.05 * len(scan)
    assert any(np.isfinite(r["rho"]) for r in log.rounds)


def test_sweep_beam_and_surrogate(chat_model, tmp_path):
    out = tmp_path / "beam.jsonl"
    kw = dict(probes=["math"], mode="likelihood", max_items=3, progress=False, results=out)
    result = cf.sweep(chat_model, strategy="beam", budget=6, block_sizes=(2,), search={"beam_width": 2, "depth": 2},
                      **kw)
    records = read_records(out)[1]
    assert len(records) == 1 + 6 and {r["stage"] for r in records[1:]} == {"beam"}
    assert len({r["layers"] for r in records}) == 7 and result.search_log.looked == [r["layers"] for r in records[1:]]
    again = cf.sweep(chat_model, strategy="beam", budget=6, block_sizes=(2,), search={"beam_width": 2, "depth": 2},
                     **kw)
    assert len(read_records(out)[1]) == 7 and again.search_log.looked == result.search_log.looked  # resumed: no rerun
    sur = cf.sweep(chat_model, strategy="surrogate", budget=5, block_sizes=(2,), seed=1, validate=1,
                   **{**kw, "results": tmp_path / "sur.jsonl"})
    assert len(sur.search_log.looked) == 5 and "combined_val_delta" in sur.to_pandas().columns
    with pytest.raises(ValueError, match="needs budget=N"):
        cf.sweep(chat_model, strategy="beam", probes=["math"], progress=False)
    with pytest.raises(ValueError, match="unknown beam search options: width"):
        cf.sweep(chat_model, strategy="beam", budget=2, search={"width": 2}, probes=["math"], progress=False)
    # placement options a strategy would ignore are refused, not dropped
    with pytest.raises(ValueError, match="every refine_stride layers; stride= applies to grid and scan"):
        cf.sweep(chat_model, strategy="beam", budget=2, stride=2, probes=["math"], progress=False)
    with pytest.raises(ValueError, match="'surrogate' tries blocks at every start"):
        cf.sweep(chat_model, strategy="surrogate", budget=2, starts=(1,), probes=["math"], progress=False)
    with pytest.raises(ValueError, match="refine_stride= applies to strategies refine, beam and surrogate, not 'grid'"):
        cf.sweep(chat_model, refine_stride=2, probes=["math"], progress=False)
    with pytest.raises(ValueError, match="refine_stride must be a whole number >= 1, got -2"):
        cf.sweep(chat_model, strategy="beam", budget=2, refine_stride=-2, probes=["math"], progress=False)
    # options of another strategy: paths= does not turn a search into a paths sweep, budget= needs a search
    with pytest.raises(ValueError, match="paths= runs the given paths .strategy 'paths'.; strategy 'beam' does not"):
        cf.sweep(chat_model, strategy="beam", budget=2, paths=["0..3,2..29"], probes=["math"], progress=False)
    with pytest.raises(ValueError, match="budget= and search= apply to strategies beam and surrogate, not 'grid'"):
        cf.sweep(chat_model, budget=5, probes=["math"], progress=False)
    with pytest.raises(ValueError, match=r"'beam' grows blocks that run twice; times=\(3,\)"):
        cf.sweep(chat_model, strategy="beam", budget=2, times=(3,), probes=["math"], progress=False)
    # a ranking column the sweep will not have, or one a search cannot optimise: refused before the baseline
    with pytest.raises(ValueError, match="'beam' optimises combined_delta or <probe>_delta"):
        cf.sweep(chat_model, strategy="beam", budget=2, by="combined_q", probes=["math"], progress=False)
    with pytest.raises(ValueError, match="by='math_margin_delta' is not a search column of a mode='generate'"):
        cf.sweep(chat_model, strategy="refine", by="math_margin_delta", probes=["math"], progress=False)


def test_search_inputs_it_would_misuse_are_refused():
    """A negative surrogate batch (it looped forever), a beam whose seed blocks all break max_extra
    (it searched nothing), a skip refilled by a repeat (the baseline, which spent budget)."""
    scan, grid = make_configs(N, "scan"), make_configs(N, "grid", (2, 4), None, 3)
    for batch in (-3, 0, 1.5):
        with pytest.raises(ValueError, match="surrogate batch must be a whole number >= 1"):
            surrogate_search(N, _synthetic([]), 20, scan, grid, batch=batch)
    with pytest.raises(ValueError, match="surrogate kappa must be finite"):
        surrogate_search(N, _synthetic([]), 20, scan, grid, kappa=float("nan"))
    with pytest.raises(ValueError, match=r"no seed block: block sizes \[3, 4\] every 2 layers of 12 within max_extra=2"):
        beam_search(N, _synthetic([]), 10, block_sizes=(3, 4), stride=2, max_extra=2)
    with pytest.raises(ValueError, match="seeds and the seed stride >= 1"):
        beam_search(N, _synthetic([]), 10, stride=-1)
    calls: list[str] = []
    beam_search(6, lambda cs: {c.key: 0.0 for c in cs if calls.append(c.key) is None}, 40, block_sizes=(1,), stride=1,
                skip=True, depth=2)
    assert "0..5" not in calls and len(calls) == len(set(calls))


def test_objective_and_combined_use_every_probe_of_the_sweep():
    """A results file resumed with other probes: the search's objective is over this sweep's probes
    (a probe a record lacks is an error naming the config), and a config scored on fewer probes than
    the table's gets no combined columns rather than a mean over other probes."""
    from circuit_finder.sweep.result import SweepResult
    from circuit_finder.sweep.search import objective

    def rec(layers, **scores):
        return {"layers": layers, "split": "search", "mode": "likelihood",
                "scores": {p: dict(enumerate(v)) for p, v in scores.items()}}

    base, a, b = rec("0..5", math=[0, 0], eq=[0, 0]), rec("0..3,2..5", math=[100, 100], eq=[0, 0]), \
        rec("0..4,3..5", math=[60, 60])
    assert objective(a, base, "combined_delta") == 50.0 and objective(a, base, "combined_delta", ["math"]) == 100.0
    with pytest.raises(ValueError, match="no scores of probe 'eq' for 0..4,3..5 to optimise 'combined_delta'"):
        objective(b, base, "combined_delta", ["math", "eq"], "0..4,3..5")
    table = SweepResult([base, a, b], num_layers=6, mode="likelihood").to_pandas().set_index("layers")
    assert table.loc["0..3,2..5", "combined_delta"] == 50.0 and table.loc["0..4,3..5", "math_delta"] == 60.0
    assert np.isnan(table.loc["0..4,3..5", "combined_delta"]) and np.isnan(table.loc["0..4,3..5", "combined"])
    # the result of a sweep resumed with math alone combines its own probes; eq is still shown
    mine = SweepResult([base, a, b], num_layers=6, mode="likelihood", probes=["math"]).to_pandas().set_index("layers")
    assert mine.loc["0..4,3..5", "combined_delta"] == 60.0 and mine.loc["0..3,2..5", "combined_delta"] == 100.0
    assert mine.loc["0..3,2..5", "eq_delta"] == 0.0


def test_tied_configs_rank_by_path_whatever_the_record_order():
    """Three items give deltas in steps of 33.3, so ties are common: the ranking (top, validate, the
    refine winners) must not follow the order a Ray run happened to write records in."""
    from circuit_finder.sweep.result import SweepResult

    def rec(layers, scores):
        return {"layers": layers, "split": "search", "mode": "likelihood", "scores": {"math": dict(enumerate(scores))}}

    base = rec("0..5", [0, 0, 0])
    tied = [rec("0..4,3..5", [100, 0, 0]), rec("0..3,2..5", [0, 100, 0]), rec("0..2,1..5", [0, 0, 100])]
    orders = [[base, *tied], [base, *reversed(tied)]]
    for by in ("math_delta", "math_p"):
        ranked = [list(SweepResult(r, num_layers=6, mode="likelihood").top(3, by=by)["layers"]) for r in orders]
        assert ranked[0] == ranked[1] == ["0..2,1..5", "0..3,2..5", "0..4,3..5"]


def test_search_curve_plot():
    from matplotlib.figure import Figure

    calls: list[str] = []
    _, log = beam_search(N, _synthetic(calls), 10, block_sizes=(2,), stride=3, beam_width=2, depth=2)
    fig = log.plot(label="beam")
    assert isinstance(fig, Figure)
    line = fig.axes[0].lines[0]
    assert list(line.get_ydata()) == log.best_so_far() and len(line.get_xdata()) == 10
