"""Test set-up: a private KERAS_HOME seeded with the corpora, quiet logs, small shared fixtures.

One pytest process per backend: set KERAS_BACKEND before running pytest.
"""

import atexit
import os
import shutil
import sys
import tempfile

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
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_nanogpt as kn  # noqa: E402

BACKEND = keras.backend.backend()
# `compile` arguments for a few steps of a tiny model: TensorFlow's XLA compilation costs more than it
# saves there, while JAX without jit runs op by op.
QUICK_COMPILE = {"jit_compile": False} if BACKEND == "tensorflow" else {}
SHAKESPEARE_SAMPLE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
)


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


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))
