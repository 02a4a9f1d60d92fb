"""Model: a loaded decoder-only LM (the C++ engine, its config and tokenizer) run along any layer path.

This is the object users hold. Its methods are thin: a layer path runs in the C++ engine
(``Engine.forward`` / ``run_slots`` — the one loop over a path's slots), tokens are encoded and
decoded by ``generation.TextCodec`` (``model.codec``), the decode loop lives in ``generation``,
and continuations are scored in ``likelihood``. Loading files into a Model is ``loading.load``.

Limits: the tensors in ``model.tensors`` are the engine's own (shared storage), so mutating them
changes the model; a GGUF's packed matrices (``quants.PackedTensor``) are read-only views of the
file's memory map: never write them. A model split over devices (``placement``) takes and returns tensors on its main
device, ``model.device``. One thread at a time may run a model or use a KV cache: the engine
releases the GIL while it computes, so a second thread changing the same cache (``keep_rows``,
``place``) races it (the server runs every request on one worker thread).
"""

from __future__ import annotations

import hashlib
import numbers

import torch

from . import _C, generation, likelihood
from .config import ModelConfig
from .files import fingerprint
from .generation import Sampling, TextCodec, as_token_ids, outside_vocabulary, positions_from_mask
from .layer_path import LayerPath
from .placement import Placement
from .router import run as routing

__all__ = ["Model"]


class Model:
    """A decoder-only LM that runs along any layer path. See ``circuit_finder.load``.

    Attributes: engine (the C++ Engine), config (ModelConfig), tokenizer (or None), codec
    (TextCodec: encoding, padding, finishing rows), device (the main device: embedding, head, inputs
    and outputs), placement (each layer's device; ``placement.split`` when over several), dtype,
    source (the file or folder), tensors (Hugging Face name -> the tensor the engine runs, same
    storage). cuda_graphs: replay decode steps as a CUDA graph on CUDA (CF_CUDA_GRAPHS=0 turns it
    off; a split model never does); static_decode: force (True) or forbid (False) fixed-shape decode
    steps on any device (None: when every layer is on CUDA).
    """

    def __init__(self, engine, config: ModelConfig, tokenizer, device: torch.device, dtype: torch.dtype, source: str,
                 tensors: dict[str, torch.Tensor] | None = None, placement: Placement | None = None):
        self.engine = engine
        self.tensors = tensors or {}
        self.config = config
        self.codec = TextCodec(tokenizer, config.eos_token_ids, config.pad_token_id, source, config.vocab_size)
        self.device = device
        self.placement = placement or Placement((device,) * config.num_layers, device)
        self.dtype = dtype
        self.source = source
        self.cuda_graphs = generation.cuda_graphs_default()
        self.static_decode: bool | None = None
        self.activations = "float"  # load(activations=): "q8" rounds packed products' activations to 8 bits
        # load()'s options that change the weights or numbers (quantize, dequantize, activations,
        # fuse_projections; from_file: made by load() from its source, so it can be loaded again
        # the same way), so a sweep's workers load the same model and a resume checks them
        self.load_options: dict = {}

    def __repr__(self) -> str:
        c = self.config
        where = f"[{self.placement}]" if self.placement.split else str(self.device)
        return (f"Model({c.architecture}, {c.num_layers} layers, hidden {c.hidden_size}, "
                f"{self.dtype}, {where}, from {self.source})")

    @property
    def tokenizer(self):
        return self.codec.tokenizer

    def fingerprint(self) -> str | None:
        """A cheap identity of the weights, which sweeps' resumes and routers compare: the source
        file's (``files.fingerprint``) for a model ``load`` made from it; else the tensors' own
        (their names, shapes, dtypes and 64 values spread over each), so two in-memory models
        (``load_from_tensors``: a base and its fine-tune, say) are told apart."""
        if self.load_options.get("from_file"):
            return fingerprint(self.source)
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            t = getattr(self.tensors[name], "blocks", self.tensors[name])  # a PackedTensor: its bytes
            flat = t.detach().reshape(-1)
            at = torch.linspace(0, max(0, flat.numel() - 1), 64, device=flat.device).long()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:".encode())
            if flat.numel():
                h.update(flat[at].float().cpu().numpy().tobytes())
        return h.hexdigest()[:32]

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of weight storage resident per device ({"cpu": ..., "cuda:0": ...}): each storage
        counted once (tied embeddings, a layer run at several slots, views of one stacked tensor), the
        engine's own converted copies included; layers placed on the meta device hold none; a packed
        GGUF matrix counts its blocks (pages of the memory-mapped file)."""
        tensors = [getattr(t, "blocks", t) for t in self.tensors.values()]  # a PackedTensor's storage: its blocks
        tensors += list(self.engine.main_tensors().values())
        for layer in range(self.num_layers):
            tensors += list(self.engine.layer_tensors(layer).values())
        seen, out = set(), {}
        for t in tensors:
            storage, where = t.untyped_storage(), str(t.device)
            if t.device.type == "meta" or (where, storage.data_ptr()) in seen:
                continue
            seen.add((where, storage.data_ptr()))
            out[where] = out.get(where, 0) + storage.nbytes()
        return out

    def fused_products(self) -> dict[str, int]:
        """{"qkv": attention layers whose q / k / v projections run as one product, "gate_up": gated
        MLPs (experts included) whose gate / up do}: a checkpoint's fused tensors (Phi-3) or ones
        ``load`` laid out so (its fuse_projections)."""
        return dict(self.engine.fused_products())

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def context_length(self) -> int:
        """The config's max_position_embeddings (2048 when the config has none)."""
        return int(self.config.max_position_embeddings or 2048)

    def path(self, layers=None) -> LayerPath:
        """None, path text, a LayerPath or a list of ints -> a LayerPath validated for this model."""
        return LayerPath.coerce(layers, self.num_layers)

    def router(self, layers):
        """A Router for a ``layers`` argument that names one (a Router, or "router:PATH" — the
        router file at PATH), checked against this model; None for a plain path."""
        return routing.resolve(layers, self) if routing.is_router(layers) else None

    def logits(self, input_ids, layers=None, attention_mask=None) -> torch.Tensor:
        """Logits [B, T, V] of input_ids [B, T] along the layer path (None = identity; a Router:
        each row along the path it is routed to).

        attention_mask [B, T] (1 = token, 0 = left padding) gives each sequence the positions it
        would have alone.
        """
        ids = as_token_ids(input_ids, self.device)
        router = self.router(layers)
        path = None if router else self.path(layers)
        mask = self._mask_for(ids, attention_mask, "input_ids")
        positions = (torch.arange(ids.shape[1], device=self.device).expand_as(ids).contiguous() if mask is None
                     else positions_from_mask(mask))
        if router is not None:
            return routing.logits(self, router, ids, positions, mask)[0]
        with torch.inference_mode():
            return self.engine.forward(ids, positions, mask, list(path), None, False)

    def _mask_for(self, ids: torch.Tensor, attention_mask, name: str) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        mask = as_token_ids(attention_mask, self.device, "attention_mask")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != {name} shape {tuple(ids.shape)}")
        return mask

    def _inferred_mask(self, ids: torch.Tensor) -> torch.Tensor | None:
        """transformers' rule for prompts given without a mask: pad ids are padding, where the pad
        id is no EOS (None when there are none: every id a token)."""
        pad = self.codec.pad_id
        if pad is None or pad in self.codec.eos_ids or not bool((ids == pad).any()):
            return None
        return (ids != pad).long()

    def generate(self, prompts, layers=None, max_new_tokens: int = 64, min_new_tokens: int = 0,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: str | list[str] | None = None, chat: bool = False, attention_mask=None,
                 thinking: bool | None = None):
        """Generates along a layer path.

        prompts: a string or list of strings -> list[str] of completions (chat=True applies the chat
        template; thinking: its enable_thinking switch, None = the template's default, or with a
        router its training sweep's setting, as ``Router.path_for`` reads it; a sweep sets it False
        unless told otherwise, so thinking=False writes a prompt as a sweep's probes ran it); or a
        LongTensor [B, T] of token ids (left-padded, with attention_mask; without one, pad ids are
        padding where the pad id is no EOS, as transformers infers) ->
        LongTensor [B, new] of generated ids (finished rows padded with the pad id).
        temperature 0 is greedy; otherwise sampling with top_p, reproducible with seed for the same
        batch (one generator draws for every row: a prompt's sample depends on its batch and row).
        layers may be a Router (or "router:PATH"): each prompt runs along the path it is routed to.
        The KV cache holds prompt + max_new_tokens positions from the start: one that cannot fit the
        devices' free memory raises ValueError before it is made.
        """
        router = self.router(layers)
        path = None if router else self.path(layers)
        if router is not None and thinking is None and chat:  # as the router's training sweep wrote prompts
            thinking = router.thinking
        if isinstance(prompts, torch.Tensor):
            sampling = Sampling(max_new_tokens, min_new_tokens, temperature, top_p, seed)
            ids = as_token_ids(prompts, self.device, "prompts")
            mask = self._mask_for(ids, attention_mask, "prompts")
            return self._generate(ids, self._inferred_mask(ids) if mask is None else mask, router or path, sampling)
        sampling = Sampling(max_new_tokens, min_new_tokens, temperature, top_p, seed, stop or ())
        if router is not None:
            router.check_prompts(chat, thinking, self.codec)
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, mask = self.codec.left_pad([self.codec.encode_prompt(p, chat, thinking) for p in prompt_list],
                                        self.device)
        new = self._generate(ids, mask, router or path, sampling)
        return [self.codec.finish(row, sampling.stops).text for row in new.tolist()]

    def _generate(self, ids: torch.Tensor, mask, route, sampling: Sampling) -> torch.Tensor:
        if isinstance(route, LayerPath):
            return generation.generate_ids(self, ids, mask, route, sampling)
        return routing.generate_ids(self, route, ids, mask, sampling)[0]

    def score(self, contexts, continuations, layers=None, batch_size: int = 16) -> list[float]:
        """Summed log-probabilities of each continuation given its context, along the layer path
        (or, for a Router, along the path each context is routed to).

        contexts/continuations: strings (or one string each), or lists of token ids (or one list
        each; numpy arrays and tensors of ids too). Text pairs are tokenized by lm-eval's rule
        (``likelihood.encode_pair``).
        """
        contexts, continuations = (x.tolist() if hasattr(x, "tolist") else x for x in (contexts, continuations))
        if isinstance(contexts, str) or (contexts and isinstance(contexts[0], numbers.Integral)):
            contexts, continuations = [contexts], [continuations]
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        router = self.router(layers)
        path = None if router else self.path(layers)
        pairs = [self._pair(c, k) for c, k in zip(contexts, continuations)]
        vocab = self.config.vocab_size
        for k, (ctx, cont) in enumerate(pairs):  # (a continuation's last id is a target only, never an input)
            bad = outside_vocabulary([*ctx, *cont], vocab)
            if bad is not None:
                raise _C.InputError(f"pair {k}: token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if router is not None:  # routed on each whole prompt, as it learned (a pair's context lacks its end space)
            whole = [self.codec.encode(c) if isinstance(c, str) else ctx for c, (ctx, _) in zip(contexts, pairs)]
            return [v for v, _ in routing.score_pairs(self, router, pairs, batch_size, route_on=whole)[0]]
        return [v for v, _ in likelihood.score_pairs(self, pairs, list(path), batch_size)]

    def _pair(self, context, continuation) -> tuple[list[int], list[int]]:
        if isinstance(context, str) or isinstance(continuation, str):
            return likelihood.encode_pair(self.codec, context, continuation)
        ctx, cont = [int(t) for t in context], [int(t) for t in continuation]
        if not ctx:
            raise ValueError("a context encodes to no tokens")
        if not cont:
            raise ValueError("a continuation holds no tokens")
        return ctx, cont
