"""Bad input, faults and safety: clear errors before any work, nothing lost, nothing half-written,
nothing executed that should not be, no network but `get_file` for the known corpora."""

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zipfile

import keras
import numpy as np
import pytest
from conftest import to_numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_nanogpt as kn

ALPHABET = "abcdefgh \n"  # the vocabulary of `model`: 10 characters + padding and [UNK]


@pytest.fixture(scope="module")
def model():
    """A tiny char model with a vectorizer, shared so that its generation functions compile once."""
    keras.utils.set_random_seed(3)
    vectorizer = kn.data.make_vectorizer(ALPHABET * 3)
    return kn.NanoGPT(vectorizer.vocabulary_size(), 8, 1, 1, 8, vectorizer=vectorizer)


@pytest.fixture()
def no_network(monkeypatch):
    """Forbid every socket connection and name lookup; the list of attempts records any."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is forbidden in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


# ---------------------------------------------------------------------------------------------
# Files and downloads
# ---------------------------------------------------------------------------------------------

def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No such text file: '.*missing\.txt' \(and not a known "
                                                r"corpus name: \('pride_and_prejudice', 'tinyshakespeare'\)"):
        kn.data.load_text(tmp_path / "missing.txt")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", "\ufeff\r\n".encode("utf-8")])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"empty\.txt' holds no text \(it is empty or only whitespace\)"):
        kn.data.load_text(path)


def test_non_utf8_file_names_file_and_offset(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("Caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt' is not valid utf-8: byte 3 \(b'\\xe9'\) cannot be "
                                         r"decoded\. Pass `encoding=`.*`errors='replace'`"):
        kn.data.load_text(path)
    assert kn.data.load_text(path, encoding="latin-1") == "Café au lait"
    assert kn.data.load_text(path, errors="replace") == "Caf\ufffd au lait"
    assert kn.data.load_text(path, errors="ignore") == "Caf au lait"


def test_bad_encoding_or_errors_are_refused_before_reading(tmp_path, no_network):
    missing = tmp_path / "missing.txt"  # not read: the options are checked first
    with pytest.raises(ValueError, match=r"`encoding` must be a codec name .*; got 'no-such-codec'"):
        kn.data.load_text(missing, encoding="no-such-codec")
    with pytest.raises(ValueError, match=r"`errors` must be 'strict', 'replace', 'ignore' .*; got 'skip'"):
        kn.data.load_text(missing, errors="skip")
    with pytest.raises(ValueError, match=r"`encoding` .*; got None"):
        kn.data.load_text("pride_and_prejudice", encoding=None)  # a known corpus: refused before get_file
    assert no_network == []


def test_known_corpora_load_without_the_network(no_network):
    assert kn.data.load_text("tinyshakespeare").startswith("First Citizen:")
    text = kn.data.load_text("pride_and_prejudice")
    vectorizer = kn.data.make_vectorizer(text[:5000])
    kn.data.make_datasets(text[:5000], vectorizer, 16, 4)
    kn.data.make_vectorizer(level="byte")  # keras-hub's tokenizers too
    assert no_network == []


def test_failed_download_names_the_url_and_the_way_out(monkeypatch, no_network):
    monkeypatch.setitem(kn.data.KNOWN_TEXTS, "nowhere", ("https://example.org/nowhere.txt", "0" * 64))
    with pytest.raises(OSError, match=r"Could not download 'nowhere' from https://example\.org/nowhere\.txt "
                                      r".*Put the file at '.*nowhere\.txt', or pass the path of a local copy"):
        kn.data.load_text("nowhere")
    assert no_network  # it did try, through get_file


def test_bad_argument_types():
    with pytest.raises(TypeError, match=r"`name_or_path` must be a corpus name .* or a file path; got 42"):
        kn.data.load_text(42)
    with pytest.raises(TypeError, match=r"`text` must be a str; got bytes"):
        kn.data.make_vectorizer(b"bytes")
    with pytest.raises(TypeError, match=r"`vectorizer` must come from kn\.data\.make_vectorizer.*; got str"):
        kn.data.make_datasets("abc" * 100, "not a vectorizer", 4, 2)


# ---------------------------------------------------------------------------------------------
# Arguments: each error names the argument, the value and what is allowed
# ---------------------------------------------------------------------------------------------

TEXT = ALPHABET * 40


def _datasets(vectorizer, **kwargs):
    return kn.data.make_datasets(TEXT, vectorizer, **{"sequence_length": 8, "batch_size": 2, **kwargs})


def _nanogpt(**kwargs):
    return kn.NanoGPT(**{"vocabulary_size": 12, "sequence_length": 8, "num_layers": 1, "num_heads": 2,
                         "hidden_dim": 8, **kwargs})


def _generate(model, prompt="bad", **kwargs):
    return model.generate(prompt, **{"max_new_tokens": 2, **kwargs})


BAD_ARGUMENTS = {  # id: (call(vectorizer, model), error, message)
    "sequence_length=0": (lambda v, m: _datasets(v, sequence_length=0), ValueError,
                          r"`sequence_length` must be an integer >= 1; got 0\."),
    "batch_size=-2": (lambda v, m: _datasets(v, batch_size=-2), ValueError,
                      r"`batch_size` must be an integer >= 1; got -2\."),
    "batch_size=2.5": (lambda v, m: _datasets(v, batch_size=2.5), TypeError,
                       r"`batch_size` must be an integer >= 1; got 2\.5 \(float\)\."),
    "validation_split=1": (lambda v, m: _datasets(v, validation_split=1.0), ValueError,
                           r"`validation_split` must be in \[0\.0, 1\.0\); got 1\.0\."),
    "validation_split=-0.1": (lambda v, m: _datasets(v, validation_split=-0.1), ValueError,
                              r"`validation_split` must be in \[0\.0, 1\.0\); got -0\.1\."),
    "validation_split='10%'": (lambda v, m: _datasets(v, validation_split="10%"), TypeError,
                               r"`validation_split` must be a number in \[0\.0, 1\.0\); got '10%' \(str\)\."),
    "level": (lambda v, m: kn.data.make_vectorizer(TEXT, level="syllable"), ValueError,
              r"`level` must be one of \('char', 'word', 'wordpiece', 'sentencepiece', 'byte', 'bpe'\); "
              r"got 'syllable'\."),
    "hidden_dim % num_heads": (lambda v, m: _nanogpt(hidden_dim=30, num_heads=4), ValueError,
                               r"`hidden_dim` must be divisible by `num_heads`; got hidden_dim=30, num_heads=4\."),
    "vocabulary_size=0": (lambda v, m: _nanogpt(vocabulary_size=0), ValueError,
                          r"`vocabulary_size` must be an integer >= 1; got 0\."),
    "num_layers=-1": (lambda v, m: _nanogpt(num_layers=-1), ValueError,
                      r"`num_layers` must be an integer >= 1; got -1\."),
    "dropout=1": (lambda v, m: _nanogpt(dropout=1.0), ValueError, r"`dropout` must be in \[0\.0, 1\.0\); got 1\.0\."),
    "dropout=-0.1": (lambda v, m: _nanogpt(dropout=-0.1), ValueError,
                     r"`dropout` must be in \[0\.0, 1\.0\); got -0\.1\."),
    "dropout=nan": (lambda v, m: _nanogpt(dropout=math.nan), ValueError,
                    r"`dropout` must be in \[0\.0, 1\.0\); got nan\."),
    "small vocabulary_size": (lambda v, m: _nanogpt(vocabulary_size=5, vectorizer=v), ValueError,
                              r"`vectorizer` has 12 tokens but `vocabulary_size` is 5; pass vocabulary_size >= 12\."),
    "max_new_tokens=-1": (lambda v, m: _generate(m, max_new_tokens=-1), ValueError,
                          r"`max_new_tokens` must be an integer >= 0; got -1\."),
    "top_p=0": (lambda v, m: _generate(m, top_p=0.0), ValueError, r"`top_p` must be in \(0\.0, 1\.0\]; got 0\.0\."),
    "top_p=1.5": (lambda v, m: _generate(m, top_p=1.5), ValueError, r"`top_p` must be in \(0\.0, 1\.0\]; got 1\.5\."),
    "temperature=-0.5": (lambda v, m: _generate(m, temperature=-0.5), ValueError,
                         r"`temperature` must be in \[0\.0, inf\); got -0\.5\."),
    "top_k=0": (lambda v, m: _generate(m, top_k=0), ValueError, r"`top_k` must be an integer >= 1; got 0\."),
    "prompt id too big": (lambda v, m: _generate(m, prompt=[[1, 2, 12, 40]]), ValueError,
                          r"`prompt` must hold token ids in \[0, 12\) \(the vocabulary\); got \[12, 40\]\."),
    "prompt id negative": (lambda v, m: _generate(m, prompt=np.array([[-1, 2]])), ValueError,
                           r"`prompt` must hold token ids in \[0, 12\) \(the vocabulary\); got \[-1\]\."),
    "stop id too big": (lambda v, m: _generate(m, stop=[3, 99]), ValueError,
                        r"`stop` must hold token ids in \[0, 12\) \(the vocabulary\); got \[99\]\."),
    "decode id too big": (lambda v, m: kn.data.decode(v, [3, 12]), ValueError,
                          r"`ids` must hold token ids in \[0, 12\) \(the vocabulary\); got \[12\]\."),
    "fit id too big": (lambda v, m: m.fit(np.full((4, 8), 12), np.zeros((4, 8), "int32"), verbose=0), ValueError,
                       r"`x` must hold token ids in \[0, 12\) \(the vocabulary\); got \[12\]\."),
    "text prompt, no vectorizer": (lambda v, m: _generate(_nanogpt(), prompt="bad"), ValueError,
                                   r"A text `prompt` needs a model with a `vectorizer`; this model has none\."),
    "callback top_p": (lambda v, m: kn.callbacks.TextGenerationCallback("bad", top_p=2), ValueError,
                       r"`top_p` must be in \(0\.0, 1\.0\]; got 2\.0\."),
    "callback keyword": (lambda v, m: kn.callbacks.TextGenerationCallback("bad", topk=3), TypeError, r"'topk'"),
    "save suffix": (lambda v, m: m.save("model.h5"), ValueError, r"`filepath` must end in '\.keras'; got 'model\.h5'\."),
    "save_weights suffix": (lambda v, m: m.save_weights("w.h5"), ValueError,
                            r"`filepath` must end in '\.weights\.h5'; got 'w\.h5'\."),
}


@pytest.fixture(scope="module")
def untouched_model(model):
    """A model that only ever sees bad input: nothing may have been compiled or trained on it."""
    keras.utils.set_random_seed(4)
    untouched = kn.NanoGPT(12, 8, 1, 1, 8, vectorizer=model.vectorizer)
    untouched.compile(optimizer="sgd")
    return untouched


@pytest.mark.parametrize("case", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_name_the_argument_the_value_and_what_is_allowed(case, untouched_model):
    call, error, message = case
    weights = [w.copy() for w in untouched_model.get_weights()]
    with pytest.raises(error, match=message):
        call(untouched_model.vectorizer, untouched_model)
    assert getattr(untouched_model, "_kn_compiled", None) is None or untouched_model._kn_compiled.traces == 0
    for before, after in zip(weights, untouched_model.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_text_shorter_than_one_window(model):
    vectorizer = model.vectorizer
    with pytest.raises(ValueError, match=r"The text is too short: its 6 training tokens make 0 windows of "
                                         r"sequence_length=8, fewer than batch_size=1\."):
        kn.data.make_datasets("abcdef", vectorizer, 8, 1, validation_split=0)
    with pytest.raises(ValueError, match=r"The validation part \(8 tokens for validation_split=0\.04\) is "
                                         r"shorter than one window of 9 tokens"):
        kn.data.make_datasets(ALPHABET * 20, vectorizer, 8, 2, validation_split=0.04)


def test_a_bad_sample_prompt_stops_fit_before_the_first_step(model):
    steps = []
    counter = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: steps.append(batch))
    no_vectorizer = kn.NanoGPT(12, 8, 1, 1, 8)
    no_vectorizer.compile()
    x = np.ones((8, 8), "int32")
    with pytest.raises(ValueError, match="needs a model with a `vectorizer`"):
        no_vectorizer.fit(x, x, epochs=1, verbose=0, callbacks=[
            counter, kn.callbacks.TextGenerationCallback("abc", max_new_tokens=2)])
    assert steps == []


def test_loss_plot_path_is_checked_when_the_callback_is_made(tmp_path):
    with pytest.raises(ValueError, match=r"`path` must be the path of a PNG file to write; got the folder"):
        kn.callbacks.LossPlotCallback(tmp_path)
    with pytest.raises(TypeError, match=r"`path` must be the path of a PNG file to write; got 3"):
        kn.callbacks.LossPlotCallback(3)


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

def test_long_prompt_is_cropped_not_an_error(model):
    context = model.sequence_length
    prompt = np.random.default_rng(0).integers(2, 12, size=(1, 3 * context)).astype("int32")
    out = model.generate(prompt, max_new_tokens=4, temperature=0)
    assert out.shape == (1, 3 * context + 4)
    np.testing.assert_array_equal(out[:, :3 * context], prompt)
    cropped = model.generate(prompt[:, -context:], max_new_tokens=4, temperature=0)
    np.testing.assert_array_equal(out[:, -4:], cropped[:, -4:])  # the model saw the last `context` tokens
    text = "abc defg\nhab" * 3
    long = model.generate(text, max_new_tokens=4, temperature=0)
    assert long.startswith(text) and long[len(text):] == model.generate(
        text[-context:], max_new_tokens=4, temperature=0)[context:]


def test_unseen_characters_warn_and_map_to_unknown(model):
    prompt = "bad Zoo \u4e2d"
    with pytest.warns(UserWarning, match=r"never seen in training: \['Z', 'o', '\u4e2d'\]; they map to "
                                         r"the out-of-vocabulary id 1"):
        text = model.generate(prompt, max_new_tokens=3, seed=0)
    assert text.startswith(prompt) and len(text) == len(prompt) + 3
    assert kn.data.encode(model.vectorizer, "Z\u4e2d").tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------
# Model files: truncated, corrupted, refused by safe_mode
# ---------------------------------------------------------------------------------------------

def test_truncated_and_corrupted_model_files_are_named(tmp_path):
    good = str(tmp_path / "good.keras")
    kn.NanoGPT(12, 8, 1, 1, 8).save(good)
    data = open(good, "rb").read()
    (tmp_path / "truncated.keras").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.keras").write_bytes(data[:60] + b"\0" * 400 + data[460:])
    with pytest.raises(ValueError, match=r"truncated\.keras' is not a readable \.keras file \(truncated"):
        kn.load_model(tmp_path / "truncated.keras")
    with pytest.raises(ValueError, match=r"corrupt\.keras' (is corrupted|could not be loaded)"):
        kn.load_model(tmp_path / "corrupt.keras")
    with pytest.raises(FileNotFoundError, match=r"No such model file: '.*missing\.keras'"):
        kn.load_model(tmp_path / "missing.keras")
    assert isinstance(kn.load_model(good), kn.NanoGPT)


def test_keras_file_with_its_vectorizer_loads_in_safe_mode(tmp_path, model):
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert loaded.vectorizer.get_vocabulary() == model.vectorizer.get_vocabulary()
    for before, after in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(before, after)


def _rewrite_config(source, target, change):
    """Copy the .keras file `source` to `target` with its config.json passed through `change`."""
    import json

    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["config.json"] = json.dumps(change(json.loads(members["config.json"]))).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)


def test_safe_mode_refuses_lambdas_and_unregistered_classes(tmp_path, monkeypatch):
    inputs = keras.Input((3,))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs)).save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match=r"lambda\.keras' could not be loaded .*Python lambda.*safe_mode"):
        kn.load_model(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="lambda"):
        keras.models.load_model(tmp_path / "lambda.keras")

    marker = tmp_path / "imported"
    (tmp_path / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    kn.NanoGPT(12, 8, 1, 1, 8).save(tmp_path / "good.keras")
    _rewrite_config(tmp_path / "good.keras", tmp_path / "evil.keras",
                    lambda config: {**config, "module": "evil_module", "class_name": "Evil",
                                    "registered_name": "evil_module>Evil"})
    with pytest.raises(ValueError, match=r"evil\.keras' could not be loaded .*Could not locate class 'Evil'"):
        kn.load_model(tmp_path / "evil.keras")
    assert not marker.exists()  # the module named in the file was never imported


# ---------------------------------------------------------------------------------------------
# Faults: non-finite loss, crashes while writing
# ---------------------------------------------------------------------------------------------

def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoints(tmp_path):
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(12, 8, 1, 1, 8)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    x = np.random.default_rng(0).integers(0, 12, size=(32, 8)).astype("int32")
    every_step = keras.callbacks.ModelCheckpoint(str(tmp_path / "step.weights.h5"), save_weights_only=True,
                                                 save_freq=1)
    every_epoch = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch.keras"))
    model.fit(x, x, sample_weight=np.ones(32), batch_size=8, verbose=0, callbacks=[every_step, every_epoch])
    saved = {name: (tmp_path / name).read_bytes() for name in ("step.weights.h5", "epoch.keras")}
    for poison in (math.nan, math.inf):  # an infinite sample weight makes the loss inf, a NaN one NaN
        with pytest.raises(kn.callbacks.NonFiniteLossError, match=f"The training loss became {poison} at step 1; "
                                                                  f"training stopped and nothing more was saved"):
            model.fit(x, x, sample_weight=np.full(32, poison), batch_size=8, verbose=0,
                      callbacks=[every_step, every_epoch])
        assert not all(np.isfinite(w).all() for w in model.get_weights())  # the bad step did happen
        for name, content in saved.items():
            assert (tmp_path / name).read_bytes() == content, name
        model.load_weights(tmp_path / "step.weights.h5")
        assert all(np.isfinite(w).all() for w in model.get_weights())
    assert all(np.isfinite(w).all() for w in kn.load_model(tmp_path / "epoch.keras").get_weights())


def test_a_failed_write_leaves_the_old_file_and_no_litter(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="crash"), kn._files.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half of the new")
        raise RuntimeError("crash")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.keras"]
    with kn._files.atomic_path(path) as tmp:
        assert tmp.endswith(".keras") and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["model.keras"]


def test_every_writer_goes_through_atomic_path(tmp_path, monkeypatch, model):
    written = []
    atomic_path = kn._files.atomic_path

    @contextlib.contextmanager
    def recording(path):
        written.append(os.path.basename(os.fspath(path)))
        with atomic_path(path) as tmp:
            yield tmp

    monkeypatch.setattr(kn._files, "atomic_path", recording)
    model.save(tmp_path / "model.keras")
    model.save_weights(tmp_path / "model.weights.h5")
    kn.callbacks.save_loss_plot({"loss": [2.0, 1.5]}, tmp_path / "plot.png")
    for callback in (keras.callbacks.ModelCheckpoint(str(tmp_path / "full.keras")),
                     keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch.weights.h5"), save_weights_only=True),
                     keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
                     kn.callbacks.LossPlotCallback(tmp_path / "loss.png")):
        callback.set_model(model)  # what fit does; then the end of an epoch
        callback.on_epoch_end(0, {"loss": 2.0, "val_loss": 2.1})
    expected = ["model.keras", "model.weights.h5", "plot.png", "full.keras", "epoch.weights.h5",
                "latest.weights.h5", "loss.png"]
    assert sorted(written) == sorted(expected)
    files = [f for f in os.listdir(tmp_path) if f != "backup"] + os.listdir(tmp_path / "backup")
    assert sorted(files) == sorted(expected + ["training_metadata.json"])  # no temporary file left behind


def test_killed_writes_leave_the_old_file_or_the_new_one(tmp_path):
    paths = {kind: str(tmp_path / name) for kind, name in
             (("model", "model.keras"), ("weights", "model.weights.h5"), ("plot", "loss.png"))}
    model = kn.NanoGPT(12, 8, 1, 1, 8)
    model.save(paths["model"])
    model.save_weights(paths["weights"])
    kn.callbacks.save_loss_plot({"loss": [3.0, 2.0]}, paths["plot"])
    writer = textwrap.dedent(f"""
        import keras_nanogpt as kn
        model = kn.NanoGPT(12, 8, 1, 1, 8)
        history = {{"loss": list(range(50, 0, -1)), "val_loss": list(range(60, 10, -1))}}
        for count in range(1_000_000):
            model.save({paths["model"]!r})
            model.save_weights({paths["weights"]!r})
            kn.callbacks.save_loss_plot(history, {paths["plot"]!r})
            if count == 0:  # imports done: from here on, the time goes into writing
                print("ready", flush=True)
    """)
    process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True, env=os.environ)
    try:
        assert process.stdout.readline().strip() == "ready"
        time.sleep(2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # Each file is whole (the old one or the new one): a half-written one raises here.
    kn.load_model(paths["model"])
    model.load_weights(paths["weights"])
    import matplotlib.image

    assert matplotlib.image.imread(paths["plot"]).shape[-1] in (3, 4)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=0, max_size=300))
def test_any_text_builds_datasets_or_fails_clearly(text):
    try:
        vectorizer = kn.data.make_vectorizer(text)
        train, _ = kn.data.make_datasets(text, vectorizer, sequence_length=4, batch_size=2,
                                         validation_split=0.25)
    except ValueError as error:
        assert str(error).startswith(("`text` is empty", "The text is too short", "The validation part"))
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


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(0, 11), min_size=1, max_size=20), st.integers(0, 12),
       st.sampled_from([dict(), dict(temperature=0), dict(top_k=3), dict(temperature=50.0)]),
       st.integers(0, 2**31 - 1))
def test_generate_stays_in_the_vocabulary(model, prompt, max_new_tokens, sampling, seed):
    out = to_numpy(model.generate(np.array([prompt]), max_new_tokens=max_new_tokens, seed=seed, **sampling))
    assert out.shape == (1, len(prompt) + max_new_tokens)
    assert out.min() >= 0 and out.max() < model.vocabulary_size
