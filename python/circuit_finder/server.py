"""An OpenAI-compatible server where each request may run its own layer path.

    circuit-finder serve --model PATH --layers 0..12,10..29 --host 127.0.0.1 --port 8000

Endpoints: ``POST /v1/chat/completions`` (``stream: true`` as server-sent events),
``POST /v1/completions``, ``GET /v1/models``, ``GET /health``. A request may carry
``"layers": "..."`` (any layer path spelling, ``rys=i:j`` included) to use that path for this
request only: the weights are shared, nothing is reloaded.

One worker thread owns the model. Requests that arrive within ``batch_window_ms`` of each other
and share path and sampling settings run as one batch (left-padded, each row with its own
positions). Bad input — malformed JSON, fields of the wrong type, prompts longer than the
context, invalid paths — gets a 4xx JSON error in OpenAI's format and the server keeps serving.
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

import torch

from .layer_path import LayerPath, LayerPathError
from .model import Model

__all__ = ["create_app", "serve"]


class BadRequest(ValueError):
    """A request the server refuses (answered with HTTP 400)."""


@dataclass
class _Job:
    ids: list[int]
    path: LayerPath
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    stream: Any = None  # for streaming jobs: callback(token ids so far, finished)
    future: Future = field(default_factory=Future)

    @property
    def key(self):
        return (self.path, self.max_tokens, self.temperature, self.top_p, self.seed, tuple(self.stops))


class _Worker:
    """Owns the model; runs queued jobs, batching those that arrive together with equal settings."""

    def __init__(self, model: Model, max_batch: int, window_s: float):
        self.model, self.max_batch, self.window_s = model, max_batch, window_s
        self.queue: queue.Queue[_Job] = queue.Queue()
        self.stats = {"requests": 0, "batches": 0}
        self.thread = threading.Thread(target=self._loop, name="circuit-finder-worker", daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> Future:
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
            groups: dict[Any, list[_Job]] = {}
            for job in jobs:
                # streaming jobs run alone: their tokens are sent as they come
                groups.setdefault(job.key if job.stream is None else id(job), []).append(job)
            for group in groups.values():
                self._run(group)

    def _run(self, jobs: list[_Job]) -> None:
        first = jobs[0]
        try:
            model = self.model
            ids, mask = model._left_pad([j.ids for j in jobs])
            on_step = None
            if first.stream is not None:
                generated: list[int] = []

                def on_step(token, finished):
                    generated.append(int(token[0]))
                    first.stream(list(generated), bool(finished[0]))

            with torch.inference_mode():
                new = model._generate_ids(ids, mask, first.path, first.max_tokens, 0, first.temperature, first.top_p,
                                          first.seed, first.stops, text_mode=True, on_step=on_step)
            self.stats["batches"] += 1
            self.stats["requests"] += len(jobs)
            for job, row in zip(jobs, new.tolist()):
                job.future.set_result(row)
        except Exception as e:  # reported to each waiting request; the worker keeps running
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)


class _TooLarge(Exception):
    pass


class _BodyLimit:
    """ASGI middleware: refuses request bodies over ``limit`` bytes (declared or streamed) with 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            from starlette.responses import JSONResponse

            response = JSONResponse(status_code=413, content={"error": {
                "message": f"request body over the limit of {self.limit} bytes", "type": "invalid_request_error",
                "param": None, "code": None}})
            return await response(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge()
            return message

        await self.app(scope, limited, send)


def _finish(model: Model, row: list[int], stops: list[str], max_tokens: int) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of a generated row."""
    eos = set(model._eos_ids())
    cut = next((i for i, t in enumerate(row) if t in eos), None)
    tokens = row[:cut] if cut is not None else row
    text = model.tokenizer.decode(tokens, skip_special_tokens=True)
    reason = "stop" if cut is not None else "length"
    for s in stops:
        at = text.find(s)
        if at >= 0:
            text, reason = text[:at], "stop"
    if reason == "length" and len(tokens) < max_tokens:
        reason = "stop"
    return text, reason, len(tokens) + (1 if cut is not None else 0)


def create_app(model: Model, layers=None, model_name: str | None = None, max_batch: int = 16,
               batch_window_ms: float = 10.0, max_tokens_limit: int = 4096, context_length: int | None = None,
               max_request_bytes: int = 1 << 20, max_prompt_tokens: int | None = None, max_pending: int = 256):
    """The FastAPI app serving ``model`` (default path ``layers``).

    Limits, each answered with a 4xx JSON error: request bodies over ``max_request_bytes`` (413),
    prompts over ``max_prompt_tokens`` or prompt + max_tokens over the context length (400),
    ``max_tokens`` over ``max_tokens_limit`` (400), more than ``max_pending`` requests waiting (429).
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
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
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if model.tokenizer is None:
        raise ValueError(f"{model.source}: serving text needs a tokenizer")
    default_path = model.path(layers)
    name = model_name or "circuit-finder"
    context = int(context_length or model.config.raw.get("max_position_embeddings") or 4096)
    worker = _Worker(model, max_batch, batch_window_ms / 1000.0)
    prompt_limit = int(max_prompt_tokens) if max_prompt_tokens else None
    pending = {"n": 0}  # requests waiting for the worker; only touched on the event loop

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
        max_tokens: StrictInt | None = Field(default=None, ge=1)
        max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
        temperature: StrictFloat | StrictInt = Field(default=1.0, ge=0.0, le=2.0)
        top_p: StrictFloat | StrictInt = Field(default=1.0, gt=0.0, le=1.0)
        stop: StrictStr | list[StrictStr] | None = None
        stream: StrictBool = False
        seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)
        n: StrictInt = Field(default=1, ge=1, le=1)
        layers: StrictStr | list[StrictInt] | None = None

        @field_validator("stop")
        @classmethod
        def _stops(cls, v):
            stops = [v] if isinstance(v, str) else (v or [])
            if len(stops) > 16 or any(len(x) > 256 for x in stops):
                raise ValueError("at most 16 stop sequences of at most 256 characters")
            return v

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)

    class CompletionRequest(Common):
        prompt: StrictStr | list[StrictStr]

    app = FastAPI(title="circuit-finder", version="0.1.0")
    app.state.worker = worker

    app.add_middleware(_BodyLimit, limit=max_request_bytes)

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                                   "code": None}})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where or 'body'}: {e.get('msg')}")
        return error(400, "; ".join(parts) or "invalid request")

    class TooBusy(Exception):
        pass

    @app.exception_handler(TooBusy)
    async def _busy(request: Request, exc: TooBusy):
        return error(429, f"more than {max_pending} requests are waiting; retry later", "rate_limit_error")

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        return error(400, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        if isinstance(exc, _TooLarge):
            return error(413, f"request body over the limit of {max_request_bytes} bytes")
        return error(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "error")

    def plan(req: Common, prompts: list[list[int]]) -> tuple[LayerPath, int, list[str]]:
        try:
            path = model.path(req.layers) if req.layers is not None else default_path
        except (LayerPathError, ValueError, TypeError) as e:
            raise BadRequest(f"layers: {e}") from e
        max_tokens = req.max_completion_tokens or req.max_tokens or 256
        if max_tokens > max_tokens_limit:
            raise BadRequest(f"max_tokens {max_tokens} is over this server's limit of {max_tokens_limit}")
        for p in prompts:
            if not p:
                raise BadRequest("the prompt encodes to no tokens")
            if prompt_limit is not None and len(p) > prompt_limit:
                raise BadRequest(f"the prompt has {len(p)} tokens, over the limit of {prompt_limit}")
            if len(p) + max_tokens > context:
                raise BadRequest(f"the prompt has {len(p)} tokens; with max_tokens {max_tokens} that is over the "
                                 f"context length {context}")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return path, max_tokens, [s for s in stops if s]

    def chat_ids(req: ChatRequest) -> list[int]:
        messages = []
        for m in req.messages:
            content = m.content
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                content = "".join(part.text or "" for part in content if part.type == "text")
            messages.append({"role": m.role, "content": content or ""})
        try:
            text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            raise BadRequest(f"messages: the chat template rejected them ({e})") from e
        return encode(text, add_special_tokens=False)

    def encode(text: str, **kwargs) -> list[int]:
        try:
            return model.tokenizer(text, **kwargs)["input_ids"]
        except Exception as e:  # e.g. lone surrogates
            raise BadRequest(f"the text cannot be tokenized ({type(e).__name__})") from e

    async def run(job: _Job) -> list[int]:
        if pending["n"] >= max_pending:
            raise TooBusy()
        pending["n"] += 1
        try:
            return await asyncio.wrap_future(worker.submit(job))
        finally:
            pending["n"] -= 1

    def job_for(req: Common, ids: list[int], path, max_tokens, stops, stream=None) -> _Job:
        return _Job(ids=ids, path=path, max_tokens=max_tokens, temperature=float(req.temperature),
                    top_p=float(req.top_p), seed=req.seed, stops=stops, stream=stream)

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "layers": str(default_path), "num_layers": model.num_layers,
                **worker.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "circuit-finder",
                                            "layers": str(default_path)}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        ids = chat_ids(req)
        path, max_tokens, stops = plan(req, [ids])
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(stream_chunks(req, ids, path, max_tokens, stops, rid, created, chat=True),
                                     media_type="text/event-stream")
        row = await run(job_for(req, ids, path, max_tokens, stops))
        text, reason, n = _finish(model, row, stops, max_tokens)
        return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                "usage": usage(len(ids), n), "layers": str(path)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or len(prompts) > max_batch:
            raise BadRequest(f"prompt: give 1 to {max_batch} prompts")
        ids = [encode(p) for p in prompts]
        path, max_tokens, stops = plan(req, ids)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            if len(ids) != 1:
                raise BadRequest("stream: one prompt at a time")
            return StreamingResponse(stream_chunks(req, ids[0], path, max_tokens, stops, rid, created, chat=False),
                                     media_type="text/event-stream")
        rows = await asyncio.gather(*[run(job_for(req, i, path, max_tokens, stops)) for i in ids])
        choices, total = [], 0
        for k, row in enumerate(rows):
            text, reason, n = _finish(model, row, stops, max_tokens)
            total += n
            choices.append({"index": k, "text": text, "finish_reason": reason, "logprobs": None})
        return {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": choices,
                "usage": usage(sum(len(i) for i in ids), total), "layers": str(path)}

    async def stream_chunks(req, ids, path, max_tokens, stops, rid, created, chat: bool):
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def on_tokens(tokens, finished):
            loop.call_soon_threadsafe(updates.put_nowait, (tokens, finished))

        future = worker.submit(job_for(req, ids, path, max_tokens, stops, stream=on_tokens))
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_text: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else (
                    {"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": reason, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": name,
                                          "choices": [choice]}) + "\n\n"

        if chat:
            yield chunk(None, None, first=True)
        sent = ""
        done = asyncio.ensure_future(asyncio.wrap_future(future))
        while True:
            getter = asyncio.ensure_future(updates.get())
            finished_first, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
            if getter in finished_first:
                tokens, _finished = getter.result()
                text, _, _ = _finish(model, tokens, stops, max_tokens)
                if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                    continue
                if len(text) > len(sent) and text.startswith(sent):
                    yield chunk(text[len(sent):], None)
                    sent = text
                continue
            getter.cancel()
            break
        try:
            row = done.result()
        except Exception as e:
            yield "data: " + json.dumps({"error": {"message": str(e), "type": "server_error"}}) + "\n\n"
            yield "data: [DONE]\n\n"
            return
        while not updates.empty():
            updates.get_nowait()
        text, reason, _ = _finish(model, row, stops, max_tokens)
        if len(text) > len(sent) and text.startswith(sent):
            yield chunk(text[len(sent):], None)
        yield chunk(None, reason)
        yield "data: [DONE]\n\n"

    return app


def serve(model: str = "default", layers=None, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          dtype: str | None = None, model_name: str | None = None, max_batch: int = 16,
          batch_window_ms: float = 10.0, **limits) -> None:
    """Loads a model and serves it with uvicorn (blocking). ``limits``: see create_app."""
    import uvicorn

    import circuit_finder as cf

    loaded = cf.load(model, device=device, dtype=dtype)
    app = create_app(loaded, layers=layers, model_name=model_name or str(model), max_batch=max_batch,
                     batch_window_ms=batch_window_ms, **limits)
    uvicorn.run(app, host=host, port=port, log_level="info", limit_concurrency=limits.get("max_pending", 256) + 16)
