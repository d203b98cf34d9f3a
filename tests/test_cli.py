"""The keras-nanogpt console script: train, generate, evaluate, export, resume after SIGKILL, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import BACKEND, to_numpy

import keras_nanogpt as kn
from keras_nanogpt import cli

TINY = ["--layers", "1", "--heads", "2", "--hidden-dim", "16", "--sequence-length", "16",
        "--batch-size", "8", "--verbose", "0"]


@pytest.fixture()
def corpus(tmp_path, small_text):
    path = tmp_path / "corpus.txt"
    path.write_text(small_text[:6000], encoding="utf-8")
    return str(path)


def test_train_generate_evaluate(tmp_path, corpus, capsys):
    out = tmp_path / "m.keras"
    assert cli.main(["train", "--text", corpus, *TINY, "--steps", "20", "--checkpoint-every", "10",
                     "--plot", str(tmp_path / "loss.png"), "--out", str(out)]) == 0
    assert out.is_file()
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = kn.load_model(out)
    assert int(to_numpy(model.optimizer.iterations)) == 20 and model.sequence_length == 16
    capsys.readouterr()

    assert cli.main(["generate", str(out), "--prompt", "It is", "--max-new-tokens", "15", "--seed", "1",
                     "--no-stream"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("It is") and len(text.rstrip("\n")) >= len("It is")
    assert cli.main(["generate", str(out), "--prompt", "It is", "--max-new-tokens", "15", "--seed", "1",
                     "--stream"]) == 0
    assert capsys.readouterr().out == text

    assert cli.main(["evaluate", str(out), "--text", corpus]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"validation_loss", "perplexity", "accuracy"}
    assert 0 < report["validation_loss"] < 5 and report["perplexity"] > 1


def test_throughput_and_mfu_are_logged(tmp_path, corpus, small_text, char_vectorizer):
    model = kn.NanoGPT(char_vectorizer.vocabulary_size(), 16, 1, 2, 16)
    model.compile()
    train, _ = kn.data.make_datasets(small_text, char_vectorizer, 16, 8, seed=0)
    callback = kn.callbacks.ThroughputCallback(tokens_per_step=8 * 16, peak_flops=1e12)
    history = model.fit(train.take(5), epochs=2, verbose=0, callbacks=[callback])
    tokens_per_second = history.history["tokens_per_second"]
    assert len(tokens_per_second) == 2 and all(t > 0 for t in tokens_per_second)
    expected = tokens_per_second[-1] * kn.callbacks.flops_per_token(model) / 1e12
    assert history.history["mfu"][-1] == pytest.approx(expected)


@pytest.mark.skipif(BACKEND == "torch", reason="tf_saved_model export needs the tensorflow or jax backend")
def test_export_writes_a_saved_model(tmp_path, tiny_model):
    tiny_model.save(tmp_path / "m.keras")
    target = tmp_path / "serving"
    target.mkdir()
    (target / "old").write_text("previous export")
    assert cli.main(["export", str(tmp_path / "m.keras"), str(target)]) == 0
    assert (target / "saved_model.pb").is_file() and not (target / "old").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []


def _run(*args, **kwargs):
    environment = dict(os.environ, KERAS_BACKEND=BACKEND)
    return subprocess.Popen([sys.executable, "-m", "keras_nanogpt.cli", *args], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_resumes_after_sigkill(tmp_path, corpus):
    checkpoints = tmp_path / "ckpt"
    arguments = ["train", "--text", corpus, *TINY, "--checkpoint-every", "5",
                 "--checkpoint-dir", str(checkpoints), "--out", str(tmp_path / "m.keras")]
    first = _run(*arguments, "--steps", "100000")
    metadata = checkpoints / "training_metadata.json"
    deadline = time.time() + 240
    while not metadata.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert metadata.exists(), "no backup was written before the deadline"
    assert not (tmp_path / "m.keras").exists()

    second = _run(*arguments, "--steps", "30")
    out, err = second.communicate(timeout=400)
    assert second.returncode == 0, err
    resumed = int(out.split("resuming from step ")[1].split()[0])
    assert resumed >= 5 and resumed % 5 == 0
    model = kn.load_model(tmp_path / "m.keras")
    assert int(to_numpy(model.optimizer.iterations)) == 30


@pytest.mark.parametrize("arguments, message", [
    (["train", "--text", "/no/such/corpus.txt", "--out", "x.keras"], "corpus.txt"),
    (["train", "--text", "CORPUS", "--steps", "0", "--out", "x.keras"], "--steps"),
    (["train", "--text", "CORPUS", "--config", "huge", "--out", "x.keras"], "huge"),
    (["train", "--text", "CORPUS", "--level", "syllable", "--out", "x.keras"], "level"),
    (["generate", "/no/such/model.keras", "--prompt", "a"], "model.keras"),
    (["generate", "MODEL", "--prompt", "a", "--top-p", "2"], "top_p"),
    (["train", "--text", "CORPUS"], "--out"),
    (["fly"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, corpus, tiny_model, capsys, monkeypatch, arguments,
                                         message):
    tiny_model.save(tmp_path / "model.keras")
    arguments = [{"CORPUS": corpus, "MODEL": str(tmp_path / "model.keras")}.get(a, a) for a in arguments]
    monkeypatch.chdir(tmp_path)
    assert cli.main(arguments) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.keras").exists()
