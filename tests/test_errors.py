"""Bad input, faults and safety: clear errors before any work, nothing lost, nothing half-written."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_nanogpt as kn


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty.txt.*no text"):
        kn.data.load_text(path)


def test_non_utf8_file_names_file_and_offset(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("Caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt.*byte 3.*encoding="):
        kn.data.load_text(path)
    assert kn.data.load_text(path, encoding="latin-1") == "Café au lait"
    assert kn.data.load_text(path, errors="replace") == "Caf\ufffd au lait"
    with pytest.raises(ValueError, match="encoding"):
        kn.data.load_text(path, encoding="no-such-codec")


def test_failed_download_names_the_url_and_the_way_out(monkeypatch):
    monkeypatch.setitem(kn.data.KNOWN_TEXTS, "nowhere", ("http://127.0.0.1:9/nowhere.txt", "0" * 64))
    with pytest.raises(OSError, match=r"http://127\.0\.0\.1:9/nowhere\.txt.*local copy"):
        kn.data.load_text("nowhere")


def test_bad_argument_types():
    with pytest.raises(TypeError, match="name_or_path"):
        kn.data.load_text(42)
    with pytest.raises(TypeError, match="text"):
        kn.data.make_vectorizer(b"bytes")
    with pytest.raises(TypeError, match="vectorizer"):
        kn.data.make_datasets("abc" * 100, "not a vectorizer", 4, 2)


def test_text_prompt_without_vectorizer():
    model = kn.NanoGPT(10, 8, 1, 1, 8)
    with pytest.raises(ValueError, match="vectorizer"):
        model.generate("hello", max_new_tokens=2)


def test_prompt_ids_outside_the_vocabulary(tiny_model):
    with pytest.raises(ValueError, match="prompt"):
        tiny_model.generate(np.array([[1, 2, tiny_model.vocabulary_size]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt"):
        tiny_model.generate(np.array([[-1, 2]]), max_new_tokens=2)


def test_long_prompt_is_cropped_not_an_error(tiny_model):
    prompt = np.full((1, tiny_model.sequence_length * 2), 5, "int32")
    out = tiny_model.generate(prompt, max_new_tokens=3, temperature=0)
    assert out.shape == (1, tiny_model.sequence_length * 2 + 3)


def test_unseen_characters_warn_and_map_to_unknown(tiny_model):
    with pytest.warns(UserWarning, match="never seen"):
        text = tiny_model.generate("Zebra \u4e2d", max_new_tokens=3, seed=0)
    assert isinstance(text, str) and len(text) == len("Zebra \u4e2d") + 3


def _save_tiny(path):
    model = kn.NanoGPT(12, 8, 1, 1, 8)
    model.save(path)
    return model


def test_truncated_and_corrupted_model_files_are_named(tmp_path):
    good = str(tmp_path / "good.keras")
    _save_tiny(good)
    data = open(good, "rb").read()
    (tmp_path / "truncated.keras").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.keras").write_bytes(data[:60] + b"\0" * 400 + data[460:])
    for name in ("truncated.keras", "corrupt.keras"):
        with pytest.raises(ValueError, match=name):
            kn.load_model(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        kn.load_model(tmp_path / "missing.keras")
    assert isinstance(kn.load_model(good), kn.NanoGPT)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(12, 8, 1, 1, 8)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    x = np.random.default_rng(0).integers(0, 12, size=(64, 8)).astype("int32")
    checkpoint = str(tmp_path / "best.keras")
    save = keras.callbacks.ModelCheckpoint(checkpoint)
    model.fit(x, x, batch_size=8, epochs=1, verbose=0, callbacks=[save])
    good = kn.load_model(checkpoint).get_weights()
    model.compile(optimizer=keras.optimizers.SGD(1e30))  # explodes within a few steps
    with pytest.raises(kn.callbacks.NonFiniteLossError, match="loss became"):
        model.fit(x, x, batch_size=8, epochs=3, verbose=0, callbacks=[save])
    for before, after in zip(good, kn.load_model(checkpoint).get_weights()):
        np.testing.assert_array_equal(before, after)


def test_killed_save_leaves_the_old_file_or_the_new_one(tmp_path):
    path = str(tmp_path / "model.keras")
    _save_tiny(path)
    writer = textwrap.dedent(f"""
        import keras_nanogpt as kn
        model = kn.NanoGPT(300, 64, 4, 4, 128)
        print("ready", flush=True)
        while True:
            model.save({path!r})
    """)
    process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True,
                               env=os.environ)
    try:
        assert process.stdout.readline().strip() == "ready"
        time.sleep(2.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    model = kn.load_model(path)
    assert model.vocabulary_size in (12, 300)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=0, max_size=300))
def test_any_text_builds_datasets_or_fails_clearly(text):
    try:
        vectorizer = kn.data.make_vectorizer(text)
        train, _ = kn.data.make_datasets(text, vectorizer, sequence_length=4, batch_size=2,
                                         validation_split=0.25)
    except (ValueError, TypeError) as error:
        assert any(word in str(error) for word in ("text", "sequence_length", "validation"))
        return
    x, y = next(iter(train))
    assert tuple(x.shape) == (2, 4) == tuple(y.shape)


@pytest.fixture(scope="module")
def alphabet_vectorizer():
    return kn.data.make_vectorizer("abc XYZ\n\t“é”ß\u4e2d😀.,;")


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="abc XYZ\n\t“é”ß\u4e2d😀.,;", max_size=200))
def test_char_level_decode_inverts_encode(alphabet_vectorizer, text):
    assert kn.data.decode(alphabet_vectorizer, kn.data.encode(alphabet_vectorizer, text)) == text


@pytest.fixture(scope="module")
def property_model():
    keras.utils.set_random_seed(3)
    return kn.NanoGPT(7, 8, 1, 1, 8)


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=12), st.integers(0, 6), st.integers(0, 2**31 - 1))
def test_generate_stays_in_the_vocabulary(property_model, prompt, max_new_tokens, seed):
    out = np.asarray(property_model.generate(np.array([prompt]), max_new_tokens=max_new_tokens, seed=seed))
    assert out.shape == (1, len(prompt) + max_new_tokens)
    assert out.min() >= 0 and out.max() < 7
