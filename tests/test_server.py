"""The OpenAI-compatible server, driven by the official openai client: chat, completions,
streaming, per-request layer paths (same text as Model.generate along that path), batching of
concurrent requests, 4xx answers to bad requests, and lm-eval's local-chat-completions model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from circuit_finder.generation import Sampling  # noqa: E402
from circuit_finder.server import Job, create_app  # noqa: E402

PROMPTS = ["What is 2 + 2?", "Name a colour.", "Say hello.", "Count to three."]


@contextlib.contextmanager
def running(app):
    """Serves app with uvicorn on a free loopback port in a thread; yields the base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(chat_model):
    app = create_app(chat_model, layers=None, model_name="tiny", batch_window_ms=300, max_tokens_limit=64)
    with running(app) as url:
        yield url, app


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_chat_with_per_request_layers(server, chat_model):
    url, _ = server
    c = client(url)
    for layers in (None, "rys=1:4", "0..2,4,5"):
        extra = {"layers": layers} if layers else {}
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}],
                                      max_tokens=12, temperature=0, extra_body=extra)
        want = chat_model.generate(PROMPTS[0], layers=layers, chat=True, max_new_tokens=12)[0]
        assert r.choices[0].message.content == want, layers
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 12
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_streaming_equals_plain(server, chat_model):
    url, _ = server
    c = client(url)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    plain = c.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                      extra_body={"layers": "rys=2:5"})
    pieces, reasons = [], []
    for chunk in c.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                           stream=True, extra_body={"layers": "rys=2:5"}):
        delta = chunk.choices[0].delta
        pieces.append(delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == plain.choices[0].message.content
    assert reasons[-1] == plain.choices[0].finish_reason and len(pieces) > 2
    text = "".join(ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="Once upon", max_tokens=8,
                                                                       temperature=0, stream=True))
    assert text == chat_model.generate("Once upon", max_new_tokens=8)[0]


def test_completions_and_batching(server, chat_model):
    url, app = server
    c = client(url)
    r = c.completions.create(model="tiny", prompt=PROMPTS, max_tokens=10, temperature=0, stop=["\n"],
                             extra_body={"layers": "rys=1:3"})
    want = chat_model.generate(PROMPTS, layers="rys=1:3", max_new_tokens=10, stop=["\n"])
    assert [ch.text for ch in r.choices] == want
    before = dict(app.state.worker.stats)

    def one(p):
        return c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=8,
                                         temperature=0).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(one, PROMPTS))
    after = app.state.worker.stats
    assert after["requests"] - before["requests"] == 4
    assert after["batches"] - before["batches"] < 4  # concurrent requests shared a batch
    assert together == [chat_model.generate(p, chat=True, max_new_tokens=8)[0] for p in PROMPTS]


@pytest.mark.parametrize("body, message", [
    ('{"messages": [', "JSON"),
    ('{"messages": "hi"}', "messages"),
    ('{"messages": []}', "messages"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}', "max_tokens"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', "limit of 64"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
    ('{"messages": [{"role": "user", "content": "hi"}], "layers": "0..99"}', "layers: layer path slot"),
    ('{"messages": [{"role": "user", "content": "hi"}], "layers": "rys=5:2"}', "layers"),
    ('{"messages": [{"role": "user", "content": "hi"}], "n": 3}', "n"),
    ('[1, 2, 3]', "body"),
    ('{"messages": [{"role": "user", "content": "hi"}], "layers": "rys=0:5:40"}', "201 slots, over this server's "
                                                                                   "limit of 24"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}, '
     '{"type": "text", "text": "What is in it?"}]}]}', "'image_url' parts are not supported"),
    ('{"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}', "presence_penalty"),
    ('{"messages": [{"role": "user", "content": "hi"}], "top_k": 5}', "top_k"),
])
def test_bad_requests_get_4xx(server, body, message):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message.lower() in err["message"].lower(), err
    assert httpx.get(f"{url}/health").status_code == 200


def test_over_long_prompt_and_unknown_route(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "word " * 600, "max_tokens": 8})
    assert r.status_code == 400 and "context length 512" in r.json()["error"]["message"]
    near = "word " * 480  # no max_tokens: what the context leaves (not a refusal for the default 256)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": near, "temperature": 0}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"] <= 512
    assert httpx.get(f"{url}/v1/nothing").status_code == 404
    ok = client(url).completions.create(model="tiny", prompt="still here", max_tokens=3, temperature=0)
    assert ok.choices[0].text is not None


def local_tasks(folder: Path) -> Path:
    """The local lm-eval tasks (tests/lm_eval_tasks) copied into folder with their data paths filled in."""
    tasks_dir = Path(__file__).resolve().parent / "lm_eval_tasks"
    for f in tasks_dir.iterdir():
        if f.suffix == ".yaml":
            (folder / f.name).write_text(f.read_text().replace("__DATA__", str(tasks_dir)))
        else:
            shutil.copy(f, folder / f.name)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return folder


def test_lm_eval_local_chat_completions(server, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    url, _ = server
    local_tasks(tmp_path)
    results = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args=f"base_url={url}/v1/chat/completions,model=tiny,tokenizer_backend=None,max_retries=1",
        tasks=["cf_gen"], apply_chat_template=True, task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True)
    assert "exact_match,none" in results["results"]["cf_gen"]
    assert len(results["samples"]["cf_gen"]) == 6
    print(json.dumps([s["resps"][0][0] for s in results["samples"]["cf_gen"]]))


def _hostile_bodies(rng):
    """Requests that must all be refused with a 4xx: bad JSON, wrong types, huge or negative numbers,
    invalid paths, oversized fields."""
    good = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    bad_values = {
        "max_tokens": [-1, 0, 10**30, "10", 1.5, -5, [], {"a": 1}, 10**6],
        "temperature": [-1, 3, "hot", [], 1e309, float("nan")],
        "top_p": [0, -0.5, 2, "x"],
        "seed": [-5, 2**70, "s", 1.5],
        "n": [0, 2, 10**9, "one"],
        "layers": ["0..99", "rys=9:2", "rys=1:99", "-1", "a..b", "0..3,,x", [0, 99], [-1], ["x"], 7, {"a": 1},
                   "0.." + "9" * 400, "rys=0:0"],
        "messages": ["hi", [], [{"role": 1}], [{"content": "x"}], [{"role": "user", "content": 5}], None, 3,
                     [{"role": "user", "content": [{"type": "text", "text": 1}]}]],
        "stop": [5, [1, 2], ["x"] * 40, "y" * 1000],
        "stream": ["maybe", 3, []],
        "max_completion_tokens": [-3, "many"],
    }
    out = []
    for _ in range(1000):
        kind = rng.randrange(6)
        if kind == 0:  # broken JSON
            text = json.dumps(good)
            cut = rng.randrange(1, len(text) - 1)
            broken = text[:cut] + rng.choice(["", "}", "]]", "\x00", "'", "\\"])
            try:
                json.loads(broken)
                broken += "{"  # the cut happened to leave valid JSON
            except ValueError:
                pass
            out.append(("chat", broken))
        elif kind == 1:  # not an object
            out.append(("chat", json.dumps(rng.choice([[1, 2], "text", 12, None, True, [good]]))))
        elif kind == 2:  # over-long prompt
            body = dict(good, messages=[{"role": "user", "content": "word " * rng.randint(600, 3000)}])
            out.append(("chat", json.dumps(body)))
        elif kind == 3:  # completions with bad prompt fields
            body = {"prompt": rng.choice([5, [1, -2], [[5, 10**9]], [1.5], None, [], ["a"] * 300, {"x": 1}]), "max_tokens": 3}
            out.append(("completions", json.dumps(body)))
        else:
            field = rng.choice(sorted(bad_values))
            body = dict(good)
            body[field] = rng.choice(bad_values[field])
            out.append(("chat", json.dumps(body)))
    return out


@pytest.mark.slow
def test_thousand_hostile_requests(server, chat_model):
    import random

    url, _ = server
    statuses = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        for endpoint, body in _hostile_bodies(random.Random(0)):
            r = http.post(f"/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", content=body,
                          headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert 400 <= r.status_code < 500, (body[:200], r.status_code, r.text[:300])
            assert "error" in r.json()
    print("status counts:", statuses)
    r = client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[2]}],
                                            max_tokens=8, temperature=0)
    assert r.choices[0].message.content == chat_model.generate(PROMPTS[2], chat=True, max_new_tokens=8)[0]


def test_size_and_concurrency_limits(chat_model):
    app = create_app(chat_model, max_request_bytes=2000, max_pending=1, batch_window_ms=0)
    from fastapi.testclient import TestClient

    with TestClient(app) as http:
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        r = http.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and "limit of 2000 bytes" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", content=iter([b'{"messages": "', b"y" * 5000]),
                      headers={"content-type": "application/json"})  # chunked: no Content-Length
        assert r.status_code == 413 and "limit of 2000 bytes" in r.json()["error"]["message"], r.text
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
        r = http.post("/v1/chat/completions", content=iter([body[:10], body[10:]]),
                      headers={"content-type": "application/json"})  # chunked, under the limit: read whole
        assert r.status_code == 200, r.text
        r = http.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "a \\ud800"}]}',
                      headers={"content-type": "application/json"})  # a lone surrogate
        assert r.status_code == 400, r.text
    with running(create_app(chat_model, max_pending=1, batch_window_ms=0)) as url:
        def one(_):
            return httpx.post(f"{url}/v1/completions", timeout=60,
                              json={"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0}).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(8)))
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
        assert httpx.get(f"{url}/health").status_code == 200


def test_completions_logprobs_and_echo_match_transformers(server, chat_model, chat_model_dir):
    """echo + logprobs follow OpenAI's completions semantics; the numbers are transformers' own."""
    from transformers import AutoModelForCausalLM

    url, _ = server
    ref = AutoModelForCausalLM.from_pretrained(str(chat_model_dir), dtype=torch.float32).eval()
    prompt = "The quick brown fox jumps over"
    ids = chat_model.tokenizer(prompt)["input_ids"]
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={"prompt": prompt, "max_tokens": 1, "temperature": 0,
                                                              "logprobs": 2, "echo": True}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.inference_mode():
        seq = torch.tensor([ids + [_last_id(chat_model, ids)]])
        want = torch.log_softmax(ref(seq).logits[0].double(), -1)
    expected = [float(want[q - 1, seq[0, q]]) for q in range(1, seq.shape[1])]
    diff = np.abs(np.array(lp["token_logprobs"][1:]) - np.array(expected))
    print(f"server logprobs vs transformers: max {diff.max():.3g}, mean {diff.mean():.3g}")
    assert diff.max() < 1e-4
    for q, top in enumerate(lp["top_logprobs"][1:], 1):
        assert len(top) == 2 and abs(max(top.values()) - float(want[q - 1].max())) < 1e-4
    assert r["choices"][0]["text"].startswith(prompt)
    plain = httpx.post(f"{url}/v1/completions", timeout=60, json={"prompt": ids, "max_tokens": 4, "temperature": 0,
                                                                  "logprobs": 0}).json()["choices"][0]
    assert plain["text"] == chat_model.generate(prompt, max_new_tokens=4)[0]
    assert len(plain["logprobs"]["token_logprobs"]) == len(plain["logprobs"]["tokens"]) <= 4
    assert plain["logprobs"]["top_logprobs"] is None
    only = httpx.post(f"{url}/v1/completions", timeout=60, json={"prompt": prompt, "max_tokens": 0, "echo": True,
                                                                 "logprobs": 0}).json()["choices"][0]
    assert only["text"] == prompt and len(only["logprobs"]["tokens"]) == len(ids)


def test_echo_text_offsets_index_the_returned_text(server, chat_model):
    """text_offset: where each token's text begins in the choice's text (the prompt as given, then
    the completion), against prefix decodes by transformers' tokenizer: a token the tokenizer adds
    in front of a text adds nothing, a special token written in the text adds its text, the EOS
    that ends a completion adds nothing."""
    url, _ = server
    tok = chat_model.tokenizer
    special = tok.convert_ids_to_tokens(chat_model.codec.eos_ids[0])
    for prompt in ("The quick brown fox jumps over", f"{special}Héllo wörld, 2+2="):
        ids = tok(prompt)["input_ids"]
        for given in (prompt, ids):
            choice = httpx.post(f"{url}/v1/completions", timeout=60, json={
                "prompt": given, "max_tokens": 6, "temperature": 0, "logprobs": 0, "echo": True}).json()["choices"][0]
            text, offsets = choice["text"], choice["logprobs"]["text_offset"]
            head = prompt if isinstance(given, str) else tok.decode(ids)
            print(repr(text), offsets)
            assert text.startswith(head) and len(offsets) == len(choice["logprobs"]["tokens"])
            assert offsets == sorted(offsets) and offsets[len(ids)] == len(head)
            shift = len(tok.decode(ids)) - len(head)  # what the tokenizer added in front (BOS)
            for q in range(len(ids)):
                before = tok.decode(ids[:q])
                if not before.endswith("\ufffd"):  # not inside a character split over tokens
                    assert offsets[q] == max(0, len(before) - shift), (q, before)
            assert all(len(head) <= o <= len(text) for o in offsets[len(ids):])


def test_text_offsets_with_a_tokenizer_that_adds_bos():
    """A sentencepiece-style tokenizer (Metaspace, BOS added in front): decoded alone, "▁quick" is
    "quick" and BOS is "<s>", so summing each token's own text puts every offset past its word."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from circuit_finder.server import added_in_front, text_offsets

    pieces = ["<unk>", "<s>", "</s>", "▁The", "▁quick", "▁brown", "▁fox", "▁", *string.ascii_letters, *",.+=é"]
    spm = Tokenizer(models.Unigram([(p, -1.0 if p.startswith("▁") and len(p) > 1 else -5.0) for p in pieces], 0))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    spm.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    spm.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    text = "The quick brown fox jumps, a+b=é"
    ids = tok(text)["input_ids"]
    assert added_in_front(tok, ids, text) == 1 and ids[0] == tok.bos_token_id
    offsets = text_offsets(tok, ids, text, added=1)
    print(ids, offsets)
    ends = [*offsets[1:], len(text)]
    assert [text[a:b] for a, b in zip(offsets[:5], ends[:5])] == ["", "The", " quick", " brown", " fox"]
    assert offsets == [0, *(len(tok.decode(ids[1:q])) for q in range(1, len(ids)))]  # prefix decodes, no BOS
    # a completion cut by a stop string: the tokens past the cut sit at the text's end, even where
    # the cut text is also the decode's end ("The quick The" cut at "The")
    assert text_offsets(tok, ids[1:], "The quick", skip_special=True)[2:] == [len("The quick")] * (len(ids) - 3)
    the = tok("The quick The", add_special_tokens=False)["input_ids"]
    assert text_offsets(tok, the, "The", skip_special=True) == [0, 3, 3]
    # a prompt whose decode is not its text (spaces before punctuation: transformers' clean-up)
    spaced = "The quick , fox"
    ids = tok(spaced)["input_ids"]
    got = text_offsets(tok, ids, spaced, added=added_in_front(tok, ids, spaced))
    assert [spaced[a:b] for a, b in zip(got, [*got[1:], len(spaced)])][:4] == ["", "The", " quick", " "]


def _last_id(model, ids):
    """The greedy next token after ids (what max_tokens=1 at temperature 0 appends)."""
    return int(model.logits(torch.tensor([ids]))[0, -1].argmax())


def test_lm_eval_local_completions_loglikelihood(server, chat_model, chat_model_dir, tmp_path):
    """lm-eval's local-completions model runs a multiple-choice task through the server, with the
    same per-choice log-likelihoods as the in-process adapter."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import circuit_finder.lm_eval  # noqa: F401  (registers circuit-finder)

    url, _ = server
    local_tasks(tmp_path)
    manager = TaskManager(include_path=str(tmp_path))
    via_server = lm_eval.simple_evaluate(
        model="local-completions", task_manager=manager, tasks=["cf_mc"], log_samples=True,
        model_args=f"base_url={url}/v1/completions,model=tiny,tokenizer_backend=huggingface,"
                   f"tokenizer={chat_model_dir},max_retries=1")
    local = lm_eval.simple_evaluate(model=circuit_finder.lm_eval.CircuitFinderLM(model=chat_model), tasks=["cf_mc"],
                                    task_manager=manager, log_samples=True)
    a = [float(r[0][0]) for s in via_server["samples"]["cf_mc"] for r in s["resps"]]
    b = [float(r[0][0]) for s in local["samples"]["cf_mc"] for r in s["resps"]]
    diff = np.abs(np.array(a, dtype=float) - np.array(b, dtype=float))
    print(f"local-completions vs adapter log-likelihoods: max {diff.max():.3g}, mean {diff.mean():.3g}")
    assert len(a) == len(b) > 0 and diff.max() < 1e-3
    assert via_server["results"]["cf_mc"]["acc,none"] == local["results"]["cf_mc"]["acc,none"]


def test_streaming_counts_against_pending_limit(chat_model):
    """With max_pending=1, an open stream holds the only slot: other requests get 429 until it ends."""
    gate = threading.Event()
    app = create_app(chat_model, max_pending=1, batch_window_ms=0)
    ids = chat_model.tokenizer("hold the worker")["input_ids"]
    # a job whose per-token callback waits: the worker is busy until the gate opens
    app.state.worker.submit(Job(ids, chat_model.path(), Sampling(2), stream=lambda tokens, done: gate.wait(30)))
    with running(app) as url:
        body = {"messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 8, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            busy = [httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code,
                    httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60).status_code]
            assert httpx.get(f"{url}/health").json()["pending"] == 1
            gate.set()
            assert busy == [429, 429], busy
            assert [line for line in lines if line][-1] == "data: [DONE]"
        deadline = time.time() + 10
        while httpx.get(f"{url}/health").json()["pending"] and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60).status_code == 200


def test_a_stream_whose_client_goes_stops_generating(chat_model):
    """A client that reads a stream's first tokens and goes: the worker stops that generation at its
    next token (counted in /health's cancelled) instead of running it to max_tokens, and serves the
    next request."""
    app = create_app(chat_model, batch_window_ms=0)
    with running(app) as url:
        body = {"messages": [{"role": "user", "content": "Tell a very long story."}], "max_tokens": 400,
                "temperature": 0.8, "seed": 1, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ") and next(lines) == "" and next(lines).startswith("data: ")
        deadline = time.time() + 30
        while httpx.get(f"{url}/health").json()["pending"] and time.time() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{url}/health").json()
        assert health["pending"] == 0 and health["cancelled"] == 1, health
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200


def test_a_queued_request_whose_client_goes_is_skipped(chat_model):
    """A non-streamed request whose client times out while the worker is busy is cancelled in the
    queue: the worker skips it (counted in /health's cancelled) and serves the next request."""
    gate = threading.Event()
    app = create_app(chat_model, batch_window_ms=0)
    ids = chat_model.tokenizer("hold the worker")["input_ids"]
    # a job whose per-token callback waits: the worker is busy until the gate opens
    app.state.worker.submit(Job(ids, chat_model.path(), Sampling(2), stream=lambda tokens, done: gate.wait(30)))
    with running(app) as url:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 8}, timeout=0.5)
        time.sleep(4 * 0.25 + 0.5)  # the server sees the client gone (it polls every 0.25 s)
        gate.set()
        deadline = time.time() + 30
        while httpx.get(f"{url}/health").json()["pending"] and time.time() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{url}/health").json()
        print(health)
        assert health["pending"] == 0 and health["cancelled"] == 1 and health["requests"] == 1, health  # gate job ran
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200 and httpx.get(f"{url}/health").json()["requests"] == 2


def test_dropped_stream_releases_its_slot(chat_model):
    """A client that opens a stream and goes away at once leaves no pending slot behind."""
    with running(create_app(chat_model, max_pending=1, batch_window_ms=0)) as url:
        body = {"messages": [{"role": "user", "content": "Count slowly."}], "max_tokens": 8, "stream": True}
        for _ in range(3):
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60):
                pass  # closed before reading a byte
        deadline = time.time() + 20
        while httpx.get(f"{url}/health").json()["pending"] and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{url}/health").json()["pending"] == 0
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60).status_code == 200


def test_completion_logprobs_stop_at_the_stop_string(server, chat_model):
    """Tokens, logprobs and usage cover the completion up to the stop string, as the text does."""
    url, _ = server
    free = chat_model.generate("Once upon a time", max_new_tokens=12)[0]
    stop = free[len(free) // 2:][:3]
    assert stop.strip(), free
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={"prompt": "Once upon a time", "max_tokens": 12,
                                                              "temperature": 0, "stop": [stop], "logprobs": 0}).json()
    choice = r["choices"][0]
    assert choice["text"] == free[:free.find(stop)] and choice["finish_reason"] == "stop"
    pieces = choice["logprobs"]["tokens"]
    assert len(pieces) == r["usage"]["completion_tokens"] == len(choice["logprobs"]["token_logprobs"])
    assert "".join(pieces).startswith(choice["text"]) and len("".join(pieces[:-1])) < len(choice["text"])


def test_seeds_streams_and_usage(server, chat_model):
    """A seeded sampled request gets the same text when other requests arrive with it (it runs
    alone: a batch would draw its rows from one generator); a stream never sends the start of a stop
    string that then completes (the text equals the non-streamed one); neutral penalties are
    accepted; stream_options.include_usage ends the stream with the token counts."""
    url, app = server
    c = client(url)

    def sampled(_):
        return c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}],
                                         max_tokens=12, temperature=0.9, seed=42, presence_penalty=0,
                                         frequency_penalty=0.0).choices[0].message.content

    alone = sampled(0)
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(sampled, range(3)))
    assert together == [alone] * 3, (alone, together)
    messages = [{"role": "user", "content": PROMPTS[2]}]
    full = c.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    stop = text[4:14]  # spans several tokens: its first tokens come before it is complete
    assert len(stop) == 10 and text.find(stop) == 4
    plain = c.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0, stop=[stop])
    assert plain.choices[0].message.content == text[:4]
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                            stop=[stop], stream=True, stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text[:4], (streamed, text)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_unsupported_fields_are_refused(server):
    """A field that would change the answer and is not implemented is refused (not answered as if
    it were applied); null, and values that mean off, are accepted and change nothing."""
    url, _ = server
    hi = [{"role": "user", "content": "hi"}]
    for field, value in (("logprobs", True), ("stop_token_ids", [5]), ("functions", [{"name": "f"}]),
                         ("guided_choice", ["a"]), ("tools", [{"type": "function"}])):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"messages": hi, "max_tokens": 2, field: value})
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={"prompt": "hi", "max_tokens": 2, "best_of": 3})
    assert r.status_code == 400 and "best_of" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": hi, "max_tokens": 2, "chat_template_kwargs": {"add_vision_id": True}})
    assert r.status_code == 400 and "only enable_thinking" in r.json()["error"]["message"]
    plain = {"prompt": "Once upon", "max_tokens": 6, "temperature": 0}
    want = httpx.post(f"{url}/v1/completions", timeout=60, json=plain).json()["choices"][0]["text"]
    off = {"best_of": 1, "logit_bias": {}, "suffix": "", "top_p": None, "n": None, "stream": None, "echo": None,
           "presence_penalty": None, "seed": None, "logprobs": None}
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={**plain, **off})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": hi, "max_tokens": 2, "temperature": 0, "tools": [], "response_format": {"type": "text"},
        "tool_choice": "auto", "function_call": "none", "logprobs": False})
    assert r.status_code == 200, r.text


def test_min_tokens_ignore_eos_and_thinking_switch(server, chat_model):
    """min_tokens / ignore_eos (vLLM's) keep EOS from ending the answer, as Model.generate's
    min_new_tokens does (on the default model, whose answers end early); chat_template_kwargs.
    enable_thinking writes the prompt as the codec writes it with that switch (here a template
    given one)."""
    from fastapi.testclient import TestClient

    import circuit_finder as cf

    default = cf.load(cf.default_model_path())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with TestClient(create_app(default, batch_window_ms=0)) as http:
        free = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 24, "temperature": 0}).json()
        assert free["usage"]["completion_tokens"] < 16 and free["choices"][0]["finish_reason"] == "stop", free
        for extra, least in (({"min_tokens": 16}, 16), ({"ignore_eos": True}, 24)):
            r = http.post("/v1/chat/completions",
                          json={"messages": messages, "max_tokens": 24, "temperature": 0, **extra}).json()
            want = default.generate(messages[0]["content"], chat=True, max_new_tokens=24, min_new_tokens=least)[0]
            print(extra, r["usage"], repr(r["choices"][0]["message"]["content"][:60]))
            assert r["choices"][0]["message"]["content"] == want and r["usage"]["completion_tokens"] >= least
    url, _ = server
    tok = chat_model.tokenizer
    original = tok.chat_template
    try:
        tok.chat_template = original + "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
        for thinking in (True, False):
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "messages": messages, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": thinking}}).json()
            assert r["usage"]["prompt_tokens"] == len(chat_model.codec.encode_chat(messages, thinking=thinking))
        assert len(chat_model.codec.encode_chat(messages, thinking=False)) > len(
            chat_model.codec.encode_chat(messages, thinking=True))
    finally:
        tok.chat_template = original


def test_many_prompts_streams_name_their_path_and_batches_of_interacting_rows(server, chat_model, monkeypatch):
    """A completions request may hold more prompts than one batch (they run as several); stream
    chunks name the path as non-streamed responses do; where rows interact (LongRoPE), requests
    run alone, never batched with others."""
    from circuit_finder import generation

    url, app = server
    prompts = [f"Item {k}:" for k in range(20)]
    r = client(url).completions.create(model="tiny", prompt=prompts, max_tokens=3, temperature=0)
    assert [ch.text for ch in r.choices] == chat_model.generate(prompts, max_new_tokens=3)
    chunks = list(client(url).completions.create(model="tiny", prompt="Once", max_tokens=3, temperature=0,
                                                 stream=True, extra_body={"layers": "rys=1:3"}))
    assert all(getattr(ch, "layers", None) == "0..2,1..5" for ch in chunks), chunks[0]
    monkeypatch.setattr(generation, "rows_interact", lambda model: True)
    before = dict(app.state.worker.stats)

    def one(p):
        return client(url).completions.create(model="tiny", prompt=p, max_tokens=2, temperature=0).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, PROMPTS))
    after = app.state.worker.stats
    assert after["batches"] - before["batches"] == after["requests"] - before["requests"] == 4


def test_a_running_batch_whose_clients_all_go_stops(chat_model, monkeypatch):
    """A non-streamed request whose client times out while its batch runs: the batch stops at its
    next token (counted in /health's cancelled) instead of decoding to max_tokens, and the worker
    serves the next request. The steps are slowed to 20 ms so the batch is still running."""
    from circuit_finder import generation

    steps = []
    real = generation.step_function

    def slow(*args, **kwargs):
        step = real(*args, **kwargs)

        def run(token):
            steps.append(1)
            time.sleep(0.02)
            return step(token)

        return run

    monkeypatch.setattr(generation, "step_function", slow)
    app = create_app(chat_model, batch_window_ms=0)
    with running(app) as url:
        body = {"prompt": "Tell a very long story.", "max_tokens": 300, "temperature": 0.8, "seed": 1}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
        deadline = time.time() + 30
        while httpx.get(f"{url}/health").json()["pending"] and time.time() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{url}/health").json()
        print(health, len(steps), "steps of 300")
        assert health["pending"] == 0 and health["cancelled"] == 1 and health["requests"] == 0, health
        assert len(steps) < 150
        monkeypatch.undo()
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200


def test_a_cache_too_large_for_memory_is_a_400(server, monkeypatch):
    """A batch whose KV cache cannot fit the server's free memory answers 400 with the reason, and
    the worker keeps serving."""
    import circuit_finder.placement

    url, _ = server
    monkeypatch.setattr(circuit_finder.placement, "free_memory", lambda d: 1)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 8})
    assert r.status_code == 400 and "max_tokens too large for this server's memory" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 8, "stream": True})  # an event
    assert '"type": "invalid_request_error"' in r.text and "the KV cache" in r.text and "[DONE]" in r.text, r.text
    monkeypatch.undo()
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 8}).status_code == 200


def test_a_batch_too_large_for_memory_runs_in_smaller_batches(server, chat_model, monkeypatch):
    """Where a batch's KV cache cannot fit (CacheTooLarge) but one row's can, the worker splits the
    batch: each request gets the text it gets alone, none a refusal."""
    import circuit_finder.placement
    from circuit_finder.placement import CacheTooLarge

    url, _ = server
    tried = []

    def one_row_fits(model, layers, batch, capacity, what):
        tried.append(batch)
        if batch > 1:
            raise CacheTooLarge(f"{what}: {batch} rows do not fit")

    monkeypatch.setattr(circuit_finder.placement, "check_cache_fits", one_row_fits)  # what checked_cache calls
    c = client(url)

    def one(p):
        return c.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(one, PROMPTS))
    monkeypatch.undo()
    print(f"batch sizes tried: {tried}")
    assert max(tried) > 1 and tried.count(1) == len(PROMPTS)  # a batch was refused, then rows ran alone
    assert texts == [chat_model.generate(p, max_new_tokens=6)[0] for p in PROMPTS]
