"""Sweep runner: scores probes along layer paths, reusing the work their paths share.

``run_configs`` runs configs in order of how many of their first slots agree with the identity
path (for the RYS config (i, j): slots 0..j-1). For each probe, ``ProbeBatch`` encodes the items
once and advances the identity pass slot by slot; its hidden states (and, when generating, its KV
cache slots, shared without copies) are reused by every config, so the prefix of each path is
computed once for the whole sweep. Each finished config is appended to the ResultStore.

Modes: ``generate`` (greedy decode with ``generation.decode``, the probe scores the text and says
whether it could read an answer at all: the parse rate) and ``likelihood`` (the probe's choices
scored by ``likelihood`` in packed layout; accuracy of the right answer ranking first, and its
log-prob margin over the best wrong choice). Thinking: by default the chat template's
``enable_thinking`` switch is set off (templates without one ignore it); ``thinking=True`` leaves
it on and gives every probe ``think_tokens`` more tokens to think in. A template that opens a
<think> block in the prompt itself gets the extra tokens too (with a warning), and its
completions are scored (and stored) with the opening tag put back.

Generate mode does less work than one row per item (every route gives each item the ids it gets
alone): a probe's items are grouped by prompt length (``length_groups``: little left padding); the
tokens all prompts of a group share (the chat template's head, ``shared_head``) run once at batch
1, their keys and values placed into every row; and every group's rows decode as one batch
(``joint_decode``), each to its own probe's budget, finished rows leaving the batch on the CPU.

Limits: one model in one process. The shared head needs attention-only layers whose sliding
windows, if any, span a whole row (elsewhere prompts are plainly left-padded); router configs run
each group on its own and, with a shared head, from the embedding. Where rows interact (LongRoPE
picks its table by the call's largest position: ``generation.rows_interact``) each probe's items
run as one batch, as plain batched generation runs them.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
import time
import warnings
from collections.abc import Sequence

import torch

from .. import generation, likelihood
from ..loading import q8_products
from ..model import Model
from ..placement import checked_cache
from ..probes import Item, Probe, get_probe, parse_rate_of
from ..results import ResultStore
from ..router import run as routing
from ..router.run import RouterConfig
from .configs import MODES, SweepConfig

__all__ = ["THINK_TOKENS", "ProbeBatch", "Runner", "context_digest", "item_digest", "model_setup", "opens_thinking",
           "resolve_chat", "resolve_probes", "run_configs", "prompting_setup", "sweep_setup"]

THINK_TOKENS = 1024  # extra generation budget per probe when thinking is left on
_OPENS_THINKING = re.compile(r"<(?:think|thinking)>\s*$")


def probe_contexts(model: Model, items: Sequence[Item], chat: bool, thinking: bool = False) -> list[str]:
    """The text each item's answer follows: the chat template's prompt (its thinking switch set to
    ``thinking``), or "<prompt>\\nAnswer:"."""
    if chat:
        return [model.codec.chat_text([{"role": "user", "content": it.prompt}], thinking=thinking) for it in items]
    return [f"{it.prompt}\nAnswer:" for it in items]


class ProbeBatch:
    """One probe's items encoded once: the rows run in one batch, and the identity pass over them."""

    def __init__(self, model: Model, probe: Probe, items: list[Item], mode: str, chat: bool, thinking: bool = False,
                 think_tokens: int = THINK_TOKENS):
        self.model, self.probe, self.items, self.mode = model, probe, items, mode
        check_mode(probe, mode)
        model.codec.require(f"probe {probe.name!r}")
        contexts = probe_contexts(model, items, chat, thinking)
        # a template that opens the thinking block itself (no switch to turn it off): completions
        # start inside it, so they are scored with the opening tag put back, and get room to think
        self.opened = "<think>" if any(_OPENS_THINKING.search(c) for c in contexts) else ""
        if self.opened and not thinking and mode == "generate":
            warnings.warn(f"probe {probe.name!r}: the chat template opens a thinking block in the prompt; "
                          f"giving each item {think_tokens} more tokens", stacklevel=2)
        self.budget = probe.max_new_tokens + (think_tokens if thinking or self.opened else 0)
        special = not chat  # a chat template writes its own special tokens
        if mode == "likelihood":
            # each choice ends with the end-of-answer marker, so a choice that is a prefix of another
            # ("1" of "12") has to be a complete answer to win
            self.marker = model.codec.end_of_answer(chat)
            self.groups = self._choice_groups(contexts, chat)
            # what a router reads: the whole prompt as generation encodes it (the scoring context
            # leaves its trailing whitespace to the choice, lm-eval's rule; a deployed router sees it)
            self.context_ids = [model.codec.encode(c, add_special_tokens=special) for c in contexts]
            self.scoring = likelihood.choice_batch(model, self.groups)
            self.ids, self.positions, self.prefix_mask = self.scoring.ids, self.scoring.positions, self.scoring.mask
            self.capacity, self.head = None, 0
        else:
            seqs = [model.codec.encode(c, add_special_tokens=special) for c in contexts]
            self.context_ids = seqs  # what a router reads: each item's prompt ids
            self.head = shared_head(model, seqs, self.budget)
            self.ids, mask = head_layout(model.codec, seqs, self.head, model.device)
            self.capacity = self.ids.shape[1] + self.budget
            self.positions, self.full_mask = generation.generation_masks(self.ids, mask, self.budget)
            self.prefix_mask = None if self.full_mask is None else mask
        self._h = None
        self._done = 0
        self._cache = None
        self._head_h = self._head_cache = None  # the shared head's hidden states and cache (batch 1)

    def _choice_groups(self, contexts: list[str], chat: bool) -> list[tuple[list[int], list[list[int]]]]:
        """Per item: (context ids, [ids of each choice]) by the one tokenization rule."""
        groups = []
        for it, context in zip(self.items, contexts):
            if len(it.choices) < 2 or len(set(it.choices)) != len(it.choices) or it.answer not in it.choices:
                raise ValueError(f"probe {self.probe.name!r} item {it.id!r}: likelihood mode needs at least two "
                                 f"different 'choices', one of them the answer (it ranks them)")
            pairs = []
            for choice in it.choices:
                try:
                    pairs.append(likelihood.encode_pair(self.model.codec, context, choice if chat else " " + choice,
                                                        add_special_tokens=not chat))
                except ValueError as e:
                    raise ValueError(f"probe {self.probe.name!r} item {it.id!r}: choice {choice!r}: {e}") from e
            groups.append((pairs[0][0], [cont + self.marker for _, cont in pairs]))
        return groups

    def _new_cache(self, layers: list[int], rows: int, src=None, begin: int = 0):
        """A generate-mode cache of ``rows`` rows along ``layers`` (its first ``begin`` slots
        ``src``'s), checked against the free memory left by the caches already made (the identity
        prefix's, the other batches')."""
        return checked_cache(self.model, layers, rows, self.capacity, f"probe {self.probe.name!r}: max_new_tokens="
                             f"{self.probe.max_new_tokens} (a budget of {self.budget} tokens a row)", src, begin)

    def _prefix(self, slots: int, num_layers: int) -> torch.Tensor:
        """Hidden states (of the tokens after the shared head) after the identity path's first
        ``slots`` slots, advanced monotonically as configs run in order of shared prefix (restarted
        when a config needs fewer). The head runs alongside at batch 1, its keys and values placed
        into every row of the cache."""
        engine, p, every = self.model.engine, self.head, list(range(num_layers))
        if self._h is None or slots < self._done:
            self._h = engine.embed(self.ids[:, p:])
            self._done = 0
            if self.mode == "generate":
                self._cache = self._new_cache(every, self.ids.shape[0])
            if p:
                self._head_h = engine.embed(self.ids[:1, :p])
                self._head_cache = engine.new_cache(every, 1, p)
                self._cache.advance(p)
        if slots > self._done:
            if p:
                self._head_h = engine.run_slots(self._head_h, self.positions[:1, :p], None, every, self._head_cache,
                                                self._done, slots)
                self._place_head(self._head_cache, self._cache, self._done, slots)
            self._h = engine.run_slots(self._h, self.positions[:, p:], self.prefix_mask, every, self._cache,
                                       self._done, slots)
            self._done = slots
        return self._h

    def _place_head(self, head_cache, cache, first_slot: int, end_slot: int = -1) -> None:
        """The head's keys and values of slots [first_slot, end_slot) into every row of ``cache``."""
        cache.place(head_cache, 0, 0, first_slot, self.head, self.ids.shape[0], end_slot)

    def _run_head(self, layers: list[int], begin: int, cache) -> None:
        """Runs the shared head along the config's slots [begin, end) at batch 1 (from the identity
        prefix's head) and places its keys and values into every row of ``cache``."""
        engine, p = self.model.engine, self.head
        h = self._head_h if begin else engine.embed(self.ids[:1, :p])
        head_cache = engine.new_cache(layers, 1, p, self._head_cache if begin else None, begin)
        engine.run_slots(h, self.positions[:1, :p], None, layers, head_cache, begin, len(layers))
        self._place_head(head_cache, cache, begin)
        cache.advance(p)

    def run(self, config: SweepConfig | RouterConfig, num_layers: int, reuse: bool) -> dict:
        if isinstance(config, RouterConfig):
            return self.run_router(config.router, num_layers, reuse)
        if self.mode == "generate":
            return joint_decode(self.model, [self], list(config.layers), lambda b: b.prefill(config, num_layers, reuse))[0]
        engine = self.model.engine
        begin = config.shared_prefix(num_layers) if reuse else 0
        h = self._prefix(begin, num_layers) if reuse else engine.embed(self.ids)
        layers = list(config.layers)
        return self._likelihood(engine.run_slots(h, self.positions, self.prefix_mask, layers, None, begin, len(layers)))

    def run_router(self, router, num_layers: int, reuse: bool) -> dict:
        """Scores the items each along the candidate the router picks for it (rows grouped by
        candidate; in generate mode a group goes on from the shared identity prefix when its
        candidate starts with it). The record's ``routes`` say which candidate each item took."""
        engine = self.model.engine
        choices = router.choose(self.model, self.context_ids)
        out: dict = {}
        for c, rows in routing.groups(choices).items():
            layers = list(router.candidates[c])
            items = [self.items[r] for r in rows]
            if self.mode == "likelihood":
                scoring = likelihood.choice_batch(self.model, [self.groups[r] for r in rows])
                h = engine.run_slots(engine.embed(scoring.ids), scoring.positions, scoring.mask, layers, None, 0,
                                     len(layers))
                part = self._likelihood(h, scoring, items)
            else:
                part = self._generate_rows(rows, layers, router.layer if reuse and router.reuses(c) else 0, num_layers)
            for key, values in part.items():
                out.setdefault(key, {}).update(values)
        out["routes"] = {it.id: str(router.candidates[c]) for it, c in zip(self.items, choices)}
        if "parsed" in out and len(out["parsed"]) < len(self.items):
            del out["parsed"]
        return {k: {it.id: v[it.id] for it in self.items} if isinstance(v, dict) else v for k, v in out.items()}

    def _generate_rows(self, rows: list[int], layers: list[int], begin: int, num_layers: int) -> dict:
        """Generates for some rows of the batch along ``layers``, from the identity prefix's first
        ``begin`` slots (hidden states and KV slots of those rows) or from the embedding."""
        engine = self.model.engine
        begin = 0 if self.head else begin  # the identity prefix holds the tokens after the head only
        idx = torch.tensor(rows, dtype=torch.long, device=self.ids.device)
        h = self._prefix(begin, num_layers).index_select(0, idx) if begin else engine.embed(self.ids.index_select(0, idx))
        src = self._cache.select_rows(idx, begin) if begin else None
        cache = self._new_cache(layers, len(rows), src, begin)
        mask = None if self.prefix_mask is None else self.prefix_mask.index_select(0, idx)
        h = engine.run_slots(h, self.positions.index_select(0, idx), mask, layers, cache, begin, len(layers))
        return self._generate(h, cache, layers, idx)

    def prefill(self, config: SweepConfig, num_layers: int, reuse: bool) -> tuple[torch.Tensor, object]:
        """Generate mode: runs the prompts along the config's path (from the shared identity prefix
        when ``reuse``); returns the last position's logits [B, V] (fp32) and the cache."""
        engine, p = self.model.engine, self.head
        layers = list(config.layers)
        begin = config.shared_prefix(num_layers) if reuse else 0
        h = self._prefix(begin, num_layers) if reuse else engine.embed(self.ids[:, p:])
        cache = self._new_cache(layers, self.ids.shape[0], self._cache if begin else None, begin)
        if p:
            self._run_head(layers, begin, cache)
        h = engine.run_slots(h, self.positions[:, p:], self.prefix_mask, layers, cache, begin, len(layers))
        cache.advance(self.ids.shape[1] - p)
        return engine.head(h[:, -1:])[:, -1].float(), cache

    def _generate(self, h: torch.Tensor, cache, layers: list[int], rows: torch.Tensor | None = None) -> dict:
        """Decodes after the prompt's last slot (``rows``: the batch rows h holds; None = all) and
        scores the completions."""
        cache.advance(self.ids.shape[1])
        logits = self.model.engine.head(h[:, -1:])[:, -1].float()
        sampling = generation.Sampling(self.budget)
        positions, full_mask = self.positions, self.full_mask
        if rows is not None:
            positions = positions.index_select(0, rows)
            full_mask = None if full_mask is None else full_mask.index_select(0, rows)
        new = generation.decode(self.model, logits, cache, layers, positions[:, -1:], full_mask, sampling)
        return self.scored(new, rows)

    def scored(self, new: torch.Tensor, rows: torch.Tensor | None = None) -> dict:
        """Scores generated ids [n, steps] of the items in ``rows`` (None: all, in order)."""
        items = self.items if rows is None else [self.items[r] for r in rows.tolist()]
        outputs = [self.opened + self.model.codec.finish(row[: self.budget]).text for row in new.tolist()]
        out = {"scores": {it.id: _finite(self.probe, it, self.probe.score(it, o)) for it, o in zip(items, outputs)},
               "outputs": {it.id: o for it, o in zip(items, outputs)}}
        parsed = {it.id: parse_rate_of(self.probe, it, o) for it, o in zip(items, outputs)}
        if all(v is not None for v in parsed.values()):
            out["parsed"] = parsed
        return out

    def _likelihood(self, h: torch.Tensor, scoring=None, items=None) -> dict:
        """Choice rankings of the items (default: all, in self.scoring) from hidden states h."""
        scoring, items = scoring or self.scoring, self.items if items is None else items
        values, _ = likelihood.gather_logprobs(self.model.engine.head, h, scoring)
        scores, norm, margins, at = {}, {}, {}, 0
        for it in items:
            lp = values[at:at + len(it.choices)]
            at += len(it.choices)
            right = it.choices.index(it.answer)
            scores[it.id], margins[it.id] = _ranking(lp, right)
            # lm-eval's acc_bytes (its acc_norm on ASCII): log-prob per UTF-8 byte of the choice's text
            norm[it.id], _ = _ranking([v / max(1, len(c.encode())) for v, c in zip(lp, it.choices)], right)
        broken = [i for i, m in margins.items() if m is None]
        if broken:
            warnings.warn(f"probe {self.probe.name!r}: {len(broken)} of {len(margins)} items got non-finite "
                          f"log-probabilities or margins (the forward overflowed?), e.g. item {broken[0]!r}: "
                          f"margins left out (NaN or +inf ranks wrong)", stacklevel=2)
        return {"scores": scores, "scores_norm": norm, "margins": margins}


GROUP_COST = 32  # tokens of prefill one more group of a probe's items costs besides its head


def length_groups(lengths: Sequence[int], cost: int) -> list[list[int]]:
    """Indices of prompts in groups of similar length, so that left padding wastes little: the
    split of the lengths' sorted order that minimises the padded tokens (rows x longest per group)
    plus ``cost`` per group (exact, by dynamic programming over the sorted lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best, cut = [0] + [None] * n, [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: the first j sorted prompts, grouped
        for i in range(j):
            total = best[i] + (j - i) * lengths[order[j - 1]] + cost
            if best[j] is None or total < best[j]:
                best[j], cut[j] = total, i
    groups, j = [], n
    while j:
        groups.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return groups[::-1]


MIN_HEAD = 8  # shortest common prompt head worth computing once at batch 1


def shared_head(model: Model, seqs: Sequence[Sequence[int]], budget: int) -> int:
    """How many first tokens every prompt shares (the chat template's system prompt and the
    user turn's opening), to be computed once and placed into every row's cache: 0 when under
    MIN_HEAD, for one prompt, or where a hole between head and tail is not exact — a linear
    attention layer's state would run over the padding, and a sliding window counts cache columns,
    not positions, so it must span the whole row (the longest prompt and `budget` new tokens) for
    the hole to change nothing."""
    cfg = model.config
    row = max(len(s) for s in seqs) + budget
    if (len(seqs) < 2 or any(cfg.linear_layers) or any(0 < w < row for w in cfg.sliding_window)
            or generation.rows_interact(model)):
        return 0
    p = min(len(s) for s in seqs) - 1  # every row keeps a token of its own
    first = seqs[0]
    for s in seqs[1:]:
        p = next((i for i in range(p) if s[i] != first[i]), p)
    return p if p >= MIN_HEAD else 0


def head_layout(codec, seqs: Sequence[Sequence[int]], head: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [B, T] of prompts laid out as the shared head, then left padding, then each
    prompt's own tokens (plain left padding when head is 0); positions follow the mask."""
    if not head:
        return codec.left_pad(seqs, device)
    tail, mask = codec.left_pad([s[head:] for s in seqs], device)
    B = len(seqs)
    top = torch.tensor(list(seqs[0][:head]), dtype=torch.long, device=device).expand(B, head)
    return torch.cat([top, tail], 1), torch.cat([torch.ones((B, head), dtype=mask.dtype, device=device), mask], 1)


def joint_decode(model: Model, batches: Sequence[ProbeBatch], layers: list[int], prefill) -> list[dict]:
    """Greedy decoding of several probes' rows as one batch (each row to its own probe's budget;
    finished rows leave the batch on the CPU), scored per probe. ``prefill(batch)`` gives a batch's
    last logits and cache; each cache is copied into one joint cache, prompts right-aligned, and
    dropped before the next batch runs. A shorter probe's rows are padded on the left, which their
    key mask hides and their positions skip, so every row decodes as it would alone."""
    if len(batches) == 1:
        b = batches[0]
        logits, cache = prefill(b)
        new = generation.decode(model, logits, cache, layers, b.positions[:, -1:], b.full_mask,
                                generation.Sampling(b.budget))
        return [b.scored(new)]
    width, budget = max(b.ids.shape[1] for b in batches), max(b.budget for b in batches)
    sizes = [b.ids.shape[0] for b in batches]
    device = batches[0].ids.device
    cache = checked_cache(model, layers, sum(sizes), width + budget, f"the probes' joint decode (budget {budget})")
    mask = torch.ones((sum(sizes), width + budget), dtype=torch.long, device=device)
    row, logits = 0, []
    for b in batches:
        n, T = b.ids.shape
        last, part = prefill(b)
        cache.place(part, row, width - T)
        del part
        logits.append(last)
        mask[row:row + n, :width - T] = 0
        if b.prefix_mask is not None:
            mask[row:row + n, width - T:width] = b.prefix_mask
        row += n
    cache.advance(width)
    budgets = torch.tensor([b.budget for b in batches for _ in range(b.ids.shape[0])], device=device)
    positions = torch.cat([b.positions[:, -1:] for b in batches])
    new = generation.decode(model, torch.cat(logits), cache, layers, positions, None if bool(mask.all()) else mask,
                            generation.Sampling(budget), budgets=budgets)
    return [b.scored(part) for b, part in zip(batches, new.split(sizes))]


def _ranking(values: list[float], right: int) -> tuple[float, float | None]:
    """(100 if the right choice scores highest else 0, its margin over the best wrong choice; None
    where it is not finite: a forward that overflowed (NaN or +inf log-probabilities) ranks
    nothing, and its margin is left out of the statistics rather than written as NaN)."""
    if any(math.isnan(v) or v == math.inf for v in values):  # (-inf is a choice it rules out: rankable)
        return 0.0, None
    best_wrong = max(v for c, v in enumerate(values) if c != right) if len(values) > 1 else float("-inf")
    margin = values[right] - best_wrong
    return (100.0 if values[right] > best_wrong else 0.0), (margin if math.isfinite(margin) else None)


def _finite(probe, item, score) -> float:
    """A probe's score of an item as a float; ValueError naming them when it is not a finite number."""
    value = float(score)
    if not math.isfinite(value):
        raise ValueError(f"probe {getattr(probe, 'name', probe)!r} scored item {item.id!r} {score!r}: a score must be "
                         f"a finite number (0-100)")
    return value


class Runner:
    """Runs configs for a fixed set of probes (items encoded once) and returns their records."""

    def __init__(self, model: Model, probes: list[Probe], mode: str, split: str, max_items: int | None,
                 chat: bool | None, reuse: bool, thinking: bool = False, think_tokens: int = THINK_TOKENS,
                 stage: str = "sweep"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        chat = resolve_chat(model, chat)
        self.model, self.mode, self.split, self.reuse, self.stage, self.chat = model, mode, split, reuse, stage, chat
        self.thinking = bool(thinking)
        self.num_layers = model.num_layers
        self.batches: list[ProbeBatch] = []  # generate mode: a probe's items in groups of similar length
        self.order: dict[str, list[str]] = {}  # each probe's item ids, in the records' order
        check_probes(model, probes, mode, split, max_items)
        for probe in probes:
            items = probe.items(split)[:max_items]
            self.order[probe.name] = [it.id for it in items]
            batch = ProbeBatch(model, probe, items, mode, chat, thinking, think_tokens)
            groups = length_groups([len(s) - batch.head for s in batch.context_ids], 2 * batch.head + GROUP_COST) \
                if mode == "generate" and not generation.rows_interact(model) else [list(range(len(items)))]
            self.batches += [batch] if len(groups) == 1 else \
                [ProbeBatch(model, probe, [items[i] for i in g], mode, chat, thinking, think_tokens) for g in groups]

    def _one_by_one(self, config) -> bool:
        """Each probe's batch runs alone: likelihood mode and router configs; generate mode
        decodes all probes' rows as one batch (joint_decode)."""
        return self.mode != "generate" or isinstance(config, RouterConfig) or len(self.batches) == 1 or \
            generation.rows_interact(self.model)

    def run(self, config: SweepConfig) -> dict:
        t0 = time.perf_counter()
        extra = config.layers.extra_layers(self.num_layers) if isinstance(config, SweepConfig) else None
        record = {"layers": config.key, "start": config.start, "end": config.end, "times": config.times,
                  "extra_layers": extra, "split": self.split,
                  "mode": self.mode, "stage": self.stage, "scores": {}}
        if isinstance(config, RouterConfig):
            config.router.check_prompts(self.chat, self.thinking, self.model.codec)
            record.update(self._in_sample(config))
        with torch.inference_mode():
            outs = [b.run(config, self.num_layers, self.reuse) for b in self.batches] if self._one_by_one(config) else \
                joint_decode(self.model, self.batches, list(config.layers),
                             lambda b: b.prefill(config, self.num_layers, self.reuse))
        record.update(self._merged(outs))
        record["seconds"] = round(time.perf_counter() - t0, 4)
        return record

    def _in_sample(self, config: RouterConfig) -> dict:
        """A router scored on items it was trained on: refused on held-out items (they would not be
        held out), flagged (with a warning) on search items, where its row is optimistic."""
        seen = routing.trained_on(config.router, {b.probe.name: b.items for b in self.batches})
        if not seen:
            return {}
        if self.split != "search":  # (run_configs refuses these before anything runs)
            raise ValueError(f"{config.key} was trained on {seen} of these {self.split} items")
        warnings.warn(f"{config.key} is scored on {seen} search items it was trained on: its row is in-sample "
                      f"(optimistic); its held-out reading is validate()'s or evaluate_router's", stacklevel=3)
        return {"in_sample": seen}

    def _merged(self, outs: list[dict]) -> dict:
        """The batches' outputs by key and probe, each probe's items in its order; a key some
        batch of a probe lacks (parse rates) is left out for that probe."""
        merged: dict = {}
        for key in ("scores", "scores_norm", "margins", "outputs", "parsed", "routes"):
            for name, ids in self.order.items():
                parts = [out.get(key) for b, out in zip(self.batches, outs) if b.probe.name == name]
                if all(part is not None for part in parts):
                    values = {k: v for part in parts for k, v in part.items()}
                    merged.setdefault(key, {})[name] = {i: values[i] for i in ids}
        return merged


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="config", dynamic_ncols=True)


def run_configs(model: Model, probes: list[Probe], configs: list[SweepConfig], store: ResultStore | None,
                mode: str, split: str, max_items: int | None, chat: bool | None, reuse: bool, progress: bool,
                desc: str = "sweep", thinking: bool = False, think_tokens: int = THINK_TOKENS,
                executor=None) -> list[dict]:
    """Runs the configs not yet in the store (in shared-prefix order), appending each record as it
    finishes; ``desc`` names the stage (sweep, refine, validate) in the records and the progress bar.
    ``executor``: a RayExecutor runs them on Ray workers (records still appended here, in the order
    they finish); None runs them in this process."""
    names = [p.name for p in probes]
    todo = [c for c in configs if store is None or not store.has(c.key, split, mode, names)]
    if split != "search":  # before anything runs: a router is never scored on items it trained on as held out
        items = {p.name: p.items(split)[:max_items] for p in probes}
        for c in todo:
            seen = routing.trained_on(c.router, items) if isinstance(c, RouterConfig) else 0
            if seen:
                raise ValueError(f"{c.key} was trained on {seen} of these {split} items: they are not held out "
                                 f"for it. Score it on items its training never saw.")
    n = model.num_layers
    todo.sort(key=lambda c: (c.shared_prefix(n), c.key))
    records: list[dict] = []
    if not todo:
        return records
    bar = _progress(len(todo), progress, desc)

    def finished(record: dict) -> None:
        if store is not None:
            store.append(record)
        records.append(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(record["layers"][:40])

    try:
        if executor is not None:
            executor.run(model, probes, todo, finished,
                         dict(mode=mode, split=split, max_items=max_items, chat=chat, reuse=reuse, thinking=thinking,
                              think_tokens=think_tokens, stage=desc))
        else:
            runner = Runner(model, probes, mode, split, max_items, chat, reuse, thinking, think_tokens, stage=desc)
            for config in todo:
                finished(runner.run(config))
    finally:
        if bar is not None:
            bar.close()
    return records


def resolve_chat(model: Model, chat: bool | None) -> bool:
    """chat=None: use the chat template when the tokenizer has one."""
    return getattr(model.tokenizer, "chat_template", None) is not None if chat is None else bool(chat)


def check_mode(probe: Probe, mode: str) -> None:
    """ValueError when ``probe`` is not scored in ``mode``."""
    modes = tuple(getattr(probe, "modes", MODES))
    if mode not in modes:
        raise ValueError(f"probe {probe.name!r} is scored in mode {' or '.join(map(repr, modes))} only, not {mode!r}")


def check_probes(model: Model, probes: Sequence[Probe], mode: str, split: str, max_items: int | None) -> None:
    """What a Runner refuses, checked before any work (on a Ray sweep's driver, before workers
    load the model): a probe not scored in ``mode``, one without ``split`` items, a model without
    a tokenizer."""
    check_max_items(max_items)
    for probe in probes:
        check_mode(probe, mode)
        if not probe.items(split)[:max_items]:
            raise ValueError(f"probe {probe.name!r} has no {split} items")
        model.codec.require(f"probe {probe.name!r}")


def check_max_items(max_items) -> None:
    """max_items is None (every item) or a whole number >= 1 (items[:-1] or items[:0] would
    silently drop items or read as a probe without any)."""
    if max_items is not None and (isinstance(max_items, bool) or not isinstance(max_items, numbers.Integral)
                                  or max_items < 1):
        raise ValueError(f"max_items must be None (every item) or an integer >= 1, got {max_items!r}")


def sweep_setup(model: Model, probes: list[Probe], chat: bool | None, max_items: int | None,
                thinking: bool = False, think_tokens: int = THINK_TOKENS, *, mode: str) -> dict:
    """What a sweep's records depend on beyond the model's shape and mode (ResultStore.open's
    ``setup``): the model's (``model_setup``), how prompts are written (``prompting_setup``) and
    each probe's search item ids and their digest (max_items is recorded too, but the items it
    selects are what is compared)."""
    chosen = {p.name: p.items("search")[:max_items] for p in probes}
    return {**model_setup(model), **prompting_setup(model, probes, mode, chat, thinking, think_tokens),
            "items": {name: [it.id for it in items] for name, items in chosen.items()},
            "item_digest": {name: item_digest(items) for name, items in chosen.items()}}


def prompting_setup(model: Model, probes: Sequence[Probe], mode: str, chat: bool | None, thinking: bool,
                    think_tokens: int) -> dict:
    """How prompts are written and answered: chat on or off and, when on, a digest of the chat
    template (its text, so another template for the same weights is told apart); the thinking
    switch, and the extra tokens answers get where thinking is on or (generate mode) the template
    opens a thinking block itself; in generate mode each probe's max_new_tokens and the ids that
    end an answer."""
    chat = resolve_chat(model, chat)
    template = getattr(model.tokenizer, "chat_template", None) if chat else None
    digest = None if template is None else hashlib.sha256(
        json.dumps(template, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:32]
    out = {"chat": chat, "chat_template": digest, "thinking": bool(thinking)}
    if thinking or (mode == "generate" and chat and opens_thinking(model)):
        out["think_tokens"] = int(think_tokens)  # answers get that many more tokens
    if mode == "generate":
        out["max_new_tokens"] = {p.name: int(p.max_new_tokens) for p in probes}
        out["eos_ids"] = [int(i) for i in model.codec.eos_ids]  # where answers end
    return out


def opens_thinking(model: Model) -> bool:
    """Whether the chat template (thinking switch off) opens a thinking block at the end of the
    prompt itself, as DeepSeek-R1 distills' and QwQ's do: answers then start inside it."""
    return bool(_OPENS_THINKING.search(model.codec.chat_text([{"role": "user", "content": "?"}], thinking=False)))


def model_setup(model: Model) -> dict:
    """What a record depends on in the model: its file's fingerprint, dtype, load(quantize=) and
    load(dequantize=) options, activations (with q8, which products the CPU rounds) and the kinds
    of device its layers run on (a CPU's and a GPU's kernels round differently: greedy tokens of
    near-ties can flip; which GPU of a kind does not matter)."""
    q8 = {"q8_products": q8_products()} if model.activations == "q8" else {}
    options = getattr(model, "load_options", {})
    return {"fingerprint": model.fingerprint(), "dtype": str(model.dtype).replace("torch.", ""),
            "quantize": options.get("quantize"), "dequantize": bool(options.get("dequantize", False)),
            "activations": model.activations, "devices": sorted({d.type for d in model.placement.devices}), **q8}


def context_digest(model: Model, probes: Sequence[Probe], split: str, max_items: int | None, chat: bool | None,
                   thinking: bool) -> str:
    """sha256 of every item's prompt as this model's tokenizer encodes it (the chat template and
    its thinking switch applied): two processes that agree on it write the same prompts."""
    chat = resolve_chat(model, chat)
    h = hashlib.sha256()
    for probe in probes:
        for context in probe_contexts(model, probe.items(split)[:max_items], chat, thinking):
            h.update(json.dumps(model.codec.encode(context, add_special_tokens=not chat)).encode())
    return h.hexdigest()


def item_digest(items: Sequence[Item]) -> str:
    """sha256 of the items' ids, prompts, answers, choices, scorers and scorer data: another
    version of a probe with the same ids has another digest."""
    text = json.dumps([[it.id, it.prompt, it.answer, list(it.choices), it.scorer, dict(it.data)] for it in items],
                      ensure_ascii=False, sort_keys=True, default=list)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_probes(probes) -> list[Probe]:
    """Probe names, .jsonl paths or Probe objects (one or a list) -> Probes with distinct names."""
    if isinstance(probes, str) or not isinstance(probes, Sequence):
        probes = [probes]
    out = [get_probe(p) for p in probes]
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ValueError(f"two probes share a name: {names}")
    if not out:
        raise ValueError("no probes given")
    return out
