"""An OpenAI-compatible server where each request may run its own layer path.

    circuit-finder serve --model PATH --layers 0..12,10..29 --host 127.0.0.1 --port 8000

Endpoints: ``POST /v1/chat/completions`` (``stream: true`` as server-sent events),
``POST /v1/completions`` (text or token-id prompts; ``logprobs: n`` and ``echo: true`` with
OpenAI's completions semantics, so lm-eval's ``local-completions`` runs loglikelihood tasks),
``GET /v1/models``, ``GET /health``. A request may carry ``"layers": "..."`` (any layer path
spelling, ``rys=i:j`` included) to use that path for this request only: the weights are shared,
nothing is reloaded. Routers (``circuit_finder.Router``, registered with ``routers=`` /
``--router FILE``) are named ``"layers": "router:NAME"`` per request or as the server's default:
each prompt then runs along the path the router picks for it, and the response says which
(``"layers"``: the path run, ``"router"``: its name).

One worker thread owns the model. Requests that arrive within ``batch_window_ms`` of each other
and share path and sampling settings run as one batch (left-padded, each row with its own
positions). Every request, streaming or not, counts against ``max_pending``. Bad input —
malformed JSON, fields of the wrong type, prompts longer than the context, invalid paths — gets a
4xx JSON error in OpenAI's format and the server keeps serving.

A client that goes stops its work: a stream's generation at its next token, a non-streamed request
while it waits in the queue, and a running batch at its next token once all its clients have gone.

Fields that would change the answer and are not implemented (logit_bias, tools, penalties,
stop_token_ids, guided decoding) are refused unless null or off; vLLM's min_tokens / ignore_eos and
chat_template_kwargs.enable_thinking are read. Where rows of a batch interact (LongRoPE picks its
factors from the batch's longest row) each request runs alone.

Limits: n = 1 per prompt; logprobs are computed after generation by one teacher-forced pass over
prompt + completion (the raw model distribution, before temperature/top-p).
"""

import asyncio
import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from . import generation, likelihood
from .generation import Sampling
from .layer_path import LayerPath, LayerPathError
from .model import Model
from .placement import CacheTooLarge
from .router import Router, RouterError
from .router import run as routing

__all__ = ["Limits", "create_app", "serve"]


DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


class BadRequest(ValueError):
    """A request the server refuses (answered with HTTP 400)."""


class TooBusy(Exception):
    """More requests are waiting than the server accepts (answered with HTTP 429)."""


class Cancelled(Exception):
    """A job whose client went away: not started, or stopped at its next token."""


@dataclass(frozen=True)
class Limits:
    """What the server refuses: bodies over max_request_bytes (413), prompts over max_prompt_tokens
    or prompt + max_tokens over the context length (400), max_tokens over max_tokens_limit (400),
    a layer path (or a router's longest candidate) of more than max_path_slots slots (400),
    more than max_pending requests waiting, streaming ones included (429)."""

    max_tokens_limit: int = 4096
    context_length: int | None = None
    max_request_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_pending: int = 256
    max_path_slots: int | None = None  # default 4 x the model's layers


@dataclass
class Job:
    """One prompt to complete. ``stream``: callback(token ids so far, finished) for streaming jobs;
    ``logprobs``: None, or how many top alternatives to report per token; ``echo``: score the prompt."""

    ids: list[int]
    path: LayerPath | Router
    sampling: Sampling
    stream: Any = None
    logprobs: int | None = None
    echo: bool = False
    score_only: bool = False  # echo with max_tokens 0: nothing is generated
    prompt_text: str | None = None  # what echo returns for a text prompt
    future: Future = field(default_factory=Future)
    routed: LayerPath | None = None  # the path a router picked for this prompt (set by the worker)
    cancelled: threading.Event = field(default_factory=threading.Event)  # set when its client went

    @property
    def run_path(self) -> LayerPath:
        """The path this prompt runs along (its router's choice once made)."""
        return self.routed if isinstance(self.path, Router) else self.path

    @property
    def key(self):
        """Jobs of one key may share a batch. A streaming job runs alone (its tokens are sent as they
        come), and so does a seeded sampled one: a batch draws from one generator, so its rows would
        not get what the seed gives the request alone."""
        seeded = self.sampling.temperature > 0 and self.sampling.seed is not None
        alone = id(self) if self.stream is not None or seeded else None
        return (self.path, self.sampling, self.score_only, alone)


@dataclass
class Completed:
    """A finished job: the generated ids, the row made text (TextCodec.finish, done once, in the
    worker), and token log-probs when asked for."""

    row: list[int]
    finished: generation.Finished
    logprobs: tuple[list[float], list[list[tuple[int, float]]]] | None = None


class Worker:
    """Owns the model; runs queued jobs, batching those that arrive together with equal settings."""

    def __init__(self, model: Model, max_batch: int, window_s: float):
        self.model, self.max_batch, self.window_s = model, max_batch, window_s
        self.queue: queue.Queue[Job] = queue.Queue()
        self.stats = {"requests": 0, "batches": 0, "cancelled": 0}
        self.thread = threading.Thread(target=self._loop, name="circuit-finder-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Future:
        self.queue.put(job)
        return job.future

    def _loop(self) -> None:
        while True:
            jobs = [self.queue.get()]
            deadline = time.monotonic() + self.window_s
            while len(jobs) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    jobs.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
            groups: dict[Any, list[Job]] = {}
            alone = generation.rows_interact(self.model)  # a row's numbers would depend on the others'
            for job in self._live(jobs):
                groups.setdefault(id(job) if alone else job.key, []).append(job)
            for group in groups.values():
                self._run(group)

    def _live(self, jobs: list[Job]) -> list[Job]:
        """The jobs whose clients are still there (the others end with Cancelled, never run)."""
        for job in jobs:
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                job.future.set_exception(Cancelled())
        return [job for job in jobs if not job.cancelled.is_set()]

    def _run(self, jobs: list[Job]) -> None:
        try:
            rows = self._generate(jobs)
            self.stats["batches"] += 1
            self.stats["requests"] += len(jobs)
            for job, row in zip(jobs, rows):
                fin = self._finish(job, row)
                job.future.set_result(Completed(row, fin, self._logprobs(job, row[:fin.tokens])))
        except CacheTooLarge as e:  # the batch's cache does not fit: halves may (each row runs as it would alone)
            if len(jobs) > 1:
                self._run(jobs[:len(jobs) // 2])
                self._run(jobs[len(jobs) // 2:])
            else:
                jobs[0].future.set_exception(e)
        except Exception as e:  # reported to each waiting request; the worker keeps running
            self.stats["cancelled"] += len(jobs) if isinstance(e, Cancelled) else 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)

    def _generate(self, jobs: list[Job]) -> list[list[int]]:
        first, model = jobs[0], self.model
        if isinstance(first.path, Router) and first.score_only:
            for job, c in zip(jobs, first.path.choose(model, [j.ids for j in jobs])):
                job.routed = first.path.candidates[c]
        if first.score_only:
            return [[] for _ in jobs]
        ids, mask = model.codec.left_pad([j.ids for j in jobs], model.device)
        on_step = None
        if first.stream is not None:
            generated: list[int] = []

            def on_step(token, finished):
                if first.cancelled.is_set():  # the client went: the worker is free for the others
                    raise Cancelled()
                generated.append(int(token[0]))
                first.stream(list(generated), bool(finished[0]))

        def check() -> None:  # every client of the batch went: stop (one that stays gets its whole answer)
            if all(job.cancelled.is_set() for job in jobs):
                raise Cancelled()

        if not isinstance(first.path, Router):
            return generation.generate_ids(model, ids, mask, first.path, first.sampling, on_step, check).tolist()
        new, choices = routing.generate_ids(model, first.path, ids, mask, first.sampling, on_step, check)
        for job, c in zip(jobs, choices):
            job.routed = first.path.candidates[c]
        return new.tolist()

    def _finish(self, job: Job, row: list[int]) -> generation.Finished:
        if job.score_only:
            return generation.Finished("", "length", 0)
        return self.model.codec.finish(row, job.sampling.stops, job.sampling.max_new_tokens)

    def _logprobs(self, job: Job, completion: list[int]):
        """Token log-probs of prompt + completion (the generated tokens the answer counts)."""
        if job.logprobs is None:
            return None
        return likelihood.token_logprobs(self.model, job.ids + completion, list(job.run_path), job.logprobs)


class BodyLimit:
    """ASGI middleware: refuses request bodies over ``limit`` bytes with 413, whether declared
    (Content-Length) or sent in chunks (read here first, up to the limit, then handed on)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(scope, receive, send)
        if declared is not None:
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:  # chunked: at most limit + one chunk is held
            message = await receive()
            if message["type"] != "http.request":  # the client went
                return await self.app(scope, _replay(message, receive), send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(scope, receive, send)
        await self.app(scope, _replay({"type": "http.request", "body": body, "more_body": False}, receive), send)

    async def _refuse(self, scope, receive, send):
        from starlette.responses import JSONResponse

        response = JSONResponse(status_code=413, content=error_body(
            f"request body over the limit of {self.limit} bytes", "invalid_request_error"))
        await response(scope, receive, send)


def _replay(first: dict, receive):
    """An ASGI receive that gives ``first``, then what ``receive`` gives (a disconnect, later)."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return first
        return await receive()

    return again


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def request_models():
    """The pydantic request models (imported lazily: fastapi is an optional dependency)."""
    from pydantic import (
        BaseModel,
        ConfigDict,
        Field,
        StrictBool,
        StrictFloat,
        StrictInt,
        StrictStr,
        field_validator,
    )

    class Part(BaseModel):
        model_config = ConfigDict(extra="allow")
        type: StrictStr
        text: StrictStr | None = None

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: StrictStr
        content: StrictStr | list[Part] | None = None

    class Common(BaseModel):
        model_config = ConfigDict(extra="allow")
        model: str | None = None
        # strict types: "10" is not a number and 1 is not true
        max_tokens: StrictInt | None = Field(default=None, ge=0)
        max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
        # null is the default, as OpenAI's spec allows (clients that serialise unset fields send it)
        temperature: StrictFloat | StrictInt | None = Field(default=None, ge=0.0, le=2.0)
        top_p: StrictFloat | StrictInt | None = Field(default=None, gt=0.0, le=1.0)
        stop: StrictStr | list[StrictStr] | None = None
        stream: StrictBool | None = None
        seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)
        n: StrictInt | None = Field(default=None, ge=1, le=1)
        layers: StrictStr | list[StrictInt] | None = None
        # vLLM's extensions: answer at least min_tokens tokens; ignore_eos: EOS is never generated
        # (masked for the whole budget, as min_tokens = max_tokens)
        min_tokens: StrictInt | None = Field(default=None, ge=0)
        ignore_eos: StrictBool | None = None

        @field_validator("stop")
        @classmethod
        def _stops(cls, v):
            stops = [v] if isinstance(v, str) else (v or [])
            if len(stops) > 16 or any(len(x) > 256 for x in stops):
                raise ValueError("at most 16 stop sequences of at most 256 characters")
            return v

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        chat_template_kwargs: dict[str, Any] | None = None  # enable_thinking only

        @field_validator("chat_template_kwargs")
        @classmethod
        def _template_kwargs(cls, v):
            other = sorted(set(v or {}) - {"enable_thinking"})
            if other:
                raise ValueError(f"only enable_thinking is supported, not {', '.join(other)}")
            if v and not isinstance(v.get("enable_thinking"), bool | None):
                raise ValueError("enable_thinking must be true, false or null")
            return v

    class CompletionRequest(Common):
        prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
        logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
        echo: StrictBool | None = None

    return ChatRequest, CompletionRequest


class Service:
    """What the routes do, apart from HTTP: plan a request (path, budget, stops), encode prompts,
    queue jobs under the pending limit, and shape finished rows into OpenAI's response objects."""

    def __init__(self, model: Model, layers, name: str, worker: Worker, limits: Limits, routers=None):
        if model.tokenizer is None:
            raise ValueError(f"{model.source}: serving text needs a tokenizer")
        self.model, self.name, self.worker, self.limits = model, name, worker, limits
        self.routers = register_routers(model, routers)
        if isinstance(layers, Router) and layers.name not in self.routers:
            layers.check(model)
            self.routers[layers.name] = layers
        self.default_path = self.route(layers) if routing.is_router(layers) else model.path(layers)
        self.context = int(limits.context_length or model.config.max_position_embeddings or 4096)
        self.pending = 0  # requests waiting for the worker or streaming; only touched on the event loop

    # ------------------------------------------------------------------ requests -> jobs
    def job(self, req, ids: list[int], stream=None, logprobs: int | None = None, echo: bool = False) -> Job:
        try:
            path = self.target(req.layers)
        except (LayerPathError, ValueError, TypeError) as e:
            raise BadRequest(f"layers: {e}") from e
        slots = max(map(len, path.candidates)) if isinstance(path, Router) else len(path)
        most = self.limits.max_path_slots or 4 * self.model.num_layers
        if slots > most:
            raise BadRequest(f"layers: the path runs {slots} slots, over this server's limit of {most}")
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:  # not asked for: 256, or less where the limit or the context leaves less
            max_tokens = max(1, min(256, self.limits.max_tokens_limit, self.context - len(ids)))
        if max_tokens == 0 and not echo:
            raise BadRequest("max_tokens must be >= 1 (0 only with echo: true)")
        if max_tokens > self.limits.max_tokens_limit:
            raise BadRequest(f"max_tokens {max_tokens} is over this server's limit of {self.limits.max_tokens_limit}")
        self.check_prompt(ids, max_tokens)
        return Job(ids, path, sampling_of(req, max_tokens), stream=stream, logprobs=logprobs, echo=echo,
                   score_only=max_tokens == 0)

    def target(self, layers) -> LayerPath | Router:
        """A request's ``layers`` (None: the server's default) -> the path or router it runs."""
        if layers is None:
            return self.default_path
        return self.route(layers) if routing.is_router(layers) else self.model.path(layers)

    def route(self, layers) -> Router:
        """A Router, or "router:NAME" -> a registered router (requests never name files)."""
        if isinstance(layers, Router):
            return layers
        name = layers.strip()[len(routing.PREFIX):].strip()
        if name not in self.routers:
            known = ", ".join(sorted(self.routers)) or "none"
            raise ValueError(f"no router named {name!r} on this server (routers: {known})")
        return self.routers[name]

    def describe(self, path) -> dict:
        """The response fields naming what ran: "layers" (the path) and, when routed, "router"."""
        if isinstance(path, Router):
            return {"layers": f"{routing.PREFIX}{path.name}", "router": path.name}
        return {"layers": str(path)}

    def check_prompt(self, ids: list[int], max_tokens: int) -> None:
        limit = self.limits.max_prompt_tokens
        if not ids:
            raise BadRequest("the prompt encodes to no tokens")
        if limit is not None and len(ids) > limit:
            raise BadRequest(f"the prompt has {len(ids)} tokens, over the limit of {limit}")
        if len(ids) + max_tokens > self.context:
            raise BadRequest(f"the prompt has {len(ids)} tokens; with max_tokens {max_tokens} that is over the "
                             f"context length {self.context}")
        vocab = self.model.config.vocab_size
        bad = generation.outside_vocabulary(ids, vocab)
        if bad is not None:
            raise BadRequest(f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})")

    def chat_ids(self, req) -> list[int]:
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):  # OpenAI content parts: text only (an image is not dropped unseen)
                other = next((part.type for part in content if part.type != "text"), None)
                if other is not None:
                    raise BadRequest(f"messages[{i}].content: {other!r} parts are not supported (text only)")
                content = "".join(part.text or "" for part in content)
            messages.append({"role": m.role, "content": content or ""})
        thinking = (req.chat_template_kwargs or {}).get("enable_thinking")
        try:
            text = self.model.codec.chat_text(messages, thinking=self._router_thinking(req.layers) if thinking is None
                                              else thinking)
        except Exception as e:
            raise BadRequest(f"messages: the chat template rejected them ({e})") from e
        return self.encode(text, add_special_tokens=False)

    def _router_thinking(self, layers) -> bool | None:
        """A routed request's chat prompt is written with the thinking switch its router's training
        sweep used (as Model.generate writes it); None (the template's default) otherwise, or when
        ``layers`` names no router (job() then says why)."""
        if layers is not None and not routing.is_router(layers):
            return None
        try:
            chosen = self.target(layers)
        except (ValueError, TypeError, RouterError):
            return None
        return chosen.thinking if isinstance(chosen, Router) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.model.codec.encode(text, add_special_tokens=add_special_tokens)
        except Exception as e:  # e.g. lone surrogates
            raise BadRequest(f"the text cannot be tokenized ({type(e).__name__})") from e

    def prompts(self, prompt) -> list[tuple[list[int], str | None]]:
        """A completions prompt (text, texts, token ids or lists of token ids) -> (ids, text or None)."""
        if isinstance(prompt, str):
            return [(self.encode(prompt), prompt)]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [(list(prompt), None)]
        return [(p, None) if isinstance(p, list) else (self.encode(p), p) for p in prompt]

    # ------------------------------------------------------------------ queueing
    def reserve(self, n: int = 1) -> None:
        """Takes n pending slots, all or none (TooBusy when they do not fit); the event loop runs
        this without a pause, so two requests never both take the last slots."""
        if self.pending + n > self.limits.max_pending:
            raise TooBusy()
        self.pending += n

    def release(self, n: int = 1) -> None:
        self.pending -= n

    async def run(self, job: Job, request=None, reserved: bool = False) -> Completed:
        """The job's result (its pending slot taken and released here, or, ``reserved``, by the
        caller). With ``request``: a client that goes cancels the job: skipped while it waits in
        the queue (Cancelled), stopped at the next token once every job of its running batch is
        cancelled."""
        if not reserved:
            self.reserve()
        try:
            done = asyncio.wrap_future(self.worker.submit(job))
            while request is not None and not job.cancelled.is_set():
                finished, _ = await asyncio.wait({done}, timeout=DISCONNECT_POLL_S)
                if finished:
                    break
                if await request.is_disconnected():
                    job.cancelled.set()
            return await done
        finally:
            if not reserved:
                self.release()

    # ------------------------------------------------------------------ rows -> responses
    def finish(self, job: Job, row: list[int]) -> generation.Finished:
        """A streamed row so far, made text (finished rows come made, in Completed)."""
        return self.model.codec.finish(row, job.sampling.stops, job.sampling.max_new_tokens)

    def logprobs_object(self, job: Job, done: Completed) -> dict | None:
        """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset — over
        the prompt (echo) and the completion. text_offset indexes the choice's text: a token that
        adds no text there (BOS, EOS, the part past a stop string) sits at the next token's offset."""
        if done.logprobs is None:
            return None
        values, tops = done.logprobs
        tok = self.model.tokenizer
        completion = done.row[:done.finished.tokens]
        seq = job.ids + completion
        start = 0 if job.echo else len(job.ids)
        token_lp = [None, *values][start:]
        top = [None, *[{tok.decode([i]): v for i, v in alts} for alts in tops]][start:]
        prompt = self.prompt_text(job) if job.echo else ""
        added = added_in_front(tok, job.ids, prompt) if job.echo and job.prompt_text is not None else 0
        offsets = text_offsets(tok, job.ids, prompt, added=added) if job.echo else []
        offsets += [len(prompt) + o for o in text_offsets(tok, completion, done.finished.text, skip_special=True)]
        return {"tokens": [tok.decode([t]) for t in seq[start:]], "token_logprobs": token_lp,
                "top_logprobs": top if job.logprobs else None, "text_offset": offsets}

    def prompt_text(self, job: Job) -> str:
        """What echo returns for the prompt: its text as given, or a token-id prompt decoded."""
        return job.prompt_text if job.prompt_text is not None else self.model.tokenizer.decode(job.ids)

    def completion_choice(self, k: int, job: Job, done: Completed) -> tuple[dict, int]:
        """(choice object, completion tokens) of a finished completions job."""
        fin = done.finished
        text = (self.prompt_text(job) if job.echo else "") + fin.text
        return {"index": k, "text": text, "finish_reason": fin.reason,
                "logprobs": self.logprobs_object(job, done), **self.ran(job)}, fin.tokens

    def ran(self, job: Job) -> dict:
        """Per prompt: the path it ran along and, when a router chose it, the router's name."""
        if not isinstance(job.path, Router):
            return {}
        return {"layers": str(job.routed) if job.routed is not None else None, "router": job.path.name}

    def chat_response(self, rid: str, created: int, job: Job, done: Completed) -> dict:
        fin = done.finished
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": fin.text},
                             "finish_reason": fin.reason}],
                "usage": usage(len(job.ids), fin.tokens), **self.describe(job.path), **self.ran(job)}

    def start_stream(self, job: Job) -> tuple[asyncio.Future, asyncio.Queue]:
        """Queues a streaming job under the pending limit (TooBusy when full). The slot is released
        when the worker is done with the job, so dropped streams still bound the queued work and
        can never leak a slot; a client that goes stops its job at the next token (``stream``)."""
        self.reserve()
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        job.stream = lambda tokens, finished: loop.call_soon_threadsafe(updates.put_nowait, tokens)
        future = self.worker.submit(job)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self.release))
        return asyncio.wrap_future(future), updates

    async def stream(self, job: Job, done: asyncio.Future, updates: asyncio.Queue, rid: str, created: int,
                     chat: bool, include_usage: bool = False):
        """Server-sent events of a started job: text deltas as tokens come (the end of the text that
        could be the start of a stop string held back until it is not), then the finish reason, and
        with ``include_usage`` (stream_options) a last chunk with the token counts."""
        chunk = self._chunker(job, rid, created, chat)
        if chat:
            yield chunk(None, None, first=True)
        sent = ""
        try:
            while True:
                getter = asyncio.ensure_future(updates.get())
                ready, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in ready:
                    getter.cancel()
                    break
                text = self.finish(job, getter.result()).text
                text = text[:len(text) - stop_prefix(text, job.sampling.stops)]
                if not text.endswith("\ufffd") and len(text) > len(sent) and text.startswith(sent):
                    yield chunk(text[len(sent):], None)  # (a trailing \ufffd: wait for the rest of the character)
                    sent = text
        finally:  # the client went before the end (the generator was closed): stop generating for it
            if not done.done():
                job.cancelled.set()
                done.add_done_callback(lambda f: f.cancelled() or f.exception())  # read: no "never retrieved"
        try:
            fin = done.result().finished
        except Exception as e:  # (the status line went out with the first chunk: the error is an event)
            kind = "invalid_request_error" if isinstance(e, CacheTooLarge) else "server_error"
            yield "data: " + json.dumps({"error": {"message": str(e), "type": kind}}) + "\n\n"
            yield "data: [DONE]\n\n"
            return
        if len(fin.text) > len(sent) and fin.text.startswith(sent):
            yield chunk(fin.text[len(sent):], None)
        yield chunk(None, fin.reason)
        if include_usage:
            yield chunk(None, None, usage=usage(len(job.ids), fin.tokens))
        yield "data: [DONE]\n\n"

    def _chunker(self, job: Job, rid: str, created: int, chat: bool):
        """Chunk writer of a stream: each names the path (a router's name; its choice in the last
        chunk with a finish reason, as non-streamed responses do)."""
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_text: str | None, reason: str | None, first: bool = False, usage: dict | None = None) -> str:
            if usage is not None:  # stream_options.include_usage: the last chunk, without choices
                return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": self.name,
                                              "choices": [], "usage": usage}) + "\n\n"
            if chat:
                delta = {"role": "assistant", "content": ""} if first else (
                    {"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": reason, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": self.name,
                                          "choices": [choice], **self.describe(job.path),
                                          **(self.ran(job) if reason is not None else {})}) + "\n\n"

        return chunk


def sampling_of(req, max_tokens: int) -> Sampling:
    """A request's Sampling: null temperature / top_p are 1 (OpenAI's defaults); min_tokens (at most
    the budget) and ignore_eos keep EOS from ending the answer early."""
    budget = max(max_tokens, 1)
    least = budget if req.ignore_eos else min(req.min_tokens or 0, budget)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    return Sampling(budget, least, temperature, top_p, req.seed, tuple(stops))


def text_offsets(tokenizer, ids: list[int], text: str, skip_special: bool = False, added: int = 0,
                 window: int = 8) -> list[int]:
    """Where each token of ``ids`` begins in ``text``, their decode (``skip_special`` as it was
    made) or what they were encoded from. The first ``added`` tokens (what the tokenizer put in
    front of an encoded text: BOS) come out at 0; a token's width is what it adds to the decode of
    the ``window`` tokens before it (decoded alone, a sentencepiece piece loses its leading space
    and a byte-level piece may be half a character); offsets past the text's end (a stop string
    cut it) come out at its end."""
    def width(part: list[int]) -> int:
        return len(tokenizer.decode(part, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False))

    offsets, seq, at = [0] * added, ids[added:], 0
    for i in range(len(seq)):
        offsets.append(min(at, len(text)))
        lo = max(0, i - window)
        at += max(0, width(seq[lo:i + 1]) - width(seq[lo:i]))
    return offsets


def added_in_front(tokenizer, ids: list[int], text: str) -> int:
    """How many of ``ids`` (``text`` encoded with special tokens) the tokenizer put in front of the
    text's own tokens (BOS): 0 when the ids do not end with the text's encoding without them."""
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(ids) - len(plain) if len(plain) <= len(ids) and ids[len(ids) - len(plain):] == plain else 0


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def install_error_handlers(app, limits: Limits) -> None:
    """Every refusal as a JSON error in OpenAI's format with the right status."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def error(status: int, message: str, kind: str = "invalid_request_error"):
        return JSONResponse(status_code=status, content=error_body(message, kind))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where or 'body'}: {e.get('msg')}")
        return error(400, "; ".join(parts) or "invalid request")

    @app.exception_handler(TooBusy)
    async def _busy(request: Request, exc: TooBusy):
        return error(429, f"more than {limits.max_pending} requests are waiting; retry later", "rate_limit_error")

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        return error(400, str(exc))

    @app.exception_handler(CacheTooLarge)  # max_tokens whose cache cannot fit even alone (Worker._run splits batches)
    async def _too_large(request: Request, exc: CacheTooLarge):
        return error(400, f"max_tokens too large for this server's memory: {exc}")

    @app.exception_handler(Cancelled)
    async def _gone(request: Request, exc: Cancelled):  # nobody reads it: the client went
        return error(499, "the client closed the request before it ran", "cancelled")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "error")


def register_routers(model: Model, routers) -> dict[str, Router]:
    """Routers (objects or router files; a dict maps names to them) -> {name: Router}, each
    checked against the model; two routers with one name are refused."""
    if routers is None:
        return {}
    items = routers.items() if isinstance(routers, dict) else [(None, r) for r in routers]
    out: dict[str, Router] = {}
    for name, r in items:
        router = r if isinstance(r, Router) else Router.load(r)
        router.check(model)
        name = name or router.name
        if name in out:
            raise RouterError(f"two routers are named {name!r}")
        out[name] = router
    return out


def create_app(model: Model, layers=None, model_name: str | None = None, max_batch: int = 16,
               batch_window_ms: float = 10.0, routers=None, **limits):
    """The FastAPI app serving ``model`` (default path ``layers``: a path, a Router or
    "router:NAME"); ``routers``: Routers or router files requests may name as "router:NAME";
    ``limits``: the fields of Limits."""
    from fastapi import FastAPI

    lim = Limits(**limits)
    service = Service(model, layers, model_name or "circuit-finder", Worker(model, max_batch, batch_window_ms / 1e3), lim,
                      routers)
    app = FastAPI(title="circuit-finder", version="0.1.0")
    app.state.worker = service.worker
    app.state.service = service
    app.add_middleware(BodyLimit, limit=lim.max_request_bytes)
    install_error_handlers(app, lim)
    add_routes(app, service)
    return app


# fields this server does not implement, and the values that mean "off" (accepted): sampling
# penalties, OpenAI's and vLLM's (refused whenever set to something else, so no answer is given
# as if they had been applied)
_NEUTRAL = {"presence_penalty": (0,), "frequency_penalty": (0,), "repetition_penalty": (1,), "top_k": (0, -1),
            "min_p": (0,), "best_of": (1,), "logit_bias": ({},), "suffix": ("",), "tools": ([],),
            "response_format": ({"type": "text"},), "tool_choice": ("none", "auto"), "functions": ([],),
            "function_call": ("none", "auto"), "stop_token_ids": ([],), "include_stop_str_in_output": (False,),
            "logprobs": (False,), "top_logprobs": (0,), "guided_json": (), "guided_regex": (),
            "guided_choice": (), "guided_grammar": ()}


def stop_prefix(text: str, stops) -> int:
    """How many closing characters of text could be the start of a stop string (held back from a
    stream: the full stop string ends the text without it)."""
    return max((k for stop in stops for k in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:k])), default=0)


def refuse_unsupported(req) -> None:
    """400 naming a field this server does not implement (rather than answering as if it did),
    unless it is null or set to a value that means off."""
    extra = req.model_extra or {}
    given = [f for f, off in _NEUTRAL.items() if extra.get(f) is not None and not _is_off(extra[f], off)]
    if given:
        raise BadRequest(f"{given[0]}: not supported by this server")


def _is_off(value, off: tuple) -> bool:
    """Whether value is one of off (a bool never equals a number here: true is not 1)."""
    return any(isinstance(value, bool) == isinstance(o, bool) and value == o for o in off)


def add_routes(app, service: Service) -> None:
    from fastapi import Request
    from fastapi.responses import StreamingResponse

    ChatRequest, CompletionRequest = request_models()

    def streaming(job: Job, rid: str, created: int, chat: bool, req):
        options = (req.model_extra or {}).get("stream_options") or {}
        if not isinstance(options, dict):
            raise BadRequest("stream_options: must be an object")
        done, updates = service.start_stream(job)  # holds a pending slot until the job ends (429 when full)
        return StreamingResponse(service.stream(job, done, updates, rid, created, chat,
                                                bool(options.get("include_usage"))),
                                 media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.name, **service.describe(service.default_path),
                "routers": sorted(service.routers), "num_layers": service.model.num_layers,
                "pending": service.pending, **service.worker.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0,
                                            "owned_by": "circuit-finder",
                                            **service.describe(service.default_path)}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        refuse_unsupported(req)
        job = service.job(req, service.chat_ids(req))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return streaming(job, rid, created, True, req)
        return service.chat_response(rid, created, job, await service.run(job, request))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        refuse_unsupported(req)
        prompts = service.prompts(req.prompt)
        if not prompts or len(prompts) > service.limits.max_pending:  # more than max_batch run as several batches
            raise BadRequest(f"prompt: give 1 to {service.limits.max_pending} prompts")
        jobs = [service.job(req, ids, logprobs=req.logprobs, echo=bool(req.echo)) for ids, _ in prompts]
        for job, (_, text) in zip(jobs, prompts):
            job.prompt_text = text
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            if len(jobs) != 1 or req.logprobs is not None or req.echo:
                raise BadRequest("stream: one prompt at a time, without logprobs or echo")
            return streaming(jobs[0], rid, created, False, req)
        service.reserve(len(jobs))  # all or none: a request is not left half queued
        try:  # (released here: a job cancelled before it starts never reaches its own finally)
            done = await asyncio.gather(*[service.run(j, request, reserved=True) for j in jobs])
        finally:
            service.release(len(jobs))
        choices = [service.completion_choice(k, j, d) for k, (j, d) in enumerate(zip(jobs, done))]
        return {"id": rid, "object": "text_completion", "created": created, "model": service.name,
                "choices": [c for c, _ in choices], "usage": usage(sum(len(j.ids) for j in jobs),
                                                                     sum(n for _, n in choices)),
                **service.describe(jobs[0].path)}


def serve(model: str = "default", layers=None, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          dtype: str | None = None, model_name: str | None = None, max_batch: int = 16,
          batch_window_ms: float = 10.0, routers=None, device_map=None, max_memory=None, dequantize: bool = False,
          quantize=None, activations: str = "float", **limits) -> None:
    """Loads a model (placed by device_map / max_memory, weights and activations as dequantize /
    quantize / activations say: see ``load``) and serves it with uvicorn (blocking). ``limits``:
    see Limits."""
    import uvicorn

    from .loading import load

    loaded = load(model, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory, dequantize=dequantize,
                  quantize=quantize, activations=activations)
    app = create_app(loaded, layers=layers, model_name=model_name or str(model), max_batch=max_batch,
                     batch_window_ms=batch_window_ms, routers=routers, **limits)
    # (no uvicorn limit_concurrency: it counts idle keep-alive connections too, and answers them a
    # plain-text 503; max_pending's 429 bounds the work)
    uvicorn.run(app, host=host, port=port, log_level="info")
