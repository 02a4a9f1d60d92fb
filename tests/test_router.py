"""Routers (issue #19): candidates and labels from per-item records, training determinism, the
classifier's arrays against scikit-learn's own prediction, save/load, mixed-choice batches
against each prompt run alone along its chosen path (generate, logits, score, the sweep runner),
the held-out reading against a hand computation, and the server and lm-eval routes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import circuit_finder as cf
from circuit_finder.layer_path import LayerPath
from circuit_finder.probes import get_probe
from circuit_finder.results import read_records
from circuit_finder.router.run import RouterConfig
from circuit_finder.router.train import labels_and_weights, select_candidates, utility_table
from circuit_finder.sweep import SweepConfig, SweepResult, run_configs

PROMPTS = ["What is 2 + 2?", "Name a colour you like very much, please.", "Say hello.",
           "If all cats are animals and Tom is a cat, is Tom an animal? Answer yes or no."]
PATHS = ["0..5", "0..2,1..5", "0,1,3,4,5", "0,0..5"]  # reuse 2 slots, 2 slots, 2 slots, 1 slot (of layer=2)


def _sweep(model, tmp_path, mode="likelihood", **kw):
    return cf.sweep(model, probes=["math", "eq", "reasoning"], paths=PATHS[1:], mode=mode,
                    results=tmp_path / f"sweep-{mode}.jsonl", progress=False, **kw)


@pytest.fixture(scope="module")
def likelihood_sweep(chat_model, tmp_path_factory):
    return _sweep(chat_model, tmp_path_factory.mktemp("router"))


def hand_router(model, prompts=PROMPTS, paths=PATHS, layer=2, chat=True, classes=None) -> cf.Router:
    """A nearest-centroid router whose centroids are the prompts' own features (each alone):
    prompt k goes to candidate classes[k] (default k) — a mixed-choice batch by construction."""
    n, h = model.num_layers, model.config.hidden_size
    probe = cf.Router("probe", [LayerPath.parse(p) for p in paths], layer, "mean", n, h, "constant", [0],
                      np.zeros(h), np.ones(h), np.zeros((0, h)), np.zeros(0))
    ids = [model.codec.encode_prompt(p, chat) for p in prompts]
    cents = np.concatenate([probe.features(model, [s]) for s in ids])
    classes = list(range(len(prompts))) if classes is None else classes
    return cf.Router("hand", probe.candidates, layer, "mean", n, h, "centroid", classes,
                     np.zeros(h), np.ones(h), cents, np.zeros(len(prompts)))


def _diff(name, a, b):
    d = (a.double() - b.double()).abs()
    print(f"{name}: max diff {d.max().item():.3g}, mean diff {d.mean().item():.3g}")
    return d.max().item()


# ---------------------------------------------------------------------------- training data
def _records(table: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    return {k: {"scores": {p: {f"{p}{i}": v for i, v in enumerate(vals)} for p, vals in probes.items()}}
            for k, probes in table.items()}


def test_candidates_labels_and_weights_by_hand():
    recs = _records({"base": {"a": [0, 0, 100, 100]}, "x": {"a": [100, 0, 100, 0]}, "y": {"a": [100, 100, 0, 0]},
                     "z": {"a": [0, 100, 100, 0]}})
    order = ["x", "y", "z"]  # ranked by the objective
    assert select_candidates(recs, "base", 3, "top", order, ["a"]) == ["base", "x", "y"]
    # cover: beside base, x would add item 0 (+100), y items 0 and 1 (+200), z item 1 (+100): y;
    # then every item has a 100 and nothing adds more, so the cover stops short of 4
    assert select_candidates(recs, "base", 4, "cover", order, ["a"]) == ["base", "y"]
    items, table = utility_table(recs, ["base", "x", "y"], ["a"])
    assert items == [("a", "a0"), ("a", "a1"), ("a", "a2"), ("a", "a3")]
    labels, weights = labels_and_weights(table)
    assert labels.tolist() == [1, 2, 0, 0]  # ties go to the earlier candidate (identity first)
    np.testing.assert_allclose(weights, [100 - 200 / 3, 100 - 100 / 3, 100 - 200 / 3, 100 - 100 / 3])
    with pytest.raises(ValueError, match="candidates must be >= 2"):
        select_candidates(recs, "base", 1, "top", order, ["a"])
    with pytest.raises(ValueError, match="selection"):
        select_candidates(recs, "base", 2, "best", order, ["a"])


def test_training_is_deterministic_and_predicts_like_sklearn(chat_model, likelihood_sweep):
    kw = dict(candidates=3, fallback=False, evaluate=False, seed=3)
    a = cf.train_router(likelihood_sweep, **kw)
    b = cf.train_router(likelihood_sweep, **kw)
    assert a.to_dict() == b.to_dict() and a.digest == b.digest
    assert a.kind == "logistic" and a.training["cv"] and a.training["informative"] > 0
    assert a.candidates[0] == LayerPath.identity(chat_model.num_layers)
    # the router's numpy prediction against scikit-learn's own, on prompts it never saw
    ids = [chat_model.codec.encode_prompt(p, True) for p in PROMPTS * 3]
    x = a.features(chat_model, ids)
    ours = a.predict(x)
    theirs = a.estimator.predict((x - a.mean) / a.scale)
    print("router:", ours.tolist(), "sklearn:", theirs.tolist())
    assert ours.tolist() == [int(c) for c in theirs]


def test_candidates_come_from_search_columns_only(likelihood_sweep):
    with pytest.raises(ValueError, match="held-out column"):
        cf.train_router(likelihood_sweep, by="combined_val_delta", evaluate=False)
    with pytest.raises(ValueError, match="probe.s. gsm8k: no search item .* train on probes the sweep ran: math, eq, "
                                         "reasoning"):  # (it trained, then could not be saved: NaN in-sample scores)
        cf.train_router(likelihood_sweep, probes=["math", "gsm8k"], evaluate=False)


def test_last_token_features_read_each_rows_last_real_token(chat_model):
    """Right-padded rows (Model.logits takes any mask) give the features of each prompt alone, as
    left-padded ones do: "last" reads the last real token, not the last column."""
    r = hand_router(chat_model)
    r.pooling = "mean+last"
    ids = [chat_model.codec.encode_prompt(p, True) for p in PROMPTS]
    alone = np.concatenate([r.features(chat_model, [x]) for x in ids])
    h = [chat_model.engine.run_slots(chat_model.engine.embed(torch.tensor([x])), torch.arange(len(x)).unsqueeze(0),
                                     None, list(range(r.layer)), None, 0, r.layer)[0] for x in ids]
    width = max(len(x) for x in ids)
    right = torch.zeros(len(ids), width, h[0].shape[-1], dtype=h[0].dtype)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for k, x in enumerate(h):
        right[k, :len(x)], mask[k, :len(x)] = x, 1
    assert np.allclose(r.pool(right, mask), alone, rtol=1e-5, atol=1e-6)


def test_constant_when_no_item_prefers_a_candidate(chat_model):
    n = chat_model.num_layers
    same = {"math": {it: 100.0 for it in ("math-000-cube_root", "math-001-square_root")}}
    records = [{"layers": k, "split": "search", "mode": "likelihood", "scores": same}
               for k in (str(LayerPath.identity(n)), "0..2,1..5")]
    result = SweepResult(records, num_layers=n, mode="likelihood", model=chat_model, chat=True)
    r = cf.train_router(result, candidates=2, probes=["math"], evaluate=False)
    assert r.kind == "constant" and r.training["informative"] == 0
    assert r.predict(np.zeros((3, r.feature_size))).tolist() == [r.classes[0]] * 3
    # its held-out reading is its one path's own run (nothing routed to run)
    ev = cf.train_router(result, candidates=2, probes=["math"], progress=False).evaluation
    chosen = str(r.candidates[r.classes[0]])
    assert ev["choices"] == {k: (len(get_probe("math").items("validation")) if k == chosen else 0)
                             for k in map(str, r.candidates)}
    assert ev["means"]["router"] == ev["means"]["candidates"][chosen]
    assert ev["versus"]["best_fixed"]["combined_delta"] == 0


# ---------------------------------------------------------------------------- files
def test_save_load_round_trip_and_bad_files(chat_model, likelihood_sweep, tmp_path):
    r = cf.train_router(likelihood_sweep, candidates=3, fallback=False, evaluate=False)
    path = r.save(tmp_path / "r.json")
    data = json.loads(path.read_text())  # plain JSON: no pickle anywhere
    assert data["format"] == "circuit-finder-router" and data["classifier"]["kind"] == "logistic"
    back = cf.Router.load(path)
    assert back.to_dict() == r.to_dict() and back.key == r.key
    before = path.read_bytes()
    broken = cf.Router.load(path)
    broken.training = {**broken.training, "C": float("nan")}
    with pytest.raises(ValueError, match="Out of range float"):  # a save that fails keeps the old file whole
        broken.save(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    x = r.features(chat_model, [chat_model.codec.encode_prompt(p, True) for p in PROMPTS])
    assert back.predict(x).tolist() == r.predict(x).tolist()
    assert chat_model.generate(PROMPTS, layers=f"router:{path}", max_new_tokens=4, chat=True) == \
        chat_model.generate(PROMPTS, layers=back, max_new_tokens=4, chat=True)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(cf.RouterError, match="bad.json: not JSON"):
        cf.Router.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"format": "something"}')
    with pytest.raises(cf.RouterError, match="other.json: not a circuit-finder router"):
        cf.Router.load(tmp_path / "other.json")
    data["classifier"]["weights"] = data["classifier"]["weights"][:1]
    data["classifier"]["bias"] = [0.0, 0.0, 0.0, 0.0, 0.0]
    (tmp_path / "shape.json").write_text(json.dumps(data))
    with pytest.raises(cf.RouterError, match="shape.json.*weights must be"):
        cf.Router.load(tmp_path / "shape.json")
    with pytest.raises(cf.RouterError, match="cannot read"):
        cf.Router.load(tmp_path / "missing.json")
    wide = cf.Router("w", [LayerPath.identity(8)], 1, "mean", 8, 64, "constant", [0], np.zeros(64), np.ones(64),
                     np.zeros((0, 64)), np.zeros(0))
    with pytest.raises(cf.RouterError, match="8 layers"):
        chat_model.generate("hi", layers=wide)
    with pytest.raises(cf.LayerPathError, match="a router picks one per prompt"):
        chat_model.path(back)
    with pytest.raises(cf.LayerPathError, match="a router picks one per prompt"):
        cf.export_hf(chat_model, tmp_path / "out", layers=back)


# ---------------------------------------------------------------------------- running routed batches
@pytest.mark.parametrize("classes", [None, [1, 3, 1, 3], [2, 0, 0, 2]], ids=["one-each", "interleaved", "nested"])
def test_mixed_choice_batches_equal_each_prompt_alone(chat_model, classes):
    """Groups of one row each, and groups of several rows at non-contiguous batch positions (one
    going on from the shared prefix's rows, one from the embedding), with different padding."""
    m = chat_model
    r = hand_router(m, classes=classes)
    routed = [r.path_for(m, p, chat=True) for p in PROMPTS]
    want = [PATHS[c] for c in (classes or range(4))]
    assert [str(p) for p in routed] == [str(LayerPath.parse(p)) for p in want]
    assert [r.reuses(c) for c in range(4)] == [True, True, True, False]
    together = m.generate(PROMPTS, layers=r, max_new_tokens=10, chat=True)
    alone = [m.generate(p, layers=path, max_new_tokens=10, chat=True)[0] for p, path in zip(PROMPTS, routed)]
    print(together, alone, sep="\n")
    assert together == alone
    # logits of a left-padded batch, row by row against each row alone along its path
    ids, mask = m.codec.left_pad([m.codec.encode_prompt(p, True) for p in PROMPTS], m.device)
    got = m.logits(ids, layers=r, attention_mask=mask)
    for k, path in enumerate(routed):
        row = ids[k][mask[k] == 1].unsqueeze(0)
        want = m.logits(row, layers=path)[0]
        assert _diff(f"logits row {k} ({path})", got[k][mask[k] == 1], want) < 1e-4
    # scores: each pair along the path its context routes to
    contexts = [m.codec.chat_text([{"role": "user", "content": p}]) for p in PROMPTS]
    conts = [" 4", " blue", " hello", " yes"]
    scored = m.score(contexts, conts, layers=r)
    single = [m.score(c, k, layers=r.path_for(m, m.codec.encode(c)))[0] for c, k in zip(contexts, conts)]
    assert _diff("scores", torch.tensor(scored), torch.tensor(single)) < 1e-4


def test_runner_routes_items_like_their_candidates(chat_model):
    """The sweep runner's routed record (generate mode: groups go on from the shared identity
    prefix's hidden states and KV slots) against each candidate's own record on the same items."""
    m = chat_model
    probe = get_probe("math")
    items = probe.items("search")[:4]
    r = hand_router(m, prompts=[it.prompt for it in items])
    configs = [SweepConfig.of(p, m.num_layers) for p in r.candidates]
    interleaved = hand_router(m, prompts=[it.prompt for it in items], classes=[1, 3, 3, 1])
    for mode, router in (("generate", r), ("likelihood", r), ("generate", interleaved)):
        r = router
        recs = run_configs(m, [probe], [*configs, RouterConfig(r)], None, mode, "search", 4, True, True, False)
        by = {rec["layers"]: rec for rec in recs}
        routed = by[r.key]
        assert routed["routes"]["math"] == {it.id: str(r.candidates[c]) for it, c in zip(items, r.classes)}
        for it in items:
            own = by[routed["routes"]["math"][it.id]]
            assert routed["scores"]["math"][it.id] == own["scores"]["math"][it.id]
            if mode == "generate":
                assert routed["outputs"]["math"][it.id] == own["outputs"]["math"][it.id]
            else:
                assert abs(routed["margins"]["math"][it.id] - own["margins"]["math"][it.id]) < 1e-4


# ---------------------------------------------------------------------------- the held-out reading
def test_held_out_reading_matches_a_hand_computation(chat_model, likelihood_sweep):
    r = cf.train_router(likelihood_sweep, candidates=3, fallback=False, progress=False)
    ev = r.evaluation
    val = SweepResult.load(likelihood_sweep.path).configs("validation", routers=True)
    routed = val[r.key]
    names = list(ev["items"])
    assert names == ["math", "eq", "reasoning"] and ev["items"]["math"] == len(get_probe("math").items(
        "validation"))
    keys = [str(c) for c in r.candidates]

    def mean(scores):
        return float(np.mean([np.mean(list(scores[p].values())) for p in names]))

    oracle = {p: {i: max(val[k]["scores"][p][i] for k in keys) for i in routed["scores"][p]} for p in names}
    assert ev["means"]["router"]["combined"] == pytest.approx(mean(routed["scores"]))
    assert ev["means"]["oracle"]["combined"] == pytest.approx(mean(oracle))
    assert ev["means"]["baseline"]["combined"] == pytest.approx(mean(val[keys[0]]["scores"]))
    search = likelihood_sweep.configs("search")
    best = max(keys, key=lambda k: mean({p: search[k]["scores"][p] for p in names}))
    assert ev["best_fixed"] == best  # chosen on search items only
    if r.kind == "constant":  # the fallback is that same path, by the same measure
        assert str(r.candidates[r.classes[0]]) == best
    # per probe: the candidate with that probe's best search mean, its held-out scores on that probe
    per_probe = {p: max(keys, key=lambda k: np.mean(list(search[k]["scores"][p].values()))) for p in names}
    assert ev["best_per_probe"] == per_probe
    by_probe = {p: val[per_probe[p]]["scores"][p] for p in names}
    assert ev["means"]["best_per_probe"]["combined"] == pytest.approx(mean(by_probe))
    for other, scores in (("baseline", val[keys[0]]["scores"]), ("best_fixed", val[best]["scores"]),
                          ("best_per_probe", by_probe), ("oracle", oracle)):
        delta = np.mean([np.mean([routed["scores"][p][i] - scores[p][i] for i in scores[p]]) for p in names])
        v = ev["versus"][other]
        print(other, v["combined_delta"], v["combined_ci_low"], v["combined_ci_high"], v["combined_p"])
        assert v["combined_delta"] == pytest.approx(delta)
        assert v["combined_ci_low"] <= v["combined_delta"] <= v["combined_ci_high"]
    # the routed run against its candidates' own runs: equal but for near-ties of batch composition
    assert ev["agreement"]["items"] == sum(ev["items"].values())
    assert ev["agreement"]["same"] >= 0.98 * ev["agreement"]["items"]
    text = r.report()
    print(text)
    for phrase in ("Trained on search items", "Held-out items no training saw", "router - best fixed",
                   "router - best fixed per probe", "oracle (each item's best candidate", "headroom"):
        assert phrase in text
    table = r.evaluation_table()
    assert list(table["role"][:5]) == ["baseline", "best_fixed", "best_per_probe", "router", "oracle"]
    # the routers' records stay out of the sweep's tables
    assert not any(k.startswith("router:") for k in likelihood_sweep.to_pandas()["layers"])
    assert cf.Router.load(r.save(likelihood_sweep.path.with_suffix(".router.json"))).report() == text
    # every router read on these held-out items counts: a second one's verdict p is Bonferroni-adjusted
    tried = {k for k in val if k.startswith("router:")} | {r.key}
    assert ev["routers_tried"] == len(tried)
    second = cf.train_router(likelihood_sweep, candidates=3, fallback=False, progress=False, classifier="centroid")
    m = second.evaluation["routers_tried"]
    assert second.key not in tried and m == len(tried | {second.key}) >= 2
    p = second.evaluation["versus"]["best_fixed"]["combined_p"]
    assert f"(p={min(1.0, p * m):.3g})" in second.report() and f"Bonferroni over the {m} routers" in second.report()


def _evaluated(model, versus: dict, tried: int = 1) -> cf.Router:
    """A hand router carrying a made-up held-out reading (``versus``: role -> delta, p)."""
    r = hand_router(model, prompts=PROMPTS[:2], paths=PATHS[:2])
    keys = [str(c) for c in r.candidates]
    means = {role: {"math": 10.0, "combined": 10.0} for role in (*versus, "router")}
    r.evaluation = {"items": {"math": 40}, "baseline": keys[0], "best_fixed": keys[1],
                    "best_per_probe": {"math": keys[1]}, "router": r.key, "routers_tried": tried,
                    "means": {**means, "candidates": {}}, "choices": {k: 20 for k in keys},
                    "agreement": {"items": 0, "same": 0},
                    "versus": {role: {"combined_delta": d, "combined_ci_low": d - 1, "combined_ci_high": d + 1,
                                      "combined_p": p} for role, (d, p) in versus.items()}}
    return r


def test_verdict_tells_routing_within_tasks_from_telling_tasks_apart(chat_model):
    win = (4.0, 0.001)
    apart = _evaluated(chat_model, {"baseline": win, "best_fixed": win, "best_per_probe": (0.5, 0.6),
                                    "oracle": (-9.0, 0.001)}).report()
    print(apart)
    assert "The router beats the best fixed path" in apart and "best fixed per probe: +0.50" in apart
    assert "no evidence it routes within tasks" in apart and "It also beats" not in apart
    within = _evaluated(chat_model, {"baseline": win, "best_fixed": win, "best_per_probe": (2.0, 0.01),
                                     "oracle": (-9.0, 0.001)}).report()
    assert "It also beats a fixed path per probe (p=0.01)" in within
    # the same per-probe p read as one of 3 routers: Bonferroni takes it past 0.05
    assert "no evidence it routes within tasks" in _evaluated(chat_model, {
        "baseline": win, "best_fixed": win, "best_per_probe": (2.0, 0.02), "oracle": (-9.0, 0.001)}, tried=3).report()
    # no win over the best fixed path: no per-probe verdict; an older reading without the role still reports
    lose = _evaluated(chat_model, {"baseline": win, "best_fixed": (0.5, 0.5), "best_per_probe": (0.2, 0.8),
                                   "oracle": (-9.0, 0.001)}).report()
    assert "No evidence the router beats" in lose and "within tasks" not in lose
    old = _evaluated(chat_model, {"baseline": win, "best_fixed": win, "oracle": (-9.0, 0.001)})
    del old.evaluation["best_per_probe"]
    assert "per probe" not in old.report() and "best_per_probe" not in list(old.evaluation_table()["role"])


# ---------------------------------------------------------------------------- server and lm-eval
def test_server_routes_requests(chat_model, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from circuit_finder.server import create_app

    m = chat_model
    r = hand_router(m, chat=False)
    app = create_app(m, routers=[r], model_name="tiny", batch_window_ms=200, max_tokens_limit=32)
    routed = [str(r.path_for(m, p)) for p in PROMPTS]
    with TestClient(app) as client:
        assert client.get("/health").json()["routers"] == ["hand"]
        body = {"prompt": PROMPTS, "max_tokens": 6, "temperature": 0, "layers": "router:hand"}
        got = client.post("/v1/completions", json=body).json()
        assert got["layers"] == "router:hand" and got["router"] == "hand"
        for choice, p in zip(got["choices"], PROMPTS):
            path = r.path_for(m, m.codec.encode(p))
            assert choice["layers"] == str(path)
            assert choice["text"] == m.generate(p, layers=path, max_new_tokens=6)[0]
        assert len({c["layers"] for c in got["choices"]}) > 1, routed
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPTS[1]}],
                                                        "max_tokens": 6, "temperature": 0,
                                                        "layers": "router:hand"}).json()
        path = r.path_for(m, PROMPTS[1], chat=True)
        assert chat["layers"] == str(path) and chat["router"] == "hand"
        assert chat["choices"][0]["message"]["content"] == m.generate(PROMPTS[1], layers=path, max_new_tokens=6,
                                                                      chat=True)[0]
        echo = client.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 0, "echo": True,
                                                    "logprobs": 1, "layers": "router:hand"}).json()
        lp = echo["choices"][0]["logprobs"]["token_logprobs"][1:]
        want = m.score(m.codec.encode(PROMPTS[2])[:1], m.codec.encode(PROMPTS[2])[1:],
                       layers=r.path_for(m, m.codec.encode(PROMPTS[2])))[0]
        assert sum(lp) == pytest.approx(want, abs=1e-3)
        bad = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "layers": "router:nope"})
        assert bad.status_code == 400 and "no router named 'nope'" in bad.json()["error"]["message"]
    default = create_app(m, layers="router:hand", routers={"hand": r}, model_name="tiny", batch_window_ms=0)
    with TestClient(default) as client:
        out = client.post("/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 4, "temperature": 0}).json()
        assert out["choices"][0]["layers"] == str(r.path_for(m, m.codec.encode(PROMPTS[3])))


def test_lm_eval_adapter_routes_requests(chat_model, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from circuit_finder.lm_eval import CircuitFinderLM

    m = chat_model
    r = hand_router(m, chat=False)
    path = r.save(tmp_path / "hand.json")
    lm = CircuitFinderLM(model=m, layers=f"router:{path}", batch_size=4)
    assert lm.get_model_info()["layers"] == r.key
    ll = [Instance("loglikelihood", None, (p, " yes"), k) for k, p in enumerate(PROMPTS)]
    gen = [Instance("generate_until", None, (p, {"until": ["\n"], "max_gen_toks": 6}), k) for k, p in enumerate(PROMPTS)]
    got_ll, got_gen = lm.loglikelihood(ll), lm.generate_until(gen)
    for k, p in enumerate(PROMPTS):
        single = CircuitFinderLM(model=m, layers=str(r.path_for(m, lm.tok_encode(p))).replace(",", "+"), batch_size=1)
        want_ll = single.loglikelihood([Instance("loglikelihood", None, (p, " yes"), 0)])[0]
        assert got_ll[k][0] == pytest.approx(want_ll[0], abs=1e-4) and got_ll[k][1] == want_ll[1]
        assert got_gen[k] == single.generate_until([gen[k]])[0]
    assert len({str(r.path_for(m, lm.tok_encode(p))) for p in PROMPTS}) > 1
    # rolling log-likelihood: one route per document (by its opening tokens), all windows along it
    short = CircuitFinderLM(model=m, layers=f"router:{path}", batch_size=2, max_length=8)
    docs = [Instance("loglikelihood_rolling", None, (text,), k) for k, text in enumerate(PROMPTS)]
    together, routes = short.loglikelihood_rolling(docs), set()  # all documents' windows scored at once
    for text, got in zip(PROMPTS, together):
        head = [short.prefix_token_id, *short.tok_encode(text)][:8]
        along = r.path_for(m, head)
        routes.add(str(along))
        single = CircuitFinderLM(model=m, layers=str(along).replace(",", "+"), batch_size=2, max_length=8)
        doc = [Instance("loglikelihood_rolling", None, (text,), 0)]
        assert got == pytest.approx(single.loglikelihood_rolling(doc)[0], abs=1e-4)
    assert len(routes) > 1


def test_cli_generate_and_serve_name_routers(chat_model_dir, chat_model, tmp_path, capsys):
    from circuit_finder.cli import main

    r = hand_router(chat_model, chat=False)
    path = r.save(tmp_path / "hand.json")
    assert main(["generate", "--model", str(chat_model_dir), "--layers", f"router:{path}", "--max-new-tokens", "3",
                 *PROMPTS[:2]]) == 0
    out = capsys.readouterr().out
    assert "== router hand" in out and f"### {PROMPTS[0]} (layers {r.path_for(chat_model, PROMPTS[0])})" in out
    assert main(["serve", "--model", str(chat_model_dir), "--router", str(path), "--layers", "router:other"]) == 2
    assert "no --router FILE is named 'other'" in capsys.readouterr().err
    assert main(["generate", "--model", str(chat_model_dir), "--layers", f"router:{tmp_path}/none.json", "x"]) == 2
    assert "cannot read the router file" in capsys.readouterr().err


def test_a_router_is_a_sweep_config(chat_model, tmp_path, task_dir):
    """sweep(paths=[..., router]) scores it like a path (a row of the table), and validate and
    evaluate (lm-eval tasks) run it along its routes."""
    pytest.importorskip("lm_eval")
    m = chat_model
    r = hand_router(m)
    out = tmp_path / "paths.jsonl"
    res = cf.sweep(m, probes=["math"], paths=["0..2,1..5", r], mode="likelihood", max_items=4, results=out,
                   progress=False)
    df = res.to_pandas()
    row = df[df["layers"] == r.key]
    assert len(row) == 1 and not np.isnan(row["math_delta"].iloc[0]) and "0..2,1..5" in set(df["layers"])
    rec = res.configs("search")[r.key]
    assert set(rec["routes"]["math"].values()) <= {str(c) for c in r.candidates}
    val = res.validate(2, progress=False)
    assert r.key in set(val["layers"]) and val["combined_val_delta"].notna().all()
    bench = res.evaluate(top=2, tasks=["cf_mc"], include_path=str(task_dir), batch_size=4)
    assert r.key in set(bench["layers"]) and bench["cf_mc_acc_bench_delta"].notna().all()
    with pytest.raises(ValueError, match="router this SweepResult does not hold"):
        SweepResult.load(out).validate(3, model=m, progress=False)


def test_a_router_on_its_training_items_is_in_sample(chat_model, likelihood_sweep, tmp_path):
    """train_router records the items it trained on; a router swept on them gets an in_sample row
    (with a warning, a line in the report, an in_sample column; top() and the report's best line
    leave it out), and validate() refuses held-out items it was
    trained on (they would not be held out for it)."""
    trained = cf.train_router(likelihood_sweep, candidates=3, fallback=False, evaluate=False, seed=3)
    assert likelihood_sweep.chat is True and trained.training["chat"] is True  # chat=None, resolved as the sweep ran
    search = {p: {it.id for it in get_probe(p).items("search")} for p in ("math", "eq", "reasoning")}
    assert {p: set(v) for p, v in trained.training["item_ids"].items()} == search
    m = chat_model
    r = hand_router(m)
    math = get_probe("math")
    r.training = {"item_ids": {"math": [it.id for it in math.items("search")[:3]]}}
    out = tmp_path / "in-sample.jsonl"
    with pytest.warns(UserWarning, match="scored on 3 search items it was trained on"):
        res = cf.sweep(m, probes=["math"], paths=["0..2,1..5", r], mode="likelihood", max_items=4, results=out,
                       progress=False)
    assert res.configs("search")[r.key]["in_sample"] == 3 and "0..2,1..5" in res.configs("search")
    assert "in_sample" not in res.configs("search")["0..2,1..5"]
    assert f"{r.key}: a router scored on search items it was trained on" in res.report()
    table = res.to_pandas().set_index("layers")  # flagged in the table, never a top config or the best line
    assert table.loc[r.key, "in_sample"] == 3 and table.loc["0..2,1..5", "in_sample"] == 0
    assert pd.isna(table.loc[r.key, "math_q"]) and not pd.isna(table.loc[r.key, "math_p"])  # not a test
    assert list(res.top(5)["layers"]) == ["0..2,1..5"] and f"Best by combined_delta: {r.key}" not in res.report()
    leaky = hand_router(m)
    leaky.training = {"item_ids": {"math": [it.id for it in math.items("validation")[:2]]}}
    before = len(read_records(out)[1])
    with pytest.raises(ValueError, match="trained on 2 of these validation items: they are not held out"):
        res.run_held_out([SweepConfig.of(LayerPath.parse("0..2,1..5"), 6), RouterConfig(leaky)], model=m,
                         probes=["math"], progress=False)
    assert len(read_records(out)[1]) == before  # refused before anything ran
    # a likelihood router trained before routers read whole prompts says it should be trained again
    old = hand_router(m)
    old.training = {"mode": "likelihood", "fingerprint": "x"}
    with pytest.warns(UserWarning, match="cut before their trailing whitespace"):
        old.check(m)


def test_router_features_read_the_prompt_as_deployed(chat_model):
    """What a router trains on (a sweep's context ids, both modes) is the prompt Model.generate /
    path_for encode for that item with the chat template, so a deployed router reads the same
    tokens (likelihood mode's scoring context drops the template's trailing newline; the router's
    does not)."""
    from circuit_finder.sweep import ProbeBatch

    probe = get_probe("reasoning")
    items = probe.items()[:3]
    for mode in ("likelihood", "generate"):
        batch = ProbeBatch(chat_model, probe, items, mode, chat=True)
        assert batch.context_ids == [chat_model.codec.encode_prompt(it.prompt, True) for it in items], mode


def test_prompts_written_otherwise_than_in_training_are_warned(chat_model, tmp_path):
    """A router trained on chat prompts, used on plain ones (or the other way round), reads other
    tokens: Model.generate and a sweep warn once per setting; the training's own setting is quiet."""
    import warnings

    r = hand_router(chat_model)
    r.training = {"chat": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chat_model.generate(PROMPTS[:1], layers=r, max_new_tokens=1, chat=True)
    with pytest.warns(UserWarning, match="training prompts were written with the chat template; these are written "
                                         "as plain text"):
        chat_model.generate(PROMPTS[:1], layers=r, max_new_tokens=1)
    plain = hand_router(chat_model, chat=False)
    plain.training = {"chat": False}
    with pytest.warns(UserWarning, match="prompts were written as plain text.*these are written with the chat"):
        cf.sweep(chat_model, probes=["math"], paths=[plain], mode="likelihood", max_items=2, chat=True,
                 results=tmp_path / "r.jsonl", progress=False)


def test_a_thinking_switch_set_otherwise_than_in_training_is_warned(chat_model):
    """Chat prompts both ways, but the template's thinking switch set otherwise than in the router's
    training sweep: warned where the template has such a switch, quiet where it writes the same
    prompt either way (the default model's) or the setting is left to the router (None)."""
    import warnings

    class Switching:
        def chat_text(self, messages, add_generation_prompt=True, thinking=None):
            return "<think>" if thinking else "<think></think>"

    quiet, r = hand_router(chat_model), hand_router(chat_model)
    quiet.training = r.training = {"chat": True, "thinking": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.check_prompts(True, True, chat_model.codec)  # SmolLM2's template has no switch
        r.check_prompts(True, None, Switching())
        r.check_prompts(True, False, Switching())
    with pytest.warns(UserWarning, match="thinking switch off; these have it on"):
        r.check_prompts(True, True, Switching())


def test_a_router_tells_in_memory_models_apart(chat_model, chat_model_dir):
    """Models built from tensors share one source name; a router trained on one warns on another's
    weights (each model checked once), not only on the first it meets."""
    import warnings

    from safetensors.torch import load_file

    tensors = load_file(str(next(chat_model_dir.glob("*.safetensors"))))
    base = cf.load_from_tensors(chat_model.config, dict(tensors), chat_model.tokenizer)
    tuned = {**tensors, "model.norm.weight": tensors["model.norm.weight"] * 1.5}
    other = cf.load_from_tensors(chat_model.config, tuned, chat_model.tokenizer)
    r = hand_router(chat_model)
    r.training = {"fingerprint": base.fingerprint(), "model": "<tensors>"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r.check(base)
    with pytest.warns(UserWarning, match="was trained on other weights"):
        r.check(other)


def test_select_rows_checks_its_input(chat_model):
    cache = chat_model.engine.new_cache([0, 1], 3, 8)
    sub = cache.select_rows(torch.tensor([2, 0]), 1)
    assert (sub.batch, sub.num_slots, sub.capacity) == (2, 1, 8)
    with pytest.raises(cf.InputError, match="row index 3 is outside the cache's batch of 3"):
        cache.select_rows(torch.tensor([0, 3]), 1)
    with pytest.raises(cf.InputError, match="slots must be in"):
        cache.select_rows(torch.tensor([0]), 5)
    with pytest.raises(cf.InputError, match="1-D int64"):
        cache.select_rows(torch.tensor([0.0]), 1)


def test_routed_generation_refuses_a_cache_that_cannot_fit(chat_model):
    """A router's generation sizes its caches from max_new_tokens too (along its longest candidate):
    refused before any is made, naming the argument (without the check torch fails to allocate)."""
    r = hand_router(chat_model)
    with pytest.raises(ValueError, match="max_new_tokens=10000000000: the KV cache"):
        chat_model.generate(PROMPTS[:2], layers=r, max_new_tokens=10**10, chat=True)
