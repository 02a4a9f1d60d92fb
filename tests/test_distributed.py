"""Sweeps on a local Ray cluster (issue #17): two workers give the records of a local run, resume
reruns nothing, and killing a worker mid-sweep loses nothing (every config recorded exactly once)."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

ray = pytest.importorskip("ray")

import circuit_finder as cf  # noqa: E402
from circuit_finder.results import read_records  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def _by_config(path):
    records = [r for r in read_records(path)[1] if r.get("split") == "search"]
    keys = [r["layers"] for r in records]
    assert len(keys) == len(set(keys)), "a config was recorded twice"
    return {r["layers"]: r for r in records}


def _same(local: dict, dist: dict, mode: str) -> None:
    assert set(local) == set(dist)
    for key, r in local.items():
        assert dist[key]["scores"] == r["scores"], key
        if mode == "generate":
            assert dist[key]["outputs"] == r["outputs"], key
        else:
            for p, margins in r["margins"].items():
                for i, v in margins.items():
                    assert dist[key]["margins"][p][i] == pytest.approx(v, abs=1e-4), (key, p, i)


def test_ray_sweep_gives_the_local_records(chat_model, tmp_path, cluster):
    kw = dict(probes=["math", "reasoning"], strategy="scan", mode="likelihood", max_items=3, progress=False)
    cf.sweep(chat_model, results=tmp_path / "local.jsonl", **kw)
    ex = cf.RayExecutor(workers=2, threads=1)
    cf.sweep(chat_model, results=tmp_path / "ray.jsonl", executor=ex, **kw)
    local, dist = _by_config(tmp_path / "local.jsonl"), _by_config(tmp_path / "ray.jsonl")
    print(f"{len(dist)} configs on {ex.started} workers")
    assert len(dist) == 22 and ex.started == 2 and not ex.actors  # the workers are released after the run
    _same(local, dist, "likelihood")
    lines = (tmp_path / "ray.jsonl").read_text()
    again = cf.sweep(chat_model, results=tmp_path / "ray.jsonl", executor=ex, **kw)  # resume: nothing to run
    assert (tmp_path / "ray.jsonl").read_text() == lines and len(again) == 22
    val = again.validate(2, progress=False)  # held-out items on the workers too
    assert val["combined_val_delta"].notna().all() and not ex.actors


def test_workers_stay_up_over_the_stages_of_a_sweep(chat_model, tmp_path, cluster):
    """refine's two passes and validate=N run on the same two workers (each loads the model once),
    which are freed when sweep() returns; records equal a local run's."""
    kw = dict(probes=["math"], strategy="refine", refine_stride=2, refine_top=2, block_sizes=(2,), mode="likelihood",
              max_items=2, validate=2, progress=False)
    local = cf.sweep(chat_model, results=tmp_path / "local.jsonl", **kw)
    ex = cf.RayExecutor(workers=2, threads=1)
    dist = cf.sweep(chat_model, results=tmp_path / "ray.jsonl", executor=ex, **kw)
    stages = {r["stage"] for r in read_records(tmp_path / "ray.jsonl")[1]}
    print(f"stages {sorted(stages)} on workers {ex.pids}")
    assert {"sweep", "refine", "validate"} <= stages
    assert ex.started == 2 and len(set(ex.pids)) == 2 and not ex.actors  # workers started over the whole sweep
    _same(_by_config(tmp_path / "local.jsonl"), _by_config(tmp_path / "ray.jsonl"), "likelihood")
    def table(r):
        return r.to_pandas().set_index("layers")["combined"].to_dict()

    assert table(dist) == table(local)
    # a worker that goes between two stages is replaced for the next, not the end of the sweep
    again = cf.RayExecutor(workers=2, threads=1)
    with again.session():
        first = cf.sweep(chat_model, results=tmp_path / "again.jsonl", executor=again, probes=["math"],
                         paths=["0..3,2,3,4,5", "0..4,3,4,5", "0,1,1..5"], mode="likelihood", max_items=2,
                         progress=False)
        assert len(again.actors) == 2
        ray.kill(again.actors[0], no_restart=True)
        first.validate(2, progress=False)
        assert again.restarts == 1 and len(set(again.pids)) == 3
    assert not again.actors
    with again.session():  # max_restarts bounds a session's replacements, not the executor's lifetime
        assert again.restarts == 0


def test_a_setup_error_is_raised_before_any_worker_loads(chat_model, cluster):
    """A probe that cannot run in this mode is refused on the driver as the local sweep refuses it,
    not as a Ray actor's death after every worker loaded the model."""
    ex = cf.RayExecutor(workers=2, threads=1)
    with pytest.raises(ValueError, match="probe 'instruct' is scored in mode 'generate' only"):
        cf.sweep(chat_model, probes=["instruct"], paths=["0..5"], mode="likelihood", executor=ex, progress=False)
    assert ex.pids == [] and not ex.actors


def test_a_template_set_on_the_driver_only_is_refused(chat_model, tmp_path, cluster):
    """Workers load the tokenizer from the model's files: a chat template set on the driver's
    tokenizer would not reach them, so their prompts would not be the ones the header records:
    refused, naming the cause, before any config runs."""
    tok = chat_model.tokenizer
    original = tok.chat_template
    ex = cf.RayExecutor(workers=1, threads=1)
    try:
        tok.chat_template = original.replace("<|im_start|>", "<|im_start|> ")
        with pytest.raises(ValueError, match="a Ray worker writes other prompts than this process"):
            cf.sweep(chat_model, probes=["math"], paths=["0..3,2..5"], mode="likelihood", max_items=2,
                     executor=ex, results=tmp_path / "r.jsonl", progress=False)
    finally:
        tok.chat_template = original
    assert not ex.actors and read_records(tmp_path / "r.jsonl")[1] == []


def test_workers_load_the_drivers_quantized_model(chat_model_dir, tmp_path, cluster):
    """Workers load with the driver's load options: a q8_0-quantized model's Ray records are its
    local records (not the float model's, which differ)."""
    q8 = cf.load(chat_model_dir, quantize="q8_0")
    kw = dict(probes=["math"], paths=["0..3,2,3,4,5", "0..4,3,4,5"], mode="likelihood", max_items=3, progress=False)
    cf.sweep(q8, results=tmp_path / "local.jsonl", **kw)
    cf.sweep(q8, results=tmp_path / "ray.jsonl", executor=cf.RayExecutor(workers=2, threads=1), **kw)
    local, dist = _by_config(tmp_path / "local.jsonl"), _by_config(tmp_path / "ray.jsonl")
    _same(local, dist, "likelihood")
    cf.sweep(cf.load(chat_model_dir), results=tmp_path / "float.jsonl", **kw)
    dense = _by_config(tmp_path / "float.jsonl")
    assert any(dense[k]["margins"] != dist[k]["margins"] for k in dist)  # quantization changed the numbers


def _mid_sweep(out, ready, act) -> tuple[threading.Thread, list]:
    """A started thread that, once the results file holds 3 records and ready() holds, runs act()
    once; what it returned lands in the list (empty if that never happened within 120 s)."""
    done = []

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline and not done:
            if out.exists() and len(read_records(out)[1]) >= 3 and ready():
                done.append(act())
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, done


def test_killing_a_worker_mid_sweep_loses_nothing(chat_model, tmp_path, cluster):
    kw = dict(probes=["math"], strategy="scan", mode="generate", max_items=2, progress=False)
    cf.sweep(chat_model, results=tmp_path / "local.jsonl", **kw)
    ex = cf.RayExecutor(workers=2, threads=1)
    out = tmp_path / "kill.jsonl"

    def kill():
        victim = ex.actors[0]
        ray.kill(victim, no_restart=True)
        return victim

    thread, killed = _mid_sweep(out, lambda: len(ex.actors) == 2, kill)
    cf.sweep(chat_model, results=out, executor=ex, **kw)
    thread.join(timeout=5)
    assert killed and ex.restarts == 1, "the worker was not killed mid-sweep"
    _same(_by_config(tmp_path / "local.jsonl"), _by_config(out), "generate")


def test_a_hung_worker_is_replaced_after_config_timeout(chat_model, tmp_path, cluster):
    """A worker stopped mid-sweep (SIGSTOP: alive to Ray, answering nothing) is taken for hung once
    a config has been on it config_timeout seconds: killed, replaced, and its configs run again;
    every config recorded once, as a local run records it."""
    import os
    import signal

    kw = dict(probes=["math"], strategy="scan", mode="likelihood", max_items=2, progress=False)
    cf.sweep(chat_model, results=tmp_path / "local.jsonl", **kw)
    ex = cf.RayExecutor(workers=2, threads=1, config_timeout=8)
    out = tmp_path / "hung.jsonl"

    def stop():
        os.kill(ex.pids[0], signal.SIGSTOP)
        return ex.pids[0]

    thread, stopped = _mid_sweep(out, lambda: len(ex.pids) == 2, stop)
    try:
        with pytest.warns(UserWarning, match="spent over 8 s on config .*: taken for hung, killed and replaced"):
            cf.sweep(chat_model, results=out, executor=ex, **kw)
    finally:
        thread.join(timeout=5)
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert stopped and ex.restarts == 1 and len(ex.pids) == 3, "the worker was not stopped mid-sweep"
    _same(_by_config(tmp_path / "local.jsonl"), _by_config(out), "likelihood")


def test_bad_executor_is_refused(chat_model):
    with pytest.raises(ValueError, match="executor must be"):
        cf.sweep(chat_model, probes=["math"], paths=["0..5"], executor="dask", progress=False)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        cf.RayExecutor(workers=0)
    with pytest.raises(ValueError, match="config_timeout must be None or > 0 seconds"):
        cf.RayExecutor(config_timeout=0)


def test_cli_sweep_on_ray(chat_model_dir, tmp_path, cluster, capsys):
    from circuit_finder.cli import main

    out = tmp_path / "cli.jsonl"
    args = ["sweep", "--model", str(chat_model_dir), "--strategy", "scan", "--mode", "likelihood", "--probes",
            "math", "--max-items", "2", "--out", str(out), "--no-progress"]
    assert main([*args, "--executor", "ray", "--workers", "2"]) == 0
    assert len(_by_config(out)) == 22
    assert main([*args, "--workers", "2"]) == 2
    assert "--address, --workers and --config-timeout go with --executor ray" in capsys.readouterr().err
    assert main([*args, "--config-timeout", "60"]) == 2
    assert "--config-timeout go with --executor ray" in capsys.readouterr().err
