"""GGUF (llama.cpp's format) -> Hugging Face-named tensors and config, via the `gguf` package.

Matrices of a packed type stay the file's blocks (views of its memory map where their rows keep
their order, ``read_gguf(keep_packed=True)``); the rest is decoded one tensor at a time into the
compute dtype, so after loading there is one copy of the weights, and the map's pages the read
touched leave the resident set (``drop_resident_pages``). What llama.cpp's converter changes is
undone here so the engine sees Hugging Face's layout: the Q/K row permutation of `llama` and
`mistral3` (interleaved RoPE), Gemma's +1 on every norm weight, and the names that differ per
family (Gemma's `ffn_norm` is the pre-MLP norm, Phi-3's `attn_qkv` / `ffn_up` are the fused
projections). Family settings no key carries follow llama.cpp's rules: Gemma's sliding pattern
(every 2nd / 6th layer full, unless `{arch}.attention.sliding_window_pattern` lists it) and its
attention scale (hidden / heads for the 27B layer counts 46 and 62, else the head size, unless
`{arch}.attention.scale` is set); Phi-3's LongRoPE comes from its rope_factors tensors, Llama 3.1's
scaling from rope_freqs (``_rope_freqs_config``: llama3 parameters where they give its divisors). Mixtures of
experts (qwen2moe, qwen3moe, llama with expert_count = Mixtral, gpt-oss): stacked ffn_*_exps tensors
kept as the engine's stacked gate / up / down layout (gpt-oss: with their biases; its MXFP4
experts dequantized by ``quants``); dense layers are the blocks without a router. gpt-oss's
clamped SwiGLU constants and YaRN without truncation are what llama.cpp and the published config use.
Hybrids (qwen35, qwen35moe, qwen3next): the linear-attention tensors back in transformers' layout
(``_hybrid_arrays``: value heads, A_log, the conv's axis, qwen3next's split projections). Tokenizer
and chat template come from the file, built by transformers once per file and then read back from
a cache folder keyed by the file's metadata (``gguf_tokenizer``).

Metadata without reading any tensor: ``open_gguf(path)`` (the reader), ``gguf_field(reader, key)``,
``gguf_architecture`` / ``gguf_block_count`` (of an open reader) and ``gguf_num_layers(path)``.

Limits: architectures in SUPPORTED_ARCHS and tensor types in SUPPORTED_TYPES (DEQUANTIZED_TYPES:
the other i-quants, dequantized with a warning); per-layer head counts
and RoPE factors must be uniform; a llama file with experts is read as Mixtral, and experts stored
one tensor each (old Mixtral conversions) are refused.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from .quants import PACKED_TYPES, PackedTensor, dequantize_ggml_mxfp4, is_matrix_name, packs_on

__all__ = ["DEQUANTIZED_TYPES", "GGUFError", "SUPPORTED_ARCHS", "SUPPORTED_TYPES", "build_tokenizer",
           "drop_resident_pages", "sliding_layers", "gguf_architecture", "gguf_block_count", "gguf_config",
           "gguf_field", "gguf_num_layers", "gguf_tensor_name", "gguf_tokenizer", "llama_cpp_query_scalar", "metadata_digest",
           "open_gguf", "read_gguf", "tokenizer_cache_dir"]

ARCH_TO_HF = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
              "mistral3": "Ministral3ForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM",
              "qwen3moe": "Qwen3MoeForCausalLM", "gpt-oss": "GptOssForCausalLM", "qwen35": "Qwen3_5ForCausalLM",
              "qwen35moe": "Qwen3_5MoeForCausalLM", "qwen3next": "Qwen3NextForCausalLM"}  # llama + experts: Mixtral
_MODEL_TYPE = {"gemma3": "gemma3_text", "mistral3": "ministral3", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
               "gpt-oss": "gpt_oss", "qwen35": "qwen3_5_text", "qwen35moe": "qwen3_5_moe_text", "qwen3next": "qwen3_next"}
_HYBRID = ("qwen35", "qwen35moe", "qwen3next")  # Gated DeltaNet + gated attention (llama.cpp's names)
_PLUS_ONE = ("gemma2", "gemma3", *_HYBRID)  # converters store these norms as 1 + w (not a hybrid's ssm_norm)
_OLD_EXPERTS = re.compile(r"^blk\.\d+\.ffn_(?:gate|up|down)\.\d+\.weight$")  # pre-2024 per-expert Mixtral files
_PERMUTED = ("llama", "mistral3")  # converters that reorder Q/K rows for interleaved RoPE
_GEMMA = ("gemma2", "gemma3")
_GEMMA_27B_BLOCKS = {"gemma2": 46, "gemma3": 62}  # llama.cpp scales queries by hidden/heads for these


def llama_cpp_query_scalar(arch: str, blocks: int, config: dict) -> int:
    """The query_pre_attn_scalar llama.cpp gives a Gemma 2/3 file of ``blocks`` blocks (queries
    scaled by its inverse square root): hidden / heads (integer division) at the 27B block counts
    (46, 62), else the head size. llama.cpp reads no key for it: the block count alone decides."""
    if blocks == _GEMMA_27B_BLOCKS[arch]:
        return config["hidden_size"] // config["num_attention_heads"]
    return config["head_dim"]
SUPPORTED_ARCHS = tuple(ARCH_TO_HF)
# i-quants without a packed kernel: dequantized on load by the gguf package, with one warning per load
DEQUANTIZED_TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K", "IQ4_NL", "IQ4_XS", "MXFP4")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
    # mixture of experts: the router, experts stacked [E, out, in] (held as the engine's stacked
    # gate / up / down layout), Qwen2-MoE's shared expert and its gate
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
# Where a family's converter names differ from the table above.
_FAMILY_BLOCK_NAMES = {
    "phi3": {"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"},
    "gemma2": {"post_attention_norm.weight": "post_attention_layernorm.weight",
               "ffn_norm.weight": "pre_feedforward_layernorm.weight",
               "post_ffw_norm.weight": "post_feedforward_layernorm.weight"},
}
_FAMILY_BLOCK_NAMES["gemma3"] = _FAMILY_BLOCK_NAMES["gemma2"]
# Qwen3.5 / Qwen3-Next: the linear-attention tensors (ssm_a holds -exp(A_log), conv1d is squeezed);
# qwen3next files split in_proj_qkvz into attn_qkv (q | k | v) and attn_gate (z), or (older) keep it
# whole as ssm_in; a fused expert gate_up is the engine's stacked layout already.
_FAMILY_BLOCK_NAMES["qwen35"] = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight", "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight", "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_ba.weight": "linear_attn.in_proj_ba.weight", "ssm_in.weight": "linear_attn.in_proj_qkvz.weight",
    "ssm_a": "linear_attn.A_log", "ssm_dt.bias": "linear_attn.dt_bias", "ssm_conv1d.weight": "linear_attn.conv1d.weight",
    "ssm_norm.weight": "linear_attn.norm.weight", "ssm_out.weight": "linear_attn.out_proj.weight",
    "ffn_gate_up_exps.weight": "mlp.experts.gate_up_proj"}
_FAMILY_BLOCK_NAMES["qwen35moe"] = _FAMILY_BLOCK_NAMES["qwen3next"] = _FAMILY_BLOCK_NAMES["qwen35"]
# GPT-OSS: the pre-MLP norm, sinks, the biased router and experts (kept as separate gate / up, stacked)
_FAMILY_BLOCK_NAMES["gpt-oss"] = {
    "post_attention_norm.weight": "post_attention_layernorm.weight", "attn_sinks.weight": "self_attn.sinks",
    "ffn_gate_inp.weight": "mlp.router.weight", "ffn_gate_inp.bias": "mlp.router.bias",
    "ffn_gate_exps.bias": "mlp.experts.gate_proj_bias", "ffn_up_exps.bias": "mlp.experts.up_proj_bias",
    "ffn_down_exps.bias": "mlp.experts.down_proj_bias"}


class GGUFError(ValueError):
    """A GGUF file that cannot be read, or holds something circuit-finder does not support."""


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """GGUF tensor name of a file of architecture ``arch`` -> Hugging Face name (None for tensors
    the engine does not use)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    suffix = _FAMILY_BLOCK_NAMES.get(arch, {}).get(parts[2]) or _BLOCK_NAMES.get(parts[2])
    return f"model.layers.{parts[1]}.{suffix}" if suffix else None


def gguf_tensor_name(name: str, arch: str = "llama") -> str | None:
    """Hugging Face tensor name -> its name in a GGUF file of architecture ``arch`` (the inverse of
    ``hf_name``; None for tensors a file names otherwise, e.g. split or fused ones)."""
    globals_ = {hf: g for g, hf in _GLOBAL_NAMES.items()}
    if name in globals_:
        return globals_[name]
    parts = name.split(".", 3)
    if len(parts) != 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None
    table = {**{hf: g for g, hf in _BLOCK_NAMES.items()}, **{hf: g for g, hf in _FAMILY_BLOCK_NAMES.get(arch, {}).items()}}
    return f"blk.{parts[2]}.{table[parts[3]]}" if parts[3] in table else None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's converter permutation of Q/K rows (per head: interleaved pairs -> halves)."""
    rows = w.shape[0]
    if rows % (2 * n_head) != 0:
        raise GGUFError(f"cannot undo the Q/K permutation: {rows} rows for {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (Hugging Face rows -> GGUF rows); the inverse of unpermute_qk."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` over ``path``, memory-mapped read-only (no commit charge, so a file
    larger than RAM maps). FileNotFoundError when there is no such
    file, GGUFError naming the file when its bytes are not GGUF or it is one part of a split file."""
    path = str(path)
    if not os.path.isfile(path):
        what = "a folder, not a GGUF file" if os.path.isdir(path) else "no such GGUF file"
        raise FileNotFoundError(f"{path}: {what}")
    if os.path.getsize(path) < 24:
        raise GGUFError(f"{path}: {os.path.getsize(path)} bytes, too short to be a GGUF file (empty or truncated)")
    check_metadata_sizes(path)
    try:
        try:
            reader = fast_reader_class()(path)
        except TypeError:  # the package's byte-read hook changed its arguments: its own reader then
            import gguf

            reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on bad bytes
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    parts = gguf_field(reader, "split.count")
    if parts is not None and int(parts) > 1:  # llama.cpp's split files: each holds some of the tensors
        raise GGUFError(f"{path}: part of a GGUF split into {int(parts)} files; merge them into one first "
                        f"(llama.cpp: llama-gguf-split --merge {path} merged.gguf)")
    return reader


@functools.cache
def fast_reader_class():
    """gguf.GGUFReader, its byte reads served from a plain ndarray view of its memory map: the
    reader slices the map once per metadata item (twice per vocabulary string), and numpy's memmap
    subclass costs ~2 us a slice (the default model loads in 2.1 s instead of 3.6). Same bytes,
    same views of the mapped file, no copy; tests/test_gguf.py compares it with the package's
    reader field by field. It overrides the reader's byte-read hook (same signature since gguf
    0.10); open_gguf falls back to the package's reader if that hook ever takes other arguments."""
    import gguf

    class MappedReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_cf_plain")
            if plain is None:
                plain = self._cf_plain = self.data.view(np.ndarray)
            dtype = np.dtype(dtype)
            count = int(count)
            arr = plain[offset:offset + dtype.itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return MappedReader


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


def check_metadata_sizes(path: str) -> None:
    """Walks the metadata of a (little-endian) GGUF file and checks that every string length and
    array count fits in the bytes that are left, so a corrupt count is a GGUFError naming the key
    instead of the gguf reader building billions of entries (found by fuzzing: out of memory); then
    the tensor table: each tensor's ggml type known and its data inside the file (a truncated
    download is a GGUFError naming the first tensor cut off, not a reshape error)."""
    _walk(path, tensors=True)


def metadata_keys(path: str) -> tuple[int, list[str]] | None:
    """(the offset where a little-endian GGUF file's metadata ends, its keys), walked and checked
    as ``check_metadata_sizes`` says, without the gguf reader (which builds every vocabulary entry:
    seconds); None for a file that is not one (not GGUF, or big-endian: the reader decides)."""
    return _walk(path, tensors=False)


def _walk(path: str, tensors: bool) -> tuple[int, list[str]] | None:
    import mmap
    import struct

    if os.path.getsize(path) < 24:
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _check_version(data, path)
        if not _little_endian_gguf(data):
            return None
        at, keys, alignment = 24, [], 32
        for key, kind, _, start, end in _entries(data, path):
            if key == "general.alignment" and kind == 4:  # uint32
                alignment = struct.unpack_from("<I", data, start)[0] or 32
            keys.append(key)
            at = end
        if tensors:
            _check_tensor_table(data, at, struct.unpack_from("<Q", data, 8)[0], alignment, path)
        return at, keys


def _little_endian_gguf(data) -> bool:
    """Whether mapped bytes open as a little-endian GGUF file (a big-endian one is the reader's)."""
    import struct

    return data[:4] == b"GGUF" and struct.unpack_from("<I", data, 4)[0] <= 0xFFFF


def _check_version(data, path: str) -> None:
    """GGUFError for a GGUF version 1 file (32-bit counts, which the version 2+ layout misreads)."""
    import struct

    if data[:4] == b"GGUF" and struct.unpack_from("<I", data, 4)[0] == 1:
        raise GGUFError(f"{path}: a GGUF version 1 file (2023's first format, 32-bit counts): not supported; "
                        f"convert the model again with a current llama.cpp")


def _entries(data, path: str):
    """Each metadata entry of a little-endian GGUF file's bytes, checked as it is skipped:
    (key, value type, entry start, value start, entry end)."""
    import struct

    at = 24
    for k in range(struct.unpack_from("<Q", data, 16)[0]):
        begin = at
        at, key = _string(data, at, f"metadata entry {k}'s key", path)
        if at + 4 > len(data):
            raise GGUFError(f"{path}: metadata '{key}' has no value type (file ends)")
        kind, start = struct.unpack_from("<I", data, at)[0], at + 4
        at = _skip_value(data, start, kind, key, path)
        yield key, kind, begin, start, at


def _check_tensor_table(data, at: int, count: int, alignment: int, path: str) -> None:
    """Each tensor's info (name, dims, ggml type, offset): a known type, whole blocks, and its bytes
    inside the file."""
    import struct

    import gguf

    infos, sizes = [], {int(t): (t.name, *size) for t, size in gguf.GGML_QUANT_SIZES.items()}
    _need(data, at, count * 24, f"the tensor table ({count} tensors)", path)  # each entry is >= 24 bytes
    for k in range(count):
        at, name = _string(data, at, f"tensor {k}'s name", path)
        _need(data, at, 4, f"tensor {name!r}'s info", path)
        dims = struct.unpack_from("<I", data, at)[0]
        _need(data, at + 4, 8 * dims + 12, f"tensor {name!r}'s info", path)
        shape = struct.unpack_from(f"<{dims}Q", data, at + 4)
        kind, offset = struct.unpack_from("<IQ", data, at + 4 + 8 * dims)
        at += 4 + 8 * dims + 12
        if kind not in sizes:
            raise GGUFError(f"{path}: tensor {name!r} has ggml type {kind}, which the gguf package does not know")
        type_name, block, size = sizes[kind]
        values = math.prod(shape)
        if values % block:
            raise GGUFError(f"{path}: tensor {name!r} holds {values} values, not whole {block}-value blocks of "
                            f"{type_name}")
        infos.append((name, offset, values // block * size))
    start = -(-at // alignment) * alignment
    for name, offset, nbytes in infos:
        if start + offset + nbytes > len(data):
            raise GGUFError(f"{path}: tensor {name!r} needs bytes {start + offset}..{start + offset + nbytes}, but "
                            f"the file has {len(data)} (truncated? compare its size with the original's)")


def _need(data, at: int, n: int, what: str, path: str) -> None:
    if n < 0 or at + n > len(data):
        raise GGUFError(f"{path}: {what} needs {n} bytes at offset {at}; the file has {len(data)}")


def _string(data, at: int, what: str, path: str) -> tuple[int, str]:
    import struct

    _need(data, at, 8, what, path)
    n = struct.unpack_from("<Q", data, at)[0]
    _need(data, at + 8, n, what, path)
    return at + 8 + n, bytes(data[at + 8:at + 8 + min(n, 200)]).decode("utf-8", "replace")


def _skip_value(data, at: int, kind: int, key: str, path: str) -> int:
    """Offset after a value of GGUF type ``kind`` at ``at``."""
    import struct

    if kind in _SCALAR_SIZES:
        _need(data, at, _SCALAR_SIZES[kind], f"metadata '{key}'", path)
        return at + _SCALAR_SIZES[kind]
    if kind == _STRING:
        return _string(data, at, f"metadata '{key}'", path)[0]
    if kind != _ARRAY:
        raise GGUFError(f"{path}: metadata '{key}' has unknown value type {kind}")
    _need(data, at, 12, f"metadata '{key}'", path)
    item, count = struct.unpack_from("<IQ", data, at)
    at += 12
    if item in _SCALAR_SIZES:  # fixed-size items: one check for the whole array
        _need(data, at, count * _SCALAR_SIZES[item], f"metadata '{key}' ({count} items)", path)
        return at + count * _SCALAR_SIZES[item]
    _need(data, at, count * 8, f"metadata '{key}' ({count} items)", path)  # every item is >= 8 bytes
    if item == _STRING:  # a vocabulary: lengths only, nothing decoded
        return _skip_strings(data, at, count, f"metadata '{key}'", path)
    for _ in range(count):
        at = _skip_value(data, at, item, key, path)
    return at


def _skip_strings(data, at: int, count: int, what: str, path: str) -> int:
    """Offset after `count` GGUF strings at ``at`` (each a uint64 length, then its bytes)."""
    import struct

    length, end = struct.Struct("<Q").unpack_from, len(data)
    for _ in range(count):
        if at + 8 > end:
            _need(data, at, 8, what, path)
        n = length(data, at)[0]
        at += 8
        if at + n > end:
            _need(data, at, n, what, path)
        at += n
    return at


def gguf_field(reader, key: str, default=None):
    """The decoded value of metadata ``key`` (``default`` when absent); GGUFError when it cannot be decoded."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:
        raise GGUFError(f"metadata '{key}' is malformed: {e}") from e


def gguf_architecture(reader, path: str | os.PathLike) -> str:
    """``general.architecture`` of an open file (any architecture, supported or not)."""
    arch = gguf_field(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFError(f"{path}: no general.architecture")
    return arch


def gguf_block_count(reader, path: str | os.PathLike) -> int:
    """The number of decoder layers of an open file: ``{arch}.block_count`` less the
    multi-token-prediction blocks that follow them (``{arch}.nextn_predict_layers``, Qwen3.5)."""
    arch = gguf_architecture(reader, path)
    count = gguf_field(reader, f"{arch}.block_count")
    if count is None:
        raise GGUFError(f"{path}: no {arch}.block_count")
    nextn = gguf_field(reader, f"{arch}.nextn_predict_layers", 0) or 0
    if isinstance(count, bool) or not isinstance(count, int) or not isinstance(nextn, int) or count - nextn <= 0:
        raise GGUFError(f"{path}: {arch}.block_count is {count!r} with {nextn!r} prediction blocks, not a layer count")
    return count - nextn


def gguf_num_layers(path: str | os.PathLike) -> int:
    """The number of decoder layers of a GGUF file, from its metadata (no tensor is read)."""
    return gguf_block_count(open_gguf(path), path)


def gguf_config(reader, path: str) -> dict:
    """Hugging Face-style config.json dict from GGUF metadata."""
    arch = gguf_field(reader, "general.architecture")
    if arch not in ARCH_TO_HF:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")

    def need(key):
        v = gguf_field(reader, f"{arch}.{key}")
        if v is None:
            raise GGUFError(f"{path}: missing metadata '{arch}.{key}'")
        return v

    def per_layer_scalar(key, default=None):
        v = gguf_field(reader, f"{arch}.{key}", default)
        if v is None or v == []:
            raise GGUFError(f"{path}: missing metadata '{arch}.{key}'")
        if isinstance(v, list):
            if len(set(v)) != 1:
                raise GGUFError(f"{path}: per-layer '{arch}.{key}' values differ; not supported")
            v = v[0]
        return v

    try:
        return _config_from(reader, path, arch, need, per_layer_scalar)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        if isinstance(e, GGUFError) and str(e).startswith(str(path)):
            raise
        raise GGUFError(f"{path}: malformed metadata ({type(e).__name__}: {e})") from e


def _config_from(reader, path: str, arch: str, need, per_layer_scalar) -> dict:
    heads = int(per_layer_scalar("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = gguf_field(reader, "tokenizer.ggml.tokens") or []
    by_name = {t.name: t for t in reader.tensors}
    # the embedding's rows are the vocabulary (Gemma 3's converter drops the unused tail rows)
    vocab = (int(by_name["token_embd.weight"].shape[-1]) if "token_embd.weight" in by_name
             else gguf_field(reader, f"{arch}.vocab_size") or len(tokens))
    config = {
        "architectures": [ARCH_TO_HF[arch]],
        "model_type": _MODEL_TYPE.get(arch, arch),
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(per_layer_scalar("feed_forward_length",
                                                  gguf_field(reader, f"{arch}.expert_feed_forward_length"))),
        "num_hidden_layers": gguf_block_count(reader, path),  # without multi-token-prediction blocks
        "num_attention_heads": heads,
        "num_key_value_heads": int(per_layer_scalar("attention.head_count_kv", heads)),
        "head_dim": int(gguf_field(reader, f"{arch}.attention.key_length") or hidden // heads),
        "max_position_embeddings": int(gguf_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in by_name,
        "torch_dtype": "float32",
    }
    _moe_config(reader, path, arch, config, by_name)
    if arch in _HYBRID:
        _hybrid_config(reader, path, arch, need, config)
    if arch == "phi3":
        _phi3_config(reader, path, config, by_name)
    elif arch in _GEMMA:
        _gemma_config(reader, arch, config)
    else:
        _rope_scaling_config(reader, path, arch, need, config)
    if "rope_freqs.weight" in by_name:
        _rope_freqs_config(path, arch, config, _config_vector(by_name["rope_freqs.weight"], path))
    _bias_config(config, by_name)
    ids = _special_ids(reader, path, config["vocab_size"])
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        if key in ids:
            config[hf_key] = ids[key]
    ends = _end_ids(reader, ids, tokens, config)
    if len(ends) > 1:
        config["eos_token_id"] = ends
    elif ends:
        config["eos_token_id"] = ends[0]
    return config


def _end_ids(reader, ids: dict[str, int], tokens: list[str], config: dict) -> list[int]:
    """The ids that end generation, in order, once each: the file's eos, eot and eom ids (gpt-oss:
    eos only; its eot key may name <|end|>, which is no end there), then ``_end_tokens_by_text``."""
    harmony = config.get("model_type") == "gpt_oss"
    ends = [ids[k] for k in ("eos_token_id",) + (() if harmony else ("eot_token_id", "eom_token_id")) if k in ids]
    ends += [i for i in _end_tokens_by_text(reader, tokens) if i < config["vocab_size"]]
    return list(dict.fromkeys(ends))


# special tokens that end a turn or a generation in the chat formats of published models, which
# llama.cpp also stops at when the file's metadata names only another EOS (early Llama 3 Instruct
# files: eos <|end_of_text|>, no eot key; a ChatML model whose eos is <|endoftext|>)
_END_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<|return|>", "<|call|>", "<｜end▁of▁sentence｜>", "<EOT>")


def _end_tokens_by_text(reader, tokens: list[str]) -> list[int]:
    """Ids of control (or user-defined) tokens of the vocabulary ``tokens`` whose text is one of
    ``_END_TEXTS``; not <|end|> where the vocabulary has <|return|> (gpt-oss's harmony format:
    <|end|> closes the analysis channel, and the answer follows it), as llama.cpp leaves it out there too."""
    types = gguf_field(reader, "tokenizer.ggml.token_type")
    wanted = set(_END_TEXTS) - ({"<|end|>"} if "<|return|>" in tokens else set())
    return [i for i, t in enumerate(tokens) if t in wanted and (types is None or int(types[i]) in (3, 4))]


def _special_ids(reader, path: str, vocab_size: int) -> dict[str, int]:
    """tokenizer.ggml.{bos,eos,padding,eot,eom}_token_id that lie in the vocabulary; one outside it is
    warned about and left out."""
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "padding_token_id", "eot_token_id", "eom_token_id"):
        v = gguf_field(reader, f"tokenizer.ggml.{key}")
        if v is not None and not 0 <= int(v) < vocab_size:
            warnings.warn(f"{path}: tokenizer.ggml.{key} = {int(v)} is outside the vocabulary (0..{vocab_size - 1}): "
                          "ignored", stacklevel=5)
        elif v is not None:
            ids[key] = int(v)
    return ids


_ATTENTION_BIASES = ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias")
_MLP_BIASES = ("ffn_gate.bias", "ffn_up.bias", "ffn_down.bias")


def _bias_config(config: dict, by_name: dict) -> None:
    """Biases as the file holds them (llama.cpp reads each one it finds): ``attention_bias`` when
    any layer holds an attention bias (unless the family's own rule set it), ``mlp_bias`` when any
    holds an MLP bias. ``check_biases`` then refuses a bias the family's config cannot read."""
    names = {n.split(".", 2)[2] for n in by_name if n.startswith("blk.") and n.count(".") >= 2}
    if names & set(_ATTENTION_BIASES):
        config.setdefault("attention_bias", True)
    if names & set(_MLP_BIASES):
        config["mlp_bias"] = True


def check_biases(path: str, reader, arch: str, flags) -> dict[str, str]:
    """The biases the engine reads for a config (``flags``: its ``config.parse_config``, whose
    qkv_bias / o_bias / mlp_bias say) against those the file holds, per layer that holds the biased
    matrix. A bias held but not read would be dropped (a silently different model): GGUFError naming
    it. A bias read but not held (llama.cpp treats each as optional) is zero, exactly: returned as
    {Hugging Face bias name: its matrix's Hugging Face name}, for the loader to fill."""
    reads = {**dict.fromkeys(_ATTENTION_BIASES[:3], flags.qkv_bias), "attn_output.bias": flags.o_bias,
             **dict.fromkeys(_MLP_BIASES, flags.mlp_bias)}
    by_name = {t.name for t in reader.tensors}
    missing = {}
    for layer in range(flags.num_layers):
        for suffix, read in reads.items():
            bias, matrix = f"blk.{layer}.{suffix}", f"blk.{layer}.{suffix[:-4]}weight"
            if bias in by_name and not read:
                raise GGUFError(f"{path}: tensor {bias!r} is a bias the {arch} architecture's config does not "
                                "read here (the model would run without it, unlike llama.cpp)")
            if read and bias not in by_name and matrix in by_name and hf_name(bias, arch):
                missing[hf_name(bias, arch)] = hf_name(matrix, arch)
    return missing


def _moe_config(reader, path: str, arch: str, config: dict, by_name: dict) -> None:
    """Mixture-of-experts keys: expert count and top k; a llama file with experts is Mixtral (top-k
    renormalised); Qwen's expert size, renormalisation (expert_weights_norm, else Qwen3-MoE's
    published setting: on), shared expert, and dense layers (those without a router)."""
    count = gguf_field(reader, f"{arch}.expert_count")
    if not count and arch in ("qwen2moe", "qwen3moe", "qwen35moe", "qwen3next"):
        raise GGUFError(f"{path}: missing metadata '{arch}.expert_count'")
    if not count:
        return
    used = gguf_field(reader, f"{arch}.expert_used_count")
    if not used:
        raise GGUFError(f"{path}: missing metadata '{arch}.expert_used_count'")
    if any(_OLD_EXPERTS.match(name) for name in by_name):
        raise GGUFError(f"{path}: experts stored one tensor each (an old Mixtral conversion) are not supported; "
                        f"use a file with stacked ffn_*_exps tensors")
    if arch == "llama":
        config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=int(count),
                      num_experts_per_tok=int(used))
        return
    if arch == "gpt-oss":
        _gpt_oss_config(reader, path, config, by_name, int(count), int(used))
        return
    n = config["num_hidden_layers"]
    config.update(num_experts=int(count), num_experts_per_tok=int(used), decoder_sparse_step=1,
                  moe_intermediate_size=int(gguf_field(reader, f"{arch}.expert_feed_forward_length")
                                            or config["intermediate_size"]),
                  norm_topk_prob=bool(gguf_field(reader, f"{arch}.expert_weights_norm", arch != "qwen2moe")),
                  mlp_only_layers=[i for i in range(n) if f"blk.{i}.ffn_gate_inp.weight" not in by_name])
    if arch in ("qwen2moe", "qwen3next", "qwen35moe"):
        shexp = by_name.get("blk.0.ffn_gate_shexp.weight")
        config["shared_expert_intermediate_size"] = int(
            gguf_field(reader, f"{arch}.expert_shared_feed_forward_length") or (int(shexp.shape[1]) if shexp is not None else 0))
    if arch == "qwen2moe":
        config["qkv_bias"] = "blk.0.attn_q.bias" in by_name


def _gpt_oss_config(reader, path: str, config: dict, by_name: dict, count: int, used: int) -> None:
    """GPT-OSS: expert size, biases, the clamped SwiGLU (llama.cpp hard-codes alpha 1.702 and limit
    7), the window (required) and its layers (sliding_window_pattern, else even layers slide)."""
    window = gguf_field(reader, "gpt-oss.attention.sliding_window")
    if not window:
        raise GGUFError(f"{path}: missing metadata 'gpt-oss.attention.sliding_window'")
    base, swa = gguf_field(reader, "gpt-oss.rope.freq_base"), gguf_field(reader, "gpt-oss.rope.freq_base_swa")
    if swa is not None and base is not None and float(swa) != float(base):
        raise GGUFError(f"{path}: a separate RoPE base for sliding layers (rope.freq_base_swa) is not supported "
                        "for gpt-oss")
    n = config["num_hidden_layers"]
    config.update(num_local_experts=count, num_experts_per_tok=used, swiglu_alpha=1.702, swiglu_limit=7.0,
                  intermediate_size=int(gguf_field(reader, "gpt-oss.expert_feed_forward_length")
                                        or config["intermediate_size"]),
                  attention_bias="blk.0.attn_q.bias" in by_name, sliding_window=int(window),
                  layer_types=["sliding_attention" if s else "full_attention"
                               for s in sliding_layers(reader, "gpt-oss", n)])


def _hybrid_config(reader, path: str, arch: str, need, config: dict) -> None:
    """Qwen3.5 / Qwen3-Next: the linear-attention sizes (ssm.*), which layers are linear
    (attention.recurrent_layers, else every full_attention_interval-th layer is full), partial
    rotary from rope.dimension_count (num_hidden_layers already leaves out the multi-token-prediction
    blocks at the end)."""
    heads_v, inner = int(need("ssm.time_step_rank")), int(need("ssm.inner_size"))
    config.update(linear_conv_kernel_dim=int(need("ssm.conv_kernel")), linear_key_head_dim=int(need("ssm.state_size")),
                  linear_num_key_heads=int(need("ssm.group_count")), linear_num_value_heads=heads_v,
                  linear_value_head_dim=inner // heads_v)
    n = config["num_hidden_layers"]
    recurrent = gguf_field(reader, f"{arch}.attention.recurrent_layers")
    interval = int(gguf_field(reader, f"{arch}.full_attention_interval", 4) or 4)
    if isinstance(recurrent, list) and len(recurrent) < n:
        raise GGUFError(f"{path}: {arch}.attention.recurrent_layers lists {len(recurrent)} layers, the file has {n}")
    linear = [bool(recurrent[i]) if isinstance(recurrent, list) else (i + 1) % interval != 0 for i in range(n)]
    config["layer_types"] = ["linear_attention" if x else "full_attention" for x in linear]
    rot = gguf_field(reader, f"{arch}.rope.dimension_count")
    config["partial_rotary_factor"] = int(rot) / config["head_dim"] if rot else 0.25


def _rope_scaling_config(reader, path: str, arch: str, need, config: dict) -> None:
    """rope_scaling from {arch}.rope.scaling.* (linear, yarn); for mistral3 the YaRN extras and the
    Llama-4 query scale (attention.temperature_scale)."""
    # as llama.cpp reads them: the factor from rope.scaling.factor, else the older rope.scale_linear
    # (2023 converters' linear-scaled fine-tunes); a factor without a type is linear
    factor = gguf_field(reader, f"{arch}.rope.scaling.factor") or gguf_field(reader, f"{arch}.rope.scale_linear")
    scaling = gguf_field(reader, f"{arch}.rope.scaling.type", "linear" if factor and float(factor) != 1.0 else None)
    rope = {"rope_type": "default"}
    if scaling and scaling != "none":
        if scaling not in ("linear", "yarn"):
            raise GGUFError(f"{path}: RoPE scaling {scaling!r} is not supported (supported: linear, yarn)")
        rope = {"rope_type": scaling, "factor": float(factor or need("rope.scaling.factor"))}
        orig = gguf_field(reader, f"{arch}.rope.scaling.original_context_length")
        if orig:
            rope["original_max_position_embeddings"] = int(orig)
        for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            v = gguf_field(reader, f"{arch}.rope.scaling.{key}")
            if v:
                rope[hf_key] = float(v)
        if arch == "gpt-oss" and scaling == "yarn":  # its published config; no GGUF key says so
            rope["truncate"] = False
    if arch == "mistral3":
        if rope["rope_type"] == "yarn":  # llama.cpp: attn factor mscale(f, 1) / mscale(f, yarn_log_multiplier)
            rope["mscale"] = 1.0
            rope["mscale_all_dim"] = float(gguf_field(reader, f"{arch}.rope.scaling.yarn_log_multiplier", 1.0))
        beta = float(gguf_field(reader, f"{arch}.attention.temperature_scale", 0.0))
        rope["llama_4_scaling_beta"] = beta  # stated even when 0, so no family default fills it in
        if beta:
            orig = gguf_field(reader, f"{arch}.rope.scaling.original_context_length")
            if not orig:
                raise GGUFError(f"{path}: {arch}.attention.temperature_scale needs "
                                f"{arch}.rope.scaling.original_context_length")
            rope["original_max_position_embeddings"] = int(orig)
    if rope["rope_type"] != "default" or len(rope) > 1:
        rope["rope_theta"] = config.pop("rope_theta")
        config["rope_parameters"] = rope


# llama.cpp's converter turns a llama3 RoPE config into rope_freqs with these defaults (Meta's Llama 3.1-3.3)
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope_freqs_config(path: str, arch: str, config: dict, divisors: np.ndarray) -> None:
    """rope_freqs (llama.cpp divides RoPE frequency i by divisors[i]; its converter writes them for
    Llama 3.1-style llama3 scaling) -> rope_parameters: llama3 where Meta's parameters with the largest
    divisor as the factor give these divisors, else longrope with them as its short and long factors
    (the same divisors at every length, attention unscaled): the file's frequencies either way."""
    if "rope_parameters" in config or "rope_scaling" in config:
        raise GGUFError(f"{path}: rope_freqs.weight together with another RoPE scaling ({arch}) is not supported")
    theta, dim = config.pop("rope_theta"), 2 * len(divisors)
    rotary = int(config["head_dim"] * config.get("partial_rotary_factor", 1.0))
    if dim != rotary or not np.all(np.isfinite(divisors) & (divisors > 0)):
        raise GGUFError(f"{path}: rope_freqs.weight must hold {rotary // 2} positive finite numbers (one per "
                        f"RoPE frequency of {rotary} rotary dimensions); it has {len(divisors)}")
    llama3 = {"rope_type": "llama3", "factor": float(divisors.max()), **_LLAMA3_ROPE}
    if np.allclose(llama3_divisors(theta, dim, llama3), divisors, rtol=1e-5, atol=0):
        config["rope_parameters"] = {**llama3, "rope_theta": theta}
        return
    listed = [float(x) for x in divisors]
    config["rope_parameters"] = {"rope_type": "longrope", "short_factor": listed, "long_factor": listed,
                                 "attention_factor": 1.0, "factor": 1.0, "rope_theta": theta}


def llama3_divisors(theta: float, dim: int, rope: dict) -> np.ndarray:
    """What each RoPE frequency is divided by under llama3 scaling (rope: factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings): 1 for wavelengths under original / high, the
    factor above original / low, interpolated in 1 / divisor between."""
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen, orig = 2 * np.pi / inv, rope["original_max_position_embeddings"]
    lo, hi, factor = rope["low_freq_factor"], rope["high_freq_factor"], rope["factor"]
    smooth = (orig / wavelen - lo) / (hi - lo)
    between = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < orig / hi, 1.0, np.where(wavelen > orig / lo, factor, between))


def _phi3_config(reader, path: str, config: dict, by_name: dict) -> None:
    """Phi-3: partial rotary from rope.dimension_count, the window (0 = none), and LongRoPE from the
    rope_factors_short / rope_factors_long tensors."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    config["head_dim"] = head_dim
    rot = gguf_field(reader, "phi3.rope.dimension_count")
    if rot:
        config["partial_rotary_factor"] = int(rot) / head_dim
    window = gguf_field(reader, "phi3.attention.sliding_window")
    config["sliding_window"] = int(window) if window else None
    orig = gguf_field(reader, "phi3.rope.scaling.original_context_length")
    if orig:
        config["original_max_position_embeddings"] = int(orig)
    if "rope_factors_long.weight" not in by_name:
        return
    if "rope_factors_short.weight" not in by_name or not orig:
        raise GGUFError(f"{path}: LongRoPE needs rope_factors_short.weight, rope_factors_long.weight and "
                        "phi3.rope.scaling.original_context_length")
    rope = {"rope_type": "longrope",
            "short_factor": [float(x) for x in _config_vector(by_name["rope_factors_short.weight"], path)],
            "long_factor": [float(x) for x in _config_vector(by_name["rope_factors_long.weight"], path)]}
    attn = gguf_field(reader, "phi3.rope.scaling.attn_factor")
    if attn:
        rope["attention_factor"] = float(attn)
    config["rope_scaling"] = rope


def _gemma_config(reader, arch: str, config: dict) -> None:
    """Gemma 2/3: GeGLU, soft-caps, the per-layer sliding pattern, the query scale, Gemma 3's
    local RoPE base and (global-only) linear scaling."""
    n = config["num_hidden_layers"]
    config.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                  attn_logit_softcapping=None, final_logit_softcapping=None)
    # Gemma 2 always soft-caps: a file without the keys gets Gemma 2's 50 / 30, as in llama.cpp
    caps = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0} if arch == "gemma2" else \
        {"final_logit_softcapping": None}
    for key, default in caps.items():
        v = gguf_field(reader, f"{arch}.{key}", default)
        config[key] = float(v) if v else None
    scale = gguf_field(reader, f"{arch}.attention.scale")
    if scale:
        config["query_pre_attn_scalar"] = 1.0 / float(scale) ** 2
    else:
        config["query_pre_attn_scalar"] = llama_cpp_query_scalar(arch, n, config)
    # llama.cpp: a gemma2 file without the key slides over 4096 tokens; a gemma3 one does not slide
    window = gguf_field(reader, f"{arch}.attention.sliding_window", 4096 if arch == "gemma2" else None)
    config["sliding_window"] = int(window) if window else None
    config["layer_types"] = [("sliding_attention" if sliding and window else "full_attention")
                             for sliding in sliding_layers(reader, arch, n)]
    if arch == "gemma3":
        full = {"rope_type": "default", "rope_theta": float(gguf_field(reader, "gemma3.rope.freq_base", 1e6))}
        if gguf_field(reader, "gemma3.rope.scaling.type") == "linear":
            full.update(rope_type="linear", factor=float(gguf_field(reader, "gemma3.rope.scaling.factor", 1.0)))
        local = {"rope_type": "default", "rope_theta": float(gguf_field(reader, "gemma3.rope.freq_base_swa", 1e4))}
        config.pop("rope_theta")
        config["rope_parameters"] = {"full_attention": full, "sliding_attention": local}


_SLIDING_PERIOD = {"gemma2": 2, "gemma3": 6, "gpt-oss": 2}  # llama.cpp's default: every period-th layer is full


def sliding_layers(reader, arch: str, n: int) -> list[bool]:
    """Which of a file's n layers use the sliding window (Gemma 2/3, gpt-oss):
    {arch}.attention.sliding_window_pattern (one bool per layer, or a period) when present, else
    llama.cpp's rule: every 2nd (Gemma 2, gpt-oss) or 6th (Gemma 3) layer is full."""
    pattern = gguf_field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        if len(pattern) != n:
            raise GGUFError(f"{arch}.attention.sliding_window_pattern lists {len(pattern)} layers, the file has {n}")
        return [bool(x) for x in pattern]
    period = int(pattern) if pattern else _SLIDING_PERIOD[arch]
    return [(i + 1) % period != 0 for i in range(n)]


def mapped_bytes(data) -> torch.Tensor:
    """A tensor over a tensor's bytes in the memory-mapped file, only ever read (torch warns that
    the mapping is read-only; it stays unwritten)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(data))


def _config_vector(t, path: str) -> np.ndarray:
    """A small tensor the config is read from (RoPE factors), as float64 values: read from the map as
    it is (converters write them F32), other types decoded as weights are."""
    import gguf

    if gguf.GGMLQuantizationType(t.tensor_type).name in ("F32", "F16"):
        return np.asarray(t.data, dtype=np.float64).ravel()
    return _dequantize(t, path).astype(np.float64).ravel()


def _dequantize(t, path: str) -> np.ndarray:
    import gguf

    kind = gguf.GGMLQuantizationType(t.tensor_type).name
    if kind not in SUPPORTED_TYPES and kind not in DEQUANTIZED_TYPES:
        raise GGUFError(f"{path}: tensor '{t.name}' has type {kind}, not supported "
                        f"(supported: {', '.join(SUPPORTED_TYPES + DEQUANTIZED_TYPES)})")
    shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
    try:
        if kind == "F32":
            arr = np.asarray(t.data, dtype=np.float32)
        elif kind == "F16":
            arr = np.asarray(t.data, dtype=np.float16)
        elif kind == "MXFP4":  # torch's table lookup: the package's numpy decoder takes minutes on a 20B file
            arr = dequantize_ggml_mxfp4(mapped_bytes(t.data)).numpy()
        elif kind in PACKED_TYPES and kind != "BF16":  # our block decoders (tests/test_quant.py: = the package's)
            from . import _C

            blocks = mapped_bytes(_packed_blocks(t, path))
            arr = _C.dequantize_packed(blocks, PACKED_TYPES[kind], shape[-1], torch.float32).numpy()
        else:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        return arr.reshape(shape)
    except GGUFError:
        raise
    except Exception as e:
        raise GGUFError(f"{path}: tensor '{t.name}' cannot be decoded ({type(e).__name__}: {e}); "
                        "the file may be truncated") from e


def _hf_arrays(name: str, arr: np.ndarray, arch: str, config: dict) -> list[tuple[str, np.ndarray]]:
    """One decoded GGUF tensor (under its Hugging Face name) as the Hugging Face tensor(s) it came
    from: llama / mistral3's Q/K permutation undone, the 1 + w of Gemma's and the hybrids' norms
    taken off, Qwen2-MoE's shared expert gate back to [1, H], the hybrids' changes undone."""
    if arch in _PERMUTED and name.endswith(("q_proj.weight", "q_proj.bias")):
        arr = unpermute_qk(arr, config["num_attention_heads"])
    elif arch in _PERMUTED and name.endswith(("k_proj.weight", "k_proj.bias")):
        arr = unpermute_qk(arr, config["num_key_value_heads"])
    elif arch in _PLUS_ONE and name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        arr = arr.astype(np.float32) - 1.0
    elif name.endswith("shared_expert_gate.weight") and arr.ndim == 1:  # stored [H]: a [1, H] matrix
        arr = arr.reshape(1, -1)
    return _hybrid_arrays(name, arr, arch, config) if arch in _HYBRID else [(name, arr)]


def _hybrid_arrays(name: str, arr: np.ndarray, arch: str, config: dict) -> list[tuple[str, np.ndarray]]:
    """Qwen3.5 / Qwen3-Next tensors as transformers holds them: A_log from ssm_a (-exp(A_log)), the
    conv's middle axis back, qwen35's value heads from tiled (file head j * Hk + g) to grouped (g * r
    + j) order wherever they index a dimension, qwen3next's in_proj_qkvz (ssm_in) and in_proj_ba
    (ssm_ba) split into Qwen3.5's flat projections, and a full-attention layer's fused attn_qkv into
    q (with its gate) / k / v."""
    hk, hv, dk, dv = (config[k] for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                          "linear_value_head_dim"))
    r, qk, base = hv // hk, 2 * hk * dk, ".".join(name.split(".")[:3])  # model.layers.N

    def grouped(a: np.ndarray, axis: int, start: int, hd: int) -> np.ndarray:
        if arch == "qwen3next" or r == 1:  # its converter keeps transformers' grouped order
            return a
        a = np.moveaxis(a, axis, 0)
        heads = a[start:].reshape(r, hk, hd, *a.shape[1:]).swapaxes(0, 1).reshape(hv * hd, *a.shape[1:])
        return np.moveaxis(np.concatenate([a[:start], heads]), 0, axis)

    if name.endswith("in_proj_qkv.weight") and config["layer_types"][int(name.split(".")[2])] == "full_attention":
        q, kv = 2 * config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
        return [(f"{base}.self_attn.q_proj.weight", arr[:q]), (f"{base}.self_attn.k_proj.weight", arr[q:q + kv]),
                (f"{base}.self_attn.v_proj.weight", arr[q + kv:])]
    if name.endswith("in_proj_qkvz.weight"):  # per key head [q | k | v (r Dv) | z (r Dv)]
        g = arr.reshape(hk, 2 * dk + 2 * r * dv, -1)
        qkv = np.concatenate([g[:, :dk].reshape(hk * dk, -1), g[:, dk:2 * dk].reshape(hk * dk, -1),
                              g[:, 2 * dk:2 * dk + r * dv].reshape(hv * dv, -1)])
        return [(f"{base}.linear_attn.in_proj_qkv.weight", qkv),
                (f"{base}.linear_attn.in_proj_z.weight", g[:, 2 * dk + r * dv:].reshape(hv * dv, -1))]
    if name.endswith("in_proj_ba.weight"):  # per key head [b (r) | a (r)]
        g = arr.reshape(hk, 2 * r, -1)
        return [(f"{base}.linear_attn.in_proj_b.weight", g[:, :r].reshape(hv, -1)),
                (f"{base}.linear_attn.in_proj_a.weight", g[:, r:].reshape(hv, -1))]
    rule = {"in_proj_qkv.weight": (0, qk, dv), "in_proj_z.weight": (0, 0, dv), "in_proj_b.weight": (0, 0, 1),
            "in_proj_a.weight": (0, 0, 1), "dt_bias": (0, 0, 1), "A_log": (0, 0, 1), "conv1d.weight": (0, qk, dv),
            "out_proj.weight": (1, 0, dv)}
    for suffix, (axis, start, hd) in rule.items():
        if name.endswith("linear_attn." + suffix):
            arr = grouped(arr, axis, start, hd)
            if suffix == "A_log":
                arr = np.log(-arr.astype(np.float32))
            elif suffix == "conv1d.weight":
                arr = arr[:, None, :]
    return [(name, arr)]


def _packable(t, name: str, arch: str, config: dict, dtype: torch.dtype, big_endian: bool = False) -> str | None:
    """The ggml type name a tensor stays packed in, or None when it is dequantized: packed types
    only, matrices only (projections, experts, embedding, lm_head), F16 / BF16 only when the
    compute dtype differs, and not Qwen3.5's out_proj when its columns are regrouped."""
    import gguf

    kind = gguf.GGMLQuantizationType(t.tensor_type).name
    if kind not in PACKED_TYPES or len(t.shape) < 2 or not is_matrix_name(name) or big_endian:
        return None  # (the kernels read little-endian scales and halves)
    if (kind, dtype) in (("F16", torch.float16), ("BF16", torch.bfloat16)):
        return None
    if arch in ("qwen35", "qwen35moe") and name.endswith("linear_attn.out_proj.weight") and \
            config["linear_num_value_heads"] != config["linear_num_key_heads"]:
        return None
    return kind


def _decodes_on(device: torch.device) -> bool:
    """Whether a packed matrix dequantized for `device` is decoded there (a GPU with this build's
    kernels: the blocks are copied, a quarter of the floats' bytes) rather than on the host."""
    from . import _C

    return device.type == "cuda" and _C.gpu_kernels()


def _packed_blocks(t, path: str) -> np.ndarray:
    """A packed tensor's bytes as [..., rows, row_bytes] (a view of the mapped file)."""
    data = np.asarray(t.data).reshape(-1).view(np.uint8)  # F16 / BF16 come typed
    rows = [int(d) for d in reversed([int(x) for x in t.shape])][:-1]
    try:
        return data.reshape(*rows, -1)
    except ValueError as e:
        raise GGUFError(f"{path}: tensor '{t.name}' holds {data.size} bytes, not {rows} rows of its blocks; "
                        "the file may be truncated") from e


def _float_tensor(arr: np.ndarray) -> torch.Tensor:
    """A decoded tensor the model owns: copied when it is a view of the (read-only) map."""
    return torch.from_numpy(np.array(arr, copy=not arr.flags.writeable or not arr.flags.c_contiguous))


def _packed_tensor(arr: np.ndarray) -> torch.Tensor:
    """Packed blocks: a read-only view of the map where the rows kept their order (never written:
    the engine only reads weights), else the reordered copy."""
    return mapped_bytes(arr) if arr.flags.c_contiguous else torch.from_numpy(np.ascontiguousarray(arr))


def read_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, place=None,
              keep_packed: bool = False) -> tuple[dict, dict]:
    """Reads a GGUF file -> (Hugging Face config dict, Hugging Face-named tensors in `dtype`).
    keep_packed: matrices of a packed type (quants.PACKED_TYPES) placed on a device where
    ``quants.packs_on(device)`` come back as ``PackedTensor`` (the file's blocks, views of the
    memory map where rows keep their order; the loader copies them to their GPU). Matrices
    dequantized for a GPU with this build's kernels are decoded there from their copied blocks.
    place(config, {Hugging Face name: element count}, {name: packed bytes}), when given, runs
    before any tensor is decoded and returns a Placement (the loader plans and checks devices and
    memory there); each tensor then goes to its device as soon as it is decoded, so host memory
    never holds the GPU layers' dequantized weights all at once."""
    path = str(path)
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    from .config import parse_config

    flags = parse_config(config, path)  # the engine's own checks (positive sizes, head counts...) before any tensor work
    arch = gguf_architecture(reader, path)
    zero_biases = check_biases(path, reader, arch, flags)
    from .placement import layer_of

    def kept(t) -> str | None:  # its Hugging Face name; None when unused (or a multi-token-prediction block)
        name = hf_name(t.name, arch)
        return None if name is None or (layer_of(name) or 0) >= config["num_hidden_layers"] else name

    _check_unread(path, reader, arch, config)
    named = [(t, kept(t)) for t in reader.tensors]
    big_endian = getattr(reader, "byte_order", "I") == "S"  # the reader's flag for a file of the other byte order
    if big_endian:
        _check_big_endian_types(path, [t for t, name in named if name])
    named = [(t, name, _packable(t, name, arch, config, dtype, big_endian)) for t, name in named if name]
    placed = None
    if place is not None:
        placed = place(config, {name: int(np.prod([int(x) for x in t.shape])) for t, name, _ in named},
                       {name: int(t.n_bytes) for t, name, kind in named if kind and keep_packed})
    tensors: dict = {}
    for t, name, kind in named:
        try:
            _read_tensor(t, name, kind, path, arch, config, dtype, keep_packed, placed, tensors)
        except (GGUFError, ValueError) as e:  # a shape the metadata does not explain (Q/K heads, hybrid splits)
            if str(e).startswith(path):
                raise
            raise GGUFError(f"{path}: tensor {t.name!r}: {e}") from e
    if "model.embed_tokens.weight" not in tensors:
        raise GGUFError(f"{path}: missing tensor 'token_embd.weight'")
    for bias, matrix in zero_biases.items():  # an absent optional bias is a zero one
        if matrix in tensors:
            tensors[bias] = torch.zeros(tensors[matrix].shape[0], dtype=dtype,
                                        device="cpu" if placed is None else placed.device_of(bias))
    _warn_dequantized(path, [t for t, _, _ in named], dtype)
    drop_resident_pages(reader)
    return config, tensors


def _check_big_endian_types(path: str, tensors) -> None:
    """GGUFError for a big-endian file holding anything but F32 / F16 tensors: the block decoders
    (ours and the gguf package's) read little-endian scales, so they would decode wrong values."""
    import gguf

    odd = next((t for t in tensors if gguf.GGMLQuantizationType(t.tensor_type).name not in ("F32", "F16")), None)
    if odd is not None:
        kind = gguf.GGMLQuantizationType(odd.tensor_type).name
        raise GGUFError(f"{path}: a big-endian GGUF file with a {kind} tensor ({odd.name!r}): only F32 and F16 "
                        f"tensors are read from big-endian files (quantized blocks would decode wrong). Convert "
                        f"it to little-endian (the gguf package's gguf-convert-endian) and load that")


def _read_tensor(t, name: str, kind, path: str, arch: str, config: dict, dtype, keep_packed: bool, placed,
                 tensors: dict) -> None:
    """One GGUF tensor into ``tensors`` under its Hugging Face name(s), on its device: kept packed,
    or decoded (on its GPU when this build's kernels decode there)."""
    device = torch.device("cpu") if placed is None else placed.device_of(name)
    kept = bool(kind) and keep_packed and packs_on(device)
    if kept or (kind and _decodes_on(device)):  # kept, or dequantized where it goes: the blocks travel
        for hf, arr in _hf_arrays(name, _packed_blocks(t, path), arch, config):
            packed = PackedTensor(_packed_tensor(arr), kind, int(t.shape[0]), hf)
            tensors[hf] = packed if kept else PackedTensor(packed.blocks.to(device), kind, packed.cols,
                                                           hf).dequantize(dtype)
        return
    for hf, arr in _hf_arrays(name, _dequantize(t, path), arch, config):
        tensor = _float_tensor(arr)
        if tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        tensors[hf] = tensor if placed is None else tensor.to(device)


_READ_ELSEWHERE = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")  # into the config


def _check_unread(path: str, reader, arch: str, config: dict) -> None:
    """A block past ``block_count`` is an error (a file whose metadata undercounts its layers would
    run short); a tensor the engine has no name for is warned about, by name (it is not read)."""
    blocks = config["num_hidden_layers"] + int(gguf_field(reader, f"{arch}.nextn_predict_layers", 0) or 0)
    unread = []
    for t in reader.tensors:
        parts = t.name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) >= blocks:
            raise GGUFError(f"{path}: tensor {t.name!r} belongs to block {parts[1]}, but {arch}.block_count says "
                            f"the file has {blocks} blocks")
        in_layers = len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < config["num_hidden_layers"]
        if hf_name(t.name, arch) is None and t.name not in _READ_ELSEWHERE and (parts[0] != "blk" or in_layers):
            unread.append(t.name)
    if unread:
        more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
        warnings.warn(f"{path}: tensors circuit-finder does not read for {arch}: {', '.join(unread[:3])}{more}; if "
                      "the model needs them, its outputs will differ from llama.cpp's", stacklevel=4)


def drop_resident_pages(reader) -> bool:
    """Takes the file's pages out of this process's resident set (madvise MADV_DONTNEED on the
    reader's read-only shared map; the bytes stay in the page cache and the map stays valid). What
    the read touched and no longer needs stops counting: the metadata (the whole vocabulary), the
    rows of llama / mistral3 Q/K matrices and other tensors now held as reordered or decoded copies
    (8 MB of the default model's 98). Blocks that stay views of the map fault back in, from the
    page cache, when a product first reads them. False where the platform or map has no madvise."""
    import mmap

    advice, mapped = getattr(mmap, "MADV_DONTNEED", None), getattr(reader.data, "_mmap", None)  # numpy.memmap's map
    if advice is None or mapped is None or not hasattr(mapped, "madvise"):
        return False
    try:
        mapped.madvise(advice)
    except (OSError, ValueError):  # a closed map, or a kernel that refuses the advice
        return False
    return True


def _warn_dequantized(path: str, used: list, dtype: torch.dtype) -> None:
    import gguf

    kinds = sorted({gguf.GGMLQuantizationType(t.tensor_type).name for t in used} & set(DEQUANTIZED_TYPES))
    if kinds:
        warnings.warn(f"{path}: {', '.join(kinds)} tensors have no packed kernel: dequantized to {dtype} on load",
                      stacklevel=3)


def build_tokenizer(path: str, name: str | None = None):
    """The tokenizer of a GGUF file as transformers builds it from the vocabulary (seconds for a
    large vocabulary: ``gguf_tokenizer`` keeps the result); errors name ``name`` (default ``path``)."""
    from transformers import AutoTokenizer

    p = Path(path)
    try:
        try:
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        except (ValueError, TypeError) as e:
            # transformers builds no config for some architectures (mistral3), and fails on gpt-oss's
            # (a TypeError reading its rope scaling): the tokenizer alone
            if isinstance(e, ValueError) and "not supported" not in str(e):
                raise
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:  # transformers' KeyError / IndexError on bad tokenizer.ggml.* metadata
        raise GGUFError(f"{name or path}: cannot build the tokenizer from its tokenizer.ggml.* metadata "
                        f"({type(e).__name__}: {e})") from e


_INTEGER_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}  # GGUF value types


@contextlib.contextmanager
def _tokenizer_source(path: str):
    """``path``, or, when a ``tokenizer.ggml.*_token_id`` lies outside the vocabulary (a pad id one
    past it is common in published files; transformers' build fails on it with an IndexError), a
    temporary copy of the file's header and metadata without those keys, warned about: llama.cpp
    also loads such a file without them."""
    import tempfile

    copy = _without_bad_special_ids(path)
    if copy is None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="cf-tokenizer-") as tmp:
        name = os.path.join(tmp, os.path.basename(path))
        with open(name, "wb") as out:
            out.write(copy)
        yield name


def _without_bad_special_ids(path: str) -> bytes | None:
    """The header and metadata of a little-endian GGUF file, with no tensors and without its
    special token ids outside the vocabulary (warned about); None when it has none such."""
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if not _little_endian_gguf(data):
            return None  # big-endian: left to transformers
        entries = list(_entries(data, path))
        tokens = [start for key, kind, _, start, _ in entries if key == "tokenizer.ggml.tokens" and kind == _ARRAY]
        if not tokens:
            return None
        n = struct.unpack_from("<Q", data, tokens[0] + 4)[0]
        ids = {key: struct.unpack_from(_INTEGER_FORMATS[kind], data, start)[0]
               for key, kind, _, start, _ in entries
               if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and kind in _INTEGER_FORMATS}
        bad = {key: v for key, v in ids.items() if not 0 <= v < n}
        if not bad:
            return None
        warnings.warn(f"{path}: {', '.join(f'{k} = {v}' for k, v in bad.items())} outside the vocabulary "
                      f"(0..{n - 1}): the tokenizer is built without {'it' if len(bad) == 1 else 'them'}",
                      stacklevel=7)
        kept = b"".join(data[begin:end] for key, _, begin, _, end in entries if key not in bad)
        return data[:8] + struct.pack("<QQ", 0, len(entries) - len(bad)) + kept


def tokenizer_cache_dir() -> Path:
    """Where built GGUF tokenizers are kept: $CF_CACHE_DIR/tokenizers, else
    $XDG_CACHE_HOME/circuit-finder/tokenizers (default ~/.cache/...)."""
    root = os.environ.get("CF_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "circuit-finder")
    return Path(root) / "tokenizers"


def metadata_digest(path: str, end: int) -> str:
    """SHA-256 of a GGUF file's first ``end`` bytes (its header and metadata: the whole vocabulary
    and chat template) and of the transformers and tokenizers versions that build and save the
    tokenizer: the key of a cached tokenizer."""
    import hashlib

    import tokenizers
    import transformers

    h = hashlib.sha256(f"transformers {transformers.__version__}\ntokenizers {tokenizers.__version__}\n".encode())
    with open(path, "rb") as f:
        h.update(f.read(end))
    return h.hexdigest()


def _tokenizer_cached(path: str, key: str):
    """A tokenizer of its own for each call (models loaded from one file never share one: a change
    to one's tokenizer does not reach the other's), read from the cache folder or built into it."""
    from transformers import AutoTokenizer

    from .files import staged

    folder = tokenizer_cache_dir() / key
    if (folder / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception:  # noqa: BLE001 — a damaged cache entry is rebuilt below
            pass
    with _tokenizer_source(path) as source:
        tokenizer = build_tokenizer(source, name=path)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with staged(folder, folder=True) as tmp:
            tokenizer.save_pretrained(str(tmp))
    except OSError:  # a read-only or full cache: the tokenizer is built again next time
        pass
    return tokenizer


def gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer (with chat template) stored in a GGUF file; None if absent. Built by
    transformers the first time, then read back from the cache (``tokenizer_cache_dir``, keyed by
    ``metadata_digest``) in a tenth of a second. The file's tensor table is checked first: transformers
    reads a file with the gguf package's reader, which would report a truncated one as a bad tokenizer."""
    path = os.path.abspath(str(path))
    walked = _walk(path, tensors=True) if os.path.isfile(path) else None
    if walked is None:  # missing, not GGUF, or big-endian: the reader says which, or reads it
        reader = open_gguf(path)
        walked = (int(reader.data_offset), list(reader.fields))
    end, keys = walked
    if "tokenizer.ggml.model" not in keys:
        return None
    return _tokenizer_cached(path, metadata_digest(path, end))

