"""train_router: a router fitted to a sweep's per-item search records.

1. Candidates: the identity path plus ``candidates - 1`` configs — the best by ``by``
   (``selection="top"``), or a greedy cover (``"cover"``: each next config is the one that most
   raises the items' best score among the chosen, the oracle's score on the search items).
   Or give the paths yourself (``candidates=[...]``; identity is added first).
2. Labels: each search item's best candidate (ties go to the earlier candidate, identity first),
   weighted by how much the choice matters for it (best score minus the candidates' mean) and by
   its probe's share (1 / items of its probe: every objective here — labels, cross-validation,
   the constant choice, the report's best fixed path — is ``combined``, the mean of per-probe
   means); items where every candidate scores the same carry no preference and are left out.
3. Features: ``Router.features`` of each item's prompt ids, exactly as the sweep ran them.
4. Classifier: scikit-learn's LogisticRegression on standardised features (C picked by k-fold
   cross-validation of the routed score on the search items unless given) or weighted class
   centroids; with ``fallback=True`` the router is a constant choice (the best candidate on the
   search items) unless cross-validation says routing beats it. Deterministic under ``seed``.
5. With ``evaluate=True`` (default): the held-out reading (``router.evaluate.evaluate_router``).

Only search items train (and choose candidates: ``by`` may not be a held-out column); held-out
items only evaluate. Limits: likelihood margins are not used as labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..layer_path import LayerPath
from ..sweep.runner import Runner, resolve_probes
from .core import KINDS, POOLINGS, Router
from .evaluate import evaluate_router

__all__ = ["C_GRID", "select_candidates", "train_router", "utility_table"]

C_GRID = (0.01, 0.1, 1.0, 10.0)


def select_candidates(search: dict[str, dict], base_key: str, k: int, selection: str, order: Sequence[str],
                      probes: Sequence[str]) -> list[str]:
    """Candidate keys (baseline first): ``order`` is the configs ranked by ``by``, best first."""
    if k < 2:
        raise ValueError(f"candidates must be >= 2 (identity and at least one other path), got {k}")
    if selection == "top":
        return [base_key, *[key for key in order if key != base_key][:k - 1]]
    if selection != "cover":
        raise ValueError(f"selection must be 'top' or 'cover', got {selection!r}")
    keys = [key for key in order if key != base_key]
    _, table = utility_table(search, [base_key, *keys], probes)
    chosen = [0]
    best = table[:, 0].copy()
    while len(chosen) < k:
        gains = np.maximum(table, best[:, None]).sum(0) - best.sum()
        gains[chosen] = -1
        pick = int(np.argmax(gains))  # ties: the earlier (better by ``by``) config
        if gains[pick] <= 0:
            break
        chosen.append(pick)
        best = np.maximum(best, table[:, pick])
    return [([base_key, *keys])[c] for c in chosen]


def utility_table(records: dict[str, dict], keys: Sequence[str], probes: Sequence[str]) -> tuple[list, np.ndarray]:
    """((probe, item id) of the items every config in ``keys`` scored, scores [items, configs])."""
    items = []
    for p in probes:
        common = set.intersection(*[set(records[key]["scores"].get(p, {})) for key in keys])
        items += [(p, i) for i in sorted(common)]
    table = np.array([[records[key]["scores"][p][i] for key in keys] for p, i in items], dtype=np.float64)
    return items, table.reshape(len(items), len(keys))


def labels_and_weights(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best candidate per item (first on ties) and how much the choice matters (best - mean)."""
    return table.argmax(1), table.max(1) - table.mean(1)


def probe_weights(items: Sequence[tuple[str, str]]) -> np.ndarray:
    """Per item 1 / (probes x its probe's items): weighted sums are means of per-probe means, the
    ``combined`` score the tables and the report use (a probe with more items weighs no more)."""
    counts: dict[str, int] = {}
    for p, _ in items:
        counts[p] = counts.get(p, 0) + 1
    return np.array([1.0 / (len(counts) * counts[p]) for p, _ in items])


def train_router(result, candidates: int | Sequence = 4, features: str = "mean", layer: int | None = None,
                 selection: str = "top", by: str = "combined_delta", classifier: str = "logistic",
                 C: float | None = None, fallback: bool = True, seed: int = 0, name: str | None = None,
                 evaluate: bool = True, model=None, probes=None, progress: bool = True) -> Router:
    """Fits a Router to a SweepResult's search records (see the module docstring).

    candidates: how many paths (identity included), or the paths themselves. features: "mean",
    "last" or "mean+last" pooling of the hidden state entering layer ``layer`` (default: as deep
    as every candidate shares the identity prefix, at most half the model, so the chosen path goes
    on from the feature pass). classifier: "logistic" or "centroid". C: logistic regression's
    inverse regularisation (None: chosen by cross-validation). evaluate: score the candidates and
    the router on the probes' held-out items and keep the reading in ``router.evaluation``.
    """
    try:
        import sklearn  # noqa: F401  (the classifier and the cross-validation folds)
    except ImportError as e:
        raise ImportError("train_router needs scikit-learn: pip install 'circuit-finder[router]'") from e
    model = model or result.model
    if model is None:
        raise ValueError("train_router needs the model (features come from it): pass model=circuit_finder.load(...)")
    if features not in POOLINGS:
        raise ValueError(f"features must be one of {POOLINGS}, got {features!r}")
    if classifier not in KINDS[:2]:
        raise ValueError(f"classifier must be 'logistic' or 'centroid', got {classifier!r}")
    n = result.num_layers
    base_key = str(LayerPath.identity(n))
    search = result.configs("search")
    if base_key not in search:
        raise ValueError("the sweep has no baseline (identity) record to train against")
    probe_list = resolve_probes(probes if probes is not None else (result.probes or result.probe_names("search")))
    names = [p.name for p in probe_list]
    if "_val" in by or "_bench" in by:
        raise ValueError(f"by={by!r} is a held-out column: candidates are chosen on search items only, so that "
                         f"the held-out reading stays held out")
    keys = _candidate_keys(result, search, base_key, candidates, selection, by, names)
    paths = [LayerPath.parse(k) for k in keys]
    if layer is None:
        layer = max(1, min(min(p.identity_prefix(n) for p in paths), n // 2))
    if not 1 <= layer <= n:
        raise ValueError(f"layer must be in 1..{n}, got {layer}")
    items, table = utility_table(search, keys, names)
    empty = [p for p in names if not any(q == p for q, _ in items)]
    if empty:
        raise ValueError(f"probe(s) {', '.join(empty)}: no search item that the baseline and every candidate scored "
                         f"(not swept?); train on probes the sweep ran: {', '.join(result.probe_names('search'))}")
    labels, regret = labels_and_weights(table)
    pw = probe_weights(items)
    keep = regret > 0
    weights = pw * regret / max(1e-12, float((pw * regret)[keep].mean())) if keep.any() else regret
    shape = Router(name or "router", paths, layer, features, n, model.config.hidden_size, "constant", [0],
                   np.zeros(_size(features, model)), np.ones(_size(features, model)), np.zeros((0, 0)), np.zeros(0))
    x = _item_features(shape, model, result, probe_list, [it for it, k in zip(items, keep) if k])
    fit = _fit(x, labels[keep], weights[keep], table[keep], pw[keep], classifier, C, fallback, seed, pw @ table)
    router = Router(name or _default_name(names, len(keys)), paths, layer, features, n, model.config.hidden_size,
                    fit["kind"], fit["classes"], fit["mean"], fit["scale"], fit["weights"], fit["bias"])
    router.training = _training_info(result, model, names, keys, items, labels, keep, fit,
                                     selection if isinstance(candidates, int) else "given", by, seed, classifier,
                                     table, router, x)
    router.estimator = fit.get("sklearn")  # the fitted scikit-learn model (not saved; None unless logistic)
    if evaluate:
        evaluate_router(router, result, model=model, probes=probe_list, progress=progress)
    return router


def _size(features: str, model) -> int:
    return model.config.hidden_size * (2 if features == "mean+last" else 1)


def _default_name(probes: Sequence[str], k: int) -> str:
    return f"{'-'.join(probes)}-{k}"


def _candidate_keys(result, search: dict, base_key: str, candidates, selection: str, by: str,
                    probes: Sequence[str]) -> list[str]:
    if isinstance(candidates, int):
        order = [k for k in result.top(len(search), by=by)["layers"] if not k.startswith("router:")]
        return select_candidates(search, base_key, candidates, selection, order, probes)
    keys = [base_key]
    for c in candidates:
        key = str(LayerPath.coerce(c, result.num_layers))
        if key not in search:
            raise ValueError(f"candidate {key} has no search record in this sweep")
        if key not in keys:
            keys.append(key)
    if len(keys) < 2:
        raise ValueError("give at least one candidate path besides the identity")
    return keys


def _item_features(router: Router, model, result, probes, items: list[tuple[str, str]]) -> np.ndarray:
    """Features of the search items (probe, id), from the prompt ids the sweep ran."""
    runner = Runner(model, probes, result.mode, "search", None, result.chat, True, result.thinking,
                    result.think_tokens)
    ids = {}
    for b in runner.batches:
        for it, seq in zip(b.items, b.context_ids):
            ids[(b.probe.name, it.id)] = seq
    missing = [it for it in items if it not in ids]
    if missing:
        raise ValueError(f"search item {missing[0][1]!r} of probe {missing[0][0]!r} is in the records but not in "
                         f"the probe any more")
    return router.features(model, [ids[it] for it in items])


def _fit(x: np.ndarray, y: np.ndarray, w: np.ndarray, table: np.ndarray, pw: np.ndarray, classifier: str,
         C: float | None, fallback: bool, seed: int, combined: np.ndarray) -> dict:
    """The classifier as arrays, with the cross-validation table that chose it. x, y, w, table, pw:
    the informative items' features, labels, sample weights, scores and probe weights;
    combined: each candidate's combined search score (the constant choice takes the best)."""
    mean, scale = x.mean(0) if len(x) else np.zeros(x.shape[1]), x.std(0) if len(x) else np.ones(x.shape[1])
    scale = np.where(scale > 1e-8, scale, 1.0)
    best_const = int(np.argmax(combined))
    constant = {"kind": "constant", "classes": [best_const], "mean": mean, "scale": scale,
                "weights": np.zeros((0, x.shape[1])), "bias": np.zeros(0), "C": None, "cv": {}}
    if len(np.unique(y)) < 2:
        return {**constant, "why": "every informative search item prefers the same candidate" if len(y) else
                "no search item prefers any candidate"}
    z = (x - mean) / scale
    cv = _cross_validate(z, y, w, table, pw, classifier, C, seed)
    options = {k: v for k, v in cv.items() if k != "constant"}
    pick = max(options, key=lambda k: (options[k], -list(options).index(k))) if options else None
    if fallback and (pick is None or options[pick] <= cv.get("constant", -np.inf)):
        return {**constant, "cv": cv, "why": "cross-validation on the search items: routing did not beat the "
                                             "best single candidate"}
    chosen_c = C if C is not None else (float(pick.split("=")[1]) if pick and pick.startswith("C=") else 1.0)
    fitted = _fit_classifier(z, y, w, classifier, chosen_c)
    return {**fitted, "mean": mean, "scale": scale, "C": chosen_c if classifier == "logistic" else None, "cv": cv,
            "why": "cross-validation picked it" if cv else "fitted without cross-validation (too few items)"}


def _fit_classifier(z: np.ndarray, y: np.ndarray, w: np.ndarray, classifier: str, C: float) -> dict:
    classes = np.unique(y)
    if classifier == "centroid":
        cents = np.stack([np.average(z[y == c], axis=0, weights=w[y == c]) for c in classes])
        return {"kind": "centroid", "classes": classes.tolist(), "weights": cents, "bias": np.zeros(len(classes))}
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=5000)
    clf.fit(z, y, sample_weight=w)
    return {"kind": "logistic", "classes": [int(c) for c in clf.classes_], "weights": clf.coef_,
            "bias": clf.intercept_, "sklearn": clf}


def _cross_validate(z, y, w, table, pw, classifier: str, C: float | None, seed: int) -> dict[str, float]:
    """Routed score (probe-weighted mean, as ``combined``) on held-out folds of the informative
    search items, per option ("C=..." or "centroid") and for the constant best candidate of each
    training fold; {} when too few items."""
    folds = min(5, len(y))
    if folds < 2:
        return {}
    from sklearn.model_selection import KFold

    grid = [f"C={c:g}" for c in ((C,) if C is not None else C_GRID)] if classifier == "logistic" else ["centroid"]
    got: dict[str, list[float]] = {k: [] for k in [*grid, "constant"]}
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(z):
        got["constant"].append(pw[test] @ table[test, int(np.argmax(pw[train] @ table[train]))])
        for option in grid:
            if len(np.unique(y[train])) < 2:
                pred = np.full(len(test), y[train][0])
            else:
                fit = _fit_classifier(z[train], y[train], w[train], classifier,
                                      float(option.split("=")[1]) if option.startswith("C=") else 1.0)
                pred = _predict_arrays(fit, z[test])
            got[option].append(pw[test] @ table[test, pred])
    return {k: float(np.sum(v) / pw.sum()) for k, v in got.items()}


def _predict_arrays(fit: dict, z: np.ndarray) -> np.ndarray:
    classes = np.asarray(fit["classes"])
    if fit["kind"] == "centroid":
        return classes[((z[:, None, :] - fit["weights"][None]) ** 2).sum(-1).argmin(1)]
    scores = z @ np.asarray(fit["weights"]).T + fit["bias"]
    return classes[(scores[:, 0] > 0).astype(int)] if scores.shape[1] == 1 else classes[scores.argmax(1)]


def _training_info(result, model, probes, keys, items, labels, keep, fit, selection, by, seed, classifier, table,
                   router: Router, x: np.ndarray) -> dict:
    """What report() says about training: data, labels, the cross-validation table, and the
    in-sample routed score (optimistic: the router saw these items)."""
    counts = {p: sum(1 for q, _ in items if q == p) for p in probes}
    routed = table[:, 0].copy()  # items without a preference score the same on every candidate
    if len(x):
        routed[keep] = table[np.flatnonzero(keep), router.predict(x)]
    per_probe = lambda col: {p: float(np.mean([v for (q, _), v in zip(items, col) if q == p])) for p in probes}  # noqa: E731
    ids = {p: [i for q, i in items if q == p] for p in probes}  # what it saw: never scored as held out
    return {"mode": result.mode, "prompt": "whole", "probes": probes, "items": counts, "item_ids": ids,
            "informative": int(keep.sum()),
            "labels": {keys[c]: int((labels[keep] == c).sum()) for c in range(len(keys))},
            "selection": selection, "by": by,
            "seed": seed, "classifier": classifier, "C": fit.get("C"), "cv": fit.get("cv", {}),
            "fit": fit.get("why", ""), "chat": result.chat, "thinking": bool(result.thinking),
            "results": str(result.path) if result.path else None, "model": str(model.source),
            "fingerprint": model.fingerprint(),
            "in_sample": {"router": per_probe(routed), "candidates": {k: per_probe(table[:, c])
                                                                      for c, k in enumerate(keys)},
                          "oracle": per_probe(table.max(1))}}

