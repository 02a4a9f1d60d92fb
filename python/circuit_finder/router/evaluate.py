"""The honest reading of a router: held-out items, against the paths one could use instead.

``evaluate_router`` scores the router's candidates and the router itself (each item along its
routed candidate, run for real by the sweep runner) on the probes' held-out validation items —
records appended to the sweep's results file, so a killed evaluation resumes — and compares, per
probe and combined (mean over probes):
- the router vs the baseline (identity path),
- the router vs the best fixed path (the candidate with the best search score: what you would
  use without a router),
- the router vs the best fixed path per probe (each probe's items along the candidate with that
  probe's best search score: what you would use without a router when the task of a prompt is
  known; a router whose gain is only this one tells tasks apart, it does not route within them),
- the router vs the oracle (each item's best candidate in hindsight: the ceiling of routing
  among these candidates),
each a paired difference over items with a 95% bootstrap CI and a sign-flip p
(``results.paired_stats``, the sweep tables' statistics). ``reading`` words it (Router.report).

The candidates' held-out records are ordinary validation records of the sweep: they join its
``_val`` columns and the family its held-out q-values adjust over (every config scored on
held-out items counts). Limits: the oracle and the best fixed paths are chosen among the
router's candidates and read from the candidates' own held-out runs; the router's score from its routed run (the report counts the items where the two disagree — batch
composition can change a greedy token on near-ties).
"""

from __future__ import annotations

import numpy as np

from ..layer_path import LayerPath
from ..results import paired_stats
from ..sweep.configs import SweepConfig
from .core import Router, RouterError
from .run import RouterConfig

__all__ = ["best_fixed", "best_per_probe", "candidate_configs", "evaluate_router"]


def candidate_configs(router: Router) -> list[SweepConfig]:
    """The router's candidates as sweep configs."""
    return [SweepConfig.of(p, router.num_layers) for p in router.candidates]


def evaluate_router(router: Router, result, model=None, probes=None, progress: bool = True, n_boot: int = 2000,
                    seed: int = 0) -> dict:
    """Runs the candidates and the router on held-out items (through ``result``'s runner and
    file), sets and returns ``router.evaluation``."""
    model = model or result.model
    if model is None:
        raise ValueError("evaluating a router needs the model: pass model=circuit_finder.load(...)")
    router.check(model)
    constant = router.kind == "constant"  # every item along one candidate: its own run is the routed run
    base = SweepConfig.of(LayerPath.identity(router.num_layers), router.num_layers)  # (not always a candidate)
    configs = candidate_configs(router) + ([] if constant else [RouterConfig(router)])
    configs = ([] if any(c.key == base.key for c in configs) else [base]) + configs
    result.run_held_out(configs, model, probes, progress, "router")
    val = result.configs("validation", routers=True)
    keys = [str(c) for c in router.candidates]
    routed = _constant_record(val[keys[router.classes[0]]], keys[router.classes[0]]) if constant else val[router.key]
    names = [p for p in routed["scores"] if all(p in val[k]["scores"] for k in keys)]
    base_key = base.key
    best_key = best_fixed(router, result)
    per_probe = best_per_probe(router, result, names)
    scores = {"baseline": _scores(val[base_key], names), "best_fixed": _scores(val[best_key], names),
              "best_per_probe": {p: dict(val[per_probe[p]]["scores"][p]) for p in names},
              "router": _scores(routed, names),
              "oracle": {p: {i: max(val[k]["scores"][p][i] for k in keys) for i in routed["scores"][p]}
                         for p in names}}
    rows = {role: {"scores": s} for role, s in scores.items()}
    means = {role: _means(s) for role, s in scores.items()}
    means["candidates"] = {k: _means(_scores(val[k], names)) for k in keys}
    versus = {}
    for other in ("baseline", "best_fixed", "best_per_probe", "oracle"):
        stats = paired_stats({"router": rows["router"], other: rows[other]}, other, names, n_boot, seed)["router"]
        versus[other] = {k: v for k, v in stats.items() if k.endswith(("_delta", "_ci_low", "_ci_high", "_p"))}
    routes = [(p, i, k) for p in names for i, k in (routed.get("routes") or {}).get(p, {}).items()]
    same = sum(1 for p, i, k in routes if val[k]["scores"][p].get(i) == routed["scores"][p][i])
    router.evaluation = {
        "items": {p: len(scores["router"][p]) for p in names}, "baseline": base_key, "best_fixed": best_key,
        "best_per_probe": per_probe,
        "means": means, "versus": versus, "n_boot": n_boot, "seed": seed,
        "choices": {k: sum(1 for _, _, c in routes if c == k) for k in keys},
        "agreement": {"items": len(routes), "same": same},
        # every router read on these held-out items (its records in this results file): keeping the
        # best of several readings is a selection the verdict adjusts for
        "routers_tried": len({k for k in val if k.startswith("router:")} | {router.key}),
        "results": str(result.path) if result.path else None, "router": router.key}
    return router.evaluation


def _constant_record(record: dict, key: str) -> dict:
    """A constant router's held-out record: its one candidate's, every item routed there."""
    return {"scores": record["scores"], "routes": {p: {i: key for i in v} for p, v in record["scores"].items()}}


def best_fixed(router: Router, result) -> str:
    """The candidate with the best combined search score (what one would run without a router)."""
    means = _search_means(router, result)
    keys = list(means)
    return max(keys, key=lambda k: (float(np.mean(list(means[k].values()))), -keys.index(k)))


def best_per_probe(router: Router, result, names=None) -> dict[str, str]:
    """Per probe (``names``, default the router's training probes), the candidate with that
    probe's best search score: what one would run without a router when a prompt's task is known.
    A probe without search records takes the best fixed path."""
    means = _search_means(router, result, names)
    keys = list(means)
    fallback = best_fixed(router, result)
    return {p: max(keys, key=lambda k: (means[k][p], -keys.index(k))) if p in means[keys[0]] else fallback
            for p in names or _training_probes(router, result)}


def _training_probes(router: Router, result) -> list[str]:
    return router.training.get("probes") or result.probe_names("search")


def _search_means(router: Router, result, names=None) -> dict[str, dict[str, float]]:
    """Each candidate's mean search score per probe (``names`` that every candidate has search
    records of; default the training probes), RouterError when a candidate was not swept."""
    search = result.configs("search")
    keys = [str(c) for c in router.candidates]
    missing = [k for k in keys if k not in search]
    if missing:
        raise RouterError(f"router {router.name!r}: candidate {missing[0]} has no search record in "
                          f"{result.path or 'this sweep'}; evaluate a router against the sweep it was trained on")
    wanted = list(names or _training_probes(router, result))
    names = [p for p in wanted if all(search[k]["scores"].get(p) for k in keys)]
    if not names:
        raise RouterError(f"router {router.name!r}: no probe of {wanted} has search records for every candidate in "
                          f"{result.path or 'this sweep'}")
    return {k: {p: float(np.mean(list(search[k]["scores"][p].values()))) for p in names} for k in keys}


def _scores(record: dict, names) -> dict:
    return {p: dict(record["scores"][p]) for p in names}


def _means(scores: dict) -> dict:
    out = {p: float(np.mean(list(v.values()))) for p, v in scores.items()}
    out["combined"] = float(np.mean(list(out.values())))
    return out
