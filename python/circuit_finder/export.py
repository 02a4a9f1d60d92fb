"""Export a layer path as an ordinary model: GGUF (llama.cpp, ollama), a Hugging Face folder
(transformers, vLLM) or a mergekit passthrough config.

The exported model has one physical block per slot of the path (block k = layer path[k] of the
source), so any runtime loads it without knowing about layer paths. Files are written under a
temporary name next to the target and renamed into place when complete: a failure never leaves
a half-written file (or folder) under the target name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .layer_path import LayerPath

__all__ = ["export_gguf", "export_hf", "mergekit_config"]

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _prepare_target(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
    parent = dst.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{parent}: no such folder to write {dst.name} into")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{parent}: not writable")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------- GGUF
def export_gguf(src: str | os.PathLike, dst: str | os.PathLike, layers, overwrite: bool = False) -> Path:
    """Writes a GGUF whose blocks follow the layer path: block k is block path[k] of ``src``, with
    its tensors' bytes and quantization types unchanged. ``{arch}.block_count`` is set to the
    path length and every per-layer metadata array is reordered along the path; all other
    metadata and tensors are kept. Tensors are streamed from the memory-mapped source."""
    import gguf

    from .gguf import GGUFError, _open

    src, dst = Path(src), Path(dst)
    reader = _open(str(src))
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise GGUFError(f"{src}: no general.architecture")
    arch = arch_field.contents()
    count_field = reader.fields.get(f"{arch}.block_count")
    if count_field is None:
        raise GGUFError(f"{src}: no {arch}.block_count")
    n = int(count_field.contents())
    path = LayerPath.coerce(layers, n)
    _prepare_target(dst, overwrite)

    head, blocks, tail = [], {i: [] for i in range(n)}, []
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        if m:
            layer = int(m.group(1))
            if layer >= n:
                raise GGUFError(f"{src}: tensor {t.name} belongs to block {layer} but block_count is {n}")
            blocks[layer].append((m.group(2), t))
        else:
            (tail if any(blocks.values()) else head).append((t.name, t))
    ordered = [*head, *[(f"blk.{k}.{suffix}", t) for k, layer in enumerate(path) for suffix, t in blocks[layer]], *tail]

    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        for field in reader.fields.values():
            name = field.name
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
            value = field.contents()
            if name == f"{arch}.block_count":
                value = len(path)
            elif kind == gguf.GGUFValueType.ARRAY and name.startswith(f"{arch}.") and len(value) == n:
                value = [value[i] for i in path]
            elif name == "general.alignment":
                writer.data_alignment = int(value)
            writer.add_key_value(name, value, kind, sub_type=sub)
        for name, t in ordered:
            writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, t in ordered:
            writer.write_tensor_data(t.data)
        writer.close()
        _fsync_file(tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


# ------------------------------------------------------------------------------ Hugging Face
def _remap_config(config: dict, path: LayerPath, n: int, dtype: torch.dtype | None) -> dict:
    out = json.loads(json.dumps(config))
    out["num_hidden_layers"] = len(path)
    for key, value in config.items():
        # per-layer lists (layer_types, no_rope_layers, ...): one entry per layer, reordered along the path
        if isinstance(value, list) and len(value) == n and key != "architectures" and not key.endswith("token_id"):
            out[key] = [value[i] for i in path]
    if dtype is not None:
        out["torch_dtype"] = str(dtype).replace("torch.", "")
        out.pop("dtype", None)
    return out


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '2GB', '500MB', got {size!r}")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def export_hf(src, dst: str | os.PathLike, layers, dtype: str | torch.dtype | None = None,
              max_shard_size: int | str = "2GB", overwrite: bool = False) -> Path:
    """Writes a plain Hugging Face folder for the layer path: safetensors (sharded above
    ``max_shard_size``, with model.safetensors.index.json), config.json with num_hidden_layers set
    and per-layer lists reordered, and the tokenizer. ``src`` is a model folder or a loaded Model
    (any source, GGUF included: its weights as loaded, in the compute dtype). A repeated layer is
    written once per slot, as plain HF models need. dtype: None keeps each tensor's dtype."""
    from safetensors.torch import save_file

    from . import _C
    from .model import Model, resolve_dtype

    dst = Path(dst)
    tokenizer_files: list[Path] = []
    if isinstance(src, Model):
        config, tensors, tokenizer = dict(src.config.raw), src.tensors, src.tokenizer
    else:
        folder = Path(src)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a model folder (no config.json)")
        config = json.loads((folder / "config.json").read_text())
        tensors = _C.load_safetensors(str(folder))
        tokenizer = None
        tokenizer_files = [p for p in folder.iterdir() if p.is_file() and (
            p.name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template"))
            or p.name == "generation_config.json")]
    n = int(config.get("num_hidden_layers", 0))
    if n <= 0:
        raise ValueError("the source config has no num_hidden_layers")
    path = LayerPath.coerce(layers, n)
    target = resolve_dtype(dtype, torch.float32) if dtype is not None else None
    limit = _parse_size(max_shard_size)
    _prepare_target(dst, overwrite)

    names: list[tuple[str, str]] = []  # (output name, source name)
    per_layer: dict[int, list[tuple[str, str]]] = {i: [] for i in range(n)}
    for name in tensors:
        m = _HF_LAYER.match(name)
        if m:
            per_layer[int(m.group(1))].append((m.group(2), name))
        else:
            names.append((name, name))
    for k, layer in enumerate(path):
        names += [(f"model.layers.{k}.{suffix}", name) for suffix, name in sorted(per_layer[layer])]

    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        shards: list[list[tuple[str, str]]] = [[]]
        size = 0
        for out_name, name in names:
            t = tensors[name]
            nbytes = t.numel() * (target.itemsize if target is not None and t.is_floating_point() else t.element_size())
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append((out_name, name))
            size += nbytes
        total = len(shards)
        weight_map, total_size = {}, 0
        for s, shard in enumerate(shards, 1):
            file = "model.safetensors" if total == 1 else f"model-{s:05d}-of-{total:05d}.safetensors"
            data = {}
            for out_name, name in shard:
                t = tensors[name].detach()
                if target is not None and t.is_floating_point():
                    t = t.to(target)
                data[out_name] = t.to("cpu").contiguous().clone()
                weight_map[out_name] = file
                total_size += data[out_name].numel() * data[out_name].element_size()
            save_file(data, str(tmp / file), metadata={"format": "pt"})
            del data
        if total > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        out_config = _remap_config(config, path, n, target)
        out_config.setdefault("architectures", config.get("architectures") or ["LlamaForCausalLM"])
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        for f in tokenizer_files:
            shutil.copy2(f, tmp / f.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for f in tmp.iterdir():
            _fsync_file(f)
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# --------------------------------------------------------------------------------- mergekit
def mergekit_config(layers, model: str = "MODEL", num_layers: int | None = None, dtype: str = "bfloat16") -> str:
    """mergekit ``passthrough`` YAML whose slices (``layer_range`` [start, end), end exclusive)
    reproduce the layer path: one slice per maximal run of consecutive ascending layers."""
    import yaml

    if isinstance(layers, str):
        path = LayerPath.parse(layers)
    else:
        path = layers if isinstance(layers, LayerPath) else LayerPath(layers)
    if num_layers is not None:
        path.validate(num_layers)
    runs: list[list[int]] = []
    for layer in path:
        if runs and layer == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([layer, layer + 1])
    doc = {"slices": [{"sources": [{"model": model, "layer_range": [a, b]}]} for a, b in runs],
           "merge_method": "passthrough", "dtype": dtype}
    return f"# circuit-finder layer path {path}\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
