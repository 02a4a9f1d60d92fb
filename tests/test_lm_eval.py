"""The lm-eval adapter: simple_evaluate on local tasks (multiple choice, generate_until,
loglikelihood_rolling) along a repeated path gives lm-eval's own HFLM results on a transformers
model rebuilt with deep-copied layers along the same path."""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

import circuit_finder as cf  # noqa: E402
import circuit_finder.lm_eval  # noqa: E402,F401  (registers "circuit-finder")
from helpers import rebuilt  # noqa: E402

LAYERS = "0..3+1..5"  # comma-free spelling of 0..3,1..5 (RYS (1, 4))


def _run(model, model_args, task_dir, tasks, **kw):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks,
                                   task_manager=TaskManager(include_path=str(task_dir)), batch_size=4,
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0, **kw)


def _metrics(results, task):
    return {k: v for k, v in results["results"][task].items() if isinstance(v, (int, float)) and "stderr" not in k}


def test_simple_evaluate_matches_hflm(chat_model_dir, task_dir):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks = ["cf_mc", "cf_gen", "cf_ppl"]
    ours = _run("circuit-finder", f"pretrained={chat_model_dir},layers={LAYERS},dtype=float32", task_dir, tasks,
                log_samples=True)
    hf = AutoModelForCausalLM.from_pretrained(str(chat_model_dir), dtype=torch.float32)
    path = cf.load(chat_model_dir).path(LAYERS)
    reference = HFLM(pretrained=rebuilt(hf, list(path)), tokenizer=AutoTokenizer.from_pretrained(str(chat_model_dir)),
                     batch_size=4)
    theirs = _run(reference, None, task_dir, tasks, log_samples=True)
    for task in tasks:
        a, b = _metrics(ours, task), _metrics(theirs, task)
        print(task, "circuit-finder:", a, "HFLM:", b)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (task, key)
    # the generated texts themselves, not just the metric
    gen_ours = [s["resps"][0][0] for s in ours["samples"]["cf_gen"]]
    gen_theirs = [s["resps"][0][0] for s in theirs["samples"]["cf_gen"]]
    assert gen_ours == gen_theirs
    mc_ours = [r[0][0] for s in ours["samples"]["cf_mc"] for r in s["resps"]]
    mc_theirs = [r[0][0] for s in theirs["samples"]["cf_mc"] for r in s["resps"]]
    assert max(abs(x - y) for x, y in zip(mc_ours, mc_theirs)) < 1e-3


def test_model_args_and_chat_template(chat_model_dir, task_dir):
    from lm_eval.api.registry import get_model

    cls = get_model("circuit-finder")
    lm = cls.create_from_arg_string(f"pretrained={chat_model_dir},layers=rys=1:4,batch_size=2")
    assert str(lm.path) == "0..3,1..5" and lm.batch_size == 2
    assert lm.chat_template(True) == lm.tokenizer.chat_template
    given = circuit_finder.lm_eval.CircuitFinderLM(model=lm.cf_model, layers="rys=1:4")  # evaluate()'s way
    assert given.get_model_info()["model"] == str(chat_model_dir)  # names the model, not "default"
    text = lm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("assistant\n") and "Hi" in text
    with pytest.raises(ValueError, match="unknown circuit-finder model_args: colour"):
        cls.create_from_arg_string(f"pretrained={chat_model_dir},colour=red")
    with pytest.raises(cf.LayerPathError):
        cls.create_from_arg_string(f"pretrained={chat_model_dir},layers=0..9")
    results = _run("circuit-finder", f"pretrained={chat_model_dir},layers=rys=1:4", task_dir, ["cf_gen"],
                   apply_chat_template=True, limit=2)
    assert "exact_match,none" in results["results"]["cf_gen"]


def test_cli_eval(chat_model_dir, task_dir, tmp_path, capsys):
    from circuit_finder.cli import main

    out = tmp_path / "eval-out"
    rc = main(["eval", "--model", str(chat_model_dir), "--layers", "0..3,1..5", "--tasks", "cf_mc",
               "--include_path", str(task_dir), "--batch_size", "4", "--output_path", str(out),
               "--quantize", "q8_0"])
    assert rc == 0
    files = list(out.rglob("results*.json"))
    assert files, list(out.rglob("*"))
    data = json.loads(files[0].read_text())
    assert "acc,none" in data["results"]["cf_mc"]
    assert data["config"]["model_args"]["layers"] == "0..3+1..5"
    assert data["config"]["model_args"]["quantize"] == "q8_0"  # --quantize reached the adapter's load()


def test_batch_size_auto_and_device_default(chat_model_dir):
    """device unset: cuda where this torch has it, else cpu. batch_size="auto": on the CPU the
    default 8; on a GPU the largest power of two from max_batch_size down that runs without an
    out-of-memory error (the search checked here with a stand-in that fails above 12 rows).
    lm-eval's max_batch_size is accepted."""
    import torch

    from circuit_finder.lm_eval import DEFAULT_BATCH, CircuitFinderLM, largest_batch

    lm = CircuitFinderLM.create_from_arg_string(f"pretrained={chat_model_dir}",
                                                {"batch_size": "auto:4", "max_batch_size": 32})
    assert str(lm.device) == ("cuda:0" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert lm.batch_size == DEFAULT_BATCH == 8
    tried = []

    def fits(b):
        tried.append(b)
        if b > 12:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")

    assert largest_batch(fits, 64) == 8 and tried == [64, 32, 16, 8]
    # a GPU model with layers on the CPU too: a host out-of-memory kills, so no search (the default)
    from circuit_finder.placement import Placement

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    lm.cf_model.placement = Placement((gpu,) + (cpu,) * (lm.cf_model.num_layers - 1), gpu)
    lm.cf_model.device = gpu
    assert lm.resolve_batch("auto", 32) == DEFAULT_BATCH
    assert largest_batch(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("x")), 4) == 1
    with pytest.raises(RuntimeError, match="other"):  # only running out of memory halves the batch
        largest_batch(lambda b: (_ for _ in ()).throw(RuntimeError("other")), 4)


def test_device_falls_back_to_cpu(chat_model_dir):
    """lm-eval's CLI passes device="cuda" by default; on a machine without CUDA the adapter warns and
    runs on the CPU, as lm-eval's own hf model does."""
    import torch

    from circuit_finder.lm_eval import CircuitFinderLM

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nothing to fall back from")
    with pytest.warns(UserWarning, match="not available here; running on cpu"):
        lm = CircuitFinderLM.create_from_arg_string(f"pretrained={chat_model_dir},layers=rys=1:3",
                                                    {"device": "cuda", "batch_size": 2})
    assert str(lm.device) == "cpu" and str(lm.path) == "0..2,1..5"


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_requests_at_the_edges_match_hflm(chat_model_dir):
    """Request by request, against lm-eval's own HFLM on the rebuilt transformers model, at
    max_length 16 where contexts are left-truncated and documents take several rolling windows:
    contexts ending in a space, an empty context, is_greedy, more requests than one scoring step
    (order kept), generation with left truncation and max_length in gen_kwargs, and
    add_bos_token=True on a tokenizer that adds no BOS by itself."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuit_finder.lm_eval import CircuitFinderLM

    model = cf.load(chat_model_dir)
    hf = rebuilt(AutoModelForCausalLM.from_pretrained(str(chat_model_dir), dtype=torch.float32),
                 list(model.path(LAYERS)))
    tokenizer = AutoTokenizer.from_pretrained(str(chat_model_dir))
    assert tokenizer.encode("hello")[:1] != [tokenizer.bos_token_id]  # the case add_bos_token must change
    for bos in (None, True):
        ours = CircuitFinderLM(model=model, layers=LAYERS, batch_size=1, max_length=16, max_gen_toks=5,
                               add_bos_token=bos)
        reference = HFLM(pretrained=hf, batch_size=1, max_length=16, max_gen_toks=5, add_bos_token=bool(bos),
                         tokenizer=AutoTokenizer.from_pretrained(str(chat_model_dir), add_bos_token=True)
                         if bos else tokenizer)
        pairs = [("Question: what?\nAnswer:", " blue"), ("The cat ", "sat on the mat"), ("", "Hello world"),
                 ("word " * 30, " end of it"), ("ab", " c"), ("x", " y z " * 3), *[(f"n{i} ", f"{i}") for i in range(8)]]
        context = "Question: what?\nAnswer:"  # and a continuation that is the greedy token: is_greedy True
        with torch.no_grad():
            first = hf(torch.tensor([ours.tok_encode(context)])).logits[0, -1].argmax().item()
        pairs.append((context, tokenizer.decode([first])))
        a = ours.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
        b = reference.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
        print("add_bos_token", bos, "loglikelihood max diff", max(abs(x[0] - y[0]) for x, y in zip(a, b)))
        assert [g for _, g in a] == [g for _, g in b] and any(g for _, g in b)  # is_greedy, both ways
        assert [v for v, _ in a] == pytest.approx([v for v, _ in b], abs=1e-3)
        docs = [("The quick brown fox jumps over the lazy dog. " * 4,), ("short",)]
        a = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", docs), disable_tqdm=True)
        b = reference.loglikelihood_rolling(_instances("loglikelihood_rolling", docs), disable_tqdm=True)
        print("rolling", a, b)
        assert a == pytest.approx(b, abs=1e-3)
        gens = [("Q: hi\nA:", {"until": "\n", "max_gen_toks": 4, "do_sample": False}),
                ("word " * 30, {"until": ["zzz"], "max_gen_toks": 3}),
                ("Q: hi\nA:", {"until": ["zzz"], "do_sample": False, "max_gen_toks": 5, "max_length": 12})]
        with pytest.warns(UserWarning, match="max_length in generation kwargs"):
            a = ours.generate_until(_instances("generate_until", gens), disable_tqdm=True)
        b = reference.generate_until(_instances("generate_until", gens), disable_tqdm=True)
        print("generate_until", a, b)
        assert a == b


def test_stop_strings_that_are_special_tokens_stop_and_cut(chat_model):
    """lm-eval matches stop strings in text decoded with special tokens ("<|im_end|>",
    "<|eot_id|>"); a row stops there and its text ends before it, special tokens dropped."""
    codec, tok = chat_model.codec, chat_model.tokenizer
    special = tok.convert_tokens_to_ids("<|im_start|>")
    assert special not in codec.eos_ids and special in tok.all_special_ids
    head, tail = tok.encode(" The answer is 5"), tok.encode(" user: next question")
    row = [*head, special, *tail]
    done = codec.finish(row, ["<|im_start|>"])
    assert (done.text, done.reason, done.tokens) == (" The answer is 5", "stop", len(head))
    plain = [*head, *tail, tail[-1]]
    assert codec.hit_stop(torch.tensor([row, plain]), ["<|im_start|>"]).tolist() == [True, False]
    # a plain stop after a special token: the text before it, without the special token
    row = [*tok.encode("a"), special, *tok.encode(" b\n\nc")]
    assert codec.finish(row, ["\n\n"]).text == "a b"
    assert codec.finish(row, []).text == "a b\n\nc"  # no stop: the whole row, special tokens dropped
    # a stop that shows only once the special token is gone ("a\n" <s> "\nb"): cut too, as lm-eval cuts its text
    row = [*tok.encode("a\n"), special, *tok.encode("\nb")]
    done = codec.finish(row, ["\n\n"])
    assert (done.text, done.reason, done.tokens) == ("a", "stop", len(tok.encode("a")))


def test_generation_kwargs_and_chat_template_fallbacks(chat_model):
    """do_sample without a temperature samples at 1.0 (transformers' default); kwargs the adapter
    does not implement are refused by name unless neutral; a chat template that refuses the system
    role gets the history without it, as HFLM does; a numeric layers value is a one-slot path."""
    from lm_eval.models.huggingface import HFLM

    from circuit_finder.lm_eval import CircuitFinderLM, generation_settings

    sampling, total = generation_settings({"do_sample": True}, 7, ["\n"])
    assert (sampling.temperature, sampling.max_new_tokens, sampling.stops, total) == (1.0, 7, ("\n",), None)
    sampling, _ = generation_settings({"do_sample": False, "temperature": 0.7, "min_new_tokens": 3, "num_beams": 1,
                                       "repetition_penalty": 1.0, "top_k": 40}, 7, [])
    assert (sampling.temperature, sampling.min_new_tokens) == (0.0, 3)
    sampling, _ = generation_settings({"do_sample": True, "temperature": 0.8, "top_p": 0.0}, 7, [])
    assert (sampling.temperature, sampling.top_p) == (0.0, 1.0)  # transformers keeps the argmax alone: greedy
    assert generation_settings({"do_sample": True, "top_p": 0.5}, 7, [])[0].top_p == 0.5
    with pytest.raises(ValueError, match="does not implement: num_beams, top_k"):
        generation_settings({"do_sample": True, "temperature": 0.5, "top_k": 40, "num_beams": 4}, 7, [])
    with pytest.raises(ValueError, match="does not implement: repetition_penalty"):
        generation_settings({"repetition_penalty": 1.3}, 7, [])
    assert generation_settings({"num_beams": None, "repetition_penalty": None}, 7, [])[0].max_new_tokens == 7
    # max_length with min_new_tokens: each batch's room from its own prompts, min_new_tokens from the request
    seen = []
    real = circuit_finder.lm_eval.generate_ids

    def spy(model, ids, mask, path, sampling, *args):
        seen.append((ids.shape[1], sampling.max_new_tokens, sampling.min_new_tokens))
        return real(model, ids, mask, path, sampling, *args)

    lm = CircuitFinderLM(model=chat_model, batch_size=1, max_length=40, max_gen_toks=8)
    gen = {"until": ["zzz"], "min_new_tokens": 6, "max_length": 30, "max_gen_toks": 8}
    original = circuit_finder.lm_eval.generate_ids
    circuit_finder.lm_eval.generate_ids = spy
    try:
        lm.generate_until(_instances("generate_until", [("word " * 25, gen), ("hi", gen)]), disable_tqdm=True)
    finally:
        circuit_finder.lm_eval.generate_ids = original
    (long, room_a, min_a), (short, room_b, min_b) = seen
    assert room_a == 30 - long and min_a == min(6, room_a) and room_b == 30 - short and min_b == 6
    lm = CircuitFinderLM(model=chat_model, layers=3)
    assert lm.path == chat_model.path("3")
    gemma_like = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                  "supported') }}{% endif %}<start>{{ m['role'] }}\n{{ m['content'] }}<end>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start>model\n{% endif %}")
    original = chat_model.tokenizer.chat_template
    try:
        chat_model.tokenizer.chat_template = gemma_like
        history = [{"role": "system", "content": "The following are questions."}, {"role": "user", "content": "Q?"}]

        class Reference:  # what HFLM.apply_chat_template reads of its model
            tokenizer, chat_template_args = chat_model.tokenizer, {}

        with pytest.warns(UserWarning, match="without the system messages"):
            ours = lm.apply_chat_template(history)
        assert ours == HFLM.apply_chat_template(Reference(), history) == "<start>user\nQ?<end>\n<start>model\n"
    finally:
        chat_model.tokenizer.chat_template = original
