"""`keras-nanogpt serve` against hostile clients: keys that are almost right, malformed, huge and deep
bodies, a flood past the queue, slow and vanishing clients, a stream of distinct sampling values, and
SIGTERM while clients hang.

One server runs in a thread of this process (uvicorn serving `create_app`, with an API key, one row per
batch and two waiting requests), so the test can count the model's compiled programs; the console
script's server runs in a subprocess started when the module starts, for SIGTERM. Raw sockets send
what `httpx` would refuse to (bytes above 0x7F in a header, bodies shorter than they say). Every
request goes to 127.0.0.1, every socket has a timeout and every loop a bound.
"""

import concurrent.futures
import json
import signal
import socket
import time

import httpx
import pytest
from conftest import WAIT, ThreadServer, make_sharp_model, start_cli_server, stop_process

from keras_nanogpt import serve

NAME = "tiny"
KEY = "secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
SOCKET_SECONDS = 20  # the bound on one raw socket's wait


@pytest.fixture(scope="module")
def model(char_vectorizer):
    return make_sharp_model(char_vectorizer)


@pytest.fixture(scope="module")
def cli_server(model, tmp_path_factory):
    """`keras-nanogpt serve --api-key` in a subprocess, started first (its import overlaps the tests)."""
    path = tmp_path_factory.mktemp("hostile") / f"{NAME}.keras"
    model.save(path)
    process = start_cli_server(path, "--api-key", KEY, "--max-tokens", "100000")
    yield process
    stop_process(process, WAIT)


@pytest.fixture(scope="module", autouse=True)
def start_cli_server_first(cli_server):
    """Start the console script's server before the other tests."""


@pytest.fixture(scope="module")
def server(model):
    running = ThreadServer(serve.create_app(model, name=NAME, api_key=KEY, max_batch=1, max_queue=2,
                                            max_tokens=100_000, batch_wait_ms=0))
    yield running
    running.stop()


def address(url):
    host, port = url.split("//", 1)[1].split(":")
    return host, int(port)


def raw(url, data, wait=SOCKET_SECONDS):
    """Send `data` on a fresh connection and read until the server closes it; returns (status, body)."""
    with socket.create_connection(address(url), timeout=wait) as connection:
        connection.sendall(data)
        answer = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


def request(method, path, headers=b"", body=b""):
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode() + headers
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def openai_error(body):
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


@pytest.mark.parametrize("authorization, status", [
    (b"Bearer secret", 200),
    (b"bearer   secret  ", 200),         # ASCII spaces around the key are not part of it
    (b"Bearer secret\t", 200),
    (b"Bearer secret\xa0", 401),         # U+00A0 (Latin-1 byte): str.strip would drop it
    (b"Bearer secret\x85", 401),         # U+0085 likewise
    ("Bearer secret\u00a0".encode(), 401),  # the same in UTF-8
    ("Bearer secret\u2003".encode(), 401),
    (b"Bearer \xa0secret", 401),
    (b"Bearer secre", 401),
    (b"Bearer secrets", 401),
    (b"Bearer SECRET", 401),
    (b"Basic secret", 401),
    (b"Bearer", 401),
    (b"secret", 401),
    (None, 401),
])
def test_only_the_exact_key_passes(server, authorization, status):
    headers = b"" if authorization is None else b"Authorization: " + authorization + b"\r\n"
    got, _, body = raw(server.url, request("GET", "/v1/models", headers))
    assert got == status, body
    if status == 401:
        assert openai_error(body)["code"] == "invalid_api_key"


def test_405_names_the_allowed_methods(server):
    for method, path, allowed in [("GET", "/v1/completions", {"POST"}), ("DELETE", "/v1/models", {"GET"}),
                                  ("PUT", "/health", {"GET"})]:
        response = httpx.request(method, server.url + path, headers=AUTH, timeout=WAIT)
        assert response.status_code == 405
        assert allowed <= {m.strip() for m in response.headers["allow"].split(",")}, response.headers
        assert openai_error(response.content)["code"] == "method_not_allowed"


MALFORMED = [
    b"{",
    b"[]",
    b"null",
    b'"prompt"',
    b"\xff\xfe\x00{",                                        # not UTF-8
    b"[" * 100_000 + b"]" * 100_000,                           # deep nesting
    b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"prompt": "\\ud800"}',                                  # a lone surrogate
    b'{"prompt": "a", "stop": "\\udfff"}',
    b'{"prompt": "a", "temperature": NaN}',
    b'{"prompt": "a", "top_p": Infinity}',
    b'{"prompt": "a", "max_tokens": 1e400}',
    b'{"prompt": "a", "max_tokens": 99999999999999999999999}',
    b'{"prompt": "a", "top_k": -1}',
    b'{"prompt": "a", "top_k": 1.5}',
    b'{"prompt": "a", "top_p": "0.5"}',
    b'{"prompt": "a", "n": 1000000}',
    b'{"prompt": "a", "seed": -1}',
    b'{"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}',
    b'{"prompt": null}',
    b'{"prompt": {"a": 1}}',
    b'{"prompt": "a", "prompt": 3}',
    b'{"prompt": "a", "stream": "yes"}',
    json.dumps({"prompt": ["a"] * 10_000}).encode(),
]


def test_malformed_bodies_get_4xx_and_the_server_goes_on(server):
    for body in MALFORMED:
        status, _, answer = raw(server.url, request("POST", "/v1/completions", b"Authorization: Bearer secret\r\n"
                                                    b"Content-Type: application/json\r\n", body))
        assert 400 <= status < 500, (body[:60], answer[:200])
        openai_error(answer)
    huge = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'  # over the 1 MiB cap
    response = httpx.post(server.url + "/v1/completions", content=huge, headers=AUTH, timeout=WAIT)
    assert response.status_code == 413
    # A Content-Length far above the cap is refused before any body is read.
    status, _, _ = raw(server.url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n"
                                   b"Content-Length: 99999999999\r\nConnection: close\r\n\r\n{")
    assert status == 413
    assert server.health()["status"] == "ok"
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "It is", "max_tokens": 4}, headers=AUTH,
                    timeout=WAIT)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_distinct_sampling_values_compile_nothing_new(server, model, monkeypatch):
    # PyTorch: trace the step at once (under "auto" it is traced once the eager tokens pay for it, a
    # one-off that depends on time, not on the values).
    monkeypatch.setenv("KERAS_NANOGPT_TORCH_COMPILE", "trace")
    url = server.url + "/v1/completions"
    for body in ({"temperature": 0}, {"top_k": 3, "top_p": 0.5, "temperature": 0.7}):  # the two loops
        assert httpx.post(url, json={"prompt": "It is", "max_tokens": 4, **body}, headers=AUTH,
                          timeout=WAIT).status_code == 200
    compiled = model._kn_compiled
    traces, kept = compiled.traces, len(compiled.kept)
    slowest = 0.0
    for i in range(60):
        body = {"prompt": "It is", "max_tokens": 4, "temperature": round(0.05 + 0.031 * i, 4),
                "top_p": round(0.011 + 0.0163 * i, 4), "top_k": 1 + i, "seed": i if i % 2 else None}
        started = time.monotonic()
        response = httpx.post(url, json={k: v for k, v in body.items() if v is not None}, headers=AUTH,
                              timeout=WAIT)
        slowest = max(slowest, time.monotonic() - started)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
    assert compiled.traces == traces and len(compiled.kept) == kept, list(compiled.kept)
    assert slowest < 10, slowest  # no request waits for a compilation
    # The server's tokens for a seed are still `generate`'s (the server is idle now).
    body = {"prompt": "It is", "max_tokens": 10, "temperature": 0.9, "top_p": 0.8, "top_k": 20, "seed": 11}
    text = httpx.post(url, json=body, headers=AUTH, timeout=WAIT).json()["choices"][0]["text"]
    assert "It is" + text == model.generate("It is", max_new_tokens=10, temperature=0.9, top_p=0.8, top_k=20,
                                            seed=11)


def wait_for(condition, what):
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_flood_past_the_queue_is_refused_fast(server):
    url = server.url + "/v1/completions"
    long = {"prompt": "It is", "max_tokens": 100_000, "stream": True}

    def one(i):
        started = time.monotonic()
        response = httpx.post(url, json={"prompt": "He", "max_tokens": 3}, headers=AUTH, timeout=WAIT)
        return response.status_code, time.monotonic() - started

    pool = concurrent.futures.ThreadPoolExecutor(8)
    try:
        with httpx.Client(timeout=WAIT) as http, http.stream("POST", url, json=long, headers=AUTH) as first:
            lines = first.iter_lines()  # kept: a closed iterator would close the stream
            assert next(line for line in lines if line.startswith("data: "))  # it holds the batch
            flood = [pool.submit(one, i) for i in range(24)]
            wait_for(lambda: sum(f.done() for f in flood) >= 22, "the flood was not answered")
            refused = [f.result() for f in flood if f.done()]
            assert all(status == 429 for status, _ in refused), refused
            assert max(seconds for _, seconds in refused) < 10
            assert server.health()["waiting"] == 2
        # The first client left: the two waiting requests are answered.
        results = [f.result(timeout=WAIT) for f in flood]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    assert sorted(status for status, _ in results) == [200] * 2 + [429] * 22
    wait_for(lambda: server.health()["running"] == 0 and server.health()["waiting"] == 0, "rows left running")


def test_slow_and_vanishing_clients_do_not_hold_the_server(server):
    host_port = address(server.url)
    request_body = {"prompt": "It is", "max_tokens": 5}
    assert httpx.post(server.url + "/v1/completions", json=request_body, headers=AUTH,
                      timeout=WAIT).status_code == 200  # compiled: what follows times serving only
    slow = []
    try:
        for partial in (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",  # headers never finished
                        request("POST", "/v1/completions", b"Authorization: Bearer secret\r\n",
                                b'{"prompt": "It is", "max_tokens": 5}')[:-10]):  # body short of its length
            connection = socket.create_connection(host_port, timeout=SOCKET_SECONDS)
            connection.sendall(partial)
            slow.append(connection)
        started = time.monotonic()
        ok = httpx.post(server.url + "/v1/completions", json=request_body, headers=AUTH, timeout=WAIT)
        assert ok.status_code == 200 and time.monotonic() - started < 30
        # A streaming client that vanishes after its first token: its row ends and the batch is freed.
        for _ in range(3):
            connection = socket.create_connection(host_port, timeout=SOCKET_SECONDS)
            body = json.dumps({"prompt": "It is", "max_tokens": 100_000, "stream": True}).encode()
            connection.sendall(request("POST", "/v1/completions", b"Authorization: Bearer secret\r\n"
                                       b"Content-Type: application/json\r\n", body))
            received, deadline = b"", time.monotonic() + WAIT
            while b"data: " not in received:  # the headers may come alone, before the first token
                assert time.monotonic() < deadline
                received += connection.recv(65536)
            connection.close()
        wait_for(lambda: server.health()["running"] == 0 and server.health()["waiting"] == 0, "a row kept running")
    finally:
        for connection in slow:
            connection.close()
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "He", "max_tokens": 3}, headers=AUTH,
                      timeout=WAIT).status_code == 200


def test_sigterm_with_hanging_clients_exits_0(cli_server):
    line = cli_server.stdout.readline()
    assert line.startswith(f"serving {NAME} "), line + cli_server.stderr.read()
    url = line.split(" on ", 1)[1].split()[0]
    host_port = address(url)
    assert raw(url, request("GET", "/v1/models", b"Authorization: Bearer secret\xa0\r\n"))[0] == 401
    hanging = socket.create_connection(host_port, timeout=SOCKET_SECONDS)
    hanging.sendall(request("POST", "/v1/completions", b"Authorization: Bearer secret\r\n",
                            b'{"prompt": "It is", "max_tokens": 5}')[:-5])
    body = {"model": NAME, "prompt": "It is", "max_tokens": 100_000, "stream": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=WAIT) as response:
            events = (json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: "))
            assert "choices" in next(events)
            started = time.monotonic()
            cli_server.send_signal(signal.SIGTERM)
            rest = list(events)
        assert "error" in rest[-1] and "shutting down" in rest[-1]["error"]["message"]
        out, err = cli_server.communicate(timeout=WAIT)
        # uvicorn waits for the hanging client at most its graceful-shutdown timeout (10 s).
        assert cli_server.returncode == 0 and time.monotonic() - started < 30, err
        assert out.rstrip().endswith("stopped")
    finally:
        hanging.close()
