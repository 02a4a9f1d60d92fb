"""The real embedded model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the
same GGUF: greedy tokens and logits on the identity path and a RYS path."""

from __future__ import annotations

import os

import pytest
import torch

import circuit_finder as cf
from circuit_finder import LayerPath
from helpers import rebuilt

pytestmark = pytest.mark.slow

PROMPT = "Name three primary colors."


@pytest.fixture(scope="module")
def pair():
    path = cf.default_model_path()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    hf.eval()
    return cf.load("default"), hf


def chat_ids(model):
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                               add_generation_prompt=True)
    return torch.tensor([model.tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_default_model_is_found():
    path = cf.default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)


@pytest.mark.parametrize("layers", [None, LayerPath.duplicate(30, 10, 13)], ids=["identity", "rys-10-13"])
def test_greedy_chat_generation_matches_transformers(pair, layers):
    model, hf = pair
    assert model.num_layers == 30 and model.config.num_kv_heads == 3 and model.config.tie_word_embeddings
    ref_model = hf if layers is None else rebuilt(hf, list(layers))
    ids = chat_ids(model)
    with torch.no_grad():
        ref_logits = ref_model(ids).logits
        ref = ref_model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
    logits = model.logits(ids, layers=layers)
    diff = (logits - ref_logits).abs()
    print(f"{layers}: logits max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}")
    assert diff.max().item() < 1e-3
    ours = model.generate(ids, layers=layers, max_new_tokens=32)[0]
    ours = ours[: len(ref)]
    print("ours:", model.tokenizer.decode(ours), "| transformers:", model.tokenizer.decode(ref))
    assert ours.tolist() == ref.tolist()
    text = model.generate(PROMPT, layers=layers, chat=True, max_new_tokens=32)[0]
    assert text == model.tokenizer.decode(ref, skip_special_tokens=True)


def test_text_batch_and_stop(pair):
    model, _ = pair
    prompts = ["What is 2 + 2?", "Write one word: hello"]
    alone = [model.generate(p, chat=True, max_new_tokens=12)[0] for p in prompts]
    batched = model.generate(prompts, chat=True, max_new_tokens=12)
    assert batched == alone  # left padding changes nothing
    stopped = model.generate(prompts[0], chat=True, max_new_tokens=24, stop=["4"])[0]
    assert "4" not in stopped


def test_score_prefers_the_right_answer(pair):
    model, _ = pair
    good, bad = model.score(["The capital of France is"] * 2, [" Paris", " banana"])
    print(f"log p(Paris) {good:.3f}, log p(banana) {bad:.3f}")
    assert good > bad


def test_real_likelihood_sweep(pair):
    """A small real sweep of the default model in likelihood mode: shared-prefix reuse gives exactly
    the scores of recomputing every path, and the table holds every config with its CI."""
    model = pair[0]
    kw = dict(probes=("math", "eq", "reasoning"), block_sizes=(4,), starts=[6, 18], mode="likelihood",
              max_items=3, progress=False)
    fast = cf.sweep(model, **kw)
    plain = cf.sweep(model, reuse=False, **kw)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in fast.records]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in plain.records]
    df = fast.to_pandas()
    print(df[["layers", "math_margin", "eq_margin", "reasoning_margin", "combined_delta", "combined_ci_low",
              "combined_ci_high"]].to_string())
    assert set(df["layers"]) == {"0..29", str(LayerPath.duplicate(30, 6, 10)), str(LayerPath.duplicate(30, 18, 22))}
    assert df[["math_margin", "eq_margin", "reasoning_margin"]].notna().all().all()
    assert (df["combined_ci_low"] <= df["combined_delta"]).all() and (df["combined_delta"] <= df["combined_ci_high"]).all()
