"""Running prompts through a router: each row along the candidate path it is routed to.

One batch runs the identity prefix once (embedding, then identity slots 0..layer-1, filling a KV
cache of those slots when generating); the pooled hidden states pick each row's candidate; rows
are grouped by candidate and each group goes on along its own path — from the shared prefix
(hidden states and KV slots of its rows, ``KVCache.select_rows``) when the candidate starts with
those identity slots, from the embedding otherwise. Results come back in the rows' order.

``generate_ids`` / ``logits`` / ``score_pairs`` are what Model.generate / logits / score call
for ``layers=router``; the server and the lm-eval adapter call them too. ``resolve`` turns
``layers`` arguments (a Router, or ``"router:PATH"``) into a Router.

Limits: a group's rows keep the batch's left padding (masked, so the same result as alone up to
float rounding); ``score_pairs`` routes each pair by its context alone and does not reuse that
pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import generation, likelihood
from ..generation import Sampling, generation_masks
from ..placement import check_cache_fits
from .core import Router

__all__ = ["RouterConfig", "generate_ids", "groups", "is_router", "logits", "resolve", "score_pairs", "trained_on"]

PREFIX = "router:"


@dataclass(frozen=True)
class RouterConfig:
    """A router as a sweep config: the runner scores each item along the candidate it is routed
    to; its records' layers are ``router.key`` (router:NAME@digest)."""

    router: Router
    start = None
    end = None
    times = None

    @property
    def key(self) -> str:
        return self.router.key

    def shared_prefix(self, num_layers: int) -> int:
        return self.router.layer


def trained_on(router: Router, items: dict[str, Sequence]) -> int:
    """How many of ``items`` ({probe: [Item]}) the router was trained on (its training's item ids;
    0 for a router saved before they were recorded)."""
    seen = {probe: set(ids) for probe, ids in ((router.training or {}).get("item_ids") or {}).items()}
    return sum(1 for probe, its in items.items() for it in its if it.id in seen.get(probe, ()))


def is_router(layers) -> bool:
    """Whether a ``layers`` argument names a router (an object, or text "router:...")."""
    return isinstance(layers, Router) or (isinstance(layers, str) and layers.strip().startswith(PREFIX))


def resolve(layers, model) -> Router:
    """A Router, or "router:PATH" (the router file at PATH) -> a Router checked against model."""
    router = layers if isinstance(layers, Router) else Router.load(layers.strip()[len(PREFIX):].strip())
    router.check(model)
    return router


def groups(choices: Sequence[int]) -> dict[int, list[int]]:
    """Candidate -> the rows routed to it (candidates in order of first row)."""
    out: dict[int, list[int]] = {}
    for row, c in enumerate(choices):
        out.setdefault(int(c), []).append(row)
    return out


def _rows(x: torch.Tensor | None, idx: torch.Tensor, whole: bool):
    return x if x is None or whole else x.index_select(0, idx)


def generate_ids(model, router: Router, ids: torch.Tensor, mask: torch.Tensor | None, sampling: Sampling,
                 on_step=None, check=None) -> tuple[torch.Tensor, list[int]]:
    """Generates after left-padded prompts ids [B, T], each row along its routed candidate.
    Returns (new ids [B, n] padded with the pad id, each row's candidate index). on_step, check:
    as generation.decode takes them."""
    B, T = ids.shape
    engine, cap = model.engine, T + sampling.max_new_tokens
    # the prefix's cache stays while a candidate's is made: both, along the longest candidate
    check_cache_fits(model, list(range(router.layer)) + list(max(router.candidates, key=len)), B, cap,
                     f"max_new_tokens={sampling.max_new_tokens}")
    positions, full_mask = generation_masks(ids, mask, sampling.max_new_tokens)
    step_mask = None if full_mask is None else full_mask[:, :T]
    with torch.inference_mode():
        cache = engine.new_cache(list(range(router.layer)), B, cap)
        h = router.prefix(model, ids, positions, step_mask, cache)
        choices = [int(c) for c in router.predict(router.pool(h, step_mask))]
        parts = groups(choices)
        if on_step is not None and len(parts) > 1:
            raise ValueError("on_step (streaming) needs the whole batch on one path")
        out = torch.full((B, 0), model.codec.pad_id, dtype=torch.long, device=ids.device)
        for c, rows in parts.items():
            layers, whole = list(router.candidates[c]), len(rows) == B
            idx = torch.tensor(rows, dtype=torch.long, device=ids.device)
            begin = router.layer if router.reuses(c) else 0
            if begin:
                hg, src = _rows(h, idx, whole), (cache if whole else cache.select_rows(idx, router.layer))
            else:
                hg, src = engine.embed(_rows(ids, idx, whole)), None
            gc = engine.new_cache(layers, len(rows), cap, src, begin)
            pos = _rows(positions, idx, whole)
            hg = engine.run_slots(hg, pos, _rows(step_mask, idx, whole), layers, gc, begin, len(layers))
            gc.advance(T)
            first = engine.head(hg[:, -1:])[:, -1].float()
            new = generation.decode(model, first, gc, layers, pos[:, -1:], _rows(full_mask, idx, whole), sampling,
                                    on_step, check=check)
            out = _place(out, new, idx, model.codec.pad_id)
    return out, choices


def _place(out: torch.Tensor, new: torch.Tensor, idx: torch.Tensor, pad: int) -> torch.Tensor:
    """Writes a group's new ids into its rows of ``out``, widening both with pad ids as needed."""
    width = max(out.shape[1], new.shape[1])
    if out.shape[1] < width:
        out = torch.cat([out, out.new_full((out.shape[0], width - out.shape[1]), pad)], 1)
    if new.shape[1] < width:
        new = torch.cat([new, new.new_full((new.shape[0], width - new.shape[1]), pad)], 1)
    out[idx] = new
    return out


def logits(model, router: Router, ids: torch.Tensor, positions: torch.Tensor,
           mask: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
    """Logits [B, T, V] of ids [B, T], each row along its routed candidate; and the choices."""
    B = ids.shape[0]
    engine = model.engine
    with torch.inference_mode():
        h = router.prefix(model, ids, positions, mask)
        choices = [int(c) for c in router.predict(router.pool(h, mask))]
        out = None
        for c, rows in groups(choices).items():
            layers, whole = list(router.candidates[c]), len(rows) == B
            idx = torch.tensor(rows, dtype=torch.long, device=ids.device)
            begin = router.layer if router.reuses(c) else 0
            hg = _rows(h, idx, whole) if begin else engine.embed(_rows(ids, idx, whole))
            hg = engine.run_slots(hg, _rows(positions, idx, whole), _rows(mask, idx, whole), layers, None, begin,
                                  len(layers))
            lg = engine.head(hg)
            if whole:
                return lg, choices
            if out is None:
                out = lg.new_empty((B, *lg.shape[1:]))
            out[idx] = lg
    return out, choices


def score_pairs(model, router: Router, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                max_length: int | None = None,
                route_on: Sequence[list[int]] | None = None) -> tuple[list[tuple[float, bool]], list[int]]:
    """likelihood.score_pairs with each (context, continuation) pair along the candidate its
    context is routed to (pairs with the same context go the same way). ``route_on``: per pair, the
    ids to route on, when the pair's context is not the whole prompt (encode_pair moves a trailing
    space or newline of the prompt into the continuation; the router learned on whole prompts).
    Returns the results in order and each pair's candidate index."""
    routed = [tuple(r) for r in route_on] if route_on is not None else [tuple(ctx) for ctx, _ in pairs]
    if len(routed) != len(pairs):
        raise ValueError(f"route_on holds {len(routed)} prompts for {len(pairs)} pairs")
    contexts = list(dict.fromkeys(routed))
    seen = [list(c)[-max_length:] if max_length else list(c) for c in contexts]  # (its last max_length tokens)
    chosen = dict(zip(contexts, router.choose(model, seen, batch_size)))
    choices = [chosen[r] for r in routed]
    results: list = [None] * len(pairs)
    for c, rows in groups(choices).items():
        got = likelihood.score_pairs(model, [pairs[r] for r in rows], list(router.candidates[c]), batch_size,
                                     max_length)
        for r, v in zip(rows, got):
            results[r] = v
    return results, choices

