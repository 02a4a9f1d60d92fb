"""Continuation log-likelihood: the one place a continuation is scored given its context.

``Model.score``, the lm-eval adapter (loglikelihood, rolling) and the sweep's likelihood mode all
go through here, so the same (context, continuation) pair gets the same number everywhere.

- Tokenization rule (lm-eval's): trailing whitespace of the context moves to the continuation;
  the continuation's ids are ``encode(context + continuation)`` minus the first
  ``len(encode(context))`` ids; the context's ids are ``encode(context)``, without special tokens
  when the text starts with BOS's own text (not BOS twice). An empty context conditions on BOS (or
  the tokenizer's EOS when there is no BOS), the continuation then encoded without special tokens,
  or on the continuation's first id when that is BOS already. ``encode_pair`` applies it.
- Two layouts of the same computation: ``row_batch`` puts each pair in its own left-padded row
  (context + continuation but its last token); ``packed_batch`` puts one context once per row,
  followed by all of its continuations, each continuation seeing the context and itself only
  (a tree mask) with positions continuing from the context's end — fewer tokens when an item
  has several choices. Both give the same numbers up to float rounding.
- ``gather_logprobs`` turns hidden states into per-pair summed log-probabilities (float64) and
  whether every continuation token was the argmax (lm-eval's ``is_greedy``).

Limits: a continuation longer than ``max_length`` cannot be scored (its first tokens would need
a context position that truncation removed); rows are built on the host, one batch at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .generation import TextCodec, positions_from_mask

if TYPE_CHECKING:
    from .model import Model

__all__ = ["PairBatch", "choice_batch", "encode_pair", "gather_logprobs", "packed_batch", "row_batch", "run_batch",
           "score_batch", "score_pairs", "target_logprobs", "token_logprobs"]

Pair = tuple[Sequence[int], Sequence[int]]


def encode_pair(codec: TextCodec, context: str, continuation: str,
                add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by lm-eval's rule (see the module docstring)."""
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise TypeError("context and continuation must both be strings or both be token-id lists")
    codec.require("scoring text")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    bos = codec.bos_id
    if context == "":
        if bos is None:
            raise ValueError("an empty context needs a BOS or EOS token to condition on")
        cont = codec.encode(continuation, add_special_tokens=False)  # BOS is the context already,
        ctx, cont = ([bos], cont) if cont[:1] != [bos] else (cont[:1], cont[1:])  # or the continuation's own
    else:
        if add_special_tokens and bos is not None and context.startswith(codec.tokenizer.decode([bos])):
            add_special_tokens = False  # the text brings its BOS: not a second one (lm-eval's has_bos_prefix)
        whole = codec.encode(context + continuation, add_special_tokens=add_special_tokens)
        ctx = codec.encode(context, add_special_tokens=add_special_tokens)
        cont = whole[len(ctx):]
    if not ctx:
        raise ValueError(f"context {context!r} encodes to no tokens")
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return ctx, cont


@dataclass
class PairBatch:
    """Rows for one forward pass and where each pair's continuation tokens are predicted.

    ids, positions: [B, W]; mask: [B, W] key padding mask, [B, W, W] allowed pattern, or None.
    row, pos, target, pair: [N] — token n of the continuations is ``target[n]``, predicted at
    ``(row[n], pos[n])``, and belongs to pair ``pair[n]`` (of ``n_pairs``)."""

    ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor | None
    row: torch.Tensor
    pos: torch.Tensor
    target: torch.Tensor
    pair: torch.Tensor
    n_pairs: int


def _index_tensors(targets: list[tuple[int, int, int, int]], device) -> list[torch.Tensor]:
    """[(pair, row, pos, target), ...] -> four LongTensors on device."""
    cols = list(zip(*targets)) if targets else [(), (), (), ()]
    return [torch.tensor(c, dtype=torch.long, device=device) for c in cols]


def row_batch(pairs: Sequence[Pair], pad_id: int, device, max_length: int | None = None) -> PairBatch:
    """One left-padded row per pair: (context + continuation)[-(max_length + 1):][:-1]."""
    seqs, targets = [], []
    for k, (ctx, cont) in enumerate(pairs):
        ctx, cont = list(ctx), list(cont)
        if not ctx or not cont:
            raise ValueError(f"pair {k}: empty context or continuation")
        if max_length is not None and len(cont) > max_length:
            raise ValueError(f"pair {k}: continuation of {len(cont)} tokens is longer than max_length {max_length}")
        seq = ctx + cont
        if max_length is not None:
            seq = seq[-(max_length + 1):]
        seqs.append(seq[:-1])
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, (seq, (_, cont)) in enumerate(zip(seqs, pairs)):
        ids[b, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[b, width - len(seq):] = 1
        n = len(cont)
        targets += [(b, b, width - n + q, int(t)) for q, t in enumerate(cont)]
    pair, row, pos, target = _index_tensors(targets, device)
    mask = mask.to(device)
    return PairBatch(ids.to(device), positions_from_mask(mask), mask, row, pos, target, pair, len(pairs))


def _packed_row(ctx: list[int], conts: Sequence[Sequence[int]], first_pair: int):
    """(ids, positions, segments, targets) of one context followed by its continuations."""
    seq, pos, segs, targets = list(ctx), list(range(len(ctx))), [], []
    for c, cont in enumerate(conts):
        cont = list(cont)
        start = len(seq)
        seq += cont[:-1]
        pos += range(len(ctx), len(ctx) + len(cont) - 1)
        segs.append((start, len(seq)))
        targets += [(first_pair + c, len(ctx) - 1 if q == 0 else start + q - 1, t) for q, t in enumerate(cont)]
    return seq, pos, segs, targets


def packed_batch(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int, device) -> PairBatch:
    """One row per (context, [continuations]) group; pairs are numbered group by group, in order."""
    rows, n_pairs = [], 0
    for g, (ctx, conts) in enumerate(groups):
        if not ctx or not conts or any(len(c) == 0 for c in conts):
            raise ValueError(f"group {g}: empty context or continuation")
        rows.append((len(ctx), *_packed_row(list(ctx), conts, n_pairs)))
        n_pairs += len(conts)
    width, B = max(len(r[1]) for r in rows), len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    positions = torch.zeros((B, width), dtype=torch.long)
    allowed = torch.zeros((B, width, width), dtype=torch.bool)
    targets = []
    for b, (n_ctx, seq, pos, segs, row_targets) in enumerate(rows):
        off = width - len(seq)
        ids[b, off:] = torch.tensor(seq)
        positions[b, off:] = torch.tensor(pos)
        allowed[b, off:off + n_ctx, off:off + n_ctx] = torch.ones(n_ctx, n_ctx, dtype=torch.bool).tril()
        for start, end in segs:
            n = end - start
            allowed[b, off + start:off + end, off:off + n_ctx] = True
            allowed[b, off + start:off + end, off + start:off + end] = torch.ones(n, n, dtype=torch.bool).tril()
        targets += [(p, b, off + at, t) for p, at, t in row_targets]
    pair, row, pos, target = _index_tensors(targets, device)
    return PairBatch(ids.to(device), positions.to(device), allowed.to(device), row, pos, target, pair, n_pairs)


def choice_batch(model: Model, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]) -> PairBatch:
    """The sweep's batch of (context, [choices]) groups: packed (one row per group) when every layer
    attends, one row per pair when the model has linear-attention layers (their state runs over
    every token of a row in order, so a row cannot hold a context's several continuations). Pairs
    are numbered group by group either way."""
    if any(model.config.linear_layers):
        return row_batch([(ctx, cont) for ctx, conts in groups for cont in conts], model.codec.pad_id, model.device)
    return packed_batch(groups, model.codec.pad_id, model.device)


def target_logprobs(head, h: torch.Tensor, batch: PairBatch, top: int = 0,
                    chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per continuation token of the batch: (log-prob of its target [N] (fp32 log-softmax), argmax id
    [N], top-``top`` log-probs [N, top] and ids [N, top]). h: hidden states [B, W, H] after the last
    slot; head: hidden [n, H] -> logits [n, V] (Engine.head)."""
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for a in range(0, batch.row.numel(), chunk):
        r, p, t = (x[a:a + chunk] for x in (batch.row, batch.pos, batch.target))
        logp = torch.log_softmax(head(h[r, p]).float(), dim=-1)
        values, ids = logp.topk(max(top, 1), dim=-1)
        for out, x in zip(parts, (logp.gather(-1, t.unsqueeze(-1)).squeeze(-1), ids[:, 0], values[:, :top],
                                  ids[:, :top])):
            out.append(x)
    if not parts[0]:
        empty = torch.zeros(0, device=h.device)
        return empty, empty.long(), empty.view(0, top), empty.long().view(0, top)
    return tuple(torch.cat(x) for x in parts)


def gather_logprobs(head, h: torch.Tensor, batch: PairBatch) -> tuple[list[float], list[bool]]:
    """(summed log-prob per pair (float64 sums of fp32 log-softmax), greedy per pair: every
    continuation token was the argmax) of a PairBatch whose hidden states are h."""
    logp, argmax, _, _ = target_logprobs(head, h, batch)
    totals = torch.zeros(batch.n_pairs, dtype=torch.float64, device=h.device)
    totals.index_add_(0, batch.pair, logp.double())
    misses = torch.zeros(batch.n_pairs, dtype=torch.long, device=h.device)
    misses.index_add_(0, batch.pair, (argmax != batch.target).long())
    return totals.tolist(), (misses == 0).tolist()


def run_batch(model: Model, batch: PairBatch, layers: Sequence[int]) -> torch.Tensor:
    """Hidden states [B, W, H] of a PairBatch's rows along the layer path (no cache)."""
    engine, layers = model.engine, list(layers)
    return engine.run_slots(engine.embed(batch.ids), batch.positions, batch.mask, layers, None, 0, len(layers))


def token_logprobs(model: Model, seq: Sequence[int], layers: Sequence[int],
                   top: int = 0) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-prob of each token of seq after the first, given the tokens before it, and (when top > 0)
    the top alternatives at each position as (id, log-prob) — OpenAI's echo/logprobs semantics."""
    if len(seq) < 2:
        return [], []
    batch = row_batch([(seq[:1], seq[1:])], model.codec.pad_id, model.device)
    with torch.inference_mode():
        logp, _, values, ids = target_logprobs(model.engine.head, run_batch(model, batch, layers), batch, top)
    tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return logp.tolist(), tops


def score_batch(model: Model, batch: PairBatch, layers: Sequence[int]) -> tuple[list[float], list[bool]]:
    """Runs a PairBatch along the layer path (no cache) and gathers its pairs' log-probabilities."""
    with torch.inference_mode():
        return gather_logprobs(model.engine.head, run_batch(model, batch, layers), batch)


def score_pairs(model: Model, pairs: Sequence[Pair], layers: Sequence[int], batch_size: int = 16,
                max_length: int | None = None) -> list[tuple[float, bool]]:
    """(summed log-prob, greedy) of each (context ids, continuation ids) pair along the layer path,
    in row layout, longest first in batches of batch_size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = row_batch([pairs[i] for i in chunk], model.codec.pad_id, model.device, max_length)
        values, greedy = score_batch(model, batch, layers)
        for i, v, g in zip(chunk, values, greedy):
            out[i] = (v, g)
    return out
