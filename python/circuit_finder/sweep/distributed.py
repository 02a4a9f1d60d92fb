"""Sweeps spread over a Ray cluster: configs fanned out to workers, records streamed back.

``RayExecutor`` runs what ``run_configs`` would run locally, on Ray actors (Ray schedules them;
we only hand out work):
- one model per worker: each actor loads the driver's model file (same path, dtype, device kind and
  load options: quantize, dequantize, activations, fuse_projections; its fingerprint, dtype,
  quantization and activations are checked against the driver's) and builds the sweep Runner once;
  CPU workers get ``threads`` CPUs each, CUDA workers one GPU each — or, for a model split over
  devices (``device_map``), as many GPUs as the driver's placement uses, with the same layers on
  each (the driver's GPUs renumbered to the worker's own);
- prefix reuse kept: configs are grouped by how many first slots they share with the identity
  path, and a group goes to one worker, one config at a time (the worker's Runner keeps the
  identity prefix between calls);
- the driver alone writes the results file: each record is appended (fsynced) as it comes back,
  so resume works exactly as for a local sweep;
- a worker that dies loses at most its config in flight: that config and the rest of its group
  go back to the front of the queue, a replacement worker is started (up to ``max_restarts``),
  and every config is recorded exactly once.

Limits: the model file must be readable at the same path on every node; probes travel to the
workers by pickling (built-in names, .jsonl paths or Probe objects that pickle).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence

import torch

from .runner import model_setup

__all__ = ["RayExecutor", "worker_placement"]


class SweepWorker:
    """The work of one Ray actor: a model and a Runner, scoring one config per call."""

    def __init__(self, source: str, dtype: str, device: str, probes, mode: str, split: str, max_items, chat,
                 reuse: bool, thinking: bool, think_tokens: int, stage: str, threads: int, device_map=None,
                 load_options: dict | None = None):
        from ..loading import load
        from .runner import Runner, resolve_probes

        if threads:
            torch.set_num_threads(threads)
        self.model = load(source, device=device, dtype=dtype, device_map=device_map, **(load_options or {}))
        self.runner = Runner(self.model, resolve_probes(probes), mode, split, max_items, chat, reuse, thinking,
                             think_tokens, stage)

    def identity(self) -> dict:
        return {"setup": model_setup(self.model), "pid": os.getpid(), "num_layers": self.model.num_layers}

    def run(self, config) -> dict:
        return self.runner.run(config)


def worker_placement(placement) -> tuple[dict[int, str] | None, int]:
    """(the device_map a worker loads with, GPUs per worker) for the driver's placement. A worker
    sees its own GPUs as cuda:0.. (Ray sets CUDA_VISIBLE_DEVICES), so the driver's GPUs are
    renumbered in order; an unsplit model needs no map."""
    gpus = sorted({d.index or 0 for d in placement.devices if d.type == "cuda"})
    if not placement.split:
        return None, len(gpus)
    local = {g: f"cuda:{k}" for k, g in enumerate(gpus)}
    return {i: local[d.index or 0] if d.type == "cuda" else "cpu" for i, d in enumerate(placement.layers)}, len(gpus)


class RayExecutor:
    """Runs sweep configs on Ray actors (see the module docstring).

    address: a Ray cluster ("auto", "ray://host:10001", ...) — None connects to the running Ray
    of this process or starts a local one. workers: how many actors (default: one per GPU for a
    CUDA model, else the cluster's CPUs // threads). threads: CPU threads per CPU worker
    (default: the cluster's CPUs // workers when workers is given, else this process's torch
    threads). max_restarts: replacement workers started in all. start_timeout: seconds a worker
    may take to start and load the model.
    """

    def __init__(self, address: str | None = None, workers: int | None = None, threads: int | None = None,
                 max_restarts: int = 4, start_timeout: float = 900.0):
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.address, self.workers, self.max_restarts = address, workers, max_restarts
        self.threads, self.start_timeout = threads, start_timeout
        self.actors: list = []  # the live actors while a run goes on (tests kill one mid-sweep)
        self.started = 0  # workers the last run started (replacements not counted)
        self.restarts = 0

    def _ray(self):
        try:
            import ray
        except ImportError as e:
            raise ImportError("executor='ray' needs Ray: pip install 'circuit-finder[ray]'") from e
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False)
        return ray

    def _plan(self, ray, per_worker: int) -> tuple[int, int]:
        """(workers, CPU threads each) for workers of ``per_worker`` GPUs each (0: CPU workers),
        refused when the cluster cannot hold them all at once."""
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if per_worker:
            workers = self.workers or max(1, gpus // per_worker)
            if workers * per_worker > gpus:
                raise ValueError(f"{workers} CUDA workers of {per_worker} GPU(s) each need {workers * per_worker} GPUs; "
                                 f"the Ray cluster has {gpus}")
            return workers, 0
        threads = self.threads or (max(1, cpus // self.workers) if self.workers else torch.get_num_threads())
        workers = self.workers or max(1, cpus // threads)
        if workers * threads > cpus:
            raise ValueError(f"{workers} workers x {threads} threads need {workers * threads} CPUs; the Ray cluster "
                             f"has {cpus} (pass fewer workers or threads)")
        return workers, threads

    def run(self, model, probes, configs: Sequence, on_record, worker_args: dict) -> None:
        """Runs ``configs`` (in shared-prefix order) on the actors; ``on_record(record)`` is called
        on the driver for each finished config, exactly once per config."""
        options = {k: v for k, v in model.load_options.items() if k != "from_file"}
        if not model.load_options.get("from_file"):
            raise ValueError(f"a Ray sweep loads the model again in each worker from its file, and this model "
                             f"({model.source}) was not made by circuit_finder.load: load it with load() to sweep "
                             f"it on Ray, or run the sweep in this process")
        ray = self._ray()
        device_map, gpus = worker_placement(model.placement)
        cuda = gpus > 0
        n = model.num_layers
        groups: deque = deque()
        for c in configs:
            if groups and groups[-1][0].shared_prefix(n) == c.shared_prefix(n):
                groups[-1].append(c)
            else:
                groups.append([c])
        workers, threads = self._plan(ray, gpus)
        args = dict(source=str(model.source), dtype=str(model.dtype).replace("torch.", ""),
                    device="cuda" if cuda else "cpu", probes=probes, threads=threads, device_map=device_map,
                    load_options=options, **worker_args)
        remote = ray.remote(num_gpus=gpus, num_cpus=1)(SweepWorker) if cuda else ray.remote(num_cpus=threads)(SweepWorker)
        want = model_setup(model)
        self.actors = self._start(ray, remote, args, want, min(workers, len(groups)))
        self.started = len(self.actors)
        try:
            self._drive(ray, remote, args, want, groups, on_record)
        finally:  # the workers hold CPUs or GPUs: free them for the next stage (validate) or other jobs
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []

    def _start(self, ray, remote, args: dict, want, count: int) -> list:
        """``count`` new actors, started together; each has loaded the driver's model file."""
        actors = [remote.remote(**args) for _ in range(count)]
        try:
            found = ray.get([a.identity.remote() for a in actors], timeout=self.start_timeout)
        except Exception as e:  # too slow, or a worker failed to load the model: free them all
            for a in actors:
                ray.kill(a)
            if isinstance(e, ray.exceptions.GetTimeoutError):
                raise RuntimeError(f"Ray workers did not start within {self.start_timeout:.0f} s (not enough free "
                                   f"CPUs or GPUs in the cluster, or the model loads slowly: see start_timeout)") from None
            raise
        for got in found:
            differ = {k: (v, got["setup"].get(k)) for k, v in want.items() if got["setup"].get(k) != v}
            if differ:
                for b in actors:
                    ray.kill(b)
                what = ("reads another model file" if "fingerprint" in differ else
                        "loaded the model otherwise (" + ", ".join(f"{k}: {w!r} here, {g!r} there"
                                                                  for k, (w, g) in differ.items()) + ")")
                raise ValueError(f"a Ray worker (pid {got['pid']}) {what} at {args['source']}: every node needs "
                                 f"the same file at the same path, and the same build and CPU features")
        return actors

    def _drive(self, ray, remote, args: dict, want, groups: deque, on_record) -> None:
        import ray.exceptions as rex

        died = tuple(getattr(rex, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError")
                     if hasattr(rex, n))
        current = {id(a): deque() for a in self.actors}
        inflight: dict = {}

        def feed(actor) -> None:
            if not current[id(actor)] and groups:
                current[id(actor)] = deque(groups.popleft())
            if current[id(actor)]:
                config = current[id(actor)].popleft()
                inflight[actor.run.remote(config)] = (actor, config)

        for actor in self.actors:
            feed(actor)
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1)
            actor, config = inflight.pop(done[0])
            try:
                record = ray.get(done[0])
            except died:
                groups.appendleft([config, *current.pop(id(actor))])  # nothing of it was recorded
                self._replace(ray, remote, args, want, actor, current)
                busy = {id(a) for a, _ in inflight.values()}
                for idle in [a for a in self.actors if id(a) not in busy]:
                    feed(idle)
                continue
            on_record(record)
            feed(actor)

    def _replace(self, ray, remote, args: dict, want, dead, current: dict) -> None:
        """Drops a dead actor and starts another (RuntimeError past max_restarts)."""
        self.actors = [a for a in self.actors if a is not dead]
        if self.restarts >= self.max_restarts:
            raise RuntimeError(f"Ray workers died {self.restarts + 1} times; the sweep stops here (finished "
                               f"configs are in the results file: resume to go on)")
        self.restarts += 1
        actor = self._start(ray, remote, args, want, 1)[0]
        self.actors.append(actor)
        current[id(actor)] = deque()
