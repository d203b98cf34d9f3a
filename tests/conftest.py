"""Test set-up: a private KERAS_HOME seeded with the corpora, quiet logs, shared fixtures and helpers.

Test modules import helpers from here only, never from one another.

One pytest process per backend: set KERAS_BACKEND before running pytest.
"""

import atexit
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

_HOME = tempfile.mkdtemp(prefix="keras_home_")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
_SEEDED = os.environ.get("KERAS_HOME")
os.makedirs(os.path.join(_HOME, "datasets"))
for _source in (os.path.join(_SEEDED or "", "datasets"),
                os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")):
    if os.path.isdir(_source):
        for _name in os.listdir(_source):
            if _name.endswith(".txt"):
                shutil.copy(os.path.join(_source, _name), os.path.join(_HOME, "datasets", _name))
os.environ["KERAS_HOME"] = _HOME
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
# No AOTInductor builders in the background while tests generate (tests/test_torch_aot.py turns them on
# for itself and waits for or ends the ones it starts).
os.environ.setdefault("KERAS_NANOGPT_AOT", "0")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import httpx  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import uvicorn  # noqa: E402

import keras_nanogpt as kn  # noqa: E402

BACKEND = keras.backend.backend()
# `compile` arguments for a few steps of a tiny model: TensorFlow's XLA compilation costs more than it
# saves there, while JAX without jit runs op by op.
QUICK_COMPILE = {"jit_compile": False} if BACKEND == "tensorflow" else {}
SHAKESPEARE_SAMPLE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
)
CONTEXT = 16  # make_sharp_model's context
WAIT = 120  # seconds: the bound on any one wait for a server
# TensorFlow prints these while it is imported, before absl logging is set up, whatever
# TF_CPP_MIN_LOG_LEVEL says; `import keras_nanogpt` imports TensorFlow before cli.py runs. The oneDNN
# line comes only on CPUs where TensorFlow turns oneDNN on (AVX-512 VNNI / AMX hosts).
TF_IMPORT_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    r"|I\d{4} [\d:.]+ +\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"
    r"|I\d{4} [\d:.]+ +\d+ port\.cc:\d+\] oneDNN custom operations are on")


@pytest.fixture(scope="session")
def small_text():
    """About 20k characters of Pride and Prejudice."""
    return kn.data.load_text("pride_and_prejudice")[:20000]


@pytest.fixture(scope="session")
def char_vectorizer(small_text):
    return kn.data.make_vectorizer(small_text, level="char")


@pytest.fixture()
def tiny_model(char_vectorizer):
    """A 2-layer, 32-wide char model with the vectorizer attached (fresh per test)."""
    keras.utils.set_random_seed(0)
    return kn.NanoGPT(vocabulary_size=char_vectorizer.vocabulary_size(), sequence_length=32,
                      num_layers=2, num_heads=2, hidden_dim=32, vectorizer=char_vectorizer)


# Digits, punctuation and non-ASCII text the learned BPE below has merges for.
BPE_EXTRA_TEXT = " 12345 2024 1999 3.14159 (x)--y! it's naïve café — 東京 😀\n" * 300


@pytest.fixture(scope="session")
def learned_bpe(small_text):
    """A GPT-2-style byte-level BPE of 600 ids (`<|endoftext|>` last) learned from test text: no network."""
    return kn.tokenizers.learn_bpe(small_text + BPE_EXTRA_TEXT, 600)


def tiktoken_ranks(tokenizer):
    """tiktoken's `mergeable_ranks` (token bytes -> id) of a BPE tokenizer's vocab.json, special tokens left out."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    to_byte = {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}
    special = tokenizer.special_tokens
    return {bytes(to_byte[c] for c in token): i for token, i in tokenizer.get_config()["vocabulary"].items()
            if token not in special}


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def messages(err):
    """The lines of a subprocess's stderr that are not TensorFlow's import-time noise."""
    return [line for line in err.splitlines() if line.strip() and not TF_IMPORT_NOISE.match(line)]


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def largest_difference(weights, others):
    """The largest absolute difference between two lists of arrays (e.g. two models' get_weights())."""
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(weights, others))


def make_sharp_model(char_vectorizer, seed=1, context=CONTEXT, **options):
    """A small char model (2 layers, 32 wide, `context` long) with large random weights (`options`: NanoGPT
    arguments; zero-initialised projections included), so greedy choices are never near-ties."""
    keras.utils.set_random_seed(seed)
    model = kn.NanoGPT(char_vectorizer.vocabulary_size(), context, 2, 2, 32, vectorizer=char_vectorizer,
                       **options)
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if len(variable.shape) == 2:
            variable.assign(rng.normal(0, 0.4, variable.shape).astype("float32"))
    return model


def reference_greedy(model, prompt, steps):
    """The plain loop: recompute the whole context for each token and take the argmax.

    Past the context it moves the context's start as generation.py documents: the window starts at
    most `sequence_length` tokens back, and when it would overflow it restarts with the last
    `sequence_length // 2` tokens.
    """
    tokens = list(prompt)
    start = max(0, len(tokens) - model.sequence_length)
    for _ in range(steps):
        if len(tokens) - start > model.sequence_length:
            start = len(tokens) - model.sequence_length // 2
        logits = to_numpy(model(np.array([tokens[start:]], "int32")))
        tokens.append(int(np.argmax(logits[0, -1])))
    return tokens


class ThreadServer:
    """uvicorn serving `app` in a thread, on a free 127.0.0.1 port."""

    def __init__(self, app):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        self.url = "http://127.0.0.1:%d" % listener.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)

    def health(self):
        return httpx.get(self.url + "/health", timeout=WAIT).json()

    def stop(self):
        self.server.should_exit = True
        self.thread.join(WAIT)


def start_cli_server(model_path, *flags):
    """`keras-nanogpt serve MODEL --port 0 --log-level warning FLAGS` in a subprocess under this process's
    backend, this checkout first on its path; the caller ends it (`stop_process`)."""
    script = os.path.join(os.path.dirname(sys.executable), "keras-nanogpt")
    assert os.access(script, os.X_OK), f"no console script at {script}: install the package (make install)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen([script, "serve", str(model_path), "--port", "0", "--log-level", "warning", *flags],
                            env=dict(os.environ, KERAS_BACKEND=BACKEND, PYTHONPATH=root), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop_process(process, timeout):
    """Kill `process` if it still runs, and reap it."""
    if process.poll() is None:
        process.kill()
        process.communicate(timeout=timeout)
