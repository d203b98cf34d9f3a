"""The ASGI app of `keras-nanogpt serve`: its routes, and each completion's or chat's response or event stream.

Example:
    >>> app = create_app(kn.load_model("pride.keras"))  # doctest: +SKIP
    >>> # any ASGI server runs it, e.g. uvicorn.run(app, host="127.0.0.1", port=8000)
"""

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid

from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from keras_nanogpt import _validation, backends, chat
from keras_nanogpt.serve import batching, page
from keras_nanogpt.serve.events import (AcceptedEvent, ClosedEvent, DoneEvent, FailedEvent, FinishEvent,
                                        RefusedEvent, TextEvent)
from keras_nanogpt.serve.requests import (APIError, chat_params, completion_params, parse_json, read_body,
                                          unknown_model)

logger = logging.getLogger(__name__)


def create_app(model, name="nanogpt", api_key=None, max_batch=32, max_queue=64, max_tokens=512,
               max_prompt_tokens=None, max_body_bytes=1 << 20, batch_wait_ms=5.0):
    """The ASGI app serving `model`; its decode thread starts and stops with the app's lifespan.

    Args:
        model: a `NanoGPT` with a vectorizer (it must take text).
        name: the model's name in the API (requests naming another model get a 404).
        api_key: when set, `/v1/...` needs `Authorization: Bearer <api_key>` (401 otherwise).
        max_batch: rows (prompts x n) in one decode batch, at most; one request's rows must fit.
        max_queue: requests waiting outside a batch, at most; more get 429.
        max_tokens: the largest `max_tokens` a request may ask for (400 above).
        max_prompt_tokens: tokens in one prompt, at most (400 above); None: the model's context,
            so that the model reads every prompt whole.
        max_body_bytes: request body size, at most (413 above).
        batch_wait_ms: a free decode thread starts a batch once no request came for this long.

    Returns:
        A Starlette app; `app.state.batcher` is its `batching.Batcher`.

    Example:
        >>> app = create_app(model, name="pride", api_key="secret")  # doctest: +SKIP
    """
    if model.tokenizer is None:
        raise ValueError("`model` has no vectorizer, so it cannot read text prompts; serve a model "
                         "trained with one (NanoGPT(..., vectorizer=...)).")
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string; got {name!r}.")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("`api_key` must be a non-empty string or None.")
    max_batch, max_queue, max_tokens, max_prompt_tokens, max_body_bytes, batch_wait_ms = check_limits(
        max_batch, max_queue, max_tokens, max_prompt_tokens, max_body_bytes, batch_wait_ms)
    batcher = batching.Batcher(model, max_batch=max_batch, max_queue=max_queue,
                               max_prompt_tokens=max_prompt_tokens or model.sequence_length,
                               batch_wait=batch_wait_ms / 1000)
    service = _Service(model, name, api_key, batcher, max_tokens, max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.close()
            await asyncio.to_thread(batcher.join)

    app = Starlette(
        routes=[Route("/", service.playground, methods=["GET"]),
                Route("/health", service.health, methods=["GET"]),
                Route("/v1/models", service.models, methods=["GET"]),
                Route("/v1/models/{name:path}", service.model, methods=["GET"]),
                Route("/v1/completions", service.completions, methods=["POST"]),
                Route("/v1/chat/completions", service.chat_completions, methods=["POST"])],
        exception_handlers={404: _not_found, 405: _not_allowed},
        lifespan=lifespan)
    app.state.batcher = batcher
    return app


def check_limits(max_batch=32, max_queue=64, max_tokens=512, max_prompt_tokens=None, max_body_bytes=1 << 20,
                 batch_wait_ms=5.0):
    """`create_app`'s limits, checked (so `run` refuses a bad one before loading the model)."""
    if max_prompt_tokens is not None:
        max_prompt_tokens = _validation.check_int("max_prompt_tokens", max_prompt_tokens)
    return (_validation.check_int("max_batch", max_batch), _validation.check_int("max_queue", max_queue),
            _validation.check_int("max_tokens", max_tokens), max_prompt_tokens,
            _validation.check_int("max_body_bytes", max_body_bytes),
            _validation.check_float("batch_wait_ms", batch_wait_ms, 0.0, 1000.0, high_inclusive=True))


async def _not_found(request, exc):
    return APIError(404, f"No route {request.method} {request.url.path}; this server has POST "
                         f"/v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health and GET /.",
                    code="not_found").response()


async def _not_allowed(request, exc):
    response = APIError(405, f"{request.method} is not allowed on {request.url.path}.",
                        code="method_not_allowed").response()
    response.headers["Allow"] = (getattr(exc, "headers", None) or {}).get("Allow", "")  # the route's methods
    return response


class _Service:
    """The route handlers of one app: the model's description, the checks, the streams."""

    def __init__(self, model, name, api_key, batcher, max_tokens, max_body_bytes):
        self.name, self.api_key, self.batcher = name, api_key, batcher
        self.max_tokens, self.max_body_bytes = max_tokens, max_body_bytes
        self.created = int(time.time())
        self.card = {"id": name, "object": "model", "created": self.created, "owned_by": "keras-nanogpt",
                     "parameters": int(model.count_params()), "context_length": int(model.sequence_length),
                     "vocabulary_size": int(model.vocabulary_size), "layers": int(model.num_layers),
                     "hidden_dim": int(model.hidden_dim), "backend": backends.name(),
                     "max_tokens": max_tokens, "max_batch": batcher.max_batch,
                     "max_prompt_tokens": batcher.max_prompt_tokens,
                     "has_chat_template": bool(chat.has_template(model)),
                     "chat_template": chat.template_of(model).name}
        # The template's stop sequences come first, then the request's (as `model.chat` puts them).
        self.chat_stop = tuple(tuple(s) if isinstance(s, list) else s for s in chat.stop_sequences(model))
        self.page, self.page_policy = page.page()

    async def playground(self, request):
        return HTMLResponse(self.page, headers={"Content-Security-Policy": self.page_policy,
                                                "X-Content-Type-Options": "nosniff"})

    async def health(self, request):
        closing = self.batcher.closing
        return JSONResponse({"status": "shutting_down" if closing else "ok", "model": self.name,
                             "auth": self.api_key is not None, **self.batcher.stats()},
                            status_code=503 if closing else 200)

    async def models(self, request):
        if (error := self._unauthorized(request)) is not None:
            return error.response()
        return JSONResponse({"object": "list", "data": [self.card]})

    async def model(self, request):
        if (error := self._unauthorized(request)) is not None:
            return error.response()
        if request.path_params["name"] != self.name:
            return unknown_model(request.path_params["name"], self.name).response()
        return JSONResponse(self.card)

    def _unauthorized(self, request):
        if self.api_key is None:
            return None
        # Exactly the key: the header's bytes (Starlette decodes them as Latin-1) after the scheme, with
        # ASCII spaces and tabs around it only (`str.strip` would also drop U+00A0, U+0085, ...).
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        token = token.strip(" \t").encode("latin-1")
        if scheme.lower() == "bearer" and hmac.compare_digest(token, self.api_key.encode()):
            return None
        return APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>` with the key "
                             "the server was started with (--api-key).", code="invalid_api_key")

    async def _params(self, request, read_params):
        """The request's checked parameters (`read_params`: `completion_params` or `chat_params`); APIError if not."""
        if (error := self._unauthorized(request)) is not None:
            raise error
        body = await read_body(request, self.max_body_bytes)
        return read_params(parse_json(body), self.name, self.max_tokens, self.batcher.max_batch)

    async def completions(self, request):
        try:
            params = await self._params(request, completion_params)
            job = batching.Request(params["prompts"], params["n"], params["max_tokens"], params["sampling"], None)
            return await self._complete(request, params, job, _Completion)
        except APIError as error:
            return error.response()

    async def chat_completions(self, request):
        try:
            params = await self._params(request, chat_params)
            sampling = params["sampling"]
            sampling = dataclasses.replace(sampling, stop=self.chat_stop + sampling.stop)
            job = batching.Request(None, params["n"], params["max_tokens"], sampling, None,
                                   messages=params["messages"])
            return await self._complete(request, params, job, _ChatCompletion)
        except APIError as error:
            return error.response()

    async def _complete(self, request, params, job, kind):
        """Submit `job` (a `batching.Request` whose `deliver` this sets), and answer with `kind`'s response."""
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()

        def deliver(events):
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                loop.call_soon_threadsafe(queue.put_nowait, events)

        job.deliver = deliver
        try:
            self.batcher.submit(job)
        except batching.QueueFull as error:
            raise APIError(429, f"The server is busy: {error} Retry shortly.", code="rate_limit_exceeded",
                           kind="requests") from None
        except batching.Closed as error:
            raise APIError(503, str(error), kind="server_error") from None
        answer = (await queue.get())[0]
        if isinstance(answer, RefusedEvent):
            raise APIError(400, answer.message, param=answer.param)
        if not isinstance(answer, AcceptedEvent):  # a ClosedEvent or FailedEvent
            raise APIError(503 if isinstance(answer, ClosedEvent) else 500, answer.message, kind="server_error")
        completion = kind(self.name, params, prompt_tokens=sum(answer.prompt_tokens), warnings=answer.warnings)
        if params["stream"]:
            return StreamingResponse(completion.stream(queue, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await _until_disconnect(request, completion.collect(queue), job)
        if isinstance(result, APIError):
            return result.response()
        return JSONResponse(result)


class _Completion:
    """One accepted completions request: its choices as they fill, and the response or the event stream."""

    PREFIX, OBJECT, CHUNK_OBJECT = "cmpl", "text_completion", "text_completion"

    def __init__(self, name, params, prompt_tokens, warnings):
        self.params = params
        self.head = {"id": f"{self.PREFIX}-{uuid.uuid4().hex}", "object": self.OBJECT,
                     "created": int(time.time()), "model": name}
        self.chunk_head = {**self.head, "object": self.CHUNK_OBJECT}
        rows = [p for p in params.get("prompts", [""]) for _ in range(params["n"])]
        self.texts = list(rows) if params.get("echo") else [""] * len(rows)
        self.echo = rows if params.get("echo") else None
        self.reasons = [None] * len(rows)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.warnings = warnings
        self.include_usage = bool((params["stream_options"] or {}).get("include_usage"))

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _take(self, event):
        """Record a `TextEvent` or `FinishEvent`; return an APIError for a `ClosedEvent` or
        `FailedEvent`, else None."""
        if isinstance(event, TextEvent):
            self.texts[event.choice] += event.text
        elif isinstance(event, FinishEvent):
            self.reasons[event.choice] = event.reason
            self.completion_tokens += event.tokens
        elif isinstance(event, (ClosedEvent, FailedEvent)):
            return APIError(503 if isinstance(event, ClosedEvent) else 500, event.message, kind="server_error")
        return None

    async def collect(self, queue):
        """The whole response (or an APIError), once every choice has finished."""
        while True:
            for event in await queue.get():
                if (error := self._take(event)) is not None:
                    return error
                if isinstance(event, DoneEvent):
                    choices = [self._choice(i, text, reason)
                               for i, (text, reason) in enumerate(zip(self.texts, self.reasons))]
                    body = {**self.head, "choices": choices, "usage": self.usage()}
                    if self.warnings:
                        body["warnings"] = self.warnings
                    return body

    async def stream(self, queue, job):
        """Server-sent events: one chunk per piece and choice, a finishing chunk per choice, [DONE]."""
        first = {"warnings": self.warnings} if self.warnings else {}
        try:
            if (opening := self._opening(first)) is not None:
                yield opening
                first = {}
            while True:
                out = []
                for event in await queue.get():
                    if (error := self._take(event)) is not None:
                        out.append(_event(error.body()))
                        yield b"".join(out)
                        return
                    if isinstance(event, TextEvent):
                        out.append(self._chunk(event.choice, event.text, None, first))
                        first = {}
                    elif isinstance(event, FinishEvent):
                        out.append(self._chunk(event.choice, "", event.reason, first))
                        first = {}
                    elif isinstance(event, DoneEvent):
                        if self.include_usage:
                            out.append(_event({**self.chunk_head, "choices": [], "usage": self.usage()}))
                        out.append(b"data: [DONE]\n\n")
                        yield b"".join(out)
                        return
                yield b"".join(out)
        finally:
            job.cancel()  # the client went away (or all is sent): no more tokens for this request

    def _choice(self, index, text, reason):
        """A choice of the whole response."""
        return {"text": text, "index": index, "logprobs": None, "finish_reason": reason}

    def _opening(self, extra):
        """The stream's first events before any token (the echoed prompts), or None."""
        if self.echo is None:
            return None
        return b"".join(self._chunk(i, text, None, extra if i == 0 else {}) for i, text in enumerate(self.echo))

    def _chunk(self, index, text, reason, extra):
        return self._event(self._choice(index, text, reason), extra)

    def _event(self, choice, extra):
        body = {**self.chunk_head, "choices": [choice], **extra}
        if self.include_usage:
            body["usage"] = None
        return _event(body)


class _ChatCompletion(_Completion):
    """One accepted chat request: a `chat.completion` (each choice a message) or `chat.completion.chunk` deltas
    (the role first, then the content, then an empty delta with the finish reason)."""

    PREFIX, OBJECT, CHUNK_OBJECT = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def _choice(self, index, text, reason):
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason}

    def _opening(self, extra):
        return b"".join(self._event({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}, extra if i == 0 else {})
                        for i in range(len(self.texts)))

    def _chunk(self, index, text, reason, extra):
        return self._event({"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                            "finish_reason": reason}, extra)


def _event(body):
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def _until_disconnect(request, awaitable, job):
    """`awaitable`'s result; if the client disconnects first, `job` is cancelled and the result is an
    `APIError` (499, "The client closed the request."), which the caller answers with.

    Example:
        >>> result = await _until_disconnect(request, completion.collect(queue), job)  # doctest: +SKIP
    """
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(awaitable), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        job.cancel()
        work.cancel()
        return APIError(499, "The client closed the request.")
    finally:
        watch.cancel()
