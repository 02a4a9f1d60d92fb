"""lm-evaluation-harness adapter: ``circuit-finder`` as an lm_eval model, along any layer path.

    import circuit_finder.lm_eval   # registers the model name "circuit-finder"
    import lm_eval
    lm_eval.simple_evaluate(model="circuit-finder",
                            model_args="pretrained=default,layers=rys=10:13,dtype=float32",
                            tasks=["arc_easy"])

or from the shell: ``circuit-finder eval --model PATH --layers 0..12+10..29 --tasks arc_easy``.

model_args: ``pretrained`` (HF folder, .gguf file or ``default``), ``layers`` (any layer path
text; lm-eval splits model_args on commas, so write ``0..12+10..29`` or ``0..12;10..29`` or the
RYS short form ``rys=10:13``; or ``router:PATH``, a saved Router: each request runs along the
path it routes its context to — a rolling log-likelihood document by its opening tokens), ``device``
(default cuda when available, else cpu), ``dtype``, ``batch_size`` (default 8; ``auto``: on a GPU the
largest of ``max_batch_size``, half that, ... whose rows of ``max_length`` tokens fit, found once; on
the CPU 8), ``max_length``, ``max_gen_toks``, ``add_bos_token``, ``device_map`` (``auto`` or
``cuda:0=20+cpu=12``) and ``max_memory`` (``cuda:0=20GiB+cpu=64GiB``): a model split over devices;
``dequantize`` (a GGUF converted to dtype), ``quantize`` (a Hugging Face folder packed on load,
e.g. ``q8_0``) and ``activations`` (``q8``: 8-bit inputs to the packed CPU products), as
``circuit_finder.load`` takes them.

Scoring follows lm-eval's conventions for causal models (those of its Hugging Face backend):
contexts and continuations are encoded together and split, contexts are left-truncated to the
maximum length, generation stops at ``until`` strings (matched with special tokens kept) and the
EOS token; a chat template that refuses the system role goes without it. Generation kwargs it
does not implement are refused by name (``generation_settings``), not ignored.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

try:
    from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs
except ImportError as e:  # names lm-eval added in 0.4.9 / 0.4.10
    from importlib.metadata import version

    raise ImportError(f"circuit-finder's lm-eval adapter needs lm-eval >= 0.4.10; this is lm-eval {version('lm_eval')} "
                      "(pip install -U 'lm-eval>=0.4.10')") from e
from tqdm.auto import tqdm

from .generation import Sampling, generate_ids
from .likelihood import score_pairs
from .router import run as routing

__all__ = ["CircuitFinderLM"]

_FALSE = ("0", "false", "no", "none", "")
DEFAULT_BATCH = 8


def _flag(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() not in _FALSE


def available_device(device: str | None) -> str:
    """The requested device (None: cuda when this torch can use it, else cpu), or "cpu" (with a
    warning) when it is an accelerator this torch cannot use — lm-eval's CLI passes device="cuda"
    unless told otherwise, as its own hf model expects."""
    name = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kind = name.split(":")[0]
    usable = {"cpu": True, "cuda": torch.cuda.is_available(),
              "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if usable.get(kind, True):
        return name
    warnings.warn(f"device {name!r} is not available here; running on cpu", stacklevel=2)
    return "cpu"


def largest_batch(fits, most: int) -> int:
    """The largest of most, most // 2, ..., 2 for which ``fits(b)`` runs without running out of
    device memory, else 1 (batch_size="auto" on a GPU, as lm-eval's hf model finds it)."""
    b = max(1, int(most))
    while b > 1:
        try:
            fits(b)
            return b
        except (torch.OutOfMemoryError, RuntimeError) as e:  # our extension's may arrive as RuntimeError
            if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e).lower():
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            b //= 2
    return 1


_GENERATION_KEYS = {"do_sample", "temperature", "top_p", "min_new_tokens", "max_length", "use_cache"}


def generation_settings(kwargs: dict, max_gen: int, until: list[str]) -> tuple[Sampling, int | None]:
    """(Sampling, max_length or None) for lm-eval's normalized gen_kwargs (until and max_gen_toks
    taken out). do_sample without a temperature samples at 1.0 (transformers' default); a key this
    adapter does not implement is a ValueError naming it, unless it changes nothing (num_beams=1,
    repetition_penalty=1, top_k when greedy), rather than a silently different generation."""
    sampled, given = bool(kwargs.get("do_sample")), kwargs.get("temperature")
    temperature = (1.0 if given is None else float(given)) if sampled else 0.0
    neutral = {"num_beams": lambda v: v is None or int(v) == 1,
               "repetition_penalty": lambda v: v is None or float(v) == 1.0,
               "top_k": lambda v: not sampled or v in (None, 0)}
    odd = sorted(k for k, v in kwargs.items() if k not in _GENERATION_KEYS and not neutral.get(k, lambda _: False)(v))
    if odd:
        raise ValueError(f"generation kwargs circuit-finder does not implement: {', '.join(odd)} "
                         f"({', '.join(f'{k}={kwargs[k]!r}' for k in odd)}); lm-eval's hf model would apply them")
    if "max_length" in kwargs:
        warnings.warn("max_length in generation kwargs (prompt + generated tokens, as lm-eval's hf model reads it) "
                      "overrides max_gen_toks: use max_gen_toks instead", stacklevel=3)
    top_p = 1.0 if kwargs.get("top_p") is None else float(kwargs["top_p"])
    if top_p <= 0:  # transformers keeps one token then: the argmax, a greedy generation
        temperature, top_p = 0.0, 1.0
    min_new = min(int(kwargs.get("min_new_tokens", 0) or 0), max_gen)
    sampling = Sampling(max_gen, min_new, temperature, top_p, None, tuple(until))
    return sampling, (int(kwargs["max_length"]) if kwargs.get("max_length") is not None else None)


@register_model("circuit-finder", "circuit_finder")
class CircuitFinderLM(TemplateLM):
    """An lm_eval LM running a circuit-finder Model along one layer path."""

    def __init__(self, pretrained: str = "default", layers: str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | str = DEFAULT_BATCH, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | str | None = None, model=None,
                 device_map: str | None = None, max_memory: str | None = None, dequantize: bool | str = False,
                 quantize: str | None = None, activations: str = "float", max_batch_size: int | str | None = 64,
                 **kwargs):
        super().__init__()
        from .loading import load

        if kwargs:
            raise ValueError(f"unknown circuit-finder model_args: {', '.join(sorted(kwargs))}")
        self.cf_model = model if model is not None else load(
            pretrained, device=available_device(device), dtype=dtype, device_map=device_map, max_memory=max_memory,
            dequantize=bool(_flag(dequantize)), quantize=quantize or None, activations=activations)
        if self.cf_model.tokenizer is None:
            raise ValueError(f"{pretrained}: lm-eval needs a tokenizer, and this model has none")
        self.tokenizer = self.cf_model.tokenizer
        if isinstance(layers, (int, float)) and not isinstance(layers, bool):
            layers = str(layers)  # lm-eval parses "layers=3" (a one-slot path) as a number
        self.router = self.cf_model.router(layers) if layers not in (None, "") else None
        self.path = None if self.router else self.cf_model.path(layers if layers not in (None, "") else None)
        self.pretrained = str(self.cf_model.source if model is not None else pretrained)  # what get_model_info names
        self._max_length = int(max_length) if max_length else self.cf_model.context_length
        self._batch_size = self.resolve_batch(batch_size, max_batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _flag(add_bos_token)

    def resolve_batch(self, batch_size, max_batch_size) -> int:
        """A number as given; "auto" (or "auto:N", detected once): on a GPU the largest power-of-two
        batch up to max_batch_size whose rows of max_length tokens fit; on the CPU (a model with any
        layer there too), where running out of memory is no error to catch, the default."""
        text = str(batch_size).strip()
        if not text.startswith("auto"):
            return max(1, int(text))
        if any(d.type != "cuda" for d in self.cf_model.placement.devices):
            return DEFAULT_BATCH
        path = list(self.path) if self.router is None else list(max(self.router.candidates, key=len))
        length = self._max_length

        def fits(b: int) -> None:
            pair = ([self.prefix_token_id] * (length - 1), [self.prefix_token_id])
            score_pairs(self.cf_model, [pair] * b, path, b, length)
            torch.cuda.synchronize()

        return largest_batch(fits, int(max_batch_size or 64))

    # --------------------------------------------------------------------- lm-eval plumbing
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self.cf_model.device

    @property
    def tokenizer_name(self) -> str:
        # the model's file or folder (a GGUF's tokenizer is built into a cache folder: not a name to show)
        return str(self.cf_model.source).strip("/").replace("/", "__") or "circuit-finder"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat template's prompt; a template that refuses the system role (Gemma's) gets the
        history without system messages, with a warning, as lm-eval's hf model does."""
        import jinja2

        try:
            return self.cf_model.codec.chat_text(chat_history, add_generation_prompt=add_generation_prompt)
        except jinja2.exceptions.TemplateError:
            if not any(m.get("role") == "system" for m in chat_history):
                raise
            warnings.warn("the chat template failed with a system message; applying it without the system "
                          "messages (as lm-eval's hf model does)", stacklevel=2)
            kept = [m for m in chat_history if m.get("role") != "system"]
            return self.cf_model.codec.chat_text(kept, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        special = {}
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        ids = self.tokenizer.encode(string, **special)
        bos = self.tokenizer.bos_token_id
        if self.add_bos_token and special.get("add_special_tokens", True) and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]  # add_bos_token=True on a tokenizer that adds none (lm-eval's hf model rebuilds it to)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def get_model_info(self) -> dict:
        if self.router is not None:
            return {"model": self.pretrained, "layers": self.router.key, "router": self.router.source,
                    "candidates": [str(c) for c in self.router.candidates], "dtype": str(self.cf_model.dtype),
                    "device": str(self.cf_model.device)}
        return {"model": self.pretrained, "layers": str(self.path), "slots": len(self.path),
                "dtype": str(self.cf_model.dtype), "device": str(self.cf_model.device)}

    # --------------------------------------------------------------------- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs, prompts = [], []  # prompts: what a router reads, each whole context as the adapter encodes it
        for i, (key, context_enc, continuation_enc) in enumerate(requests):
            if not context_enc or not continuation_enc:
                raise ValueError(f"request {i}: empty context or continuation after tokenization")
            pairs.append((context_enc, continuation_enc))
            whole = self.router is not None and key is not None and isinstance(key[0], str) and key[0]
            prompts.append(self.tok_encode(key[0]) if whole else context_enc)
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="circuit-finder loglikelihood")
        step = self.batch_size * 8  # score_pairs sorts and batches within each step; the bar moves per step
        for start in range(0, len(pairs), step):
            results += self._score(pairs[start:start + step], prompts[start:start + step])
            bar.update(min(step, len(pairs) - start))
        bar.close()
        for request, result in zip(requests, results):
            if request[0] is not None:
                self.cache_hook.add_partial("loglikelihood", request[0], result)
        return results

    def _score(self, pairs, prompts) -> list[tuple[float, bool]]:
        if self.router is not None:
            return routing.score_pairs(self.cf_model, self.router, pairs, self.batch_size, self.max_length,
                                       route_on=prompts)[0]
        return score_pairs(self.cf_model, pairs, list(self.path), self.batch_size, self.max_length)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's summed log-likelihood over its disjoint rolling windows; the windows of
        all documents are scored together (batched across documents, as lm-eval's HF model does).
        A router routes each document once, by its opening tokens, and every window goes along it."""
        docs = [r.args[0] for r in requests]
        windows, owner, heads = [], [], []
        for k, string in enumerate(docs):
            tokens = self.tok_encode(string)
            heads.append([self.prefix_token_id, *tokens][:self.max_length])  # what a router reads
            mine = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]
            windows += mine
            owner += [k] * len(mine)
        totals = [0.0] * len(docs)
        for k, (value, _) in zip(owner, self._rolling_scores(heads, windows, owner, disable_tqdm)):
            totals[k] += value
        for string, total in zip(docs, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    def _rolling_scores(self, heads, windows, owner, disable_tqdm: bool) -> list[tuple[float, bool]]:
        if self.router is None:
            return self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=disable_tqdm)
        route = self.router.choose(self.cf_model, heads, self.batch_size)
        out: list = [None] * len(windows)
        for c, rows in tqdm(routing.groups([route[k] for k in owner]).items(), disable=disable_tqdm,
                            desc="circuit-finder rolling (per route)"):
            scored = score_pairs(self.cf_model, [windows[i] for i in rows], list(self.router.candidates[c]),
                                 self.batch_size, self.max_length)
            for i, v in zip(rows, scored):
                out[i] = v
        return out

    # --------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        model = self.cf_model
        args = [r.args for r in requests]
        results: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        bar = tqdm(total=len(args), disable=disable_tqdm, desc="circuit-finder generate_until")
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(args[members[0]][1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            base, total = generation_settings(kwargs, max_gen, until)
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks {max_gen} leaves no room for the context in {self.max_length} tokens")
            members = sorted(members, key=lambda i: -len(self.tok_encode(args[i][0])))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                seqs = [self.tok_encode(args[i][0], left_truncate_len=max_ctx) for i in chunk]
                ids, mask = model.codec.left_pad(seqs, model.device)
                sampling = base
                if total is not None:  # max_length: prompt (padded) + generated, as lm-eval's hf model reads it
                    room = total - ids.shape[1]
                    if room < 1:
                        for i in chunk:
                            results[i] = ""
                        bar.update(len(chunk))
                        continue
                    sampling = dataclasses.replace(base, max_new_tokens=room, min_new_tokens=min(base.min_new_tokens, room))
                new = (routing.generate_ids(model, self.router, ids, mask, sampling)[0] if self.router is not None
                       else generate_ids(model, ids, mask, self.path, sampling))
                for i, row in zip(chunk, new.tolist()):
                    results[i] = model.codec.finish(row, until).text
                    self.cache_hook.add_partial("generate_until", args[i], results[i])
                bar.update(len(chunk))
        bar.close()
        return results
