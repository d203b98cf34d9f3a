"""`keras-nanogpt serve`, tested as its users use it: the official `openai` client and raw HTTP against
live servers on 127.0.0.1, 32 concurrent streaming clients, and the console script stopped by SIGTERM.

The model is test_generation's sharp model (2 layers, width 32, context 16, the characters of 20,000
characters of Pride and Prejudice, large random weights), so that greedy choices are never near-ties
and a batch's greedy text can be compared with `generate`'s exactly. Two servers run in threads of this process
(uvicorn serving `create_app`): the main one, and a small one (one row per batch, one waiting
request, an API key, a 2,000-byte body cap) for the limits. The console script's server starts in a
subprocess when the module starts, so its Keras import overlaps with the other tests. Every request
goes to 127.0.0.1 and every wait is bounded.

Compiling a decode loop costs seconds on TensorFlow, once per model, sampler, batch size and window,
so the tests keep to a few shapes: with a context of 16 every request has the one window of 16 slots,
and both servers serve the same model object that the tests call `generate` on for the expected
texts. Only one of them decodes at a time (a model serves one server), and `generate` is called only
while both are idle: the tests that leave a server decoding come after the last such call.
"""

import asyncio
import json
import signal
import socket
import threading
import time

import httpx
import openai
import pytest
from conftest import CONTEXT, WAIT, ThreadServer, make_sharp_model, start_cli_server, stop_process

import keras_nanogpt as kn
from keras_nanogpt import cli, generation, serve

NAME = "tiny"
CLIENTS = 32


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, char_vectorizer):
    path = tmp_path_factory.mktemp("serve") / f"{NAME}.keras"
    make_sharp_model(char_vectorizer).save(path)
    return path


@pytest.fixture(scope="module")
def reference(model_file):
    """The saved model, loaded apart from the servers' copies: what `generate` gives offline."""
    return kn.load_model(model_file)


@pytest.fixture(scope="module")
def cli_server(model_file):
    """`keras-nanogpt serve` in a subprocess on a free port, started when the module starts."""
    process = start_cli_server(model_file)
    yield process
    stop_process(process, WAIT)


@pytest.fixture(scope="module", autouse=True)
def start_cli_server_first(cli_server):
    """Start the console script's server before the other tests (its import overlaps with them)."""


@pytest.fixture(scope="module")
def server(reference):
    """The main server; a 50 ms quiet period ends a gather, so a burst of test clients fills one batch."""
    running = ThreadServer(serve.create_app(reference, name=NAME, max_tokens=400, batch_wait_ms=50))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def small_server(reference):
    app = serve.create_app(reference, name=NAME, api_key="secret", max_batch=1, max_queue=1, max_tokens=2000,
                           max_body_bytes=2000)
    running = ThreadServer(app)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=WAIT)


def sse(response):
    """The JSON bodies of a streamed response's events, up to [DONE] (which must come)."""
    bodies = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            if line == "data: [DONE]":
                return bodies
            bodies.append(json.loads(line[6:]))
    raise AssertionError(f"the stream ended without [DONE] after {bodies[-1:]}")


# -- the generation hooks the server uses ----------------------------------------------------------

def test_max_new_tokens_per_row_and_cancelling_a_row(reference):
    prompts = ["It is", "Mr. Darcy"]
    together = reference.generate(prompts, max_new_tokens=12, seed=4)
    short = reference.generate(prompts, max_new_tokens=[5, 12], seed=4)
    assert short == [together[0][:len("It is") + 5], together[1]]  # same draws, row 0 cut at 5
    stream = reference.stream(prompts, max_new_tokens=12, seed=4)
    assert isinstance(stream, generation.Stream)
    pieces = [next(stream) for _ in range(3)]
    stream.cancel(0)
    pieces += list(stream)
    assert "It is" + "".join(p[0] for p in pieces) == together[0][:len("It is") + 3]
    assert "Mr. Darcy" + "".join(p[1] for p in pieces) == together[1]  # the other row goes on
    assert [stream.finish_reason(0), stream.finish_reason(1)] == ["cancelled", "length"]
    assert [stream.token_count(0), stream.token_count(1)] == [3, 12]
    with pytest.raises(ValueError, match="max_new_tokens"):
        reference.generate(prompts, max_new_tokens=[5])
    with pytest.raises(ValueError, match="max_new_tokens"):
        reference.generate(prompts, max_new_tokens=[5, -1])


# -- the API through the official client --------------------------------------------------------------

def test_models_and_health(client, server, reference):
    (card,) = client.models.list().data
    assert card.id == NAME and card.object == "model"
    assert card.model_extra["parameters"] == reference.count_params()
    assert card.model_extra["context_length"] == CONTEXT
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = server.health()
    assert health["status"] == "ok" and health["model"] == NAME and health["auth"] is False


def test_seeded_completion_is_what_generate_gives(client, reference):
    response = client.completions.create(model=NAME, prompt="It is a", max_tokens=20, temperature=0.9,
                                         seed=11)
    (choice,) = response.choices
    assert "It is a" + choice.text == reference.generate("It is a", max_new_tokens=20, temperature=0.9,
                                                         seed=11)
    assert choice.finish_reason == "length" and choice.index == 0
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (7, 20)
    assert response.usage.total_tokens == 27 and response.model == NAME
    other = client.completions.create(model=NAME, prompt="It is a", max_tokens=20, temperature=0.9, seed=12)
    assert other.choices[0].text != choice.text


def test_streamed_chunks_join_to_the_same_text(client):
    arguments = dict(model=NAME, prompt="She said", max_tokens=24, temperature=1.0, seed=5)
    whole = client.completions.create(**arguments).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **arguments))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == whole
    assert len(texts) == 24  # one chunk per token (a char vocabulary: a token is a character)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_list_of_prompts_n_choices_and_echo(client, reference):
    prompts = ["It is", "Mr. B"]
    response = client.completions.create(model=NAME, prompt=prompts, max_tokens=12, seed=3, echo=True)
    texts = [c.text for c in response.choices]
    assert [c.index for c in response.choices] == [0, 1]
    assert texts == reference.generate(prompts, max_new_tokens=12, seed=3)
    assert response.usage.prompt_tokens == 10 and response.usage.completion_tokens == 24
    streamed = list(client.completions.create(model=NAME, prompt=prompts, max_tokens=12, seed=3, echo=True,
                                              stream=True))
    assert ["".join(c.choices[0].text for c in streamed if c.choices[0].index == i) for i in (0, 1)] == texts
    twice = client.completions.create(model=NAME, prompt="It is", n=2, max_tokens=12, seed=3)
    assert ["It is" + c.text for c in twice.choices] == reference.generate(["It is"] * 2, max_new_tokens=12,
                                                                           seed=3)
    assert twice.choices[0].text != twice.choices[1].text


def test_stop_strings_end_the_text(client):
    arguments = dict(model=NAME, prompt="It is", max_tokens=40, temperature=0)
    free = client.completions.create(**arguments).choices[0].text
    stop = free[12:14]
    (choice,) = client.completions.create(stop=["\x00never", stop], **arguments).choices
    assert choice.text == free[:free.index(stop)] and choice.finish_reason == "stop"
    streamed = list(client.completions.create(stop=stop, stream=True, **arguments))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_top_k_extension(client):
    greedy = client.completions.create(model=NAME, prompt="It is", max_tokens=15, temperature=0).choices[0].text
    top_1 = client.completions.create(model=NAME, prompt="It is", max_tokens=15, temperature=1.5,
                                      extra_body={"top_k": 1}).choices[0].text
    assert top_1 == greedy


def test_unknown_characters_are_served_with_the_warning(server):
    response = httpx.post(server.url + "/v1/completions", json={"prompt": "It is \u03a9", "max_tokens": 12,
                                                                "temperature": 0}, timeout=WAIT)
    assert response.status_code == 200
    body = response.json()
    assert len(body["choices"][0]["text"]) == 12
    assert any("never seen in training" in w and "\u03a9" in w for w in body["warnings"])


def test_an_unexpected_error_is_a_500_and_the_server_goes_on(server, monkeypatch):
    encode = kn.tokenizers.Tokenizer.encode

    def failing(tokenizer, text):
        if text == "BOOM":
            raise RuntimeError("the tokenizer broke")
        return encode(tokenizer, text)

    monkeypatch.setattr(kn.tokenizers.Tokenizer, "encode", failing)
    response = httpx.post(server.url + "/v1/completions", json={"prompt": "BOOM"}, timeout=WAIT)
    assert response.status_code == 500 and "the tokenizer broke" in response.json()["error"]["message"]
    fine = httpx.post(server.url + "/v1/completions", json={"prompt": "It is", "max_tokens": 12,
                                                            "temperature": 0}, timeout=WAIT)
    assert fine.status_code == 200 and len(fine.json()["choices"][0]["text"]) == 12


# -- bad input -----------------------------------------------------------------------------------

BAD = [  # (body, status, param, a fragment of the message)
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"prompt": "a", "max_tokens": 5, "frobnicate": 1}, 400, "frobnicate", "Unrecognized request argument"),
    ({"max_tokens": 5}, 400, "prompt", "required"),
    ({"prompt": [1, 2, 3]}, 400, "prompt", "token ids are not taken"),
    ({"prompt": "a", "max_tokens": "10"}, 400, "max_tokens", "integer"),
    ({"prompt": "a", "max_tokens": 401}, 400, "max_tokens", "--max-tokens"),
    ({"prompt": "a", "temperature": True}, 400, "temperature", "number"),
    ({"prompt": "a", "temperature": 2.5}, 400, "temperature", "[0.0, 2.0]"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p", "(0.0, 1.0]"),
    ({"prompt": "a", "top_k": 0}, 400, "top_k", "integer >= 1"),
    ({"prompt": "a", "n": 0}, 400, "n", "integer in [1, "),
    ({"prompt": ["a"] * 20, "n": 2}, 400, "n", "--max-batch"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream", "true or false"),
    ({"prompt": "a", "stop": [""]}, 400, "stop", "non-empty string"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "1 to 4"),
    ({"prompt": "a", "seed": -1}, 400, "seed", "integer in [0, "),
    ({"prompt": "a", "logprobs": 3}, 400, "logprobs", "not supported"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed"),
    ({"prompt": "x" * 17}, 400, "prompt", "17 tokens long"),
    ({"prompt": ["ok", ""]}, 400, "prompt", "prompt[1]` holds no tokens"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model", "'gpt-4' does not exist"),
    (b'{"prompt": ' + b"[" * 10000 + b"]" * 10000 + b"}", 400, None, "nests its JSON too deeply"),
    (b'{"prompt": "a", "stop": "\\ud800"}', 400, "stop", "not valid Unicode"),
    (b'{"prompt": "a\\udfff"}', 400, "prompt", "not valid Unicode"),
]


@pytest.mark.parametrize("body, status, param, fragment", BAD, ids=[f"{s}-{p}-{i}" for i, (_, s, p, _) in
                                                                     enumerate(BAD)])
def test_bad_input_gets_an_openai_error(server, body, status, param, fragment):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + "/v1/completions", content=content, timeout=WAIT,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_errors_through_the_client_and_other_routes(client, server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="a", max_tokens=10_000)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="a")
    assert httpx.get(server.url + "/v1/nothing", timeout=WAIT).json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/v1/completions", timeout=WAIT).status_code == 405


def test_api_key_and_body_cap(small_server):
    url = small_server.url
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.post(url + "/v1/completions", json={"prompt": "a"}, timeout=WAIT).status_code == 401
    keyed = openai.OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0, timeout=WAIT)
    assert keyed.completions.create(model=NAME, prompt="It is", max_tokens=12).usage.completion_tokens == 12
    assert small_server.health()["auth"] is True  # /health needs no key
    big = {"prompt": "a" * 3000}
    response = httpx.post(url + "/v1/completions", json=big, headers={"Authorization": "Bearer secret"},
                          timeout=WAIT)
    assert response.status_code == 413 and "--max-body-bytes" in response.json()["error"]["message"]

    def chunks():  # no Content-Length: the cap holds while the body is read
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"a" * 100
        yield b'"}'

    response = httpx.post(url + "/v1/completions", content=chunks(), headers={"Authorization": "Bearer secret"},
                          timeout=WAIT)
    assert response.status_code == 413


def test_full_queue_answers_429_and_a_disconnect_frees_the_batch(small_server):
    url, headers = small_server.url + "/v1/completions", {"Authorization": "Bearer secret"}
    long = {"prompt": "It is", "max_tokens": 2000, "stream": True}
    results = {}

    def second():
        with httpx.stream("POST", url, json={**long, "max_tokens": 12}, headers=headers, timeout=WAIT) as response:
            results["second"] = (response.status_code, sse(response))

    with httpx.Client(timeout=WAIT) as http, http.stream("POST", url, json=long, headers=headers) as first:
        lines = first.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # the first request streams
        waiting = threading.Thread(target=second)
        waiting.start()
        deadline = time.monotonic() + WAIT
        while small_server.health()["waiting"] < 1:  # the second one waits: the batch holds one row
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = time.monotonic()
        refused = httpx.post(url, json={**long, "stream": False}, headers=headers, timeout=WAIT)
        assert refused.status_code == 429 and time.monotonic() - started < 10  # answered, not held
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert results == {}  # the second one still waits behind the first
    # Leaving the block disconnected the first client, long before its 2,000 tokens.
    waiting.join(WAIT)
    status, chunks = results["second"]
    assert status == 200 and "".join(c["choices"][0]["text"] for c in chunks) != ""
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert small_server.health()["running"] == 0


def test_playground_page_is_one_offline_page(server):
    response = httpx.get(server.url + "/", timeout=WAIT)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    page = response.text
    assert "/v1/completions" in page and 'id="stop"' in page
    assert "http://" not in page and "https://" not in page and "src=" not in page  # nothing to fetch


# -- concurrency -----------------------------------------------------------------------------------

def test_seeded_requests_run_alone_and_give_the_same_tokens_in_any_company(server, reference):
    seeded = {"prompt": "It is", "max_tokens": 12, "temperature": 1.0, "seed": 21}
    alone = reference.generate("It is", max_new_tokens=12, temperature=1.0, seed=21)[len("It is"):]

    async def post(http, body):
        response = await http.post(server.url + "/v1/completions", json=body)
        return response.json()["choices"][0]["text"]

    async def together():
        async with httpx.AsyncClient(timeout=WAIT) as http:
            bodies = [seeded, {**seeded, "seed": None}, {**seeded, "seed": None, "prompt": "She said"}, seeded]
            return await asyncio.wait_for(asyncio.gather(*(post(http, b) for b in bodies)), WAIT)

    texts = asyncio.run(together())
    assert texts[0] == texts[3] == alone


def test_concurrent_streaming_clients_share_batches_and_keep_their_own_tokens(server, reference, small_text):
    """32 streaming clients at once, each with its own prompt and length; 4 leave after 3 tokens."""
    prompts = [small_text[100 + 37 * i:100 + 37 * i + 5 + i % 6] for i in range(CLIENTS)]
    lengths = [12 + i % 7 for i in range(CLIENTS)]
    leaving = {3, 10, 17, 24}
    expected = reference.generate(prompts, max_new_tokens=lengths, temperature=0)
    before = server.health()

    async def one(http, i):
        body = {"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0, "echo": True, "stream": True}
        chunks = []
        async with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    return chunks
                if line.startswith("data: "):
                    chunks.append(json.loads(line[6:]))
                    if i in leaving and len(chunks) == 4:  # the echo and 3 tokens
                        return chunks  # leaving the block closes the connection
        raise AssertionError(f"client {i}'s stream ended without [DONE]")

    async def everyone():
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(timeout=WAIT, limits=limits) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(CLIENTS))), WAIT)

    results = asyncio.run(everyone())
    for i, chunks in enumerate(results):
        assert len({c["id"] for c in chunks}) == 1 and {c["choices"][0]["index"] for c in chunks} == {0}
        texts = [c["choices"][0]["text"] for c in chunks]
        assert texts[0] == prompts[i]  # the echo
        if i in leaving:
            assert "".join(texts) == expected[i][:len(prompts[i]) + 3]
            continue
        assert "".join(texts) == expected[i]  # its own tokens, none lost, none of another client's
        assert len([t for t in texts[1:] if t]) == lengths[i]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    after = server.health()
    assert after["rows"] - before["rows"] == CLIENTS
    assert after["batches"] - before["batches"] <= 4  # they arrived together, so they shared batches
    assert after["running"] == 0 and after["waiting"] == 0


def test_health_answers_while_a_long_request_streams(server):
    body = {"prompt": "It is", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=WAIT) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        next(lines)
        started = time.monotonic()
        health = server.health()
        elapsed = time.monotonic() - started
        assert health["running"] == 1 and elapsed < 2.0, (health, elapsed)
        assert next(lines)  # still streaming
    deadline = time.monotonic() + WAIT
    while server.health()["running"]:  # the disconnect ended its row
        assert time.monotonic() < deadline
        time.sleep(0.02)


# -- the console script ------------------------------------------------------------------------------

def test_cli_serve_refuses_bad_arguments(model_file, capsys):
    assert cli.main(["serve", "/no/such/model.keras", "--port", "0"]) == 2
    assert "/no/such/model.keras" in capsys.readouterr().err
    assert cli.main(["serve", str(model_file), "--max-batch", "0"]) == 2
    assert "`max_batch`" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        assert cli.main(["serve", str(model_file), "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_cli_serve_ends_streams_with_an_error_on_sigterm_and_exits_0(cli_server):
    line = cli_server.stdout.readline()  # "serving tiny (N parameters) on http://127.0.0.1:PORT ..."
    assert line.startswith(f"serving {NAME} "), line + cli_server.stderr.read()
    url = line.split(" on ", 1)[1].split()[0]
    assert httpx.get(url + "/health", timeout=WAIT).json()["status"] == "ok"
    body = {"model": NAME, "prompt": "It is", "max_tokens": 500, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=WAIT) as response:
        events = (json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: "))
        assert "choices" in next(events)
        cli_server.send_signal(signal.SIGTERM)
        rest = list(events)
    assert "error" in rest[-1] and "shutting down" in rest[-1]["error"]["message"]
    assert all("choices" in event for event in rest[:-1])
    out, err = cli_server.communicate(timeout=WAIT)
    assert cli_server.returncode == 0, err
    assert "shutting down" in out and out.rstrip().endswith("stopped")
