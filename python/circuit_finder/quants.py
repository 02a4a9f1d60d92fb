"""Quantized weight formats: GGUF block types kept packed (``PackedTensor``), and GPT-OSS's MXFP4
experts and fine-grained FP8 checkpoints, which load by dequantizing.

A ``PackedTensor`` is a matrix exactly as a GGUF file stores it — uint8 rows of ggml blocks (a view
of the memory-mapped file where no reordering was needed) with its ggml type and column count —
which the engine's CPU linear layers and embedding read without a dequantized copy (csrc
kernels/cpu/quant.h). PACKED_TYPES lists the types; ``dequantize`` gives the float matrix (our
kernel, checked against the `gguf` package's decoders in tests/test_quant.py).
``quantize_matrix`` packs a float matrix as a ggml type on the device it is placed on
(``quantizers``: torch, byte for byte the `gguf` package's rounding for the 32-value types, ours for
the K-quants Q4_K, Q5_K and Q6_K) for loading a Hugging Face checkpoint quantized
(``cf.load(folder, quantize="q4_k")``): QUANTIZE_TYPES are the types it can make, and MIXES
llama.cpp's per-tensor mixes of them (``quantize="q4_k_m"``: ``mix_type``, the rules of the
llama.cpp that llama-cpp-python 0.3.36 builds, checked tensor by tensor against it in
tests/test_quant.py; other llama.cpp versions move some tensors).

OpenAI's published GPT-OSS checkpoints store each MoE layer's expert matrices in MXFP4 (OCP
Microscaling, FP4 E2M1 elements in blocks of 32 sharing one E8M0 power-of-two scale):
``mlp.experts.gate_up_proj_blocks`` [E, 2I, H/32, 16] uint8 (two elements per byte, the even one
in the low nibble) with ``..._scales`` [E, 2I, H/32] uint8 (exponent + 127), and ``down_proj``
alike. They dequantize here, one expert at a time on the device the layer goes to, into the tensors
transformers holds (``gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H]); with ``quantize=``,
``gpt_oss_experts_as_gguf`` makes them (MXFP4 or float) in GGUF's layout instead, to be packed as
a ggml type. MXFP4 itself is not a type the engine runs packed.
GGUF files (llama.cpp's gpt-oss conversions) hold MXFP4 in ggml's own block order, decoded by
``dequantize_ggml_mxfp4``.

Fine-grained FP8 checkpoints (``quantization_config.quant_method`` "fp8": Qwen3-*-FP8, Ministral 3 and
Devstral's default repos) store a linear layer's ``weight`` as float8 (E4M3, or E5M2) with its
``weight_scale_inv``: one scale per tensor, or one per block of ``weight_block_size`` [rows, columns]
(the grid rounded up at the edges; fp32, or E8M0 exponents as uint8); static activation scales
(``activation_scale``) are for FP8 products only. ``fp8_pairs`` finds them and ``dequantize_fp8``
gives weight x scale in the compute dtype, one matrix at a time on the device it goes to, as
transformers does without an FP8-capable GPU.

Compressed-tensors, GPTQ / AWQ and bitsandbytes checkpoints, which load by dequantizing too, live in
``compressed``, ``gptq`` and ``bnb`` (the first two read FP8_DTYPES, ``expand_blocks`` and
``unpack_words`` here); the loader takes them all through one entry.

Limits: MXFP4, fine-grained FP8, compressed-tensors, GPTQ, AWQ and bitsandbytes only; a NaN
MXFP4 scale (255) dequantizes to inf, as ldexp does.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass
from functools import partial

import torch

from .quantizers import BLOCK, K_TYPES, QUANTIZE_TYPES, quantize_rows

__all__ = ["FP4_E2M1", "GGML_MXFP4_BYTES", "K_FALLBACK", "MIXES", "MXFP4_BLOCK", "PACKED_TYPES", "QUANTIZE_TYPES",
           "FP8_DTYPES", "MixModel", "PackedTensor", "dequantize_fp8", "expand_blocks", "dequantize_ggml_mxfp4", "dequantize_mxfp4",
           "fp8_block_size", "fp8_pairs", "gpt_oss_experts_as_gguf", "is_matrix_name", "llama_cpp_70b", "mix_type", "mxfp4_pairs", "mxfp4_shape",
           "packs_on", "quantize_choice", "quantize_matrix", "unpack_words", "warn_unapplied_scales"]

# ggml type name -> id of the types the engine reads packed (gguf.GGMLQuantizationType's ids).
PACKED_TYPES = {"F16": 1, "BF16": 30, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
                "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ4_NL": 20, "IQ4_XS": 23}


K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # for matrices whose rows are not whole 256-value blocks
# Hugging Face names of the matrices the engine reads packed: projections, stacked experts, Mixtral's
# hub experts, the embedding and lm_head (never norms, routers or biases).
_MATRIX = re.compile(r"(_proj\.weight|_proj|\.in_proj_\w+\.weight|\.w[123]\.weight|lm_head\.weight|embed_tokens\.weight)$")


def is_matrix_name(name: str) -> bool:
    return bool(_MATRIX.search(name))


def packs_on(device: torch.device) -> bool:
    """Whether packed matrices run on `device`: the CPU, or a CUDA/ROCm GPU in a build with GPU kernels."""
    from . import _C

    return device.type == "cpu" or (device.type == "cuda" and _C.gpu_kernels())


class PackedTensor:
    """A matrix [..., rows, cols] held as ggml blocks: ``blocks`` uint8 [..., rows, row_bytes] (CPU,
    or a CUDA/ROCm GPU in a build with GPU kernels), ``type_name`` one of PACKED_TYPES. ValueError
    naming `name` when the bytes do not fit the type."""

    __slots__ = ("blocks", "type_name", "cols")

    def __init__(self, blocks: torch.Tensor, type_name: str, cols: int, name: str = "tensor"):
        from . import _C

        if type_name not in PACKED_TYPES:
            raise ValueError(f"{name}: type {type_name} is not packed (packed: {', '.join(PACKED_TYPES)})")
        if blocks.dtype != torch.uint8 or blocks.dim() < 2 or blocks.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name}: packed blocks are a uint8 [..., rows, bytes] tensor on the CPU or a GPU, got "
                             f"{blocks.dtype} {list(blocks.shape)} on {blocks.device}")
        row_bytes = _C.packed_row_bytes(PACKED_TYPES[type_name], int(cols))
        if blocks.shape[-1] != row_bytes:
            raise ValueError(f"{name}: {cols} {type_name} columns take {row_bytes} bytes a row, got {blocks.shape[-1]}")
        self.blocks, self.type_name, self.cols = blocks.contiguous(), type_name, int(cols)

    @property
    def ggml_type(self) -> int:
        return PACKED_TYPES[self.type_name]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.blocks.shape[:-1], self.cols))

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float matrix [..., rows, cols] in `dtype`, on the blocks' device."""
        from . import _C

        decode = _C.gpu_dequantize_packed if self.blocks.is_cuda else _C.dequantize_packed
        return decode(self.blocks, self.ggml_type, self.cols, dtype)

    def __getitem__(self, index) -> PackedTensor:
        """The stacked matrices or rows `index` selects over the leading dimensions, each row's
        blocks whole: ``p[e]`` (one expert of [E, rows, cols]), ``p[:, :half]`` (the first rows)."""
        index = index if isinstance(index, tuple) else (index,)
        plain = len(index) < self.blocks.dim() and not any(i is Ellipsis or i is None for i in index)
        blocks = self.blocks[index] if plain else None
        if blocks is None or blocks.dim() < 2:
            raise IndexError(f"a packed {list(self.shape)} matrix is indexed over its leading dimensions only, "
                             f"keeping whole rows, got {index}")
        return PackedTensor(blocks, self.type_name, self.cols)

    def __iter__(self):
        raise TypeError(f"a packed {list(self.shape)} matrix is not iterable: index its leading dimensions")

    def to(self, device) -> PackedTensor:
        """The same blocks on `device` (copied as they are)."""
        return PackedTensor(self.blocks.to(device), self.type_name, self.cols)

    def __repr__(self) -> str:
        return f"PackedTensor({self.type_name}, shape={list(self.shape)}, {self.nbytes} bytes)"


# The 16 values of an FP4 E2M1 code (OCP MX spec): sign bit 3, then 2 exponent and 1 mantissa bits.
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32  # elements per shared scale
GGML_MXFP4_BYTES = 17  # llama.cpp's block: the scale byte, then 16 bytes holding element j (low) and j + 16 (high)


def mxfp4_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (blocks, scales)} for every ``<name>_blocks`` / ``<name>_scales`` pair in a checkpoint;
    ValueError naming the tensor when one half is missing or the shapes disagree."""
    out = {}
    for key, blocks in tensors.items():
        if not key.endswith("_blocks"):
            continue
        name = key[:-len("_blocks")]
        scales = tensors.get(name + "_scales")
        if scales is None:
            raise ValueError(f"MXFP4 tensor '{key}' has no '{name}_scales'")
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise ValueError(f"MXFP4 tensors '{key}' and '{name}_scales' must be uint8, got {blocks.dtype} and "
                             f"{scales.dtype}")
        if blocks.dim() != 4 or blocks.shape[-1] != MXFP4_BLOCK // 2 or blocks.shape[:-1] != scales.shape:
            raise ValueError(f"MXFP4 tensor '{key}' {list(blocks.shape)} does not match '{name}_scales' "
                             f"{list(scales.shape)} (expected [experts, rows, groups, 16] and [experts, rows, groups])")
        out[name] = (blocks, scales)
    return out


def mxfp4_shape(blocks: torch.Tensor) -> list[int]:
    """The dequantized tensor's shape, as transformers holds it: [E, columns, rows] (rows and columns
    of the packed [E, rows, groups, 16] swapped)."""
    e, rows, groups = blocks.shape[0], blocks.shape[1], blocks.shape[2]
    return [e, groups * MXFP4_BLOCK, rows]


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """blocks [E, R, G, 16] uint8, scales [E, R, G] uint8 -> [E, G * 32, R] in `dtype` on `device`:
    a transposed view of the dequantized [E, R, G * 32] (each expert's rows are a linear layer's
    output features, so the engine reads the view back as a contiguous [R, G * 32] matrix)."""
    e, rows, groups = blocks.shape[0], blocks.shape[1], blocks.shape[2]
    out = torch.empty(e, rows, groups * MXFP4_BLOCK, dtype=dtype, device=device)
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32, device=device)
    for i in range(e):  # one expert at a time bounds the index and fp32 temporaries
        b = blocks[i].to(device)
        codes = torch.stack((b & 0x0F, b >> 4), dim=-1).long()  # [R, G, 16, 2]: even element in the low nibble
        values = lut[codes].reshape(rows, groups, MXFP4_BLOCK)
        exponent = scales[i].to(device).int() - 127
        out[i] = torch.ldexp(values, exponent.unsqueeze(-1)).reshape(rows, groups * MXFP4_BLOCK).to(dtype)
    return out.transpose(1, 2)


def gpt_oss_experts_as_gguf(tensors: dict, mxfp4: dict, packs=lambda name, shape: True) -> tuple[dict, set[str], dict]:
    """GPT-OSS experts in GGUF's layout, which the engine reads packed, for ``quantize=``: each
    layer's transformers gate_up_proj [E, H, 2I] (gate and up columns alternating) and down_proj
    [E, I, H], float in ``tensors`` or MXFP4 in ``mxfp4`` (``mxfp4_pairs``), become gate_proj /
    up_proj [E, I, H] and down_proj [E, H, I] — in the layers where ``packs(name, shape)`` says one
    of the three will be packed (the others stay as they are). Returns ({name: (shape,
    make(dtype, device))}, the names of the tensors they replace, {bias name: split bias}): each
    matrix made when asked for, one at a time, as the loader's dequantized-on-load matrices are."""
    made, parts, biases = {}, set(), {}
    for name in sorted(n for n in {*tensors, *mxfp4} if n.endswith(".mlp.experts.gate_up_proj")):
        x = name[:-len("gate_up_proj")]
        e, h, two_i = mxfp4_shape(mxfp4[name][0]) if name in mxfp4 else tensors[name].shape
        shapes = {x + "gate_proj": (e, two_i // 2, h), x + "up_proj": (e, two_i // 2, h),
                  x + "down_proj": (e, h, two_i // 2)}
        if not any(packs(n, shape) for n, shape in shapes.items()):
            continue
        for (n, shape), rows in zip(shapes.items(), (slice(0, None, 2), slice(1, None, 2), None)):
            source = x + ("down_proj" if rows is None else "gate_up_proj")
            made[n] = (shape, partial(_expert_rows, tensors, mxfp4, source, rows))
            parts.update((source, source + "_blocks", source + "_scales"))
        bias = tensors.get(x + "gate_up_proj_bias")
        if bias is None:
            raise ValueError(f"GPT-OSS checkpoint: missing tensor '{x}gate_up_proj_bias'")
        biases[x + "gate_proj_bias"], biases[x + "up_proj_bias"] = bias[:, 0::2].contiguous(), bias[:, 1::2].contiguous()
        parts.add(x + "gate_up_proj_bias")
    return made, parts, biases


def _expert_rows(tensors: dict, mxfp4: dict, name: str, rows: slice | None, dtype: torch.dtype,
                 device) -> torch.Tensor:
    """One GPT-OSS expert matrix in GGUF's layout [E, out, in], from transformers' [E, in, out]
    (``rows``: the output features kept, every other one of gate_up's; None: all), float or MXFP4;
    MXFP4 decodes only those rows (its blocks are stored [E, out, ...])."""
    if name in mxfp4:
        blocks, scales = mxfp4[name]
        if rows is not None:
            blocks, scales = blocks[:, rows], scales[:, rows]
        return dequantize_mxfp4(blocks, scales, dtype, device).transpose(1, 2)  # (contiguous [E, out, in])
    t = tensors[name] if rows is None else tensors[name][..., rows]
    out = torch.empty(t.shape[0], t.shape[2], t.shape[1], dtype=dtype, device=device)
    return out.copy_(t.transpose(1, 2))


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # the float8 weights of fine-grained FP8 checkpoints


def fp8_block_size(config: dict) -> tuple[int, int] | None:
    """``weight_block_size`` of a fine-grained FP8 checkpoint's quantization_config (at the top or in
    text_config; absent: transformers' default, 128 x 128); None for per-tensor scales (null) or no
    FP8 config."""
    for c in (config, config.get("text_config") or {}):
        qc = c.get("quantization_config") or {}
        if qc.get("quant_method") == "fp8":
            block = qc.get("weight_block_size", (128, 128))
            return None if block is None else (int(block[0]), int(block[1]))
    return None


def fp8_pairs(tensors: dict[str, torch.Tensor], block: tuple[int, int] | None) -> dict[str, tuple]:
    """{name: (float8 weight, its weight_scale_inv)} of a fine-grained FP8 checkpoint; ValueError naming
    the tensor when a float8 weight has no scale or the scale's shape fits neither one scale per tensor
    nor the ``block`` grid over the weight's last two dimensions."""
    out = {}
    for name, w in tensors.items():
        scaled = name.removesuffix("_scale_inv")
        if scaled != name and getattr(tensors.get(scaled), "dtype", None) not in FP8_DTYPES:
            raise ValueError(f"'{name}' scales '{scaled}', which is not a float8 tensor (a checkpoint cast to "
                             "another dtype with its FP8 scales left beside it?)")
        if not isinstance(w, torch.Tensor) or w.dtype not in FP8_DTYPES:  # GGUF's packed matrices too
            continue
        scale = tensors.get(f"{name}_scale_inv")
        if scale is None:
            raise ValueError(f"FP8 tensor '{name}' has no '{name}_scale_inv'")
        grid = None if block is None or w.dim() < 2 else \
            [*w.shape[:-2], -(-w.shape[-2] // block[0]), -(-w.shape[-1] // block[1])]
        if scale.numel() != 1 and list(scale.shape) != grid:
            raise ValueError(f"FP8 tensor '{name}' {list(w.shape)}: '{name}_scale_inv' is {list(scale.shape)}, "
                             f"expected one scale or {grid} (weight_block_size {list(block) if block else None})")
        out[name] = (w, scale)
    return out


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype,
                   device: str | torch.device = "cpu", chunk: int = 1 << 24) -> torch.Tensor:
    """weight (float8) x its scale (one, or one per ``block`` of [rows, columns], the grid's last row and
    column covering what is left) in ``dtype`` on ``device``; uint8 scales are E8M0 exponents (2^(s - 127)).
    Rows of about `chunk` elements at a time (whole blocks; stacked experts one at a time) bound the
    fp32 temporaries."""
    s = scale.to(device)
    s = torch.ldexp(torch.ones(s.shape, device=device), s.int() - 127) if s.dtype == torch.uint8 else s.float()
    if weight.dim() < 2:  # a vector with its one scale
        return (weight.to(device).float() * s.reshape(())).to(dtype)
    if weight.dim() > 2:  # experts [..., rows, cols]: each with its grid (or the one scale)
        out = torch.empty(weight.shape, dtype=dtype, device=device)
        grids = s.reshape(-1, *s.shape[-2:]) if s.numel() > 1 else None
        for e, (w, o) in enumerate(zip(weight.reshape(-1, *weight.shape[-2:]), out.view(-1, *weight.shape[-2:]))):
            o.copy_(dequantize_fp8(w, s if grids is None else grids[e], block, dtype, device, chunk))
        return out
    rows, cols = weight.shape
    height = 1 if s.numel() == 1 else int(block[0])
    step = max(height, chunk // max(1, cols) // height * height)
    out = torch.empty(weight.shape, dtype=dtype, device=device)
    for r0 in range(0, rows, step):
        w = weight[r0:r0 + step].to(device).float()
        factor = s.reshape(()) if s.numel() == 1 else expand_blocks(
            s[r0 // height:-(-(r0 + step) // height)], block, w.shape[0], cols)
        out[r0:r0 + step] = w * factor
    return out


def warn_unapplied_scales(method: str, names: list[str], stacklevel: int) -> None:
    """One warning that a checkpoint's activation / KV-cache scales (`names`) are not applied: the
    products and caches of a checkpoint dequantized on load run in the compute dtype."""
    if names:
        warnings.warn(f"{method}: {len(names)} activation / KV-cache scales (e.g. '{names[0]}') are not applied: "
                      "products and caches run in the compute dtype, as in transformers' dequantized model (vLLM "
                      "quantizes them)", stacklevel=stacklevel + 1)


def expand_blocks(grid: torch.Tensor, block, rows: int, cols: int) -> torch.Tensor:
    """A grid of one value per ``block`` [rows, columns] over the last two dimensions, repeated to
    [..., rows, cols] (the grid's last row and column covering what is left)."""
    b0, b1 = (int(b) for b in block)
    return grid.repeat_interleave(b0, dim=-2)[..., :rows, :].repeat_interleave(b1, dim=-1)[..., :cols]


def unpack_words(words: torch.Tensor, bits: int, count: int, dim: int = -1, order=None) -> torch.Tensor:
    """int32 words of `bits`-bit codes (2, 4 or 8) packed along `dim` -> their codes as int32, `count`
    of them along `dim`: code j of a word at bit j x bits, or at bit order[j] x bits (AWQ's order)."""
    per = 32 // bits
    shifts = torch.tensor(range(per) if order is None else order, dtype=torch.int32, device=words.device) * bits
    w = words.movedim(dim, -1)
    codes = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)[..., :count]
    return codes.movedim(-1, dim)


def dequantize_ggml_mxfp4(raw: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """A GGUF MXFP4 tensor's bytes [..., rows * 17 / 32] uint8 -> float32 [..., columns]: per block
    of 17 bytes, element j is FP4_E2M1[byte j+1 & 15] and element j + 16 is FP4_E2M1[byte j+1 >> 4],
    both times 2^(byte 0 - 127). Decoded `chunk` blocks at a time to bound the temporaries."""
    if raw.dtype != torch.uint8 or raw.shape[-1] % GGML_MXFP4_BYTES:
        raise ValueError(f"MXFP4 data must be uint8 rows of 17-byte blocks, got {raw.dtype} {list(raw.shape)}")
    blocks = raw.reshape(-1, GGML_MXFP4_BYTES)
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32)
    out = torch.empty(blocks.shape[0], MXFP4_BLOCK, dtype=torch.float32)
    for start in range(0, blocks.shape[0], chunk):
        b = blocks[start:start + chunk]
        codes = b[:, 1:]
        values = torch.cat((lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]), dim=1)
        out[start:start + chunk] = torch.ldexp(values, b[:, :1].int() - 127)
    return out.reshape(*raw.shape[:-1], raw.shape[-1] // GGML_MXFP4_BYTES * MXFP4_BLOCK)


# llama.cpp's type mixes (its quantizer's choice per tensor, without an importance matrix): each
# mix's base type, which most matrices get.
MIXES = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}


@dataclass(frozen=True)
class MixModel:
    """What a mix's choice reads of the model: its decoder layers, experts per MoE layer (0: dense),
    whether the embedding is the output head, and whether llama.cpp counts it a 70B
    (``llama_cpp_70b``)."""
    layers: int
    experts: int = 0
    tied: bool = False
    seventy_b: bool = False


def llama_cpp_70b(architecture: str, layers: int, heads: int, kv_heads: int, experts: int = 0) -> bool:
    """Whether llama.cpp's model-type detection calls this a 70B (its mixes then give attention's v
    Q5_K where they would give Q4_K): a dense llama-family model of 80 layers with grouped-query
    attention (Llama-2/3.x-70B; with as many kv heads as heads it is the 65B), or a Qwen2 of 80
    layers (Qwen2.5-72B)."""
    if layers != 80 or experts:
        return False
    return architecture == "Qwen2ForCausalLM" or (
        architecture in ("LlamaForCausalLM", "MistralForCausalLM") and kv_heads < heads)


# matrix names, Hugging Face's or GGUF's, by the role llama.cpp's mixes give them
_ROLES = (("head", re.compile(r"^(lm_head|output)\.weight$")),
          ("embedding", re.compile(r"(embed_tokens|^token_embd)\.weight$")),
          ("v", re.compile(r"(\.v_proj|\.attn_v)\.weight$")),
          ("k", re.compile(r"(\.k_proj|\.attn_k)\.weight$")),
          ("o", re.compile(r"(\.self_attn\.o_proj|\.attn_output)\.weight$")),
          ("qkv", re.compile(r"(\.qkv_proj|\.in_proj_qkvz?|\.attn_qkv)\.weight$")),  # Phi-3's; linear attention's
          ("down", re.compile(r"(down_proj(\.weight)?|\.w2\.weight|\.ffn_down(_exps|_shexp)?\.weight)$")))
_LAYER = re.compile(r"(\.layers\.|^blk\.)(\d+)\.")


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's layers whose attn_v / ffn_down a mix gives more bits: the first and last eighth,
    and every third layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def mix_type(mix: str, name: str, model: MixModel) -> str:
    """The type llama.cpp's mix `mix` ("Q4_K_M", "Q5_K_M") gives matrix `name` (Hugging Face's or
    the GGUF's; before the K-quants' fallback for rows that are not whole 256-value blocks): Q6_K for
    the output head (the embedding where tied); Q8_0 for attention's k / v and fused qkv in 8-expert
    models and Q5_K for their attention output; Q6_K for v, fused qkv and ffn_down (experts' and the
    shared expert's too) in the layers of ``_more_bits``; Q5_K for the other v / qkv of a 70B in
    Q4_K_M; the base type otherwise. A matrix llama.cpp's converter splits (Qwen3-Next's
    in_proj_qkvz: attn_qkv and attn_gate) gets its attn_qkv's type."""
    role = next((r for r, pattern in _ROLES if pattern.search(name)), None)
    if role == "head" or (role == "embedding" and model.tied):
        return "Q6_K"
    if model.experts == 8 and role in ("k", "v", "qkv"):
        return "Q8_0"
    if model.experts == 8 and role == "o":
        return "Q5_K"
    layer = _LAYER.search(name)
    if role in ("v", "qkv", "down") and layer and _more_bits(int(layer.group(2)), model.layers):
        return "Q6_K"
    if role in ("v", "qkv") and model.seventy_b and MIXES[mix] == "Q4_K":
        return "Q5_K"
    return MIXES[mix]


def quantize_choice(spec, name: str, shape, fallen: list | None = None, model: MixModel | None = None,
                    unfit: list | None = None) -> str | None:
    """The type `spec` picks for matrix `name` of `shape` ([..., rows, cols]), or None to keep it
    float. spec: a type name ("q8_0"), a mix ("q4_k_m": ``mix_type``, which needs `model`), or
    {fnmatch pattern: type, mix or None}, first match wins (e.g. {"lm_head.weight": "q8_0",
    "*.embed_tokens.*": None, "*": "q4_k_m"}). Empty matrices stay float; a K-quant's whose columns
    are not whole 256-value blocks fall back to Q5_0 (for Q4_K), Q5_1 (for Q5_K) or Q8_0 (for Q6_K),
    as llama.cpp's quantizer does, their names appended to ``fallen``; a matrix whose columns are not
    whole blocks of the type it gets then stays float, its name appended to ``unfit``. ValueError
    for a type not in QUANTIZE_TYPES or MIXES."""
    if spec is None or not is_matrix_name(name) or len(shape) < 2 or 0 in tuple(shape):
        return None
    rules = spec.items() if isinstance(spec, dict) else [("*", spec)]
    kind = next((k for pattern, k in rules if fnmatch.fnmatchcase(name, pattern)), None)
    if kind is None:
        return None
    kind = str(kind).upper()
    if kind in MIXES:
        if model is None:
            raise ValueError(f"quantize: the mix {kind.lower()!r} (for {name}) needs the model's layer count (model=)")
        kind = mix_type(kind, name, model)
    if kind not in QUANTIZE_TYPES:
        raise ValueError(f"quantize: {kind!r} (for {name}) is not a type circuit-finder can make "
                         f"({', '.join(t.lower() for t in QUANTIZE_TYPES + tuple(MIXES))})")
    if kind in K_TYPES and int(shape[-1]) % 256:
        kind = K_FALLBACK[kind]
        if int(shape[-1]) % BLOCK[kind] == 0 and fallen is not None:
            fallen.append(name)
    if int(shape[-1]) % BLOCK[kind] == 0:
        return kind
    if unfit is not None:
        unfit.append(name)
    return None


def quantize_matrix(t: torch.Tensor, kind: str, name: str = "tensor", device=None) -> PackedTensor:
    """A float matrix [..., rows, cols] packed as `kind` (``quantizers.quantize_rows``) on `device`
    (default: t's), where its blocks stay; t's rows travel there a chunk at a time."""
    blocks = quantize_rows(t.detach().reshape(-1, t.shape[-1]), kind, name, device)
    return PackedTensor(blocks.reshape(*t.shape[:-1], -1), kind, t.shape[-1], name)
