"""A router's reading in words and as a table: what it was trained on, and — once evaluated — its
held-out score against the baseline, the best fixed path, the best fixed path per probe and the
oracle (``Router.report``, ``Router.evaluation_table``). Reads only the router's ``training`` and
``evaluation`` dicts, so a router loaded from its file reports exactly what was found when it was
trained (one evaluated before the per-probe comparison existed reports without it).
"""

from __future__ import annotations

import numpy as np

__all__ = ["ROLES", "evaluation_table", "report"]

ROLES = ("baseline", "best_fixed", "best_per_probe", "router", "oracle")


def evaluation_table(router):
    """A pandas table of the held-out means: one row per role (baseline, best fixed, best fixed per
    probe, router, oracle) and per candidate, a column per probe and combined."""
    import pandas as pd

    ev = _require(router)
    layers = {"baseline": ev["baseline"], "best_fixed": ev["best_fixed"], "router": ev["router"],
              "best_per_probe": _per_probe_text(ev.get("best_per_probe", {})), "oracle": "best candidate per item"}
    rows = [{"role": role, "layers": layers[role], **ev["means"][role]} for role in ROLES if role in ev["means"]]
    rows += [{"role": "candidate", "layers": k, **m} for k, m in ev["means"]["candidates"].items()]
    return pd.DataFrame(rows)


def _per_probe_text(paths: dict) -> str:
    return "; ".join(f"{p}: {k}" for p, k in paths.items())


def _require(router) -> dict:
    if not router.evaluation:
        raise ValueError(f"router {router.name!r} has not been evaluated on held-out items: "
                         f"circuit_finder.router.evaluate.evaluate_router(router, result)")
    return router.evaluation


def report(router) -> str:
    """The router's training and held-out reading in words and numbers."""
    lines = _report_training(router)
    if not router.evaluation:
        return "\n".join([*lines, "Not evaluated on held-out items: in-sample numbers cannot tell routing from "
                                  "overfitting (train_router(..., evaluate=True))."])
    return "\n".join([*lines, *_report_held_out(router)])


def _report_training(router) -> list[str]:
    t = router.training or {}
    kind = {"logistic": f"logistic regression (C={t.get('C')})", "centroid": "nearest centroid",
            "constant": f"a constant choice ({router.candidates[router.classes[0]]})"}[router.kind]
    reused = sum(router.reuses(c) for c in range(len(router.candidates)))
    lines = [f"Router {router.name!r} ({router.key}): {len(router.candidates)} candidates "
             f"[{', '.join(map(str, router.candidates))}]; {kind} on the {router.pooling}-pooled hidden state "
             f"entering layer {router.layer} ({reused} of {len(router.candidates)} candidates go on from that "
             f"identity prefix)."]
    if not t:
        return lines
    items = ", ".join(f"{p} {n}" for p, n in t.get("items", {}).items())
    labels = ", ".join(f"{k} {v}" for k, v in t.get("labels", {}).items())
    lines.append(f"Trained on search items ({items}), mode={t.get('mode')}: {t.get('informative')} prefer some "
                 f"candidate (best-candidate labels: {labels}); the rest score the same on every candidate.")
    if t.get("cv"):
        cv = ", ".join(f"{k} {v:.2f}" for k, v in t["cv"].items())
        lines.append(f"  Cross-validated routed score on those items: {cv} -> {t.get('fit')}.")
    elif t.get("fit"):
        lines.append(f"  {t['fit']}.")
    ins = t.get("in_sample")
    if ins:
        comb = {k: float(np.mean(list(v.values()))) for k, v in
                (("router", ins["router"]), ("oracle", ins["oracle"]))}
        best = max(float(np.mean(list(v.values()))) for v in ins["candidates"].values())
        lines.append(f"  In-sample (items it was fitted to; optimistic): router {comb['router']:.2f}, best "
                     f"candidate {best:.2f}, oracle {comb['oracle']:.2f} (combined).")
    return lines


def _report_held_out(router) -> list[str]:
    ev = router.evaluation
    m, v = ev["means"], ev["versus"]
    items = ", ".join(f"{p} {n}" for p, n in ev["items"].items())
    total = max(1, sum(ev["choices"].values()))
    routes = ", ".join(f"{k} {100 * c / total:.0f}%" for k, c in ev["choices"].items())
    lines = [f"Held-out items no training saw ({items}); combined = mean over probes:",
             f"  baseline {ev['baseline']}: {m['baseline']['combined']:.2f}",
             f"  best fixed path (best search score) {ev['best_fixed']}: {m['best_fixed']['combined']:.2f}"]
    if "best_per_probe" in m:
        lines.append(f"  best fixed path per probe (best search score on each; needs the task known): "
                     f"{m['best_per_probe']['combined']:.2f} ({_per_probe_text(ev['best_per_probe'])})")
    lines += [f"  router: {m['router']['combined']:.2f} (routes: {routes})",
              f"  oracle (each item's best candidate, in hindsight): {m['oracle']['combined']:.2f}"]
    for other, label in (("baseline", "baseline"), ("best_fixed", "best fixed"),
                         ("best_per_probe", "best fixed per probe"), ("oracle", "oracle")):
        if other not in v:
            continue
        s = v[other]
        lines.append(f"  router - {label}: {s['combined_delta']:+.2f} (95% paired bootstrap CI "
                     f"{s['combined_ci_low']:+.2f} to {s['combined_ci_high']:+.2f}), p={s['combined_p']:.3g}")
    lines.append("  " + _verdict(v["best_fixed"], v["oracle"], int(ev.get("routers_tried", 1)), v.get("best_per_probe")))
    agree = ev["agreement"]
    if agree["items"] and agree["same"] < agree["items"]:
        lines.append(f"  Check: {agree['items'] - agree['same']} of {agree['items']} items scored differently in the "
                     f"routed run than in their candidate's own run (batch composition changed a near-tie).")
    return lines


def _verdict(best: dict, oracle: dict, tried: int = 1, per_probe: dict | None = None) -> str:
    """The reading against the best fixed path, by the sign-flip test's p (a bootstrap CI is too
    narrow on few items), Bonferroni-adjusted over the ``tried`` routers read on these items; then,
    when the router wins, whether it also beats a fixed path per probe (routing within tasks) or
    only tells the tasks apart."""
    p = min(1.0, best["combined_p"] * tried)
    if p < 0.05 and best["combined_delta"] > 0:
        head = f"The router beats the best fixed path on held-out items (p={p:.3g})."
    elif p < 0.05 and best["combined_delta"] < 0:
        head = f"The router is worse than the best fixed path on held-out items (p={p:.3g}): use the fixed path."
    else:
        head = (f"No evidence the router beats the best fixed path (p={p:.3g}): the fixed path is the "
                "simpler choice.")
    if tried > 1:
        head += (f" (p is {tried} x the test's {best['combined_p']:.3g}, Bonferroni over the {tried} routers read on "
                 f"these held-out items in this results file: keeping the best of several readings is a selection.)")
    if per_probe is not None and p < 0.05 and best["combined_delta"] > 0:
        head += " " + _per_probe_verdict(per_probe, tried)
    return (f"{head} The oracle gap ({-oracle['combined_delta']:.2f} points) is what a perfect choice among these "
            f"candidates would add: the headroom, not an achievable result.")


def _per_probe_verdict(per_probe: dict, tried: int) -> str:
    p = min(1.0, per_probe["combined_p"] * tried)
    if p < 0.05 and per_probe["combined_delta"] > 0:
        return f"It also beats a fixed path per probe (p={p:.3g}): it routes within tasks, not only between them."
    return (f"Against a fixed path per probe it is {per_probe['combined_delta']:+.2f} (p={p:.3g}): no evidence it "
            "routes within tasks; its gain is telling the tasks apart, which needs no router when a prompt's task "
            "is known.")
