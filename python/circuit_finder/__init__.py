"""circuit-finder: run any decoder layer path of an open LLM — layers repeated, skipped or
reordered — in one process, with no weight copied and no training.

    import circuit_finder as cf
    model = cf.load("path/to/hf-folder")
    model.generate("What is 17 * 23?", layers="0..9,7..9,10..29")

Where things live (docs/structure.md has the full map): loading (files -> Model), placement
(device_map: each layer's device), model (Model:
logits / generate / score), generation (encode, pad, decode loop, finish rows), likelihood (the
one continuation log-likelihood), sweep/ (configs, runner, SweepResult), results (store and
statistics), router/ (Router, train_router: a layer path per prompt), export, lm_eval, server, cli.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C
from .config import ConfigError, ModelConfig
from .export import export_gguf, export_hf, export_mergekit, mergekit_config
from .generation import Sampling, TextCodec
from .gguf import GGUFError
from .layer_path import LayerPath, LayerPathError
from .loading import default_model_path, load, load_from_tensors
from .model import Model
from .placement import Placement
from .router import Router, RouterError
from .router.train import train_router
from .sweep import RayExecutor, SweepResult, sweep

FormatError = _C.FormatError
WeightError = _C.WeightError
InputError = _C.InputError
load_safetensors = _C.load_safetensors

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FormatError",
    "GGUFError",
    "InputError",
    "LayerPath",
    "LayerPathError",
    "Model",
    "ModelConfig",
    "Placement",
    "RayExecutor",
    "Router",
    "RouterError",
    "Sampling",
    "SweepResult",
    "TextCodec",
    "WeightError",
    "default_model_path",
    "export_gguf",
    "export_hf",
    "export_mergekit",
    "load",
    "load_from_tensors",
    "load_safetensors",
    "mergekit_config",
    "sweep",
    "train_router",
]
