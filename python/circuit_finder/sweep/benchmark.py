"""From sweep to benchmark: lm-eval tasks run along layer paths, kept per sample so that a path's
benchmark delta is paired with the baseline's item by item (``SweepResult.evaluate``).

``run_benchmark`` runs ``lm_eval.simple_evaluate`` through our adapter (``circuit_finder.lm_eval``)
once per layer path, with ``log_samples=True``, and turns each task's logged samples into a
record like a probe's: ``scores[<task>_<metric>][doc id] = 100 * value`` (split ``"benchmark"``),
so the same paired bootstrap CIs, sign-flip p and BH/Holm q apply (columns ``<task>_<metric>_bench...``).

Limits: per-sample metrics that lm-eval aggregates by mean (acc, acc_norm, exact_match, ...);
corpus-level metrics (perplexity, bleu) have no per-sample pairing and are skipped. The first
filter of a task is used (tasks with several filters log each sample once per filter). Needs the
``eval`` extra (``pip install circuit-finder[eval]``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

__all__ = ["BENCHMARK_SPLIT", "benchmark_settings", "run_benchmark", "sample_scores"]

BENCHMARK_SPLIT = "benchmark"
_SKIP = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics", "doc_hash",
         "prompt_hash", "target_hash"}


def benchmark_settings(tasks, limit, metrics, evaluate_kwargs: dict) -> str:
    """A canonical text of what a benchmark record depends on (tasks, limit, metrics, lm-eval
    arguments such as num_fewshot): records of other settings are not reused."""
    return json.dumps({"tasks": list(tasks or []), "limit": limit, "metrics": list(metrics) if metrics else None,
                       "kwargs": {k: evaluate_kwargs[k] for k in sorted(evaluate_kwargs)}}, sort_keys=True, default=str)


def sample_scores(samples: Sequence[dict], metrics: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """One task's logged samples -> {metric: {doc id: 100 * value}} for per-sample numeric metrics
    (all that the samples carry, or ``metrics``), from the first filter the samples name."""
    if not samples:
        return {}
    first = samples[0].get("filter")
    out: dict[str, dict[str, float]] = {}
    for s in samples:
        if s.get("filter") != first:
            continue
        names = metrics or s.get("metrics") or [k for k in s if k not in _SKIP]
        for name in names:
            value = s.get(name)
            if isinstance(value, bool) or isinstance(value, (int, float)):
                out.setdefault(name, {})[str(s["doc_id"])] = 100.0 * float(value)
    return out


def run_benchmark(model, layer_keys: Sequence, tasks: Sequence[str], limit: int | float | None = None,
                  mode: str | None = None, include_path: str | None = None, batch_size: int = 8,
                  metrics: Sequence[str] | None = None, seed: int = 0, **evaluate_kwargs) -> list[dict]:
    """One benchmark record per layer path (path text, or a Router; see the module docstring);
    extra keyword arguments go to ``lm_eval.simple_evaluate`` (num_fewshot, apply_chat_template, ...)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from ..lm_eval import CircuitFinderLM
    except ImportError as e:
        if "lm-eval >=" in str(e):  # installed, but too old: say so rather than "install it"
            raise
        raise ImportError("evaluate() needs lm-eval: pip install 'circuit-finder[eval]'") from e
    manager = TaskManager(include_path=str(include_path)) if include_path else TaskManager()
    records = []
    for key in layer_keys:
        t0 = time.perf_counter()
        lm = CircuitFinderLM(model=model, layers=key, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, log_samples=True, task_manager=manager,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed, **evaluate_kwargs)
        scores = {}
        for task, samples in out["samples"].items():
            for metric, values in sample_scores(samples, metrics).items():
                scores[f"{task}_{metric}"] = values
        if not scores:
            raise ValueError(f"lm-eval logged no per-sample metric for tasks {list(tasks)}")
        records.append({"layers": getattr(key, "key", key), "split": BENCHMARK_SPLIT, "mode": mode, "stage": "evaluate",
                        "tasks": list(tasks), "limit": limit, "scores": scores,
                        "seconds": round(time.perf_counter() - t0, 4)})
    return records
