"""Shared fixtures: tiny random models built locally with transformers (no network, no hub)."""

from __future__ import annotations

import copy
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


def rebuilt(hf_model, layers):
    """A transformers model whose decoder runs `layers` in order, from deep-copied layers."""
    m = copy.deepcopy(hf_model)
    originals = hf_model.model.layers
    m.model.layers = torch.nn.ModuleList([copy.deepcopy(originals[i]) for i in layers])
    for slot, layer in enumerate(m.model.layers):
        layer.self_attn.layer_idx = slot
    m.config.num_hidden_layers = len(layers)
    if getattr(m.config, "layer_types", None) is not None:
        m.config.layer_types = [hf_model.config.layer_types[i] for i in layers]
    return m
