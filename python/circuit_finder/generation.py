"""Generation: the one home for turning prompts into tokens and generated tokens into text.

- ``TextCodec`` — the token side of a model: prompts (plain or chat-templated) and chat messages
  to ids, left padding, the EOS and pad ids, and ``finish`` — the one rule that turns a generated
  row into text (cut at EOS, decode, cut at the first stop string) with its finish reason.
- ``Sampling`` — the settings of one generation (budget, temperature, top_p, seed, stops),
  validated once.
- ``generate_ids`` / ``decode`` — the decode loop: prefill, then one token per step until every
  row has hit EOS or a stop string, or the budget is spent (on a GPU the host reads "all
  finished" every 8th step, not every step, and cuts the extra steps' pad columns). On CUDA each step runs in fixed shapes
  (``Engine.decode_step``) captured once as a CUDA graph and replayed; elsewhere it runs the
  ordinary cached forward. ``decode`` starts from a prefilled cache, so sweeps can prefill shared
  prefixes themselves.

Limits: greedy or temperature/top-p sampling only (no beam search); stop strings are checked on the
decoded text of each row after every step (fine for short budgets, O(steps^2) text for long ones).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .placement import checked_cache

if TYPE_CHECKING:
    from .layer_path import LayerPath
    from .model import Model

__all__ = ["Finished", "Sampling", "TextCodec", "as_token_ids", "decode", "generate_ids", "generation_masks",
           "outside_vocabulary", "positions_from_mask", "rows_interact", "sample"]

OnStep = Callable[[torch.Tensor, torch.Tensor], None]  # (tokens [B], finished [B]) after every step
Check = Callable[[], None]  # before every step, on the host only (reads no tensor): raises to stop


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Left-padded attention mask [B, T] -> position ids [B, T] (0 at each sequence's first real token)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def outside_vocabulary(ids: Sequence[int], vocab_size: int) -> int | None:
    """The first id of ``ids`` outside the vocabulary (0..vocab_size - 1); None when all are in it."""
    return next((t for t in ids if not 0 <= t < vocab_size), None)


def as_token_ids(values, device: torch.device, name: str = "input_ids") -> torch.Tensor:
    """Token ids (tensor or nested lists, [T] or [B, T]) -> LongTensor [B, T] on device."""
    if not isinstance(values, torch.Tensor):
        values = torch.as_tensor(values)
    if values.dim() == 1:
        values = values.unsqueeze(0)
    if values.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must hold integer token ids, got {values.dtype}")
    return values.to(device=device, dtype=torch.long)


@dataclass(frozen=True)
class Finished:
    """A generated row made text: ``reason`` is "stop" (EOS or a stop string) or "length";
    ``tokens`` counts the generated tokens up to and including EOS."""

    text: str
    reason: str
    tokens: int


class TextCodec:
    """The token side of a model (tokenizer + the config's special ids). ``tokenizer`` may be None:
    then only id-level methods work, and text ones raise naming the model source."""

    def __init__(self, tokenizer, config_eos_ids: Sequence[int], config_pad_id: int, source: str,
                 vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.source = source
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        inside = self._in_vocabulary
        self.eos_ids = [i for i in config_eos_ids if inside(i, vocab_size, "the config's eos_token_id")]
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None and eos not in self.eos_ids and inside(eos, vocab_size, "the tokenizer's eos_token_id"):
            self.eos_ids.append(eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        if config_pad_id >= 0 and inside(config_pad_id, vocab_size, "the config's pad_token_id"):
            self.pad_id = int(config_pad_id)
        elif pad is not None and inside(pad, vocab_size, "the tokenizer's pad_token_id"):
            self.pad_id = int(pad)
        else:
            self.pad_id = self.eos_ids[0] if self.eos_ids else 0

    def _in_vocabulary(self, i: int, vocab_size: int | None, what: str) -> bool:
        """Whether id ``i`` lies in the vocabulary; one outside it is warned about (and then left
        out: a pad id past the vocabulary would be fed back to the model, an EOS id never met)."""
        if vocab_size is None or outside_vocabulary([int(i)], vocab_size) is None:
            return True
        warnings.warn(f"{self.source}: {what} {int(i)} is outside the vocabulary (0..{vocab_size - 1}): left out",
                      stacklevel=4)
        return False

    def require(self, what: str):
        """The tokenizer, or ValueError saying ``what`` needs one."""
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, and {self.source} has none; pass token ids instead")
        return self.tokenizer

    @property
    def bos_id(self) -> int | None:
        """The id an empty context conditions on: BOS, else the tokenizer's EOS (lm-eval's prefix
        token), else the config's first EOS, else None."""
        tok = self.tokenizer
        if tok is not None and tok.bos_token_id is not None:
            return int(tok.bos_token_id)
        eos = getattr(tok, "eos_token_id", None)
        if eos is not None and int(eos) in self.eos_ids:  # (eos_ids holds those inside the vocabulary)
            return int(eos)
        return self.eos_ids[0] if self.eos_ids else None

    def chat_text(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                  thinking: bool | None = None) -> str:
        """Chat messages -> the prompt text of the tokenizer's chat template. Without a generation
        prompt the last (assistant) message is left open, to be continued. ``thinking``: passed as
        the template's ``enable_thinking`` switch (Qwen3-style templates; others ignore it)."""
        extra = {} if thinking is None else {"enable_thinking": bool(thinking)}
        return self.require("chat").apply_chat_template(list(messages), tokenize=False,
                                                        add_generation_prompt=add_generation_prompt,
                                                        continue_final_message=not add_generation_prompt, **extra)

    def end_of_answer(self, chat: bool) -> list[int]:
        """The ids that close an answer: in chat, what the template writes after an assistant turn's
        content up to and including its first special token (e.g. <|im_end|>); otherwise, or when
        the template shows none, the EOS (with a warning in chat). [] only without any EOS."""
        if chat:
            marker = self._template_end()
            if marker:
                return marker
            warnings.warn(f"{self.source}: the chat template writes no special token after an answer; "
                          f"closing answers with EOS instead", stacklevel=2)
        return self.eos_ids[:1]

    def _template_end(self) -> list[int]:
        tok = self.require("chat")
        marker = "\u2063answer\u2063"
        text = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                       tokenize=False)
        after = text[text.rfind(marker) + len(marker):] if marker in text else ""
        ids = self.encode(after, add_special_tokens=False) if after else []
        special = set(getattr(tok, "all_special_ids", []) or []) | set(self.eos_ids)
        special |= {i for i, t in (getattr(tok, "added_tokens_decoder", None) or {}).items() if getattr(t, "special", False)}
        end = next((k for k, t in enumerate(ids) if t in special), None)
        return ids[:end + 1] if end is not None else []

    def encode_chat(self, messages: Sequence[dict], thinking: bool | None = None) -> list[int]:
        """Chat messages -> prompt ids (the template's text, its own special tokens only; ``thinking``
        as ``chat_text`` takes it)."""
        return self.encode(self.chat_text(messages, thinking=thinking), add_special_tokens=False)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"prompts must be strings, got {type(text).__name__}")
        return self.require("text prompts")(text, add_special_tokens=add_special_tokens)["input_ids"]

    def encode_prompt(self, prompt: str, chat: bool, thinking: bool | None = None) -> list[int]:
        """A user prompt -> ids: through the chat template (one user turn; ``thinking``: its
        enable_thinking switch, None = the template's default) when chat, else as plain text."""
        if chat:
            if not isinstance(prompt, str):
                raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
            return self.encode_chat([{"role": "user", "content": prompt}], thinking)
        return self.encode(prompt)

    def left_pad(self, seqs: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token lists -> (ids [B, T], mask [B, T]) left-padded with the pad id (mask 0 on padding)."""
        if not seqs:
            raise ValueError("no sequences to pad")
        if any(len(s) == 0 for s in seqs):
            raise ValueError("a prompt encodes to no tokens")
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
        return ids.to(device), mask.to(device)

    def finish(self, row: Sequence[int], stops: Sequence[str] = (), max_new_tokens: int | None = None) -> Finished:
        """A generated row -> text cut at the first EOS, then before the earliest stop string, then
        without special tokens. Stops are matched in the text with special tokens kept, as lm-eval's
        stopping criterion matches them (so "<|im_end|>" or "<|eot_id|>" stops a row), and again in
        the text without them, as lm-eval cuts its output. reason is "length" only when the
        row ran to max_new_tokens unstopped; tokens counts the generated tokens up to the EOS
        (included) or those the text before the stop string reaches into."""
        row = list(row)
        decode = self.require("decoding").decode
        eos = set(self.eos_ids)
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        tokens = row[:cut] if cut is not None else row
        raw = decode(tokens, skip_special_tokens=False) if stops else ""
        at = _earliest(raw, stops)
        n = None
        if at >= 0:
            n = next(n for n in range(len(tokens) + 1) if len(decode(tokens[:n], skip_special_tokens=False)) >= at)
            text = self._plain(tokens, n, raw, at)
        else:
            text = decode(tokens, skip_special_tokens=True)
        plain_at = _earliest(text, stops)  # one that shows only once special tokens are gone ("a\n<s>\nb")
        if plain_at >= 0:
            text = text[:plain_at]
            n = next(n for n in range(len(tokens) + 1) if len(decode(tokens[:n], skip_special_tokens=True)) >= plain_at)
        if n is not None:
            return Finished(text, "stop", n)
        unstopped = cut is None and (max_new_tokens is None or len(tokens) >= max_new_tokens)
        return Finished(text, "length" if unstopped else "stop", len(tokens) + (1 if cut is not None else 0))

    def _plain(self, tokens: list[int], n: int, raw: str, at: int) -> str:
        """raw[:at] (``raw`` the decode of ``tokens`` with special tokens, ``n`` tokens reaching
        ``at``) without its special tokens: the tokens wholly before ``at`` decoded without them,
        then the start of the token the cut falls in, unless that one is special."""
        decode = self.tokenizer.decode
        if decode(tokens, skip_special_tokens=True) == raw:  # no special token in the row
            return raw[:at]
        whole = decode(tokens[:n], skip_special_tokens=False)
        k = n if len(whole) == at else n - 1
        text = decode(tokens[:k], skip_special_tokens=True)
        if k < n and tokens[k] not in set(self.tokenizer.all_special_ids):
            text += raw[len(decode(tokens[:k], skip_special_tokens=False)):at]
        return text

    def hit_stop(self, generated: torch.Tensor, stops: Sequence[str]) -> torch.Tensor:
        """generated [B, n] -> bool [B]: whose decoded text (special tokens kept) holds a stop string."""
        texts = self.require("stop strings").batch_decode(generated.tolist(), skip_special_tokens=False)
        return torch.tensor([any(s in t for s in stops) for t in texts], device=generated.device)


def _earliest(text: str, stops: Sequence[str]) -> int:
    """Where the first of the stop strings begins in text; -1 when none does."""
    return min((text.find(s) for s in stops if s and s in text), default=-1)


@dataclass(frozen=True)
class Sampling:
    """Settings of one generation: temperature 0 is greedy; stops end a row when its text holds one."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stops: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.temperature < 0 or not (0 < self.top_p <= 1):
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        stops = (self.stops,) if isinstance(self.stops, str) else tuple(self.stops or ())
        object.__setattr__(self, "stops", tuple(s for s in stops if s))

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(int(self.seed))
        return g


def generation_masks(ids: torch.Tensor, mask: torch.Tensor | None,
                     max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions [B, T] of left-padded prompts, and the key mask over prompt + generated tokens
    [B, T + max_new_tokens] (None when nothing is padded). ValueError for a row whose last column
    is padding (right-padded: generation continues each row from its last column). Padding inside
    a row (the sweep's shared head, then each row's left padding) is masked like any other."""
    B, T = ids.shape
    if mask is None:
        return torch.arange(T, device=ids.device).expand(B, T).contiguous(), None
    if T and not bool((mask[:, -1] != 0).all()):
        row = int((mask[:, -1] == 0).nonzero()[0])
        raise ValueError(f"attention_mask row {row} ends in padding (right-padded); generation continues each "
                         f"row from its last column: pad prompts on the left")
    full_mask = None
    if not bool((mask != 0).all()):
        full_mask = torch.ones((B, T + max_new_tokens), dtype=torch.long, device=ids.device)
        full_mask[:, :T] = mask
    return positions_from_mask(mask), full_mask


def generate_ids(model: Model, ids: torch.Tensor, mask: torch.Tensor | None, path: LayerPath,
                 sampling: Sampling, on_step: OnStep | None = None, check: Check | None = None) -> torch.Tensor:
    """Generates after left-padded prompts ids [B, T] (mask [B, T] or None) along path.
    Returns the new ids [B, n] (rows finished early padded with the pad id). ``check`` runs
    before each decode step and may raise to stop (the server's cancelled batch)."""
    B, T = ids.shape
    layers = list(path)
    with torch.inference_mode():  # the cache first: one that cannot fit is refused before the masks are made
        cache = checked_cache(model, layers, B, T + sampling.max_new_tokens, f"max_new_tokens={sampling.max_new_tokens}")
        positions, full_mask = generation_masks(ids, mask, sampling.max_new_tokens)
        step_mask = None if full_mask is None else full_mask[:, :T]
        logits = model.engine.forward(ids, positions, step_mask, layers, cache, True)[:, -1].float()
        return decode(model, logits, cache, layers, positions[:, -1:], full_mask, sampling, on_step, check=check)


def decode(model: Model, logits: torch.Tensor, cache, layers: list[int], last_pos: torch.Tensor,
           full_mask: torch.Tensor | None, sampling: Sampling, on_step: OnStep | None = None,
           budgets: torch.Tensor | None = None, check: Check | None = None) -> torch.Tensor:
    """Token-by-token decoding after a prefill: logits [B, V] of the last prompt position, the
    cache holding the prompt (length T), last_pos [B, 1] its positions, full_mask [B, T + max_new]
    or None; budgets [B]: each row's own token budget (at most max_new_tokens; None: all rows
    max_new_tokens). Returns the new ids [B, n] (rows finished early padded with the pad id).
    check: run on the host before each step (no device sync: it reads no tensor); raising stops.
    Greedy decoding with dynamic steps (the CPU) drops finished rows from the batch as it goes:
    the cache's rows move in place, and the ids are the same (not where rows_interact). A row whose
    logits hold NaN or +inf (an overflowed forward) stops there, padded, with one warning."""
    B = logits.shape[0]
    codec = model.codec
    limit = _budgets(budgets, B, sampling.max_new_tokens, logits.device)
    step = step_function(model, cache, layers, last_pos, full_mask)
    eos = torch.tensor(codec.eos_ids, dtype=torch.long, device=logits.device)
    generator = sampling.generator(logits.device)
    out: list[torch.Tensor] = []
    finished = torch.zeros(B, dtype=torch.bool, device=logits.device)
    every = check_every(logits.device, sampling, on_step)
    compact = every == 1 and sampling.temperature == 0 and isinstance(step, _DynamicStep) and not rows_interact(model)
    alive = torch.arange(B, device=logits.device)  # the batch rows the step still runs
    done: list[torch.Tensor] = []  # per step: had every row finished (read on the host every `every` steps)
    broken = torch.zeros(B, dtype=torch.bool, device=logits.device)  # rows whose logits overflowed
    for n in range(sampling.max_new_tokens):
        if check is not None:
            check()
        if n < sampling.min_new_tokens and eos.numel():
            logits[:, eos] = float("-inf")
        logits, bad = _overflowed(logits, alive, B, sampling.temperature > 0)
        bad &= ~finished  # (a finished row's logits are not read)
        broken |= bad
        finished |= bad
        token = sample(logits, sampling.temperature, sampling.top_p, generator)
        if token.shape[0] < B:
            token = torch.full((B,), codec.pad_id, dtype=token.dtype, device=token.device).index_copy_(0, alive, token)
        token = torch.where(finished, torch.full_like(token, codec.pad_id), token)
        out.append(token)
        if eos.numel():
            finished |= torch.isin(token, eos)
        if limit is not None:
            finished |= limit <= n + 1
        if sampling.stops:
            finished |= codec.hit_stop(torch.stack(out, 1), sampling.stops)
        if on_step is not None:
            on_step(token, finished)
        done.append(finished.all())
        if n + 1 == sampling.max_new_tokens or ((n + 1) % every == 0 and bool(done[-1])):
            break
        if compact:
            alive = _drop_finished(step, alive, finished)
        logits = step(token.index_select(0, alive) if alive.numel() < B else token)
    if every > 1:  # steps run past the one where every row finished only produced pads: cut them
        ended = torch.stack(done).nonzero()
        if ended.numel():
            out = out[: int(ended[0, 0]) + 1]
    if bool(broken.any()):
        rows = broken.nonzero().squeeze(1).tolist()
        warnings.warn(f"generation: row(s) {rows[:8]}{' ...' if len(rows) > 8 else ''} of {B} got NaN or +inf logits "
                      f"(the forward overflowed: float16 along a path that repeats layers? bfloat16 or float32 "
                      f"keeps the range): they stop at that step, padded", stacklevel=2)
    return torch.stack(out, 1)


def _overflowed(logits: torch.Tensor, alive: torch.Tensor, B: int,
                sampled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, bool [B]: the rows holding NaN or +inf, by original row; ``alive`` maps the batch's
    rows to original rows). Where tokens are ``sampled`` those rows are zeroed, so sampling them
    cannot fail (argmax cannot). One reduction over the vocabulary, no host read."""
    bad = ~torch.isfinite(logits.amax(-1))  # max propagates NaN; all -inf (nothing allowed) counts too
    if sampled:
        logits = logits.masked_fill(bad.unsqueeze(1), 0.0)
    if bad.shape[0] < B:
        bad = torch.zeros(B, dtype=torch.bool, device=bad.device).index_copy_(0, alive, bad)
    return logits, bad


def rows_interact(model: Model) -> bool:
    """Whether a row's numbers depend on which other rows share its batch: LongRoPE picks its
    table by the largest position in the call (as transformers picks it by the call's length), so
    dropping, joining or regrouping rows could switch it. Batching that reshapes batches is off then
    (not for one table under both names: a GGUF's per-frequency rope_freqs)."""
    kinds = [model.config.rope, model.config.rope_local or {}]
    return any(r.get("type") == "longrope" and r.get("short_factor") != r.get("long_factor") for r in kinds)


def _budgets(budgets: torch.Tensor | None, B: int, max_new_tokens: int, device) -> torch.Tensor | None:
    """Per-row budgets as a tensor on the device (None when every row has max_new_tokens)."""
    if budgets is None:
        return None
    limit = torch.as_tensor(budgets, dtype=torch.long).to(device)
    if limit.shape != (B,) or bool((limit < 1).any()) or bool((limit > max_new_tokens).any()):
        raise ValueError(f"budgets must be [{B}] token counts in [1, max_new_tokens={max_new_tokens}], got "
                         f"{limit.tolist()}")
    return limit


def _drop_finished(step: _DynamicStep, alive: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
    """Shrinks the step's batch to the rows not finished (alive: the original row of each batch
    row). The last live rows fill the finished rows' places, so only they move."""
    live = (~finished.index_select(0, alive)).nonzero().squeeze(1).tolist()
    n, size = len(live), alive.numel()
    if n == size or n == 0:
        return alive
    kept = set(live)
    holes = [i for i in range(n) if i not in kept]
    fillers = [r for r in live if r >= n]
    rows = list(range(n))
    for hole, filler in zip(holes, fillers):
        rows[hole] = filler
    step.keep(rows)
    return alive.index_select(0, torch.tensor(rows, device=alive.device))


def check_every(device: torch.device, sampling: Sampling, on_step) -> int:
    """How many decode steps run between host reads of "has every row finished": 1 where the host
    looks at each step anyway (stop strings, a streaming callback) or nothing runs asynchronously
    (CPU); on a GPU 8, so the host queues steps without waiting for each (CF_SYNC_EVERY overrides,
    on any device)."""
    if sampling.stops or on_step is not None:
        return 1
    return max(1, int(os.environ.get("CF_SYNC_EVERY", "1" if device.type == "cpu" else "8")))


def use_static_decode(model: Model) -> bool:
    """Fixed-shape decode steps: model.static_decode when set, else on CUDA only (and not when
    layers sit on the CPU: they would attend over the cache's whole capacity every step)."""
    if model.static_decode is not None:
        return model.static_decode
    return model.device.type == "cuda" and all(d.type == "cuda" for d in model.placement.layers)


def step_function(model: Model, cache, layers: list[int], last_pos: torch.Tensor, full_mask):
    """token [B] -> logits [B, V] (fp32) of the next position, advancing the cache by one."""
    if not use_static_decode(model):
        return _DynamicStep(model, cache, layers, last_pos, full_mask)
    return _static_step(model, cache, layers, last_pos, full_mask)


class _DynamicStep:
    """token [B] -> logits [B, V] (fp32) with shapes that follow the cache's length; ``keep``
    shrinks the batch to some of its rows."""

    def __init__(self, model: Model, cache, layers, last_pos, full_mask):
        self.model, self.cache, self.layers = model, cache, layers
        self.pos, self.mask, self.len = last_pos, full_mask, cache.length

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.pos = self.pos + 1
        self.len += 1
        mask = None if self.mask is None else self.mask[:, : self.len]
        return self.model.engine.forward(token.unsqueeze(1), self.pos, mask, self.layers, self.cache, True)[:, -1].float()

    def keep(self, rows: list[int]) -> None:
        """Row i of the batch becomes row rows[i] (the cache moves its rows in place)."""
        self.cache.keep_rows(rows)
        idx = torch.tensor(rows, device=self.pos.device)
        self.pos = self.pos.index_select(0, idx)
        self.mask = None if self.mask is None else self.mask.index_select(0, idx)


def _static_step(model: Model, cache, layers, last_pos, full_mask):
    """Fixed shapes and addresses: the token, positions, key mask and write column live in tensors
    the step reads and updates in place, so a captured CUDA graph can replay it."""
    B, T, cap, dev = cache.batch, cache.length, cache.capacity, model.device
    tok = torch.zeros((B, 1), dtype=torch.long, device=dev)
    pos = (last_pos + 1).contiguous()
    index = torch.tensor([T], dtype=torch.long, device=dev)
    key_mask = torch.zeros((B, cap), dtype=torch.bool, device=dev)
    key_mask[:, :T] = True if full_mask is None else full_mask[:, :T] != 0

    def run():
        return model.engine.decode_step(tok, pos, key_mask, index, layers, cache)

    # a graph is one device's; a mixture of experts must not read its routing on the host (its
    # experts as grouped products for a step of B rows: Engine::expert_route)
    graphs = (dev.type == "cuda" and model.cuda_graphs and not model.placement.split
              and (not model.config.num_experts or model.engine.moe_without_host_sync(B)))
    replay = _CudaGraphStep(run, dev) if graphs else run

    def step(token):
        tok.copy_(token.unsqueeze(1))
        out = replay()
        cache.advance(1)
        return out.float()

    return step


class _CudaGraphStep:
    """Runs ``fn`` eagerly once on a side stream (lazy inits, as torch advises), captures it as a
    CUDA graph on the second call, and replays the graph from then on."""

    def __init__(self, fn, device: torch.device):
        self.fn, self.device = fn, device
        self.warm = False
        self.graph = None
        self.out = None

    def __call__(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.out
        if not self.warm:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self.fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.warm = True
            return out
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):  # records, runs nothing; the replay below runs this step
            self.out = self.fn()
        self.graph = g
        g.replay()
        return self.out


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax at temperature 0, else nucleus sampling."""
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


def cuda_graphs_default() -> bool:
    """CUDA graphs are on unless CF_CUDA_GRAPHS=0."""
    return os.environ.get("CF_CUDA_GRAPHS", "1") != "0"
