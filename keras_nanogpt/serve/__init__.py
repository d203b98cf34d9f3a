"""`keras-nanogpt serve`: an OpenAI-compatible HTTP server for a saved model, with a playground page.

    keras-nanogpt serve pride.keras --port 8000

Routes:
    POST /v1/completions   OpenAI's completions: prompt (a string or a list), max_tokens, temperature,
                           top_p, n, stream (server-sent events), stop, seed, echo, stream_options,
                           and the extension top_k. Errors come in OpenAI's JSON shape.
    POST /v1/chat/completions  OpenAI's chat completions: messages rendered with the model's chat
                           template (`keras_nanogpt.chat`), the same settings (max_completion_tokens
                           too), `chat.completion.chunk` deltas when streaming.
    GET  /v1/models        the served model, and its chat template (GET /v1/models/{name} too).
    GET  /health           status, queue length and live rows; open without the API key.
    GET  /                 the playground (`keras_nanogpt.serve.page`): one page, no external assets.

The app is Starlette (routing, requests, streaming responses) on uvicorn (the ASGI server).
Starlette and not FastAPI: requests are checked by hand here, so that every error has OpenAI's shape
and status (FastAPI's request models answer 422 in their own shape), and nothing more is needed.
The model runs on one decode thread (`keras_nanogpt.serve.batching`), off the event loop, which only
moves bytes: `/health` answers while requests stream, and requests that arrive together share a
decode batch. A request with a `seed` runs in a batch of its own, so it gets exactly the tokens
`model.generate(..., seed=seed)` gives.

Modules: `app` (the routes and responses), `requests` (reading and checking a request),
`batching` (the decode thread), `page` (the playground), `runner` (the command line's `serve`).

Example:
    >>> app = create_app(kn.load_model("pride.keras"))  # doctest: +SKIP
    >>> # any ASGI server runs it, e.g. uvicorn.run(app, host="127.0.0.1", port=8000)
"""

try:
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the installation
    raise ImportError(f"`keras-nanogpt serve` needs the serve extra ({error}): "
                      f"pip install 'keras_nanogpt[serve]'.") from error

from keras_nanogpt.serve.app import create_app
from keras_nanogpt.serve.requests import APIError
from keras_nanogpt.serve.runner import run

__all__ = ["APIError", "create_app", "run"]
