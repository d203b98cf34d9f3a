"""`keras-nanogpt serve`: an OpenAI-compatible HTTP server for a saved model, with a playground page.

    keras-nanogpt serve pride.keras --port 8000

Routes:
    POST /v1/completions   OpenAI's completions: prompt (a string or a list), max_tokens, temperature,
                           top_p, n, stream (server-sent events), stop, seed, echo, stream_options,
                           and the extension top_k. Errors come in OpenAI's JSON shape.
    GET  /v1/models        the served model (GET /v1/models/{name} too).
    GET  /health           status, queue length and live rows; open without the API key.
    GET  /                 the playground (`keras_nanogpt.playground`): one page, no external assets.

The app is Starlette (routing, requests, streaming responses) on uvicorn (the ASGI server).
Starlette and not FastAPI: requests are checked by hand here, so that every error has OpenAI's shape
and status (FastAPI's request models answer 422 in their own shape), and nothing more is needed.
The model runs on one decode thread (`keras_nanogpt.batching`), off the event loop, which only
moves bytes: `/health` answers while requests stream, and requests that arrive together share a
decode batch. A request with a `seed` runs in a batch of its own, so it gets exactly the tokens
`model.generate(..., seed=seed)` gives.

Example:
    >>> app = create_app(kn.load_model("pride.keras"))  # doctest: +SKIP
    >>> # any ASGI server runs it, e.g. uvicorn.run(app, host="127.0.0.1", port=8000)
"""

import asyncio
import contextlib
import hmac
import json
import logging
import numbers
import os
import signal
import socket
import time
import uuid

import keras

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError as error:  # pragma: no cover - depends on the installation
    raise ImportError(f"`keras-nanogpt serve` needs the serve extra ({error}): "
                      f"pip install 'keras_nanogpt[serve]'.") from error

from keras_nanogpt import _validation, batching, playground
from keras_nanogpt.model import load_model

logger = logging.getLogger(__name__)

_STOP_STRINGS = 4  # OpenAI's limit
_SEED_LIMIT = 2 ** 63 - 1
_UNSUPPORTED = {  # OpenAI fields taken only at the value that changes nothing
    "logprobs": (None, 0), "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
}
_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream",
           "stream_options", "stop", "seed", "echo", "user", *_UNSUPPORTED)


class APIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status)


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
    if model.vectorizer is None:
        raise ValueError("`model` has no vectorizer, so it cannot read text prompts; serve a model "
                         "trained with one (NanoGPT(..., vectorizer=...)).")
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string; got {name!r}.")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("`api_key` must be a non-empty string or None.")
    max_batch, max_queue, max_tokens, max_prompt_tokens, max_body_bytes, batch_wait_ms = _check_limits(
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
                Route("/v1/completions", service.completions, methods=["POST"])],
        exception_handlers={404: _not_found, 405: _not_allowed},
        lifespan=lifespan)
    app.state.batcher = batcher
    return app


def _check_limits(max_batch=32, max_queue=64, max_tokens=512, max_prompt_tokens=None, max_body_bytes=1 << 20,
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
                         f"/v1/completions, GET /v1/models, GET /health and GET /.", code="not_found").response()


async def _not_allowed(request, exc):
    return APIError(405, f"{request.method} is not allowed on {request.url.path}.",
                    code="method_not_allowed").response()


class _Service:
    """The route handlers of one app: the model's description, the checks, the streams."""

    def __init__(self, model, name, api_key, batcher, max_tokens, max_body_bytes):
        self.name, self.api_key, self.batcher = name, api_key, batcher
        self.max_tokens, self.max_body_bytes = max_tokens, max_body_bytes
        self.created = int(time.time())
        self.card = {"id": name, "object": "model", "created": self.created, "owned_by": "keras-nanogpt",
                     "parameters": int(model.count_params()), "context_length": int(model.sequence_length),
                     "vocabulary_size": int(model.vocabulary_size), "layers": int(model.num_layers),
                     "hidden_dim": int(model.hidden_dim), "backend": keras.backend.backend(),
                     "max_tokens": max_tokens, "max_batch": batcher.max_batch,
                     "max_prompt_tokens": batcher.max_prompt_tokens}
        self.page, self.page_policy = playground.page()

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
            return _unknown_model(request.path_params["name"], self.name).response()
        return JSONResponse(self.card)

    def _unauthorized(self, request):
        if self.api_key is None:
            return None
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return None
        return APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>` with the key "
                             "the server was started with (--api-key).", code="invalid_api_key")

    async def completions(self, request):
        try:
            if (error := self._unauthorized(request)) is not None:
                raise error
            body = await _read_body(request, self.max_body_bytes)
            params = _completion_params(_parse_json(body), self.name, self.max_tokens, self.batcher.max_batch)
            return await self._complete(request, params)
        except APIError as error:
            return error.response()

    async def _complete(self, request, params):
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()

        def deliver(events):
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                loop.call_soon_threadsafe(queue.put_nowait, events)

        job = batching.Request(params["prompts"], params["n"], params["max_tokens"], params["sampling"], deliver)
        try:
            self.batcher.submit(job)
        except batching.QueueFull as error:
            raise APIError(429, f"The server is busy: {error} Retry shortly.", code="rate_limit_exceeded",
                           kind="requests") from None
        except batching.Closed as error:
            raise APIError(503, str(error), kind="server_error") from None
        answer = (await queue.get())[0]
        if answer[0] == "refused":
            raise APIError(400, answer[1], param=answer[2])
        if answer[0] != "accepted":
            raise APIError(503 if answer[0] == "closed" else 500, answer[1], kind="server_error")
        completion = _Completion(self.name, params, prompt_tokens=sum(answer[1]), warnings=answer[2])
        if params["stream"]:
            return StreamingResponse(completion.stream(queue, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await _until_disconnect(request, completion.collect(queue), job)
        if isinstance(result, APIError):
            return result.response()
        return JSONResponse(result)


class _Completion:
    """One accepted request: its choices as they fill, and the response or the event stream."""

    def __init__(self, name, params, prompt_tokens, warnings):
        self.params = params
        self.head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                     "created": int(time.time()), "model": name}
        rows = [p for p in params["prompts"] for _ in range(params["n"])]
        self.texts = list(rows) if params["echo"] else [""] * len(rows)
        self.echo = rows if params["echo"] else None
        self.reasons = [None] * len(rows)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.warnings = warnings
        self.include_usage = bool((params["stream_options"] or {}).get("include_usage"))

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _take(self, event):
        """Record a "text" or "finish" event; return an APIError for "closed"/"failed", else None."""
        kind = event[0]
        if kind == "text":
            self.texts[event[1]] += event[2]
        elif kind == "finish":
            self.reasons[event[1]] = event[2]
            self.completion_tokens += event[3]
        elif kind in ("closed", "failed"):
            return APIError(503 if kind == "closed" else 500, event[1], kind="server_error")
        return None

    async def collect(self, queue):
        """The whole response (or an APIError), once every choice has finished."""
        while True:
            for event in await queue.get():
                if (error := self._take(event)) is not None:
                    return error
                if event[0] == "done":
                    choices = [{"text": text, "index": i, "logprobs": None, "finish_reason": reason}
                               for i, (text, reason) in enumerate(zip(self.texts, self.reasons))]
                    body = {**self.head, "choices": choices, "usage": self.usage()}
                    if self.warnings:
                        body["warnings"] = self.warnings
                    return body

    async def stream(self, queue, job):
        """Server-sent events: one chunk per piece and choice, a finishing chunk per choice, [DONE]."""
        first = {"warnings": self.warnings} if self.warnings else {}
        try:
            if self.echo is not None:
                yield b"".join(self._chunk(i, text, None, first if i == 0 else {})
                               for i, text in enumerate(self.echo))
                first = {}
            while True:
                out = []
                for event in await queue.get():
                    if (error := self._take(event)) is not None:
                        out.append(_event(error.body()))
                        yield b"".join(out)
                        return
                    if event[0] == "text":
                        out.append(self._chunk(event[1], event[2], None, first))
                        first = {}
                    elif event[0] == "finish":
                        out.append(self._chunk(event[1], "", event[2], first))
                        first = {}
                    elif event[0] == "done":
                        if self.include_usage:
                            out.append(_event({**self.head, "choices": [], "usage": self.usage()}))
                        out.append(b"data: [DONE]\n\n")
                        yield b"".join(out)
                        return
                yield b"".join(out)
        finally:
            job.cancel()  # the client went away (or all is sent): no more tokens for this request

    def _chunk(self, index, text, reason, extra):
        choice = {"text": text, "index": index, "logprobs": None, "finish_reason": reason}
        body = {**self.head, "choices": [choice], **extra}
        if self.include_usage:
            body["usage"] = None
        return _event(body)


def _event(body):
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def _until_disconnect(request, awaitable, job):
    """Await `awaitable`, cancelling `job` (and returning None) if the client disconnects first."""
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


async def _read_body(request, limit):
    length = request.headers.get("content-length", "")
    too_large = APIError(413, f"The request body is larger than this server takes ({limit} bytes, "
                              f"its --max-body-bytes).", code="request_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(body):
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"The request body is not valid JSON: {error}.") from None
    if not isinstance(payload, dict):
        raise APIError(400, f"The request body must be a JSON object; got {type(payload).__name__}.")
    return payload


def _unknown_model(requested, served):
    return APIError(404, f"The model {requested!r} does not exist; this server serves {served!r}.",
                    param="model", code="model_not_found")


def _completion_params(payload, served, max_tokens, max_batch):
    """The checked settings of a completions request (APIError 400/404 on bad input)."""
    unknown = sorted(set(payload) - set(_FIELDS))
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}. This server takes "
                            f"{', '.join(_FIELDS)}.", param=unknown[0])
    for field, neutral in _UNSUPPORTED.items():
        if field in payload and payload[field] not in neutral:
            raise APIError(400, f"`{field}` is not supported by this server; leave it out.", param=field)
    get = payload.get
    model = get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, f"`model` must be a string; got {model!r}.", param="model")
    if model is not None and model != served:
        raise _unknown_model(model, served)
    prompts = _prompts(get("prompt"))
    params = {
        "prompts": prompts,
        "max_tokens": _integer(payload, "max_tokens", 16, 0, max_tokens, "the server's --max-tokens"),
        "n": _integer(payload, "n", 1, 1, max_batch, "the server's --max-batch"),
        "stream": _boolean(payload, "stream"),
        "echo": _boolean(payload, "echo"),
        "stream_options": get("stream_options"),
    }
    if len(prompts) * params["n"] > max_batch:
        raise APIError(400, f"{len(prompts)} prompts x n={params['n']} choices make "
                            f"{len(prompts) * params['n']} rows; this server batches at most {max_batch} "
                            f"(its --max-batch).", param="n")
    options = params["stream_options"]
    if options is not None:
        if not params["stream"]:
            raise APIError(400, "`stream_options` is only allowed when `stream` is true.", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(
                options.get("include_usage", False), bool):
            raise APIError(400, f"`stream_options` must be {{\"include_usage\": true|false}}; got {options!r}.",
                           param="stream_options")
    if get("user") is not None and not isinstance(get("user"), str):
        raise APIError(400, f"`user` must be a string; got {get('user')!r}.", param="user")
    top_p = _number(payload, "top_p", None, 0.0, 1.0, low_inclusive=False)
    seed = _integer(payload, "seed", None, 0, _SEED_LIMIT, "a 63-bit integer")
    params["sampling"] = batching.Sampling(
        temperature=_number(payload, "temperature", 1.0, 0.0, 2.0),
        top_k=_integer(payload, "top_k", None, 1, None, None),
        top_p=None if top_p == 1.0 else top_p,
        stop=_stops(get("stop")),
        seed=seed)
    return params


def _prompts(prompt):
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    if prompt is None:
        raise APIError(400, "`prompt` is required: a string or a list of strings.", param="prompt")
    raise APIError(400, f"`prompt` must be a string or a non-empty list of strings (token ids are not "
                        f"taken); got {json.dumps(prompt)[:80]}.", param="prompt")


def _integer(payload, name, default, low, high, high_name):
    value = payload.get(name)
    if value is None:
        return default
    allowed = f"an integer from {low}" + (f" to {high} ({high_name})" if high is not None else " up")
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"`{name}` must be {allowed}; got {json.dumps(value)}.", param=name)
    if value < low or (high is not None and value > high):
        raise APIError(400, f"`{name}` must be {allowed}; got {value}.", param=name)
    return value


def _number(payload, name, default, low, high, low_inclusive=True):
    value = payload.get(name)
    if value is None:
        return default
    interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise APIError(400, f"`{name}` must be a number in {interval}; got {json.dumps(value)}.", param=name)
    if not ((value >= low if low_inclusive else value > low) and value <= high):
        raise APIError(400, f"`{name}` must be a number in {interval}; got {value}.", param=name)
    return float(value)


def _boolean(payload, name):
    value = payload.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"`{name}` must be true or false; got {json.dumps(value)}.", param=name)
    return value


def _stops(stop):
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not 1 <= len(stops) <= _STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise APIError(400, f"`stop` must be a non-empty string or a list of 1 to {_STOP_STRINGS} of them; "
                            f"got {json.dumps(stop)[:80]}.", param="stop")
    return tuple(stops)


# -------------------------------------------------------------------------------------------------
# The command line's `serve`: bind, load, run uvicorn until SIGINT/SIGTERM.
# -------------------------------------------------------------------------------------------------

def run(model_path, host="127.0.0.1", port=8000, name=None, api_key=None, log_level="info", **options):
    """Serve the `.keras` file at `model_path` until SIGINT or SIGTERM; return 0.

    The port is bound first (a busy port fails before the model loads). On SIGINT/SIGTERM the
    server stops taking requests, ends the streams in flight with an error chunk (and waiting
    requests with 503), and returns 0.

    Args:
        model_path: the saved model (the only file the server reads).
        host: the address to listen on; 127.0.0.1 (this machine only) unless told otherwise.
        port: the TCP port (0: any free one; the address is printed).
        name: the model's name in the API (default: the file name without `.keras`).
        api_key: require this key (see `create_app`).
        log_level: uvicorn's log level ("info" logs each request).
        **options: `create_app`'s limits (max_batch, max_queue, max_tokens, max_prompt_tokens,
            max_body_bytes, batch_wait_ms).

    Example:
        >>> run("pride.keras", port=8000)  # doctest: +SKIP
    """
    port = _validation.check_int("port", port, minimum=0)
    if port > 65535:
        raise ValueError(f"`port` must be at most 65535; got {port}.")
    _check_limits(**options)
    name = name or os.path.splitext(os.path.basename(model_path))[0]
    listener = _listen(host, port)
    try:
        model = load_model(model_path)
        app = create_app(model, name=name, api_key=api_key, **options)
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=10, lifespan="on")
        host_shown, port_shown = listener.getsockname()[:2]
        if api_key is None and not _loopback(host):
            logger.warning("serving on %s without --api-key: anyone who can reach it may use it", host)
        server = _Server(config, app.state.batcher,
                         f"serving {name} ({model.count_params():,} parameters) on "
                         f"http://{host_shown}:{port_shown}  (playground /, OpenAI API /v1)")
        # uvicorn handles the signals while it runs, then raises them again: here they do nothing.
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run(sockets=[listener])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        listener.close()
    print("stopped", flush=True)
    return 0


def _listen(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    listener.listen(2048)
    listener.set_inheritable(True)
    return listener


def _loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


class _Server(uvicorn.Server):
    """uvicorn's server, which on SIGINT/SIGTERM first tells the decode thread to end the requests."""

    def __init__(self, config, batcher, ready_message):
        super().__init__(config)
        self.batcher, self.ready_message, self.loop = batcher, ready_message, None

    async def startup(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started:
            print(self.ready_message, flush=True)

    def handle_exit(self, sig, frame):
        if self.loop is not None and not self.should_exit:
            print("shutting down: ending the requests in flight", flush=True)
            self.loop.call_soon_threadsafe(self.batcher.close)
        super().handle_exit(sig, frame)
