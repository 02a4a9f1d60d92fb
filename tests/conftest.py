"""Shared fixtures: tiny random models built locally with transformers (no network, no hub)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from helpers import ARCHS, build_hf_model  # noqa: E402

torch.set_num_threads(2)
# GGUF tokenizers are cached once built (circuit_finder.gguf.tokenizer_cache_dir): the tests keep
# theirs out of the user's cache folder, one fresh folder per test session.
if "CF_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["CF_CACHE_DIR"] = tempfile.mkdtemp(prefix="cf-test-cache-")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a machine announced as one without the default model (CF_TEST_TOKENIZER: the GPU machine,
    where its 98 MB package cannot travel), a test that fails because a data package is not
    installed (files.package_file's FileNotFoundError, raised here or in a child process the test
    ran with captured output) is reported skipped, with that message. Elsewhere (CI) it stays a
    failure: a missing install step must show."""
    outcome = yield
    report = outcome.get_result()
    error = call.excinfo
    if not (report.failed and error is not None and os.environ.get("CF_TEST_TOKENIZER")):
        return
    said = str(error.value)
    if error.errisinstance(subprocess.CalledProcessError):
        stderr = error.value.stderr or ""
        lines = (stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr).strip().splitlines()
        said = lines[-1] if lines and "FileNotFoundError" in lines[-1] else ""
    elif not error.errisinstance(FileNotFoundError):
        said = ""
    if "this needs the package" in said:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: not installed here: {said}")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(arch, **config overrides) -> (folder, transformers model), cached per session."""
    cache: dict = {}

    def make(arch: str = "llama", **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{arch}-model")
            cache[key] = (folder, build_hf_model(arch, folder, **overrides))
        return cache[key]

    return make


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """A tiny random Llama (6 layers) with the default model's real tokenizer and chat template,
    saved as a Hugging Face folder: what sweep tests run text probes on."""
    import circuit_finder as cf
    from circuit_finder.gguf import gguf_tokenizer

    if os.environ.get("CF_TEST_TOKENIZER"):  # a saved tokenizer folder, for machines without the default model
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.environ["CF_TEST_TOKENIZER"])
    else:
        try:
            tokenizer = gguf_tokenizer(cf.default_model_path())
        except FileNotFoundError as e:
            pytest.skip(str(e))
    folder = tmp_path_factory.mktemp("chat-model")
    build_hf_model("llama", folder, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_size=64,
                   intermediate_size=96)
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def chat_model(chat_model_dir):
    import circuit_finder as cf

    return cf.load(chat_model_dir)


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    """tests/lm_eval_tasks copied with their data paths (__DATA__) filled in: local lm-eval tasks."""
    import shutil
    from pathlib import Path

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tasks = Path(__file__).resolve().parent / "lm_eval_tasks"
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    for f in tasks.iterdir():
        if f.suffix == ".yaml":
            (out / f.name).write_text(f.read_text().replace("__DATA__", str(tasks)))
        else:
            shutil.copy(f, out / f.name)
    return out

