"""Shared fixtures: tiny random models built locally with transformers (no network, no hub)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from helpers import ARCHS, build_hf_model  # noqa: E402

torch.set_num_threads(2)


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
