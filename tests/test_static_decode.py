"""Fixed-shape decode steps (Engine.decode_step: what CUDA graphs replay) give the same tokens as
the ordinary decode loop, on every architecture, with left padding, sliding windows and repeated
layers; on a GPU, graph replay gives the same tokens as eager steps."""

from __future__ import annotations

import pytest
import torch

import circuit_finder as cf
from circuit_finder import LayerPath

PATH = LayerPath.duplicate(6, 2, 4)


def prompts(batch=3, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 160, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, batch):
        mask[b, : 3 * b] = 0  # left padding of different widths
    return ids, mask


def generate(model, ids, mask, static, layers=PATH, n=24):
    model.static_decode = static
    try:
        return model.generate(ids, layers=layers, attention_mask=mask, max_new_tokens=n, min_new_tokens=n)
    finally:
        model.static_decode = None


def test_static_decode_matches_dynamic(model_dir, arch):
    folder, _ = model_dir(arch)
    model = cf.load(folder)
    ids, mask = prompts()
    for layers in (None, PATH):
        dynamic = generate(model, ids, mask, False, layers)
        static = generate(model, ids, mask, True, layers)
        print(f"{arch} {layers}: equal tokens {int((dynamic == static).sum())}/{dynamic.numel()}")
        assert torch.equal(static, dynamic)
    # unpadded prompts, the window filling up (mistral's window is 12, prompt 16 + 24 new)
    assert torch.equal(generate(model, ids, None, True), generate(model, ids, None, False))


def test_static_decode_logits_match(model_dir):
    """Step logits along a repeated path equal a full forward over prompt + generated tokens."""
    folder, _ = model_dir("llama")
    model = cf.load(folder)
    ids, mask = prompts(batch=2)
    new = generate(model, ids, mask, True, n=6)
    full = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    ref = model.logits(full, layers=PATH, attention_mask=full_mask)
    engine, layers = model.engine, list(PATH)
    B, T = ids.shape
    cache = engine.new_cache(layers, B, T + 6)
    pos = cf.generation.positions_from_mask(mask)
    engine.forward(ids, pos, mask, layers, cache, True)
    key_mask = torch.zeros(B, T + 6, dtype=torch.bool)
    key_mask[:, :T] = mask != 0
    index, step_pos = torch.tensor([T]), pos[:, -1:] + 1
    for s in range(5):
        out = engine.decode_step(new[:, s:s + 1].contiguous(), step_pos, key_mask, index, layers, cache)
        cache.advance(1)
        diff = (out - ref[:, T + s]).abs()
        print(f"step {s}: max diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}")
        assert diff.max().item() < 1e-4
    assert int(index) == T + 5 and torch.equal(step_pos, pos[:, -1:] + 6)


def test_decode_step_rejects_bad_input(model_dir):
    folder, _ = model_dir("llama")
    engine = cf.load(folder).engine
    layers = list(range(6))
    cache = engine.new_cache(layers, 2, 8)
    tok, pos, idx = torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), torch.tensor([0])
    with pytest.raises(ValueError, match="key_mask must be bool"):
        engine.decode_step(tok, pos, torch.ones(2, 8, dtype=torch.long), idx, layers, cache)
    with pytest.raises(ValueError, match="key_mask must be bool"):
        engine.decode_step(tok, pos, torch.ones(2, 7, dtype=torch.bool), idx, layers, cache)
    with pytest.raises(ValueError, match="index must be"):
        engine.decode_step(tok, pos, torch.ones(2, 8, dtype=torch.bool), torch.tensor([0, 1]), layers, cache)
    with pytest.raises(ValueError, match="slots"):
        engine.decode_step(tok, pos, torch.ones(2, 8, dtype=torch.bool), idx, layers[:5], cache)
    with pytest.raises(ValueError, match=r"\[batch, 1\]"):
        engine.decode_step(torch.zeros(2, 2, dtype=torch.long), pos, torch.ones(2, 8, dtype=torch.bool), idx, layers,
                           cache)
    # refused before anything changes (it writes the mask, the cache, positions and index in place)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    for args, message in (((tok, torch.zeros(1, 1, dtype=torch.long).expand(2, 1), mask, idx), "not expanded views"),
                          ((tok, pos, mask, torch.tensor([-1])), "index -1 is outside the KV cache's 8 columns"),
                          ((tok, pos, mask, torch.tensor([8])), "index 8 is outside"),
                          ((tok + 500, pos, mask, idx), "token id 500 is outside the vocabulary")):
        with pytest.raises(ValueError, match=message):
            engine.decode_step(*args, layers, cache)
        assert not mask.any() and cache.length == 0
    cache.advance(8)
    with pytest.raises(ValueError, match="holds 8 positions; this call needs 9"):
        engine.decode_step(tok, pos, torch.ones(2, 8, dtype=torch.bool), idx, layers, cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm device visible to torch")
def test_cuda_graph_decode_matches_eager(model_dir, arch):
    folder, _ = model_dir(arch)
    model = cf.load(folder, device="cuda")
    ids, mask = prompts()
    ids, mask = ids.cuda(), mask.cuda()
    model.cuda_graphs = True
    graphed = generate(model, ids, mask, True)
    model.cuda_graphs = False
    eager = generate(model, ids, mask, True)
    dynamic = generate(model, ids, mask, False)
    print(f"{arch}: graph == eager static: {torch.equal(graphed, eager)}; == dynamic: {torch.equal(graphed, dynamic)}")
    assert torch.equal(graphed, eager)
    assert torch.equal(graphed, dynamic)
