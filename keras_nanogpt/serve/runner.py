"""The command line's `serve`: bind the port, load the model, run uvicorn until SIGINT/SIGTERM.

Example:
    >>> run("pride.keras", port=8000)  # doctest: +SKIP
"""

import asyncio
import logging
import os
import signal
import socket

import uvicorn

from keras_nanogpt import _validation
from keras_nanogpt.model import load_model
from keras_nanogpt.serve.app import check_limits, create_app

logger = logging.getLogger(__name__)


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
    check_limits(**options)
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

