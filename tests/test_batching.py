"""Rows of several prompts decoded as one batch (issue #16, item 6): the KV cache's place and
keep_rows, per-row token budgets and the CPU decode loop that drops finished rows, and the
sweep's layout (a prompt head computed once for every row, items grouped by length, every
probe's rows decoded together). Each is checked against the rows run alone or against a route
without the feature (fixed-shape decode keeps every row), never against its own output."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import circuit_finder as cf
from circuit_finder import LayerPath, generation
from circuit_finder.probes import get_probe
from circuit_finder.sweep import Runner
from circuit_finder.sweep.runner import MIN_HEAD, length_groups, shared_head
from helpers import tokens

N = 6
PATH = list(LayerPath.duplicate(N, 1, 4))


def prefilled(model, ids: torch.Tensor, capacity: int):
    """(last logits [B, V], cache holding the prompt) of unpadded prompts ids [B, T] along PATH."""
    cache = model.engine.new_cache(PATH, ids.shape[0], capacity)
    pos = torch.arange(ids.shape[1]).expand_as(ids).contiguous()
    with torch.inference_mode():
        logits = model.engine.forward(ids, pos, None, PATH, cache, True)[:, -1].float()
    return logits, cache


def alone(model, row: torch.Tensor, budget: int) -> list[int]:
    """Greedy ids of one prompt at batch 1 (nothing padded, nothing dropped)."""
    return model.generate(row.unsqueeze(0), layers=PATH, max_new_tokens=budget)[0].tolist()


def check_rows(model, new: torch.Tensor, prompts: list[torch.Tensor], budgets: list[int]) -> None:
    for i, (row, budget) in enumerate(zip(prompts, budgets)):
        want = alone(model, row, budget)
        got = new[i].tolist()
        print(f"row {i} (budget {budget}): batched {got[:8]} alone {want[:8]}")
        assert got[:len(want)] == want
        assert all(t == model.codec.pad_id for t in got[len(want):])


def test_place_and_keep_rows(model_dir):
    model = cf.load(model_dir("llama")[0])
    a, b = prefilled(model, tokens(2, 5, seed=1), 5)[1], prefilled(model, tokens(3, 8, seed=2), 8)[1]
    joint = model.engine.new_cache(PATH, 5, 20)
    joint.place(a, 0, 3)
    joint.place(b, 2, 0)
    joint.advance(8)
    for s in range(len(PATH)):
        keys = joint.keys(s)
        assert torch.equal(keys[:2, :, 3:], a.keys(s)) and torch.equal(keys[2:], b.keys(s))
        assert not keys[:2, :, :3].any()
    kept = {s: joint.keys(s)[[4, 1]].clone() for s in range(len(PATH))}
    joint.keep_rows([4, 1])  # in place: row 0 takes row 4, row 1 stays
    assert joint.batch == 2 and all(torch.equal(joint.keys(s), kept[s]) for s in kept)
    joint.keep_rows([1, 0])  # a swap: copied, not moved
    assert all(torch.equal(joint.keys(s), kept[s][[1, 0]]) for s in kept)
    one = prefilled(model, tokens(1, 4, seed=7), 4)[1]  # a batch of 1 fills several rows, some slots only
    wide = model.engine.new_cache(PATH, 3, 9)
    wide.place(one, 0, 2, first_slot=1, rows=3, end_slot=4)
    wide.advance(6)
    assert not wide.keys(0).any() and not wide.keys(4).any()
    assert all(torch.equal(wide.keys(s)[:, :, 2:], one.keys(s).expand(3, -1, -1, -1)) for s in range(1, 4))


def test_keep_rows_leaves_sharing_caches_alone(model_dir):
    model = cf.load(model_dir("llama")[0])
    _, lender = prefilled(model, tokens(3, 6, seed=3), 12)
    before = [lender.keys(s).clone() for s in range(len(PATH))]
    sharer = model.engine.new_cache(PATH, 3, 12, lender, 2)
    sharer.advance(6)
    sharer.keep_rows([2])  # its shared slots are copied out, not moved in the lender's tensors
    assert all(torch.equal(lender.keys(s), before[s]) for s in range(len(PATH)))
    assert torch.equal(sharer.keys(0), before[0][2:])
    other = model.engine.new_cache(PATH, 3, 12, lender, 2)
    other.advance(6)
    lender.keep_rows([0, 2])  # a cache others share from copies too
    assert torch.equal(other.keys(1), before[1]) and torch.equal(lender.keys(1), before[1][[0, 2]])


def test_cache_errors_name_the_fault(model_dir):
    model = cf.load(model_dir("llama")[0])
    _, cache = prefilled(model, tokens(3, 4), 6)
    for rows, message in [([0, 0], "distinct"), ([3], "distinct indices into the batch of 3"), ([], "at least one")]:
        with pytest.raises(ValueError, match=message):
            cache.keep_rows(rows)
    small = model.engine.new_cache(PATH, 2, 5)
    with pytest.raises(ValueError, match="do not fit a cache of batch 2 and capacity 5"):
        small.place(cache, 0, 2)
    with pytest.raises(ValueError, match="slots"):
        small.place(model.engine.new_cache(PATH[:3], 1, 5), 0, 0)
    borrower = model.engine.new_cache(PATH, 3, 6, cache, 2)
    with pytest.raises(ValueError, match=r"slots \[1, 9\) must lie in \[2, 9\] \(the slots before 2 are another cache.s\)"):
        borrower.place(cache, 0, 0, first_slot=1)
    with pytest.raises(ValueError, match="2 rows from a source of batch 3"):
        small.place(cache, 0, 0, rows=2)
    other = cf.load(model_dir("llama", num_key_value_heads=4)[0])
    with pytest.raises(ValueError, match="slot 0 differs in kind, shape, dtype or device"):
        other.engine.new_cache(PATH, 3, 6).place(cache, 0, 0)
    # another model's cache in a forward: refused, not broadcast or a raw shape error
    ids = tokens(3, 2)
    pos = torch.arange(4, 6).expand_as(ids).contiguous()
    with pytest.raises(ValueError, match="holds 2 key/value heads of 16 .*this model has 4 of 16"):
        other.engine.forward(ids, pos, None, PATH, cache, True)
    # overlapping copies (a cache into itself, or into / from the cache it lends slots to) would
    # read what they just wrote: refused
    snapshot = cache.keys(3).clone()
    with pytest.raises(ValueError, match="cannot be placed into itself"):
        cache.place(cache, 0, 1)
    with pytest.raises(ValueError, match="slot 0 of the source shares its memory"):
        cache.place(borrower, 0, 1, end_slot=2)  # the borrower's first 2 slots are the cache's own
    assert torch.equal(cache.keys(3), snapshot)
    with pytest.raises(ValueError, match="cannot advance the KV cache by 9223372036854775807"):
        cache.advance(2 ** 63 - 1)  # (length + n overflowed, and passed)
    with pytest.raises(ValueError, match="KV cache slot 99 is out of range: the cache has 9 slots"):
        cache.keys(99)
    with pytest.raises(ValueError, match="KV cache slot -1 is out of range"):
        cache.device(-1)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3_5_text", "phi3"])
def test_budgets_and_dropped_rows_equal_rows_alone(model_dir, arch):
    """Left-padded prompts decoded with per-row budgets: the CPU loop drops rows as they finish
    (the cache shrinks: attention keys, sliding windows, a hybrid's linear states move); each row
    equals that prompt alone, and the fixed-shape decode that keeps every row. LongRoPE (phi3)
    picks its table from the whole batch, so there no row leaves."""
    model = cf.load(model_dir(arch)[0])
    prompts = [tokens(1, n, seed=n)[0] for n in (5, 9, 7, 9)]
    budgets = [3, 12, 6, 1]
    ids, mask = model.codec.left_pad(prompts, model.device)
    positions, full_mask = generation.generation_masks(ids, mask, max(budgets))

    def run():
        cache = model.engine.new_cache(PATH, 4, ids.shape[1] + max(budgets))
        with torch.inference_mode():
            logits = model.engine.forward(ids, positions, full_mask[:, :ids.shape[1]], PATH, cache, True)[:, -1].float()
            new = generation.decode(model, logits, cache, PATH, positions[:, -1:], full_mask,
                                    generation.Sampling(max(budgets)), budgets=torch.tensor(budgets))
        return new, cache.batch

    dropped, left = run()
    assert generation.rows_interact(model) == (arch == "phi3")
    assert (left == 4) if arch == "phi3" else (left < 4)  # rows left the batch
    check_rows(model, dropped, prompts, budgets)
    model.static_decode = True
    try:
        kept, left = run()
    finally:
        model.static_decode = None
    assert left == 4 and torch.equal(kept, dropped)
    with pytest.raises(ValueError, match="budgets must be"):
        generation.decode(model, torch.zeros(4, 8), None, PATH, positions[:, -1:], full_mask, generation.Sampling(4),
                          budgets=torch.tensor([1, 2, 3, 5]))


@pytest.mark.parametrize("arch", ["llama", "qwen3_5_text"])
def test_placed_caches_decode_as_one_batch(model_dir, arch):
    """Two batches prefilled apart (widths 6 and 10), right-aligned into one cache: every row
    decodes to its own budget as it does alone."""
    model = cf.load(model_dir(arch)[0])
    groups = [tokens(2, 6, seed=5), tokens(3, 10, seed=6)]
    budgets = [7, 2, 9, 4, 9]
    parts = [prefilled(model, g, g.shape[1]) for g in groups]
    width, cap = 10, 10 + max(budgets)
    joint = model.engine.new_cache(PATH, 5, cap)
    mask = torch.ones((5, cap), dtype=torch.long)
    joint.place(parts[0][1], 0, width - 6)
    mask[:2, :width - 6] = 0
    joint.place(parts[1][1], 2, 0)
    joint.advance(width)
    last = torch.tensor([[5], [5], [9], [9], [9]])
    with torch.inference_mode():
        new = generation.decode(model, torch.cat([p[0] for p in parts]), joint, PATH, last, mask,
                                generation.Sampling(max(budgets)), budgets=torch.tensor(budgets))
    check_rows(model, new, [r for g in groups for r in g], budgets)


def test_length_groups_are_the_cheapest_split():
    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 7))]
        cost = rng.choice([0, 5, 40])
        groups = length_groups(lengths, cost)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))

        def price(split, lengths=lengths, cost=cost):
            return sum(len(g) * max(lengths[i] for i in g) + cost for g in split)

        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = min(price([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))])
                   for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert price(groups) == best
    assert length_groups([49, 52, 62, 71, 73, 113, 114, 119], 80) == [[0, 1, 2, 3, 4], [5, 6, 7]]


def test_shared_head_rules(model_dir):
    llama = cf.load(model_dir("llama")[0])
    head = list(range(10, 22))
    assert shared_head(llama, [head + [1, 2], head + [3]], 8) == 12
    assert shared_head(llama, [head, head + [5]], 8) == 11  # every row keeps a token of its own
    assert shared_head(llama, [head[:6] + [1], head[:6] + [2]], 8) == 0  # under MIN_HEAD
    assert shared_head(llama, [head + [1]], 8) == 0
    # linear attention: no hole allowed; gemma2's window of 8 is shorter than a row
    for arch in ("gemma2", "qwen3_5_text"):
        assert shared_head(cf.load(model_dir(arch)[0]), [head + [1], head + [2]], 8) == 0
    # mistral's window of 12 on every layer: a row of 11 prompt tokens shares its head with 1 new
    # token (12 columns), not with 2
    mistral, ten = cf.load(model_dir("mistral")[0]), head[:10]
    assert shared_head(mistral, [ten + [1], ten + [2]], 1) == 10
    assert shared_head(mistral, [ten + [1], ten + [2]], 2) == 0


def gemma2_chat_model(tmp_path, tokenizer, window: int):
    """A tiny random Gemma-2 (alternating sliding and full layers) with the default model's
    tokenizer and chat template."""
    from helpers import build_hf_model

    build_hf_model("gemma2", tmp_path, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, num_hidden_layers=N,
                   sliding_window=window)
    tokenizer.save_pretrained(str(tmp_path))
    return cf.load(tmp_path)


@pytest.mark.parametrize("window", [24, 512])
def test_sliding_window_sweep_shares_the_head_only_where_the_window_spans_the_row(chat_model, tmp_path, window):
    """Gemma-2's sliding window counts cache columns: the head is shared only when the window spans
    every row (prompt and budget), where the hole between head and tail changes nothing; a narrower
    window keeps plain left padding. Either way every item gets the text it gets generated alone."""
    m = gemma2_chat_model(tmp_path, chat_model.tokenizer, window)
    probes = [get_probe(p) for p in ("math", "eq")]
    runner = Runner(m, probes, "generate", "search", 4, True, True)
    spans = all(b.capacity <= window for b in runner.batches)
    print(f"window {window}: rows of {[b.capacity for b in runner.batches]} columns, heads "
          f"{[b.head for b in runner.batches]}")
    assert all((b.head >= MIN_HEAD) == spans for b in runner.batches) and spans == (window == 512)
    result = cf.sweep(m, probes=probes, paths=[LayerPath.duplicate(N, 1, 4)], mode="generate", max_items=4,
                      chat=True, progress=False)
    for record in result.records:  # the path's and the baseline's
        path = LayerPath.parse(record["layers"])
        for p in probes:
            items = p.items("search")[:4]
            want = [m.generate([it.prompt], layers=path, max_new_tokens=p.max_new_tokens, chat=True)[0]
                    for it in items]
            assert [record["outputs"][p.name][it.id] for it in items] == want, (record["layers"], p.name)


def test_generate_sweep_equals_items_alone(chat_model):
    """The sweep's layout (chat head shared, items grouped by length, all probes decoded as one
    batch with per-probe budgets, rows dropped as they finish) gives every item the text it
    gets generated alone along the same path."""
    m = chat_model
    probes = [get_probe(p) for p in ("math", "eq", "reasoning")]
    runner = Runner(m, probes, "generate", "search", 8, True, True)
    assert all(b.head >= MIN_HEAD for b in runner.batches)
    assert len(runner.batches) > len(probes)  # reasoning's items split by length
    paths = [LayerPath.duplicate(N, 2, 5), LayerPath.duplicate(N, 0, 3)]
    result = cf.sweep(m, probes=probes, paths=paths, mode="generate", max_items=8, chat=True, progress=False)
    for record in result.records:
        path = LayerPath.parse(record["layers"])
        for p in probes:
            items = p.items("search")[:8]
            want = [m.generate([it.prompt], layers=path, max_new_tokens=p.max_new_tokens, chat=True)[0] for it in items]
            assert list(record["outputs"][p.name]) == [it.id for it in items]
            assert [record["outputs"][p.name][it.id] for it in items] == want, (record["layers"], p.name)
