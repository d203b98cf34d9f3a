"""`POST /v1/chat/completions`, tested as its users use it: the official `openai` client's
`chat.completions.create` (streamed and not, n > 1, stop, seed, usage) and raw HTTP against a live server
on 127.0.0.1, hostile bodies answered with 400s in OpenAI's shape naming the field, and chats batched
beside completions through the one decode thread.

The model is a sharp one (large random weights, so greedy choices are never near-ties) with a context of
64: the default template's turns ("User: ...\\n\\nAssistant:") need more than the 16 of test_serve's model.
One server runs in a thread of this process for the whole module. The expected replies come from
`model.chat` where the model has it, and always from the contract it keeps: `model.generate` on
`kn.chat.render(model, messages)` with `kn.chat.stop_sequences(model)` before the request's stops. They are
computed while the server is idle (a model decodes for one caller at a time).
"""

import asyncio
import json
import time

import httpx
import keras
import numpy as np
import openai
import pytest
from conftest import WAIT, ThreadServer, make_sharp_model

import keras_nanogpt as kn
from keras_nanogpt import serve

NAME = "tiny-chat"
CONTEXT = 64
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is he?"}]


@pytest.fixture(scope="module")
def model(char_vectorizer):
    """A 2-layer, 32-wide char model with context 64 and large random weights."""
    return make_sharp_model(char_vectorizer, seed=3, context=CONTEXT)


@pytest.fixture(scope="module")
def server(model):
    """A 50 ms quiet period ends a gather, so a burst of test clients fills one batch."""
    running = ThreadServer(serve.create_app(model, name=NAME, max_tokens=300, batch_wait_ms=50))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=WAIT)


def reference(model, messages, max_tokens, stop=(), n=1, max_prompt=None, **settings):
    """The replies `model.chat` gives (its contract: generate on the rendered ids, the template's stops first)."""
    ids = kn.chat.render(model, messages, max_tokens=max_prompt)
    out = model.generate(np.stack([ids] * n), max_new_tokens=max_tokens,
                         stop=list(kn.chat.stop_sequences(model)) + list(stop), **settings)
    replies = [model.tokenizer.decode([int(i) for i in row[len(ids):]]) for row in out]
    if hasattr(type(model), "chat") and n == 1 and max_prompt is None:  # the chat work's model.chat
        assert model.chat(messages, max_new_tokens=max_tokens, stop=list(stop) or None, **settings) == replies[0]
    return replies, len(ids)


def sse(response):
    """The JSON bodies of a streamed response's events, up to [DONE] (which must come)."""
    bodies = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            if line == "data: [DONE]":
                return bodies
            bodies.append(json.loads(line[6:]))
    raise AssertionError(f"the stream ended without [DONE] after {bodies[-1:]}")


def post(server, body):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=WAIT)


# -- the generation hooks the server uses ----------------------------------------------------------

def test_id_rows_of_different_lengths_decode_as_each_alone_and_stream_text(model):
    rows = [kn.chat.render(model, [{"role": "user", "content": "Hi" + "!" * i}]) for i in (0, 3)]
    alone = [model.generate(ids[None], max_new_tokens=6, temperature=0)[0] for ids in rows]
    together = model.generate(rows, max_new_tokens=6, temperature=0)
    assert isinstance(together, list) and [t.tolist() for t in together] == [a.tolist() for a in alone]
    stream = model.stream(rows, max_new_tokens=6, temperature=0)
    pieces = list(stream)
    assert [np.concatenate([p[row] for p in pieces]).tolist() for row in (0, 1)] == [
        a[len(ids):].tolist() for a, ids in zip(alone, rows)]
    assert stream.text(1) == model.tokenizer.decode([int(i) for i in alone[1][len(rows[1]):]])


def test_models_say_which_chat_template(client, server, model):
    (card,) = client.models.list().data
    assert card.model_extra["has_chat_template"] is kn.chat.has_template(model) is False
    assert card.model_extra["chat_template"] == kn.chat.template_of(model).name
    assert httpx.get(server.url + f"/v1/models/{NAME}", timeout=WAIT).json()["chat_template"] == card.model_extra[
        "chat_template"]


def test_seeded_chat_is_what_model_chat_gives(client, model):
    (expected,), prompt_tokens = reference(model, MESSAGES, 20, temperature=0.9, top_k=30, seed=11)
    response = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=20, temperature=0.9,
                                              seed=11, extra_body={"top_k": 30})
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.index == 0
    assert choice.finish_reason == ("length" if response.usage.completion_tokens == 20 else "stop")
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-") and response.model == NAME
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens
    # max_completion_tokens is the newer name of the same limit; top_p too reaches the sampler.
    (expected,), _ = reference(model, MESSAGES, 12, temperature=1.2, top_p=0.8, seed=5)
    again = client.chat.completions.create(model=NAME, messages=MESSAGES, max_completion_tokens=12,
                                           temperature=1.2, top_p=0.8, seed=5)
    assert again.choices[0].message.content == expected


def test_streamed_deltas_role_first_then_content_then_finish_and_usage(client, server, model):
    arguments = dict(model=NAME, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=7)
    whole = client.chat.completions.create(**arguments)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                 **arguments))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    first, *middle, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].delta.content and c.choices[0].finish_reason is None for c in middle)
    assert "".join(c.choices[0].delta.content for c in middle) == whole.choices[0].message.content
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason
    assert finish.choices[0].delta.content is None and finish.choices[0].delta.role is None
    assert usage.choices == [] and usage.usage.model_dump() == {**whole.usage.model_dump()}
    assert all(c.usage is None for c in chunks[:-1])
    # The raw events: an empty delta on the finishing chunk, then [DONE].
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=WAIT,
                      json={**arguments, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse(response)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["delta"] == {} and events[-1]["choices"][0]["finish_reason"]
    assert "usage" not in events[-1]


def test_n_choices_streamed_and_not(client, model):
    expected, _ = reference(model, MESSAGES, 10, n=3, seed=3)
    response = client.chat.completions.create(model=NAME, messages=MESSAGES, n=3, max_tokens=10, seed=3)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.message.content for c in response.choices] == expected
    assert len(set(expected)) > 1
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, n=3, max_tokens=10, seed=3,
                                                 stream=True))
    for i in range(3):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        assert "".join(c.delta.content or "" for c in mine) == expected[i]


def test_stop_strings_end_the_reply(client, model):
    arguments = dict(model=NAME, messages=MESSAGES, max_tokens=40, temperature=0)
    free = client.chat.completions.create(**arguments).choices[0].message.content
    assert len(free) >= 14
    assert [free] == reference(model, MESSAGES, 40, temperature=0)[0]
    stop = free[12:14]
    (choice,) = client.chat.completions.create(stop=["\x00never", stop], **arguments).choices
    assert choice.message.content == free[:free.index(stop)] and choice.finish_reason == "stop"
    streamed = list(client.chat.completions.create(stop=stop, stream=True, **arguments))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == choice.message.content
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_a_long_conversation_is_cut_from_the_left_keeping_the_system_message(client, model):
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {'abcdefgh'[i]}."} for i in range(8)]
    messages = [MESSAGES[0], *turns]
    full = kn.chat.render(model, messages)
    assert full.size > CONTEXT  # longer than the context: the server renders with max_tokens = 64
    (expected,), prompt_tokens = reference(model, messages, 10, seed=2, max_prompt=CONTEXT)
    response = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, seed=2)
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens == prompt_tokens <= CONTEXT


def test_content_as_text_parts_is_the_same_conversation(client):
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "Who is "},
                                                         {"type": "text", "text": "he?"}]}]
    arguments = dict(model=NAME, max_tokens=8, seed=4)
    assert (client.chat.completions.create(messages=parts, **arguments).choices[0].message.content
            == client.chat.completions.create(messages=MESSAGES, **arguments).choices[0].message.content)


# -- bad input: 400 in OpenAI's shape naming the field, and the server goes on ---------------------------

USER = [{"role": "user", "content": "Hi"}]
BAD = [  # (body, param, a fragment of the message)
    ({}, "messages", "non-empty list"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": {"role": "user", "content": "Hi"}}, "messages", "non-empty list"),
    ({"messages": ["Hi"]}, "messages[0]", "messages[0]"),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, "messages[0].role", "must be one of"),
    ({"messages": [USER[0], {"content": "Hi"}]}, "messages[1].role", "role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content", "string or a list of text parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content", "string or a list of text parts"),
    ({"messages": [{"role": "user", "content": "x" * (CONTEXT + 10)}]}, "messages", "messages"),
    ({"messages": [{"role": "system", "content": "x" * CONTEXT}, *USER]}, "messages", "messages"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"messages": USER, "tool_choice": "auto"}, "tool_choice", "not supported"),
    ({"messages": USER, "functions": [{"name": "f"}]}, "functions", "not supported"),
    ({"messages": USER, "function_call": "auto"}, "function_call", "not supported"),
    ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({"messages": USER, "logprobs": True}, "logprobs", "not supported"),
    ({"messages": USER, "top_logprobs": 3}, "top_logprobs", "not supported"),
    ({"messages": USER, "logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    ({"messages": USER, "audio": {"voice": "alloy"}}, "audio", "not supported"),
    ({"messages": USER, "modalities": ["text", "audio"]}, "modalities", "not supported"),
    ({"messages": USER, "prediction": {"type": "content", "content": "x"}}, "prediction", "not supported"),
    ({"messages": USER, "frobnicate": 1}, "frobnicate", "Unrecognized request argument"),
    ({"messages": USER, "prompt": "Hi"}, "prompt", "Unrecognized request argument"),
    ({"messages": USER, "max_tokens": 301}, "max_tokens", "--max-tokens"),
    ({"messages": USER, "max_completion_tokens": -1}, "max_completion_tokens", "integer in [0, "),
    ({"messages": USER, "max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "disagree"),
    ({"messages": USER, "temperature": 3}, "temperature", "[0.0, 2.0]"),
    ({"messages": USER, "n": 0}, "n", "integer in [1, "),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", "1 to 4"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options", "only allowed"),
    ({"messages": [{"role": "user", "content": "a\udfff"}]}, "messages[0].content", "not valid Unicode"),
]


@pytest.mark.parametrize("body, param, fragment", BAD, ids=[f"{i}-{p}" for i, (_, p, _) in enumerate(BAD)])
def test_bad_input_gets_an_openai_error_and_the_server_goes_on(server, body, param, fragment):
    content = json.dumps(body).encode("utf-8", "surrogatepass")
    response = httpx.post(server.url + "/v1/chat/completions", content=content, timeout=WAIT,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert (error["param"] == param or error["param"].startswith(param + ".")) and fragment in error["message"], error
    fine = post(server, {"messages": USER, "max_tokens": 2, "temperature": 0})
    assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] == 2


def test_errors_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="messages\\[0\\].role") as caught:
        client.chat.completions.create(model=NAME, messages=[{"role": "robot", "content": "Hi"}])
    assert caught.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError, match="tools") as caught:
        client.chat.completions.create(model=NAME, messages=USER, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert caught.value.param == "tools"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=USER)
    # Neutral values of the fields it does not do change nothing, so they are taken.
    taken = client.chat.completions.create(model=NAME, messages=USER, max_tokens=3, logprobs=False,
                                           presence_penalty=0, response_format={"type": "text"})
    assert taken.usage.completion_tokens == 3


def test_api_key_method_and_a_vanishing_client(server, model):
    keyed = ThreadServer(serve.create_app(model, name=NAME, api_key="secret", max_tokens=2000))
    try:
        body = {"messages": USER, "max_tokens": 3}
        refused = httpx.post(keyed.url + "/v1/chat/completions", json=body, timeout=WAIT)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=keyed.url + "/v1", api_key="secret", max_retries=0, timeout=WAIT)
        assert client.chat.completions.create(model=NAME, messages=USER, max_tokens=3).usage.completion_tokens == 3
        # A client that leaves mid-stream frees its row at the next token.
        with httpx.stream("POST", keyed.url + "/v1/chat/completions", timeout=WAIT,
                          headers={"Authorization": "Bearer secret"},
                          json={"messages": USER, "max_tokens": 2000, "stream": True}) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            next(lines), next(lines)
            assert keyed.health()["running"] == 1
        deadline = time.monotonic() + WAIT
        while keyed.health()["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        keyed.stop()
    wrong = httpx.get(server.url + "/v1/chat/completions", timeout=WAIT)
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"]


# -- chats beside completions on the one decode thread -----------------------------------------------

def test_chats_and_completions_share_the_decode_thread_and_keep_their_own_tokens(server, model):
    """Greedy chats of different lengths (one ragged batch of ids) and completions at once: each gets the
    reply it gets alone; a seeded chat in that company gets model.chat's."""
    conversations = [[{"role": "user", "content": "Hi" + "!" * i}] for i in range(6)]
    expected = [reference(model, m, 8 + i, temperature=0)[0][0] for i, m in enumerate(conversations)]
    prompts = ["It is", "Mr. Darcy said"]
    completions = model.generate(prompts, max_new_tokens=10, temperature=0)
    (seeded,), _ = reference(model, MESSAGES, 12, temperature=1.0, seed=21)
    before = server.health()

    async def chat(http, messages, **extra):
        response = await http.post(server.url + "/v1/chat/completions", json={"messages": messages, **extra})
        return response.json()["choices"][0]["message"]["content"]

    async def complete(http, prompt):
        response = await http.post(server.url + "/v1/completions",
                                   json={"prompt": prompt, "max_tokens": 10, "temperature": 0})
        return prompt + response.json()["choices"][0]["text"]

    async def everyone():
        async with httpx.AsyncClient(timeout=WAIT, limits=httpx.Limits(max_connections=16)) as http:
            work = [chat(http, m, max_tokens=8 + i, temperature=0) for i, m in enumerate(conversations)]
            work += [complete(http, p) for p in prompts]
            work += [chat(http, MESSAGES, max_tokens=12, seed=21)]
            return await asyncio.wait_for(asyncio.gather(*work), WAIT)

    results = asyncio.run(everyone())
    assert results[:6] == expected
    assert results[6:8] == completions
    assert results[8] == seeded
    after = server.health()
    assert after["rows"] - before["rows"] == 9
    assert after["batches"] - before["batches"] <= 4  # the greedy chats shared a batch (and so did completions)
    assert after["running"] == 0 and after["waiting"] == 0


def test_a_fine_tuned_model_answers_in_its_own_template_streamed_and_not(model):
    """A model given nanochat's turn tokens and fine-tuned a few steps: the client's replies, streamed and
    not, are `model.chat`'s with the same seed, ending at its `<|assistant_end|>`."""
    keras.utils.set_random_seed(5)
    tuned = kn.chat.add_chat_template(model)
    tuned.compile()
    conversations = [[{"role": "user", "content": f"Who is {name}?"}, {"role": "assistant", "content": name}]
                     for name in ("Jane", "Lydia", "Kitty", "Mary")]
    tuned.fit(kn.data.chat_dataset(conversations, tuned, CONTEXT, 4, seed=0), epochs=2, verbose=0)
    assert kn.chat.has_template(tuned) and kn.chat.template_of(tuned).name == "nanochat"
    settings = dict(max_new_tokens=12, temperature=0.9, top_k=20, seed=4)
    expected = tuned.chat(MESSAGES, **settings)
    assert tuned.chat(MESSAGES, max_new_tokens=40, temperature=0) == reference(tuned, MESSAGES, 40, temperature=0)[0][0]
    running = ThreadServer(serve.create_app(tuned, name=NAME, max_tokens=64))
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=WAIT)
        (card,) = client.models.list().data
        assert card.model_extra["has_chat_template"] is True and card.model_extra["chat_template"] == "nanochat"
        arguments = dict(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0.9, seed=4,
                         extra_body={"top_k": 20})
        whole = client.chat.completions.create(**arguments)
        assert whole.choices[0].message.content == expected
        assert whole.usage.prompt_tokens == len(kn.chat.render(tuned, MESSAGES))
        streamed = list(client.chat.completions.create(stream=True, **arguments))
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
        assert streamed[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    finally:
        running.stop()
