"""Export a layer path as an ordinary model: GGUF (llama.cpp, ollama), a Hugging Face folder
(transformers, vLLM) or a mergekit passthrough config.

The exported model has one physical block per slot of the path (block k = layer path[k] of the
source), so any runtime loads it without knowing about layer paths.

Sources: ``export_gguf`` copies a .gguf file's tensor bytes as they are; ``export_hf`` takes a model
folder, a .gguf file (dequantized to ``dtype``, float32 by default) or a loaded Model (packed
matrices of either are dequantized one at a time, as their shard is written, but for those the
GPT-OSS and Qwen3-Next regroupings need first);
``export_mergekit`` takes a local model folder or .gguf file (its metadata gives the layer count,
which checks the path and resolves ``rys=i:j``) or a Hugging Face hub id ``org/name`` that is not
a local path (written as is; the path is checked only when ``num_layers`` is given).

Writing: every output is staged under a hidden temporary name next to the target, fsynced and
renamed into place when complete, so a failure never leaves a half-written file or folder under
the target name. Outputs get the ordinary permissions of the process umask. An existing target is
replaced only with ``overwrite=True``; an existing folder only when it looks like an export of
ours (config.json, *.safetensors and tokenizer / index / generation-config files, nothing else);
the source itself never.

Mixtures of experts: a Hugging Face export writes experts per expert, as published checkpoints
carry them (Qwen: ``mlp.experts.N.*_proj``; Mixtral: ``block_sparse_moe.experts.N.w1/w3/w2``),
whatever layout they were loaded from (transformers v5's stacked tensors, GGUF's ``*_exps``), and
lists the path's dense slots in ``mlp_only_layers``. GPT-OSS's published layout is stacked
(``mlp.experts.gate_up_proj`` [E, H, 2I], gate and up columns alternating): written so; an MXFP4
folder keeps its packed bytes and quantization_config, a loaded (dequantized) model drops the latter.
A GGUF's packed matrices (GPT-OSS's regrouped experts too) are dequantized one at a time, as their
shard is written: memory holds one shard of floats, not the model's.
So do fine-grained FP8, compressed-tensors, GPTQ, AWQ and bitsandbytes folders: their stored parts are written as
they are (scales not cast by ``dtype``), with the quantization_config's exact module names
renumbered along the path.

Limits: mergekit reads Hugging Face models, so a GGUF source needs ``model=`` (the Hugging Face
name to write); a hub id's layer count is not fetched (no network), pass ``num_layers``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import warnings
from pathlib import Path

import torch

from .files import atomic_file, staged
from .layer_path import LayerPath, LayerPathError

__all__ = ["export_gguf", "export_hf", "export_mergekit", "mergekit_config", "mergekit_source", "mergekit_text",
           "parse_size", "remap_config", "source_num_layers"]

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
# a decoder layer's tensors: a causal LM's model.layers.N (a base model's save: layers.N), or a
# multimodal wrapper's text decoder (transformers v5 names model.language_model.layers.N; its
# save_pretrained writes language_model.model.layers.N; 5.10-5.23 saved a doubled .model.model)
_DECODER = r"(model\.language_model\.(?:model\.)?|language_model\.model\.(?:model\.)?|model\.|)layers\."
_HF_LAYER = re.compile(rf"^{_DECODER}(\d+)\.(.+)$")
# a decoder layer's own name or one of its modules' (quantization_config module lists)
_HF_LAYER_MODULE = re.compile(rf"^(?P<head>{_DECODER})(?P<index>\d+)(?P<tail>\..*)?$")
_TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template")
# files copied beside the weights as they are: generation defaults, a multimodal model's processor
# settings, Mistral's tekken tokenizer (not params.json: it describes the source's layer count)
_SIDE_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json",
               "video_preprocessor_config.json", "tekken.json")
# every file name an HF export of ours holds: what makes an existing folder safe to replace
_HF_EXPORT_FILE = re.compile(r"^(?:config\.json|model\.safetensors(?:\.index\.json)?"
                             r"|model-\d{5}-of-\d{5}\.safetensors|" + "|".join(map(re.escape, _SIDE_FILES))
                             + "|(?:" + "|".join(_TOKENIZER_PREFIXES) + r")[\w.-]*)$")
# {arch}.* arrays of a fixed length, never per layer (a tiny model's layer count may equal theirs)
_FIXED_ARRAYS = (".rope.dimension_sections",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MERGEKIT_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# ------------------------------------------------------------------------------ sources
def _is_gguf(src) -> bool:
    return str(src).lower().endswith(".gguf")


def _decoder_config(config: dict) -> dict:
    """The part of a config.json that describes the decoder layers: a multimodal wrapper's
    text_config, else the config itself."""
    text = config.get("text_config") if isinstance(config, dict) else None
    return text if isinstance(text, dict) and "num_hidden_layers" not in config else config


def _config_layer_count(config, where) -> int:
    n = _decoder_config(config).get("num_hidden_layers") if isinstance(config, dict) else None
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"{where}: num_hidden_layers is {n!r}, not a layer count")
    return n


def _read_config(folder: Path) -> dict:
    """A model folder's config.json, any architecture; FileNotFoundError / ValueError naming the path
    otherwise."""
    from .loading import model_config_file

    config_file = model_config_file(folder)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: not a JSON object")
    return config


def source_num_layers(src: str | os.PathLike) -> int:
    """Layer count of a local model folder (config.json's num_hidden_layers) or .gguf file
    ({arch}.block_count), of any architecture; no tensor is read. FileNotFoundError / ValueError
    naming the path for anything else."""
    from .gguf import gguf_num_layers

    p = Path(src)
    if _is_gguf(p):
        return gguf_num_layers(p)
    return _config_layer_count(_read_config(p), p / "config.json")


# ------------------------------------------------------------------------------ targets
def _same_file(a: Path, b) -> bool:
    try:
        return a.exists() and Path(b).exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_replaceable_folder(dst: Path) -> None:
    """Refuses (FileExistsError naming what is there) unless ``dst`` looks like an HF export of ours."""
    if not dst.is_dir():
        raise FileExistsError(f"{dst} is a file, not an exported model folder; not replacing it")
    entries = sorted(dst.iterdir())
    if not entries:
        return
    unexpected = [p.name + ("/" if p.is_dir() else "") for p in entries
                  if not (p.is_file() and _HF_EXPORT_FILE.match(p.name))]
    names = {p.name for p in entries}
    if not unexpected and "config.json" in names and any(n.endswith(".safetensors") for n in names):
        return
    what = (f"it holds {', '.join(unexpected[:5])}" + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
            if unexpected else "it has no config.json and *.safetensors")
    raise FileExistsError(f"{dst} does not look like a model folder written by this exporter ({what}); "
                          "not replacing it: remove it yourself or choose another output")


def _check_target(dst: Path, overwrite: bool, folder: bool, source=None) -> None:
    """Refuses an output that exists (unless overwrite and safe to replace), is the source, or has
    no writable parent folder."""
    if source is not None and _same_file(dst, source):
        raise ValueError(f"{dst} is the source model; choose another output")
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
        if folder:
            _check_replaceable_folder(dst)
        elif dst.is_dir():
            raise IsADirectoryError(f"{dst} is a folder; this export writes a single file")
    parent = dst.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{parent}: no such folder to write {dst.name} into")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{parent}: not writable")


# --------------------------------------------------------------------------------------- GGUF
def _gguf_tensor_order(reader, path: LayerPath, n: int, src: Path) -> list[tuple[str, object]]:
    """(output name, source tensor) in file order: tensors before the blocks, the blocks along the
    path (renumbered by slot), tensors after the blocks."""
    from .gguf import GGUFError, gguf_architecture, gguf_field

    total = gguf_field(reader, f"{gguf_architecture(reader, src)}.block_count")  # n + prediction blocks
    head, blocks, tail = [], {i: [] for i in range(n)}, []
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        if m:
            layer = int(m.group(1))
            if n <= layer < total:  # a multi-token-prediction block: not part of a decoder path
                continue
            if layer >= n:
                raise GGUFError(f"{src}: tensor {t.name} belongs to block {layer} but block_count is {n}")
            blocks[layer].append((m.group(2), t))
        else:
            (tail if any(blocks.values()) else head).append((t.name, t))
    slots = [(f"blk.{k}.{suffix}", t) for k, layer in enumerate(path) for suffix, t in blocks[layer]]
    return [*head, *slots, *tail]


def _copy_gguf_metadata(writer, reader, arch: str, path: LayerPath, n: int) -> None:
    """Every metadata field but the writer's own; block_count = path length, per-layer arrays reordered."""
    import gguf

    stored = reader.fields.get(f"{arch}.block_count")
    total = int(stored.contents()) if stored is not None else n  # with any prediction (MTP) blocks
    for field in reader.fields.values():
        name = field.name
        if name.startswith("GGUF.") or name == "general.architecture" or name == _gemma_scale_key(arch):
            continue  # (Gemma's query scale: written by _write_gguf, see _gemma_query_scale)
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        value = field.contents()
        if name == f"{arch}.block_count":
            value = len(path)
        elif name == f"{arch}.nextn_predict_layers":  # the prediction blocks are not exported
            value = 0
        elif kind == gguf.GGUFValueType.ARRAY and name.startswith(f"{arch}.") and len(value) in (n, total) and \
                not name.endswith(_FIXED_ARRAYS):
            value = [value[i] for i in path]  # (per-layer arrays that list the MTP blocks too lose them)
        elif name == "general.alignment":
            writer.data_alignment = int(value)
        writer.add_key_value(name, value, kind, sub_type=sub)


def _gemma_scale_key(arch: str) -> str | None:
    return f"{arch}.attention.scale" if arch in ("gemma2", "gemma3") else None


# where each block of a ggml type keeps the f16 factors every value of the block is a multiple of
# (d, and dmin / m where the type has one): scaling them scales the block's values
_BLOCK_SCALES = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
                 "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}


class _Scaled:
    """A GGUF tensor to be written times ``ratio``: ``data`` is the source's (for the tensor info:
    same shape and type), ``values()`` the scaled copy, made when it is written: float values
    multiplied, a packed type's per-block f16 factors (``_BLOCK_SCALES``; rounded to f16)."""

    def __init__(self, tensor, ratio: float):
        self.data, self.tensor_type, self.ratio = tensor.data, tensor.tensor_type, ratio

    @staticmethod
    def scalable(tensor) -> bool:
        return tensor.tensor_type.name in ("F32", "F16", "BF16", *_BLOCK_SCALES)

    def values(self):
        import gguf
        import numpy as np

        kind = self.tensor_type.name
        if kind in _BLOCK_SCALES:
            blocks = np.ascontiguousarray(self.data).reshape(-1, gguf.GGML_QUANT_SIZES[self.tensor_type][1]).copy()
            for off in _BLOCK_SCALES[kind]:
                d = blocks[:, off:off + 2].copy().view(np.float16).astype(np.float32)
                blocks[:, off:off + 2] = (d * self.ratio).astype(np.float16).view(np.uint8)
            return blocks.reshape(self.data.shape)
        if kind == "BF16":  # stored as raw bytes
            x = torch.from_numpy(np.ascontiguousarray(self.data).view(np.int16).copy()).view(torch.bfloat16)
            return (x.float() * self.ratio).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
        return (self.data.astype(np.float32) * self.ratio).astype(self.data.dtype)


def _gemma_query_scale(reader, src: Path, arch: str, path: LayerPath, ordered: list) -> tuple[list, float]:
    """llama.cpp scales a Gemma file's queries by a rule of its block count (``llama_cpp_query_scalar``:
    another at the 27B counts 46 / 62) and reads no key for it, so an export whose length enters or
    leaves those counts (any path of a 27B) would run with another scale. Then every slot's query
    norm (Gemma 3) or query projection (Gemma 2; a packed one by its blocks' f16 factors) is
    multiplied by the ratio, so llama.cpp computes the source's attention. Returns the tensors to
    write and the attention.scale to record: the one llama.cpp applies (circuit-finder reads the
    key), or, where a type cannot be rescaled (IQ1-IQ3, MXFP4), the source's, with a warning that
    llama.cpp will differ."""
    from .gguf import gguf_config, llama_cpp_query_scalar

    config = gguf_config(reader, str(src))
    source, target = float(config["query_pre_attn_scalar"]), llama_cpp_query_scalar(arch, len(path), config)
    ratio = (target / source) ** 0.5
    if abs(ratio - 1.0) < 1e-6:
        return ordered, 1.0 / source ** 0.5
    suffix = ".attn_q_norm.weight" if arch == "gemma3" else ".attn_q.weight"
    scaled = [(name, _Scaled(t, ratio)) if name.endswith(suffix) else (name, t) for name, t in ordered]
    fixed = [t for name, t in scaled if name.endswith(suffix)]
    if len(fixed) == len(path) and all(_Scaled.scalable(t) for t in fixed):
        return scaled, 1.0 / target ** 0.5
    warnings.warn(f"{src}: llama.cpp scales the queries of a {len(path)}-block {arch} file by 1/sqrt({target}), not "
                  f"the source's 1/sqrt({source:g}), and this path's '{suffix[1:]}' tensors are of a type whose "
                  "values cannot be rescaled to make up for it: circuit-finder reads the exported file right, "
                  "llama.cpp will not", stacklevel=4)
    return ordered, 1.0 / source ** 0.5


def _pin_sliding_layers(writer, reader, src: Path, arch: str, path: LayerPath, n: int) -> None:
    """Gemma's and gpt-oss's sliding pattern is not in a converter's metadata: llama.cpp derives it
    from layer positions, which a path changes. It is written explicitly (one sliding flag per
    slot) so each slot keeps its layer's kind."""
    from .gguf import gguf_field, sliding_layers

    pattern = gguf_field(reader, f"{arch}.attention.sliding_window_pattern")
    sliding = sliding_layers(reader, arch, n)
    if not isinstance(pattern, list):  # a per-layer list is reordered with the other arrays
        writer.add_sliding_window_pattern([sliding[i] for i in path])
    period = {"gpt-oss": 2, "gemma2": 2, "gemma3": 6}[arch]  # llama.cpp's positional rule, in releases before it
    moved = [k for k, layer in enumerate(path) if sliding[layer] != ((k + 1) % period != 0)]  # read the pattern
    if moved:
        warnings.warn(f"{src}: slots {moved[:8]}{' ...' if len(moved) > 8 else ''} of this {arch} path hold layers of "
                      "the other attention kind than their position's; circuit-finder reads the per-slot "
                      "sliding_window_pattern written here, but a llama.cpp that derives windows from layer "
                      "positions alone will not", stacklevel=3)


def _pin_recurrent_layers(writer, reader, src: Path, arch: str, path: LayerPath) -> None:
    """A hybrid's linear / full-attention layers follow full_attention_interval from layer
    positions, which a path changes: attention.recurrent_layers (read by llama.cpp's loader before
    the interval rule) names each slot's kind, unless the file lists it already (then it is
    reordered with the other per-layer arrays)."""
    from .gguf import gguf_config, gguf_field

    if gguf_field(reader, f"{arch}.attention.recurrent_layers") is not None:
        return
    kinds = gguf_config(reader, str(src))["layer_types"]
    writer.add_array(f"{arch}.attention.recurrent_layers", [kinds[i] == "linear_attention" for i in path])


def _write_gguf(reader, src: Path, tmp: Path, arch: str, path: LayerPath, n: int, ordered) -> None:
    import gguf

    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _copy_gguf_metadata(writer, reader, arch, path, n)
        if arch in ("gemma2", "gemma3", "gpt-oss"):
            _pin_sliding_layers(writer, reader, src, arch, path, n)
        if arch in ("gemma2", "gemma3"):
            ordered, scale = _gemma_query_scale(reader, src, arch, path, ordered)
            writer.add_attention_scale(scale)
        if arch in ("qwen35", "qwen35moe", "qwen3next"):
            _pin_recurrent_layers(writer, reader, src, arch, path)
        for name, t in ordered:
            writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, t in ordered:
            writer.write_tensor_data(t.values() if isinstance(t, _Scaled) else t.data)
    finally:
        writer.close()


def export_gguf(src: str | os.PathLike, dst: str | os.PathLike, layers, overwrite: bool = False,
                force: bool = False) -> Path:
    """Writes a GGUF whose blocks follow the layer path: block k is block path[k] of ``src``, with
    its tensors' bytes and quantization types unchanged. ``{arch}.block_count`` is set to the
    path length and every per-layer metadata array is reordered along the path; all other
    metadata and tensors are kept (Gemma and gpt-oss files also get their per-slot sliding flags
    written out, see ``_pin_sliding_layers``; Gemma its query scale, with query norms or
    projections rescaled where llama.cpp's rule for the new block count differs, see
    ``_gemma_query_scale``). Tensors are streamed from
    the memory-mapped source. An architecture circuit-finder does not run is refused unless
    ``force`` (see ``check_exportable``)."""
    from .gguf import SUPPORTED_ARCHS, gguf_architecture, gguf_block_count, open_gguf

    src, dst = Path(src), Path(dst)
    reader = open_gguf(src)
    arch, n = gguf_architecture(reader, src), gguf_block_count(reader, src)
    if arch not in SUPPORTED_ARCHS:
        check_exportable(src, f"architecture {arch!r}", force)
    path = LayerPath.coerce(layers, n)
    _check_target(dst, overwrite, folder=False, source=src)
    ordered = _gguf_tensor_order(reader, path, n, src)
    with staged(dst, folder=False) as tmp:
        _write_gguf(reader, src, tmp, arch, path, n, ordered)
    return dst


# ------------------------------------------------------------------------------ Hugging Face
def remap_config(config: dict, path: LayerPath, dtype: torch.dtype | None = None, modules=None) -> dict:
    """The config.json of an export along ``path``: num_hidden_layers = path length, per-layer lists
    (layer_types, no_rope_layers, ...: one entry per source layer) reordered along the path (in a
    multimodal wrapper's text_config), torch_dtype set when ``dtype`` is given, quantization_config
    module names renumbered (``modules``: see ``_check_pattern_along``). ``config`` is not modified."""
    out = json.loads(json.dumps(config))
    source, target = _decoder_config(config), _decoder_config(out)
    n = int(source["num_hidden_layers"])
    target["num_hidden_layers"] = len(path)
    for key, value in source.items():
        if (isinstance(value, list) and len(value) == n and key not in ("architectures", "mlp_only_layers")
                and not key.endswith("token_id")):
            target[key] = [value[i] for i in path]
    for c in (out, out.get("text_config") or {}):
        qc = c.get("quantization_config") or {}
        for key in ("ignore", "modules_to_not_convert", "llm_int8_skip_modules"):  # exact module names
            if isinstance(qc.get(key), list):
                qc[key] = _names_along(qc[key], path, modules)
        for group in (qc.get("config_groups") or {}).values():
            if isinstance(group, dict) and isinstance(group.get("targets"), list):
                group["targets"] = _names_along(group["targets"], path, modules)
    if dtype is not None:
        out["torch_dtype"] = str(dtype).replace("torch.", "")
        out.pop("dtype", None)
    return out


def _names_along(names: list, path: LayerPath, modules=None) -> list:
    """Module names of a quantization_config renumbered along ``path``: an exact name in decoder layer
    i becomes one name per slot that runs layer i (none if the path skips it); other names (a vision
    tower's layers too) stay as they are, and so do patterns (``re:``), which must then pick in each
    slot what they picked in its layer (``_check_pattern_along``)."""
    out = []
    for name in names:
        if isinstance(name, str) and name.startswith("re:"):
            _check_pattern_along(name, path, modules)
        m = _HF_LAYER_MODULE.match(name) if isinstance(name, str) and not name.startswith("re:") else None
        out += [f"{m['head']}{k}{m['tail'] or ''}" for k, i in enumerate(path) if i == int(m["index"])] if m \
            else [name]
    return out


_TYPICAL_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                    "mlp.up_proj", "mlp.down_proj", "mlp.gate", "mlp.experts.0.gate_proj", "mlp.experts.0.down_proj",
                    "mlp.shared_expert.gate_proj", "block_sparse_moe.gate", "block_sparse_moe.experts.0.w1",
                    "linear_attn.in_proj_qkvz", "linear_attn.out_proj")


def _check_pattern_along(name: str, path: LayerPath, modules=None) -> None:
    """A ``re:`` pattern kept as written must match (re.match, as compressed-tensors does) each
    slot's module exactly where it matches the module of the layer that slot runs; ``modules``:
    (export name, source name) pairs of the decoder's modules (default: typical ones of every
    slot). One naming a layer by number that the path moves or repeats does not: a ValueError."""
    pattern = re.compile(name[3:])
    if modules is None:
        heads = ("model.layers.", "model.language_model.layers.", "language_model.model.layers.")
        modules = [(f"{h}{k}.{m}", f"{h}{i}.{m}") for k, i in enumerate(path) for h in heads for m in _TYPICAL_MODULES]
    moved = sorted({out for out, src in modules if bool(pattern.match(out)) != bool(pattern.match(src))})
    if moved:
        raise ValueError(f"quantization_config pattern {name!r} picks other modules in the export than in the layers "
                         f"its slots run (e.g. {moved[0]}): it names decoder layers by number, which this path moves "
                         "or repeats. Export a loaded (dequantized) Model instead, which writes plain weights")


def parse_size(size: int | str) -> int:
    """Bytes from an int or text such as '2GB', '500MB', '40KB' (binary units)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(size).upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive size in bytes or like '2GB', '500MB', got {size!r}")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def _hf_source_config(src) -> dict:
    """The source's config.json as a dict (for a GGUF, the one its metadata maps to)."""
    from .gguf import gguf_config, open_gguf
    from .model import Model

    if isinstance(src, Model):
        if src.config.wrapper:  # its loaded tensors are the text decoder's: written as that causal LM
            text = dict(_decoder_config(src.config.raw))
            for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
                if key not in text and key in src.config.raw:
                    text[key] = src.config.raw[key]
            if text.get("final_logit_softcapping"):  # Gemma3ForConditionalGeneration never applies it
                text["final_logit_softcapping"] = None
            text["tie_word_embeddings"] = "lm_head.weight" not in src.tensors  # the wrapper's rule, not text_config's
            return {**text, "architectures": [src.config.architecture]}
        # tied exactly when the head is the embedding (a tied config's different stored head is used)
        return {**src.config.raw, "tie_word_embeddings": "lm_head.weight" not in src.tensors}
    p = Path(src)
    if _is_gguf(p):
        return gguf_config(open_gguf(p), str(p))
    return _read_config(p)


def _hf_source_weights(src, target: torch.dtype | None):
    """(tensors by HF name, tokenizer object or None, tokenizer files to copy, the float dtype its
    packed matrices are written in) of the source. Packed matrices (a packed Model's, a GGUF file's
    quantized ones) stay packed here: each is dequantized when its shard is written, so memory
    holds one shard of floats, not the whole model's."""
    from . import _C
    from .gguf import gguf_tokenizer, read_gguf
    from .model import Model

    if isinstance(src, Model):  # packed matrices are written as the model's float dtype; a folder's side files
        folder, text_only = Path(src.source), bool(src.config.wrapper)  # a loaded wrapper has no vision tower
        side = [folder / f for f in _SIDE_FILES
                if folder.is_dir() and (folder / f).is_file() and not (text_only and "processor" in f)]
        return dict(src.tensors), src.tokenizer, side, src.dtype
    p = Path(src)
    if _is_gguf(p):
        return read_gguf(p, target or torch.float32, keep_packed=True)[1], gguf_tokenizer(p), [], target or torch.float32
    files = [f for f in sorted(p.iterdir()) if f.is_file() and (f.name.startswith(_TOKENIZER_PREFIXES)
                                                               or f.name in _SIDE_FILES)]
    return _C.load_safetensors(str(p)), None, files, torch.float32


def _quantized_part(name: str, t, tensors) -> bool:
    """A fine-grained FP8, compressed-tensors, GPTQ, AWQ or bitsandbytes checkpoint's stored weight,
    scale, zero point or codes (bitsandbytes' may be stored as floats), written as it is whatever
    dtype= says (its quantization_config stays; a weight cast apart from its scale, or a scale
    rounded, would read wrong)."""
    from . import bnb, compressed, gptq
    from .quants import FP8_DTYPES

    parts = ("_scale_inv", ".activation_scale", *compressed.PARTS, *gptq.PARTS, *bnb.PARTS)
    fp8 = getattr(t, "dtype", None) in FP8_DTYPES  # a PackedTensor has no dtype
    return fp8 or name.endswith(parts) or bnb.holds_codes(name, tensors)


def _cast_when_written(name: str, t, tensors, target: torch.dtype | None) -> bool:
    """Whether tensors[name] (t) is written cast to `target`: floats are, but for a quantized
    checkpoint's parts, kept as stored."""
    return target is not None and t.is_floating_point() and not _quantized_part(name, t, tensors)


class _Deferred:
    """A float tensor made when its shard is written (GPT-OSS experts regrouped from packed GGUF
    matrices), so an export holds one such tensor at a time, not every layer's. Written like a packed
    matrix: as `dtype` floats (``_floats``), its size planned from ``shape``."""

    def __init__(self, shape, make):
        self.shape, self._make = torch.Size(shape), make

    def numel(self) -> int:
        return self.shape.numel()

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self._make(dtype)


def _made_when_written(t) -> bool:
    """Whether t is a packed matrix or a _Deferred: floats of the packed dtype only when written."""
    from .quants import PackedTensor

    return isinstance(t, (PackedTensor, _Deferred))


def _floats(t, dtype: torch.dtype):
    """t itself, or a packed matrix (or _Deferred) made into `dtype` floats."""
    return t.dequantize(dtype) if _made_when_written(t) else t


_STACKED_EXPERTS = re.compile(r"^(.*\.layers\.\d+\.)mlp\.experts\.(gate_up_proj|gate_proj|up_proj|down_proj)$")
_MIXTRAL_EXPERT = {"gate": "w1", "up": "w3", "down": "w2"}


def hub_expert_tensors(tensors: dict, config: dict, dtype: torch.dtype = torch.float32) -> dict:
    """``tensors`` with stacked experts (transformers v5's gate_up_proj [E, 2I, H] and down_proj
    [E, H, I]; GGUF's gate_proj / up_proj [E, I, H]) as per-expert views under the names published
    checkpoints use (Qwen: mlp.experts.N.{gate,up,down}_proj.weight; Mixtral: block_sparse_moe
    .experts.N.w1/w3/w2.weight, its router block_sparse_moe.gate.weight). Other tensors unchanged.
    Packed matrices stay packed (per-expert rows of their blocks), but for the GPT-OSS and
    Qwen3-Next regroupings, which work on floats: GPT-OSS's are made (dequantized to the written
    dtype) when their shard is written, Qwen3-Next's projections dequantized to `dtype` here."""
    from .config import ConfigError, parse_config

    try:
        architecture = parse_config(config).architecture
    except ConfigError:
        return tensors
    if architecture == "GptOssForCausalLM":
        return gpt_oss_hub_experts(tensors)
    if architecture == "Qwen3NextForCausalLM":
        tensors = qwen3_next_hub_projections(tensors, config, dtype)
    mixtral = architecture == "MixtralForCausalLM"
    out = {}
    for name, t in tensors.items():
        m = _STACKED_EXPERTS.match(name)
        if m is None:
            out[name.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight") if mixtral else name] = t
            continue
        prefix, kind = m.groups()
        half = t.shape[1] // 2
        parts = ({"gate": t[:, :half], "up": t[:, half:]} if kind == "gate_up_proj" else {kind[:-len("_proj")]: t})
        for part, stacked in parts.items():
            for e in range(stacked.shape[0]):
                key = (f"{prefix}block_sparse_moe.experts.{e}.{_MIXTRAL_EXPERT[part]}.weight" if mixtral
                       else f"{prefix}mlp.experts.{e}.{part}_proj.weight")
                out[key] = stacked[e]
    return out


_GPT_OSS_GGUF_EXPERTS = re.compile(r"^(.*\.layers\.\d+\.mlp\.experts\.)gate_proj$")


def gpt_oss_hub_experts(tensors: dict) -> dict:
    """GPT-OSS experts in transformers' layout: GGUF's separate gate_proj / up_proj [E, I, H] (and
    their _bias [E, I]) become gate_up_proj [E, H, 2I] with gate and up columns alternating (and
    gate_up_proj_bias [E, 2I]); down_proj [E, H, I] becomes [E, I, H]. Tensors already in that
    layout (safetensors, MXFP4 blocks) are unchanged. The regrouped matrices are _Deferred: made
    (packed experts dequantized to the dtype asked for then) when their shard is written."""
    out = dict(tensors)
    for name in tensors:
        m = _GPT_OSS_GGUF_EXPERTS.match(name)
        if m is None:
            continue
        x = m.group(1)
        gate, up, down = out.pop(x + "gate_proj"), out.pop(x + "up_proj"), out[x + "down_proj"]
        e, i, h = gate.shape
        out[x + "gate_up_proj"] = _later((e, h, 2 * i), lambda d, g=gate, u=up: torch.stack(
            (_floats(g, d), _floats(u, d)), dim=2).flatten(1, 2).transpose(1, 2), gate, up)
        out[x + "gate_up_proj_bias"] = torch.stack((out.pop(x + "gate_proj_bias"), out.pop(x + "up_proj_bias")),
                                                   dim=2).flatten(1, 2)
        out[x + "down_proj"] = _later((e, i, h), lambda d, w=down: _floats(w, d).transpose(1, 2), down)
    return out


def _later(shape, make, *sources):
    """make(dtype) as a _Deferred where a source is packed (made when written); floats made now, as stored."""
    return _Deferred(shape, make) if any(map(_made_when_written, sources)) else make(None)


def qwen3_next_hub_projections(tensors: dict, config: dict, dtype: torch.dtype = torch.float32) -> dict:
    """Qwen3-Next's linear-attention projections in its own grouped layout: Qwen3.5-style flat
    in_proj_qkv / in_proj_z / in_proj_b / in_proj_a (how a GGUF loads) regrouped per key head into
    in_proj_qkvz ([q | k | v | z] per group) and in_proj_ba ([b | a] per group). Other tensors and
    ones already grouped are unchanged; packed projections are dequantized to `dtype`."""
    c = _decoder_config(config)
    hk, hv, dk, dv = (int(c[k]) for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                          "linear_value_head_dim"))
    r, out = hv // hk, dict(tensors)
    for name in tensors:
        if not name.endswith("linear_attn.in_proj_qkv.weight"):
            continue
        x = name[:-len("in_proj_qkv.weight")]
        qkv, z = (_floats(out.pop(x + f"in_proj_{p}.weight"), dtype) for p in ("qkv", "z"))
        h = qkv.shape[-1]
        q, k, v = qkv[:hk * dk], qkv[hk * dk:2 * hk * dk], qkv[2 * hk * dk:]
        groups = [t.reshape(hk, -1, h) for t in (q, k, v, z)]
        out[x + "in_proj_qkvz.weight"] = torch.cat(groups, 1).reshape(-1, h)
        b, a = (_floats(out.pop(x + f"in_proj_{p}.weight"), dtype) for p in ("b", "a"))
        out[x + "in_proj_ba.weight"] = torch.cat([b.reshape(hk, r, h), a.reshape(hk, r, h)], 1).reshape(-1, h)
    return out


def _without_quantization(config: dict, tensors: dict) -> dict:
    """The config without its quantization_config when the tensors written are not quantized (a
    loaded GPT-OSS, whose MXFP4 experts were dequantized; a loaded FP8, compressed-tensors, GPTQ, AWQ
    or bitsandbytes checkpoint): the export holds plain weights. A folder's MXFP4 blocks, FP8
    weights, compressed-tensors weights with their scales, GPTQ / AWQ qweights or bitsandbytes codes
    keep it, as do the activation and KV-cache scales of a folder whose weights are float (the parts
    ``_quantized_part`` writes as stored are what the config describes)."""
    if "quantization_config" not in config or any(
            name.endswith("_blocks") or _quantized_part(name, t, tensors) for name, t in tensors.items()):
        return config
    return {k: v for k, v in config.items() if k != "quantization_config"}


def _dynamic_along(config: dict, names: list[tuple[str, str]]) -> dict:
    """The config with a GPTQ / AWQ quantization_config's ``dynamic`` (GPTQModel's per-module patterns) made
    to give each written module its source module's rule (``gptq.dynamic_along``); else unchanged."""
    from .gptq import dynamic_along

    out = json.loads(json.dumps(config))
    for c in (out, out.get("text_config") or {}):
        qc = c.get("quantization_config") or {}
        if qc.get("quant_method") in ("gptq", "awq") and qc.get("dynamic"):
            modules = {(o.rsplit(".", 1)[0], s.rsplit(".", 1)[0]) for o, s in names if s.endswith((".qweight", ".weight"))}
            qc["dynamic"] = dynamic_along(qc["dynamic"], sorted(modules), _quantizer_names)
    return out


def _quantizer_names(saved: str) -> tuple[str, ...]:
    """A written module's name and, in a multimodal wrapper's text decoder, the other names its
    quantizer may have matched patterns against (``loading.quantizer_module_names``)."""
    from .loading import quantizer_module_names, text_decoder_tensors

    loaded = list(text_decoder_tensors({saved: None}))
    return tuple(dict.fromkeys((saved, *quantizer_module_names(loaded[0])))) if loaded else (saved,)


def _slot_names(tensors, path: LayerPath, n: int) -> list[tuple[str, str]]:
    """(output name, source name): non-layer tensors as they are, then each slot's layer renumbered."""
    names: list[tuple[str, str]] = []
    per_layer: dict[int, list[tuple[str, str]]] = {i: [] for i in range(n)}
    for name in tensors:
        m = _HF_LAYER.match(name)
        if m and int(m.group(2)) >= n:
            raise ValueError(f"tensor {name} is of layer {m.group(2)}, but the config has num_hidden_layers={n} "
                             f"(a multi-token-prediction block, or a config trimmed by hand?)")
        if m:
            per_layer[int(m.group(2))].append((m.group(1), m.group(3), name))
        else:
            names.append((name, name))
    for k, layer in enumerate(path):
        if not per_layer[layer]:  # names this exporter does not know: never a folder of the wrong layers
            raise ValueError(f"layer {layer} of the path has no tensors in the source (looked for names like "
                             f"model.layers.{layer}.*)")
        names += [(f"{prefix}layers.{k}.{suffix}", name) for prefix, suffix, name in sorted(per_layer[layer])]
    return names


def _written_itemsize(name: str, tensors, target: torch.dtype | None, packed_dtype: torch.dtype) -> int:
    """Bytes per element of tensors[name] as written: packed matrices become floats of packed_dtype,
    other floats `target` unless they are a quantized checkpoint's parts."""
    t = tensors[name]
    if _made_when_written(t):
        return (target or packed_dtype).itemsize
    return target.itemsize if _cast_when_written(name, t, tensors, target) else t.element_size()


def _plan_shards(tensors, names, target: torch.dtype | None, limit: int,
                 packed_dtype: torch.dtype) -> list[list[tuple[str, str]]]:
    shards: list[list[tuple[str, str]]] = [[]]
    size = 0
    for out_name, name in names:
        t = tensors[name]
        itemsize = _written_itemsize(name, tensors, target, packed_dtype)
        if shards[-1] and size + t.numel() * itemsize > limit:
            shards.append([])
            size = 0
        shards[-1].append((out_name, name))
        size += t.numel() * itemsize
    return shards


def _save_shard(data: dict, file: Path) -> None:
    """safetensors' save_file, with the file left at the umask's ordinary mode (the library's own
    writer makes it private, 0600)."""
    from safetensors.torch import save_file

    os.close(os.open(file, os.O_CREAT | os.O_WRONLY, 0o666))
    mode = stat.S_IMODE(os.stat(file).st_mode)
    save_file(data, str(file), metadata={"format": "pt"})
    if stat.S_IMODE(os.stat(file).st_mode) != mode:
        os.chmod(file, mode)


def _write_shards(folder: Path, tensors, shards, target: torch.dtype | None, packed_dtype: torch.dtype) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors plus model.safetensors.index.json;
    packed matrices dequantized to `packed_dtype` one at a time, as their shard is written."""
    weight_map, total_size = {}, 0
    for s, shard in enumerate(shards, 1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{s:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for out_name, name in shard:
            t = _floats(tensors[name], packed_dtype).detach()
            if _cast_when_written(name, t, tensors, target):
                t = t.to(target)
            data[out_name] = t.to("cpu").contiguous().clone()
            weight_map[out_name] = file
            total_size += data[out_name].numel() * data[out_name].element_size()
        _save_shard(data, folder / file)
        del data
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _with_layer_types(config: dict) -> dict:
    """A config whose layers differ in attention kind but that lists no layer_types (published Gemma,
    Qwen2 with max_window_layers, a hybrid's full_attention_interval): layer_types written out from
    the parsed windows and linear layers, so the export's
    slots keep their layers' kinds instead of the kinds transformers derives from slot positions."""
    decoder = _decoder_config(config)
    if "layer_types" in decoder:
        return config
    parsed = _parse_or_none(config)
    if parsed is None:  # an architecture we do not run: exported as it is
        return config
    windows, linear = parsed.sliding_window, parsed.linear_layers
    if len(set(windows)) < 2 and not any(linear):
        return config
    out = json.loads(json.dumps(config))
    _decoder_config(out)["layer_types"] = [_layer_type(w, lin) for w, lin in zip(windows, linear)]
    return out


def _with_sparse_layers(config: dict, out: dict, path: LayerPath) -> dict:
    """A Qwen mixture-of-experts export (mlp_only_layers / decoder_sparse_step pick the dense
    layers): it lists its dense slots in mlp_only_layers with step 1, so each slot keeps its
    layer's MLP kind whatever the path's length. Mixtral, GPT-OSS and Qwen3.5-MoE (every layer
    sparse) and dense models are left as they are."""
    parsed = _parse_or_none(config)
    if parsed is None:
        return out
    sparse = parsed.sparse_layers
    if not any(sparse) or parsed.architecture in ("MixtralForCausalLM", "GptOssForCausalLM",
                                                  "Qwen3_5MoeForCausalLM"):  # every layer sparse
        return out
    target = _decoder_config(out)
    target["decoder_sparse_step"] = 1
    target["mlp_only_layers"] = [s for s, layer in enumerate(path) if not sparse[layer]]
    return out


def _layer_type(window: int, linear: bool) -> str:
    """transformers' layer_types entry for a layer of this sliding window (0: none) and kind."""
    return "linear_attention" if linear else "sliding_attention" if window else "full_attention"


def _slot_kinds(config: dict) -> list[tuple]:
    parsed = _parse_or_none(config)
    return list(zip(parsed.sliding_window, parsed.linear_layers, parsed.sparse_layers)) if parsed else []


def _parse_or_none(config: dict):
    from .config import ConfigError, parse_config

    try:
        return parse_config(config)
    except ConfigError:  # an architecture we do not run: exported as it is
        return None


def _kinds_kept(config: dict, out: dict, path: LayerPath) -> dict:
    """``out`` (the export's config) read back must give every slot its layer's attention window,
    linear-attention and MLP kind. Where a position rule moves them even so (Qwen2's
    max_window_layers once the path is longer: its last slots would slide), layer_types is written
    out, and max_window_layers moved past the last slot when no slot slides; a config that still
    moves them is a ValueError, never an export that runs another model."""
    kinds = _slot_kinds(config)
    want = [kinds[layer] for layer in path] if kinds else []
    if not want or _slot_kinds(out) == want:
        return out
    fixed = json.loads(json.dumps(out))
    decoder = _decoder_config(fixed)
    decoder["layer_types"] = [_layer_type(window, lin) for window, lin, _ in want]
    if "max_window_layers" in decoder and not any(window for window, _, _ in want):
        decoder["max_window_layers"] = len(path)
    if _slot_kinds(fixed) != want:
        raise ValueError(f"the exported config would run some slots of path {path} with another attention or MLP kind "
                         "than their layers'; not writing it")
    return fixed


def _export_config(config: dict, path: LayerPath, target, names: list[tuple[str, str]]) -> dict:
    """The config.json of the export (checked before any weight is written); ``names``: the
    (output, source) tensor names of ``_slot_names``."""
    modules = sorted({(out.rsplit(".", 1)[0], src.rsplit(".", 1)[0]) for out, src in names if _HF_LAYER.match(src)})
    out_config = _with_sparse_layers(config, remap_config(_with_layer_types(config), path, target, modules), path)
    out_config = _kinds_kept(config, out_config, path)
    out_config.setdefault("architectures", config.get("architectures") or ["LlamaForCausalLM"])
    return out_config


def _write_config_and_tokenizer(folder: Path, out_config: dict, tokenizer, files) -> None:
    (folder / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
    for f in files:
        shutil.copyfile(f, folder / f.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def check_exportable(src, what: str, force: bool) -> None:
    """Refuses (or with ``force`` warns about) exporting a model circuit-finder does not run: its
    export cannot be checked to reproduce the path, and settings a runtime derives from a layer's
    position rather than from per-layer lists (llama.cpp's SmolLM3 RoPE-less every 4th layer, a
    sliding window every n-th layer, the first k dense layers of a mixture) would follow the slot,
    not the layer."""
    text = (f"{src}: {what} is not one circuit-finder runs, so the export cannot be checked to reproduce the "
            f"layer path (settings derived from a layer's position would follow the slot, not the layer)")
    if not force:
        raise ValueError(f"{text}. Pass force=True (--force) to write it anyway.")
    warnings.warn(f"{text}; written anyway (force)", stacklevel=3)


def export_hf(src, dst: str | os.PathLike, layers, dtype: str | torch.dtype | None = None,
              max_shard_size: int | str = "2GB", overwrite: bool = False, force: bool = False) -> Path:
    """Writes a plain Hugging Face folder for the layer path: safetensors (sharded above
    ``max_shard_size``, with model.safetensors.index.json), config.json with num_hidden_layers set
    and per-layer lists reordered, and the tokenizer. ``src`` is a model folder, a .gguf file
    (dequantized to ``dtype``, float32 by default) or a loaded Model (its weights as loaded). A
    repeated layer is written once per slot, as plain HF models need. dtype: None keeps each
    tensor's dtype. Arguments and the target are checked before any weight is read. An
    architecture circuit-finder does not run is refused unless ``force`` (``check_exportable``)."""
    from .config import ConfigError, parse_config
    from .loading import resolve_dtype

    dst = Path(dst)
    config = _hf_source_config(src)
    try:
        parse_config(config)
    except ConfigError as e:
        check_exportable(src, f"its config ({e})", force)
    n = _config_layer_count(config, src)
    path = LayerPath.coerce(layers, n)
    target = resolve_dtype(dtype, torch.float32) if dtype is not None else None
    limit = parse_size(max_shard_size)
    _check_target(dst, overwrite, folder=True,  # a loaded Model: the folder or file it was loaded from
                  source=src if isinstance(src, (str, os.PathLike)) else getattr(src, "source", None))
    tensors, tokenizer, tokenizer_files, packed_dtype = _hf_source_weights(src, target)
    tensors = hub_expert_tensors(tensors, config, packed_dtype)
    config = _without_quantization(config, tensors)
    names = _slot_names(tensors, path, n)
    config = _dynamic_along(config, names)
    shards = _plan_shards(tensors, names, target, limit, packed_dtype)
    out_config = _export_config(config, path, target, names)
    with staged(dst, folder=True) as tmp:
        _write_shards(tmp, tensors, shards, target, packed_dtype)
        _write_config_and_tokenizer(tmp, out_config, tokenizer, tokenizer_files)
    return dst


# --------------------------------------------------------------------------------- mergekit
def _mergekit_dtype(dtype) -> str:
    from .loading import resolve_dtype

    return _MERGEKIT_DTYPES[resolve_dtype(dtype, torch.bfloat16)]


def _path_without_count(layers) -> LayerPath:
    if isinstance(layers, LayerPath):
        return layers
    if isinstance(layers, str):
        if layers.strip().lower().startswith("rys"):
            raise LayerPathError(f"'{layers.strip()}' needs the model's layer count: pass num_layers= "
                                 "(--num-layers), or a local model")
        return LayerPath.parse(layers)
    return LayerPath(layers)


def mergekit_config(layers, model: str = "MODEL", num_layers: int | None = None, dtype: str = "bfloat16") -> str:
    """mergekit ``passthrough`` YAML whose slices (``layer_range`` [start, end), end exclusive)
    reproduce the layer path: one slice per maximal run of consecutive ascending layers. With
    ``num_layers`` the path is checked against it and ``rys=i:j`` is accepted."""
    import yaml

    path = LayerPath.coerce(layers, num_layers) if num_layers is not None else _path_without_count(layers)
    runs: list[list[int]] = []
    for layer in path:
        if runs and layer == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([layer, layer + 1])
    doc = {"slices": [{"sources": [{"model": model, "layer_range": [a, b]}]} for a, b in runs],
           "merge_method": "passthrough", "dtype": _mergekit_dtype(dtype)}
    return f"# circuit-finder layer path {path}\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)


def _looks_like_hub_id(src: str) -> bool:
    """'org/name' that is no local path: not .gguf, and its 'org' is no local folder (then it was
    meant as a local path that does not exist)."""
    return bool(_HUB_ID.match(src)) and not _is_gguf(src) and not os.path.exists(src.split("/")[0])


def mergekit_source(src: str | os.PathLike, model: str | None = None,
                    num_layers: int | None = None) -> tuple[str, int | None]:
    """(model name to write, layer count or None) for a mergekit config of ``src``: a local model
    folder or .gguf file (its layer count from metadata; a GGUF needs ``model``, the Hugging Face
    name to write), or a hub id ``org/name`` (layer count ``num_layers``, unchecked when None)."""
    text = str(src)
    if os.path.exists(text):
        n = source_num_layers(text)
        if num_layers is not None and num_layers != n:
            raise ValueError(f"num_layers={num_layers} disagrees with {text}, which has {n} layers")
        if _is_gguf(text) and model is None:
            raise ValueError(f"{text}: mergekit reads Hugging Face models, not GGUF files; name the Hugging Face "
                             "model this GGUF came from with model= (--mergekit-model org/name)")
        if not _is_gguf(text) and "text_config" in _read_config(Path(text)):
            raise ValueError(f"{text}: a multimodal model; mergekit needs its per-module syntax for these, which "
                             "this export does not write. Use --format hf (keeps the vision tower) instead")
        return model or text, n
    if _looks_like_hub_id(text):
        return model or text, num_layers
    raise FileNotFoundError(f"{text}: no such model folder or file (a Hugging Face hub id is written org/name)")


def _warn_moved_kinds(config: dict, path: LayerPath, src) -> None:
    """mergekit's passthrough renumbers layers and keeps the config: a model whose layers differ in
    kind (sliding / full / linear attention, dense / sparse MLP) gives each slot the kind of its
    position there, not its layer's. Warns naming the slots (--format hf writes the kinds out)."""
    kinds = _slot_kinds(config)
    moved = [k for k, layer in enumerate(path) if k >= len(kinds) or kinds[layer] != kinds[k]]
    if len(set(kinds)) > 1 and moved:
        warnings.warn(f"{src}: slots {moved[:8]}{' ...' if len(moved) > 8 else ''} hold layers of another attention or "
                      "MLP kind than their position's; mergekit keeps the config, so they would run as their "
                      "position's kind. --format hf writes each slot's kind out", stacklevel=3)


def mergekit_text(src: str | os.PathLike, layers, model: str | None = None, num_layers: int | None = None,
                  dtype: str = "bfloat16") -> str:
    """``mergekit_config`` for ``src`` (see ``mergekit_source``), warning when a local folder's
    slots would run another attention or MLP kind than their layers' under mergekit."""
    name, n = mergekit_source(src, model, num_layers)
    text = mergekit_config(layers, model=name, num_layers=n, dtype=dtype)
    if n is not None and os.path.isdir(str(src)):
        _warn_moved_kinds(_read_config(Path(src)), LayerPath.coerce(layers, n), src)
    return text


def export_mergekit(src: str | os.PathLike, dst: str | os.PathLike, layers, model: str | None = None,
                    num_layers: int | None = None, dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """Writes ``mergekit_config`` for ``src`` (see ``mergekit_source``) to ``dst``, refusing an
    existing file unless ``overwrite``."""
    dst = Path(dst)
    mergekit_source(src, model, num_layers)  # (refuses a bad source before the target is looked at)
    _check_target(dst, overwrite, folder=False, source=src if os.path.exists(str(src)) else None)
    text = mergekit_text(src, layers, model, num_layers, dtype)
    with atomic_file(dst, "w", encoding="utf-8") as f:
        f.write(text)
    return dst
