"""Sweeps spread over a Ray cluster: configs fanned out to workers, records streamed back.

``RayExecutor`` runs what ``run_configs`` would run locally, on Ray actors (Ray schedules them;
we only hand out work):
- one model per worker: each actor loads the driver's model file (same path, dtype, device kind and
  load options: quantize, dequantize, activations, fuse_projections; its fingerprint, dtype,
  quantization, activations and device kinds are checked against the driver's) once, and builds
  a sweep Runner per stage (search, refine, each beam round, validate: the workers stay up
  between the stages of one ``sweep()`` or ``validate()``, inside ``session()``, and are freed
  at its end); CPU workers get ``threads`` CPUs each, CUDA workers one GPU each — or, for a model
  split over devices (``device_map``), as many GPUs as the driver's placement uses, with the
  same layers on each (the driver's plan, its GPUs renumbered to the worker's own);
- prefix reuse kept: configs are grouped by how many first slots they share with the identity
  path, and a group goes to one worker, one config at a time (the worker's Runner keeps the
  identity prefix between calls);
- the driver alone writes the results file: each record is appended (fsynced) as it comes back,
  so resume works exactly as for a local sweep;
- a worker that dies (or that Ray reports unavailable, or that spends over ``config_timeout``
  seconds on one config: hung; it is killed) loses at most its config in flight: that config and
  the rest of its group go back to the front of the queue, a replacement worker is started (up to
  ``max_restarts``), and every config is recorded exactly once.

Limits: the model file must be readable at the same (absolute) path on every node; probes travel to the
workers by pickling (built-in names, .jsonl paths or Probe objects that pickle).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections import deque
from collections.abc import Sequence

import torch

from ..placement import Placement
from .runner import check_probes, context_digest, model_setup, resolve_probes

__all__ = ["RayExecutor", "worker_placement"]


class SweepWorker:
    """The work of one Ray actor: a model, and a Runner per stage, scoring one config per call."""

    def __init__(self, source: str, dtype: str, device: str, threads: int, device_map=None,
                 load_options: dict | None = None):
        from ..loading import load

        if threads:
            torch.set_num_threads(threads)
        self.model = load(source, device=device, dtype=dtype, device_map=device_map, **(load_options or {}))
        self.runner = None

    def identity(self) -> dict:
        return {"setup": model_setup(self.model), "pid": os.getpid(), "num_layers": self.model.num_layers}

    def prepare(self, probes, mode: str, split: str, max_items, chat, reuse: bool, thinking: bool, think_tokens: int,
                stage: str) -> str:
        """The Runner of a stage (its probes' items encoded once); returns ``context_digest`` of the
        prompts this worker writes, for the driver to compare with its own."""
        from .runner import Runner, resolve_probes

        probes = resolve_probes(probes)
        self.runner = Runner(self.model, probes, mode, split, max_items, chat, reuse, thinking, think_tokens, stage)
        return context_digest(self.model, probes, split, max_items, chat, thinking)

    def run(self, config) -> dict:
        return self.runner.run(config)


def worker_placement(placement: Placement) -> tuple[Placement | None, int]:
    """(the placement a worker loads with, GPUs per worker) for the driver's. A worker sees its own
    GPUs as cuda:0.. (Ray sets CUDA_VISIBLE_DEVICES), so the driver's GPUs are renumbered in order;
    the plan is the driver's (its budgets were checked there, against max_memory if given), not
    planned again against the worker's free memory. An unsplit model needs none."""
    gpus = sorted({d.index or 0 for d in placement.devices if d.type == "cuda"})
    if not placement.split:
        return None, len(gpus)
    local = {g: torch.device("cuda", k) for k, g in enumerate(gpus)}

    def mine(d: torch.device) -> torch.device:
        return local[d.index or 0] if d.type == "cuda" else d

    need = tuple((str(mine(torch.device(name))), n) for name, n in placement.need)
    return Placement(tuple(mine(d) for d in placement.layers), mine(placement.main), need), len(gpus)


class RayExecutor:
    """Runs sweep configs on Ray actors (see the module docstring).

    address: a Ray cluster ("auto", "ray://host:10001", ...) — None connects to the running Ray
    of this process or starts a local one. workers: how many actors (default: one per GPU for a
    CUDA model, else the cluster's CPUs // threads). threads: CPU threads per CPU worker
    (default: the cluster's CPUs // workers when workers is given, else this process's torch
    threads). max_restarts: replacement workers started per session (a sweep, its stages and
    validate). start_timeout: seconds a worker may take to start and load the model.
    config_timeout: seconds a worker may spend on one config (or on preparing a stage) before it
    is taken for hung, killed and replaced, the config run again elsewhere (None: no limit; set it
    well above a config's time, a first config's prefix included).
    """

    def __init__(self, address: str | None = None, workers: int | None = None, threads: int | None = None,
                 max_restarts: int = 4, start_timeout: float = 900.0, config_timeout: float | None = None):
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if config_timeout is not None and not config_timeout > 0:
            raise ValueError(f"config_timeout must be None or > 0 seconds, got {config_timeout}")
        self.address, self.workers, self.max_restarts = address, workers, max_restarts
        self.threads, self.start_timeout, self.config_timeout = threads, start_timeout, config_timeout
        self.actors: list = []  # the live actors (tests kill one mid-sweep)
        self.started = 0  # workers the last session (or run outside one) started, replacements not counted
        self.pids: list[int] = []  # the process ids of the workers it started, replacements included
        self.restarts = 0  # workers replaced in the current session (max_restarts bounds it)
        self._depth = 0  # open sessions: while > 0, workers stay up between runs
        self._loaded: tuple | None = None  # (load arguments, setup) the live actors were started with
        self._prompts = ""  # context_digest of the current stage's prompts, as this process writes them

    @contextlib.contextmanager
    def session(self):
        """Keeps the workers up between the runs inside it (sweep() holds one over its stages and
        validate(); nested sessions share it) and frees them at the outermost end."""
        if self._depth == 0:
            self.started, self.pids, self.restarts = 0, [], 0
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.close()

    def close(self) -> None:
        """Frees the workers (their CPUs or GPUs)."""
        ray = self._ray_if_up()
        for actor in self.actors:
            if ray is not None:
                ray.kill(actor, no_restart=True)
        self.actors, self._loaded = [], None

    @staticmethod
    def _ray_if_up():
        try:
            import ray
        except ImportError:
            return None
        return ray if ray.is_initialized() else None

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
        on the driver for each finished config, exactly once per config. It is a ``session()`` of
        its own: inside an open one the workers are kept for the next run (and freed if it fails);
        outside, they are freed when it returns."""
        with self.session():
            self._run(model, probes, configs, on_record, worker_args)

    def _run(self, model, probes, configs: Sequence, on_record, worker_args: dict) -> None:
        options = {k: v for k, v in model.load_options.items() if k != "from_file"}
        if not model.load_options.get("from_file"):
            raise ValueError(f"a Ray sweep loads the model again in each worker from its file, and this model "
                             f"({model.source}) was not made by circuit_finder.load: load it with load() to sweep "
                             f"it on Ray, or run the sweep in this process")
        check_probes(model, probes, worker_args["mode"], worker_args["split"], worker_args["max_items"])
        ray = self._ray()
        device_map, gpus = worker_placement(model.placement)
        n = model.num_layers
        groups: deque = deque()
        for c in configs:
            if groups and groups[-1][0].shared_prefix(n) == c.shared_prefix(n):
                groups[-1].append(c)
            else:
                groups.append([c])
        workers, threads = self._plan(ray, gpus)
        source = os.path.abspath(model.source) if os.path.exists(str(model.source)) else str(model.source)
        args = dict(source=source, dtype=str(model.dtype).replace("torch.", ""),
                    device="cuda" if gpus else "cpu", threads=threads, device_map=device_map, load_options=options)
        want = model_setup(model)
        if self._loaded is not None and self._loaded != (repr(args), repr(want)):
            self.close()  # another model or load: new workers
        self._loaded = (repr(args), repr(want))
        remote = ray.remote(num_gpus=gpus, num_cpus=1)(SweepWorker) if gpus else ray.remote(num_cpus=threads)(SweepWorker)
        stage = (probes, *(worker_args[k] for k in ("mode", "split", "max_items", "chat", "reuse", "thinking",
                                                     "think_tokens", "stage")))
        self._prompts = context_digest(model, resolve_probes(probes), *(worker_args[k] for k in (
            "split", "max_items", "chat", "thinking")))
        try:
            more = min(workers, len(groups)) - len(self.actors)
            if more > 0:
                self.actors += self._start(ray, remote, args, want, more)
                self.started += more
            for actor, done in [(a, a.prepare.remote(*stage)) for a in self.actors]:
                try:
                    self._check_prompts(ray.get(done, timeout=self.config_timeout), args["source"])
                except (*_died(ray), ray.exceptions.GetTimeoutError):  # gone or hung between stages: replaced
                    self._replace(ray, remote, args, want, stage, actor, {})
            self._drive(ray, remote, args, want, stage, groups, on_record)
        except BaseException:  # the workers hold CPUs or GPUs: free them for other jobs
            self.close()
            raise

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
        self.pids += [got["pid"] for got in found]
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

    def _drive(self, ray, remote, args: dict, want, stage: tuple, groups: deque, on_record) -> None:
        died = _died(ray)
        current = {id(a): deque() for a in self.actors}
        inflight: dict = {}  # ref -> (actor, config, when it was handed out)

        def feed(actor) -> None:
            if not current[id(actor)] and groups:
                current[id(actor)] = deque(groups.popleft())
            if current[id(actor)]:
                config = current[id(actor)].popleft()
                inflight[actor.run.remote(config)] = (actor, config, time.monotonic())

        def lost(actor, config) -> None:  # nothing of its group was recorded: back to the front
            groups.appendleft([config, *current.pop(id(actor))])
            self._replace(ray, remote, args, want, stage, actor, current)
            busy = {id(a) for a, _, _ in inflight.values()}
            for idle in [a for a in self.actors if id(a) not in busy]:
                feed(idle)

        for actor in self.actors:
            feed(actor)
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=self._patience(inflight), fetch_local=False)
            if not done:
                hung = self._overdue(inflight)
                if hung is not None:
                    actor, config, _ = inflight.pop(hung)
                    warnings.warn(f"a Ray worker spent over {self.config_timeout:g} s on config {config}: taken for "
                                  f"hung, killed and replaced; the config runs again", stacklevel=2)
                    lost(actor, config)
                continue
            actor, config, _ = inflight.pop(done[0])
            try:
                record = ray.get(done[0])
            except died:
                lost(actor, config)
                continue
            on_record(record)
            feed(actor)

    def _patience(self, inflight: dict) -> float | None:
        """Seconds until the oldest config in flight is overdue (None: no config_timeout)."""
        if self.config_timeout is None:
            return None
        oldest = min(when for _, _, when in inflight.values())
        return max(0.0, oldest + self.config_timeout - time.monotonic())

    def _overdue(self, inflight: dict):
        """The ref of the oldest config in flight if it is past config_timeout, else None."""
        ref = min(inflight, key=lambda r: inflight[r][2])
        return ref if time.monotonic() - inflight[ref][2] >= self.config_timeout else None

    def _replace(self, ray, remote, args: dict, want, stage: tuple, dead, current: dict) -> None:
        """Kills a dead (or unavailable) actor, freeing its CPUs or GPUs, and starts another for
        this stage (RuntimeError past max_restarts)."""
        ray.kill(dead, no_restart=True)
        self.actors = [a for a in self.actors if a is not dead]
        if self.restarts >= self.max_restarts:
            raise RuntimeError(f"Ray workers died or hung {self.restarts + 1} times; the sweep stops here (finished "
                               f"configs are in the results file: resume to go on)")
        self.restarts += 1
        actor = self._start(ray, remote, args, want, 1)[0]
        self.actors.append(actor)
        self._check_prompts(ray.get(actor.prepare.remote(*stage), timeout=self.start_timeout), args["source"])
        current[id(actor)] = deque()

    def _check_prompts(self, got: str, source: str) -> None:
        """ValueError when a worker's prompts (its tokenizer, chat template) are not this process's."""
        if got != self._prompts:
            raise ValueError(f"a Ray worker writes other prompts than this process: the tokenizer or chat template it "
                             f"loaded from {source} differs from this model's (one set on model.tokenizer here does "
                             f"not reach workers: save it with the model's files, or sweep in this process)")


def _died(ray) -> tuple:
    """The exceptions by which Ray says an actor is gone (or unavailable: treated alike)."""
    rex = ray.exceptions
    return tuple(getattr(rex, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError") if hasattr(rex, n))
