"""The playground in a real browser: Debian's headless Chromium, driven by Playwright, against a live
server on 127.0.0.1. It types a prompt, presses Generate, sees the text stream in, then stops a long
generation with Stop; a screenshot is saved as a test artefact (under $TEST_ARTEFACTS when set, else
pytest's temporary folder; the path is printed).

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
