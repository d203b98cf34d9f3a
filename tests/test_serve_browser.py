"""The playground in a real browser: Debian's headless Chromium, driven by Playwright, against a live
server on 127.0.0.1. It types a prompt, presses Generate, sees the text stream in, then stops a long
generation with Stop; in chat mode it sends a message, sees the assistant's turn stream in, sends a
second turn (the page sends the whole conversation, a typed stop string cuts the reply) and clears it.
Screenshots are saved as test artefacts (under $TEST_ARTEFACTS when set, else pytest's temporary folder;
the first one's path is printed).

Chromium is the distribution's (`/usr/bin/chromium`; `.ci/run` and `make test` install it when missing);
Playwright drives it with `executable_path`, never a browser of its own.
"""

import os
import re
import shutil
import time

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright
from conftest import CONTEXT, WAIT, ThreadServer, make_sharp_model

import keras_nanogpt as kn
from keras_nanogpt import serve

NAME = "tiny"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def served(char_vectorizer):
    model = make_sharp_model(char_vectorizer)
    expected = model.generate("It is a truth", max_new_tokens=60, temperature=0.8, top_k=40, seed=7)
    running = ThreadServer(serve.create_app(model, name=NAME, max_tokens=2000))
    yield running, expected, model.count_params()
    running.stop()


@pytest.fixture(scope="module")
def page():
    assert os.access(CHROMIUM, os.X_OK), (f"no Chromium at {CHROMIUM}: install Debian's chromium package "
                                          f"(apt-get install chromium), as .ci/run does")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield browser.new_page(viewport={"width": 1100, "height": 640})
        finally:
            browser.close()


def completion(page):
    return page.evaluate("document.getElementById('completion').textContent")


def test_playground_streams_the_text_in_and_stops(served, page, tmp_path_factory):
    server, expected, parameters = served
    # Playwright's expect() polls without evaluating strings in the page, which its Content-Security-
    # Policy (no 'unsafe-eval') forbids; page.evaluate goes through the DevTools protocol instead.
    page.goto(server.url + "/")
    expect(page.locator("#model")).to_contain_text(
        f"{NAME} \u00b7 {parameters / 1e6:.2f} M parameters \u00b7 context {CONTEXT}", timeout=WAIT * 1000)
    page.fill("#prompt", "It is a truth")
    page.fill("#max_tokens", "60")
    page.fill("#seed", "7")  # temperature 0.8 and top-k 40 are the page's defaults
    page.evaluate("""window.updates = 0;
        new MutationObserver((records) => { window.updates += records.length; }).observe(
            document.getElementById('completion'), {childList: true, characterData: true, subtree: true});""")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("length", timeout=WAIT * 1000)
    assert "It is a truth" + completion(page) == expected
    assert page.evaluate("window.updates") >= 30  # the page wrote it piece by piece
    folder = os.environ.get("TEST_ARTEFACTS") or str(tmp_path_factory.mktemp("artefacts"))
    os.makedirs(folder, exist_ok=True)
    screenshot = os.path.join(folder, "playground.png")
    page.screenshot(path=screenshot)
    print(f"playground screenshot: {screenshot}")
    assert open(screenshot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    page.fill("#max_tokens", "2000")
    page.fill("#seed", "")
    page.click("#generate")
    expect(page.locator("#completion")).to_have_text(re.compile(".{5}", re.DOTALL), timeout=WAIT * 1000)
    assert page.is_disabled("#generate") and page.is_enabled("#stop")  # text shows while it is being made
    page.click("#stop")
    expect(page.locator("#status")).to_contain_text("stopped", timeout=WAIT * 1000)
    stopped_at = len(completion(page))
    assert 5 <= stopped_at < 2000
    deadline = time.monotonic() + WAIT
    while httpx.get(server.url + "/health", timeout=WAIT).json()["running"]:  # the server stopped it too
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert len(completion(page)) == stopped_at
    assert not page.is_disabled("#generate") and page.is_disabled("#stop")


# -- chat mode -------------------------------------------------------------------------------------------

CHAT_CONTEXT = 128  # two turns of the default chat template, whole: more than make_sharp_model's 16


@pytest.fixture(scope="module")
def chat_served(char_vectorizer):
    """A context-128 model (large random weights) behind its own server, for the chat template's turns."""
    model = make_sharp_model(char_vectorizer, seed=5, context=CHAT_CONTEXT)
    running = ThreadServer(serve.create_app(model, name=NAME, max_tokens=2000))
    yield running, model
    running.stop()


def reply(model, messages, **settings):
    """What `model.chat` replies (its contract: generate on the rendered ids, the template's stops)."""
    ids = kn.chat.render(model, messages, max_tokens=CHAT_CONTEXT)  # as the server renders
    out = model.generate(ids[None], stop=list(kn.chat.stop_sequences(model)), **settings)
    return model.tokenizer.decode([int(i) for i in out[0, len(ids):]])


def turns(page):
    return page.evaluate("""[...document.querySelectorAll('#turns .turn')].map(
        (turn) => [turn.querySelector('.role').textContent, turn.querySelector('.content').textContent])""")


def test_playground_chat_mode_streams_turns_and_clears(chat_served, page, tmp_path_factory):
    server, model = chat_served
    page.goto(server.url + "/")
    expect(page.locator("#model")).to_contain_text(f"context {CHAT_CONTEXT}", timeout=WAIT * 1000)
    page.check("#mode-chat")
    assert page.is_visible("#message") and not page.is_visible("#prompt") and page.is_visible("#clear")
    assert page.inner_text("#generate") == "Send"
    page.fill("#max_tokens", "30")
    page.fill("#seed", "5")  # temperature 0.8 and top-k 40 are the page's defaults
    settings = dict(max_new_tokens=30, temperature=0.8, top_k=40, seed=5)
    page.evaluate("""window.updates = 0;
        new MutationObserver((records) => { window.updates += records.length; }).observe(
            document.getElementById('turns'), {childList: true, characterData: true, subtree: true});""")
    finished = re.compile(r"\u00b7 (length|stop)$")

    page.fill("#message", "Who is he?")
    page.click("#generate")
    expect(page.locator("#status")).to_have_text(finished, timeout=WAIT * 1000)
    first = [{"role": "user", "content": "Who is he?"}]
    (user, said), (assistant, answer) = turns(page)
    assert (user, said, assistant) == ("user", "Who is he?", "assistant")
    assert answer == reply(model, first, **settings)
    assert page.evaluate("window.updates") >= 10  # the reply came in piece by piece
    assert page.input_value("#message") == ""

    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And she?"}]
    free = reply(model, second, **settings)  # the page sends the whole conversation
    cut = next(i for i in range(6, len(free) - 1)  # a stop string that first appears at i, typed as is
               if free.index(free[i:i + 2]) == i and not {"\n", "\\"} & set(free[i:i + 2]))
    stop = free[cut:cut + 2]
    page.fill("#stop_string", stop)
    page.fill("#message", "And she?")
    page.click("#generate")
    expect(page.locator("#status")).to_have_text(re.compile(r"\u00b7 stop$"), timeout=WAIT * 1000)
    assert [role for role, _ in turns(page)] == ["user", "assistant", "user", "assistant"]
    assert turns(page)[3][1] == free[:cut]  # cut at the stop string
    folder = os.environ.get("TEST_ARTEFACTS") or str(tmp_path_factory.mktemp("artefacts"))
    os.makedirs(folder, exist_ok=True)
    page.screenshot(path=os.path.join(folder, "playground_chat.png"))

    page.click("#clear")
    assert turns(page) == []
    page.check("#mode-completion")
    assert page.is_visible("#prompt") and not page.is_visible("#message")
