"""The keras-nanogpt console script, run in subprocesses as a user runs it.

A training run is killed with SIGKILL after its first backup (test_recovery.py sends SIGTERM and SIGINT,
which back up the exact step); the same command resumes it and writes
the model, loss plot and TensorBoard logs that generate, evaluate and export then read. Every process
pays a Keras import, so the error runs start with the module and go on beside the training, and the
runs that read the model go side by side.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import BACKEND, messages, to_numpy

import keras_nanogpt as kn
from keras_nanogpt import cli

# The entry point that `make install` (pip install -e .) writes beside the interpreter.
SCRIPT = os.path.join(os.path.dirname(sys.executable), "keras-nanogpt")
TINY = ["--layers", "1", "--heads", "2", "--hidden-dim", "16", "--sequence-length", "16", "--batch-size", "8"]
EVERY, STEPS = 10, 40
PROMPT = "It is"
ERRORS = {  # the three kinds of bad input: arguments, the message must hold
    "missing file": (["train", "--text", "/no/such/corpus.txt", "--out", "x.keras"], "'/no/such/corpus.txt'"),
    "bad flag value": (["train", "--text", "CORPUS", "--steps", "0", "--out", "x.keras"], "`--steps`"),
    "unreadable model": (["generate", "GARBAGE", "--prompt", "a"], "garbage.keras"),
}
DEBUG = ["--debug", "generate", "/no/such/model.keras", "--prompt", "a"]


def _start(*arguments, cwd=None):
    """Start the console script under this test's backend and KERAS_HOME (conftest's private one)."""
    assert os.access(SCRIPT, os.X_OK), f"no console script at {SCRIPT}: install the package (make install)"
    environment = dict(os.environ, KERAS_BACKEND=BACKEND, KERAS_HOME=os.environ["KERAS_HOME"])
    return subprocess.Popen([SCRIPT, *map(str, arguments)], env=environment, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(process):
    """(exit code, stdout, stderr) of a started run."""
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, small_text):
    """A folder with `corpus.txt` (6,000 characters) and `garbage.keras` (not a zip archive)."""
    path = tmp_path_factory.mktemp("cli")
    (path / "corpus.txt").write_text(small_text[:6000], encoding="utf-8")
    (path / "garbage.keras").write_bytes(b"not a keras file")
    return path


@pytest.fixture(scope="module", autouse=True)
def error_runs(workdir):
    """The bad-input runs and the `--debug` run, started when the module starts, by name."""
    names = {"CORPUS": workdir / "corpus.txt", "GARBAGE": workdir / "garbage.keras"}
    runs = {name: _start(*[names.get(a, a) for a in arguments], cwd=workdir)
            for name, (arguments, _) in ERRORS.items()}
    runs["debug"] = _start(*DEBUG, cwd=workdir)
    yield runs
    for process in runs.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def trained(workdir):
    """Train, SIGKILL after the first backup, resume with the same command, then generate, evaluate, export.

    Returns a dict: `killed` (backup and model present after the kill), `train`, `generate`, `stream`,
    `evaluate`, `export` ((exit code, stdout, stderr) each) and the paths written.
    """
    paths = {name: workdir / name for name in ("m.keras", "ckpt", "loss.png", "logs", "serving")}
    command = ["train", "--text", workdir / "corpus.txt", *TINY, "--steps", STEPS, "--checkpoint-every", EVERY,
               "--checkpoint-dir", paths["ckpt"], "--out", paths["m.keras"], "--plot", paths["loss.png"],
               "--tensorboard", paths["logs"], "--prompt", PROMPT, "--peak-flops", "1e12", "--verbose", "2"]
    first = _start(*command)
    deadline = time.time() + 400
    while not list(paths["ckpt"].glob("backup-*.npz")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    backed_up = bool(list(paths["ckpt"].glob("backup-*.npz")))
    result = {"killed": (backed_up, paths["m.keras"].exists()), "train": _finish(_start(*command))}

    paths["serving"].mkdir()
    (paths["serving"] / "old").write_text("previous export")
    model = paths["m.keras"]
    generate = ["generate", model, "--prompt", PROMPT, "--max-new-tokens", "15", "--seed", "1"]
    runs = {"generate": _start(*generate, "--no-stream"), "stream": _start(*generate, "--stream"),
            "evaluate": _start("evaluate", model, "--text", workdir / "corpus.txt"),
            "export": _start("export", model, paths["serving"])}
    result.update({name: _finish(process) for name, process in runs.items()})
    return dict(result, **paths)


def test_train_resumes_after_sigkill(trained):
    assert trained["killed"] == (True, False), "no backup before the deadline, or the run was not killed"
    code, out, err = trained["train"]
    assert code == 0, err
    resumed = int(out.split("resuming from step ")[1].split()[0])
    assert EVERY <= resumed < STEPS and resumed % EVERY == 0
    assert f"saved {trained['m.keras']} after {STEPS} steps" in out
    model = kn.load_model(trained["m.keras"])
    assert int(to_numpy(model.optimizer.iterations)) == STEPS and model.sequence_length == 16
    assert not trained["ckpt"].exists()  # the backup goes once the model is saved
    assert messages(err) == []


def test_train_plots_logs_samples_and_throughput(trained):
    _, out, _ = trained["train"]
    assert trained["loss.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for folder in ("train", "validation", "samples"):
        events = os.listdir(trained["logs"] / folder)
        assert any(name.startswith("events.out.tfevents") for name in events), (folder, events)
    assert "--- samples after epoch" in out and f"\n{PROMPT}" in out
    epochs = [line for line in out.splitlines() if "tokens_per_second:" in line]
    assert epochs, out
    for line in epochs:  # verbose=2: one line per epoch
        assert float(re.search(r"tokens_per_second: (\S+)", line)[1]) > 0
        assert float(re.search(r"mfu: (\S+)", line)[1]) > 0


def test_generate_prints_and_streams_the_same_text(trained):
    code, text, err = trained["generate"]
    assert code == 0, err
    assert text.startswith(PROMPT) and len(text.rstrip("\n")) >= len(PROMPT)
    code, streamed, err = trained["stream"]
    assert code == 0, err
    assert streamed == text


def test_evaluate_prints_loss_perplexity_and_accuracy(trained):
    code, out, err = trained["evaluate"]
    assert code == 0, err
    report = json.loads(out)
    assert set(report) == {"validation_loss", "perplexity", "bits_per_character", "accuracy"}
    assert 0 < report["validation_loss"] < 5 and report["perplexity"] > 1 and 0 <= report["accuracy"] <= 1
    assert report["perplexity"] == pytest.approx(2.718281828 ** report["validation_loss"], rel=1e-3)


def test_export_writes_a_saved_model(trained):
    code, out, err = trained["export"]
    target = trained["serving"]
    if BACKEND == "torch":  # tf_saved_model needs TensorFlow or JAX: refused before any work
        assert code == 2 and len(messages(err)) == 1
        assert messages(err)[0].startswith("error:") and "KERAS_BACKEND=tensorflow" in err
        assert os.listdir(target) == ["old"]
    else:
        assert code == 0, err
        assert (target / "saved_model.pb").is_file() and not (target / "old").exists()
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".export")] == []


@pytest.mark.parametrize("name", ERRORS)
def test_console_script_bad_input_is_one_line_and_exit_2(error_runs, workdir, name):
    code, out, err = _finish(error_runs[name])
    lines = messages(err)
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error:") and ERRORS[name][1] in lines[0]
    assert not (workdir / "x.keras").exists()


def test_debug_shows_the_traceback(error_runs):
    code, _, err = _finish(error_runs["debug"])
    assert code != 0 and "Traceback (most recent call last)" in err
    assert "FileNotFoundError: No such model file: '/no/such/model.keras'" in err


def test_throughput_and_mfu_are_logged(small_text, char_vectorizer):
    model = kn.NanoGPT(char_vectorizer.vocabulary_size(), 16, 1, 2, 16)
    model.compile()
    train, _ = kn.data.make_datasets(small_text, char_vectorizer, 16, 8, seed=0)
    callback = kn.callbacks.ThroughputCallback(tokens_per_step=8 * 16, peak_flops=1e12)
    history = model.fit(train.take(5), epochs=2, verbose=0, callbacks=[callback])
    tokens_per_second = history.history["tokens_per_second"]
    assert len(tokens_per_second) == 2 and all(t > 0 for t in tokens_per_second)
    expected = tokens_per_second[-1] * kn.callbacks.flops_per_token(model) / 1e12
    assert history.history["mfu"][-1] == pytest.approx(expected)


@pytest.mark.parametrize("arguments, message", [
    (["train", "--text", "/no/such/corpus.txt", "--out", "x.keras"], "corpus.txt"),
    (["train", "--text", "CORPUS", "--steps", "0", "--out", "x.keras"], "--steps"),
    (["train", "--text", "CORPUS", "--config", "huge", "--out", "x.keras"], "huge"),
    (["train", "--text", "CORPUS", "--level", "syllable", "--out", "x.keras"], "level"),
    (["generate", "/no/such/model.keras", "--prompt", "a"], "model.keras"),
    (["generate", "MODEL", "--prompt", "a", "--top-p", "2"], "top_p"),
    (["evaluate", "MODEL", "--text", "CORPUS", "--validation-split", "0"], "--validation-split"),
    (["train", "--text", "CORPUS"], "--out"),
    (["fly"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, workdir, tiny_model, capsys, monkeypatch, arguments,
                                         message):
    """Each kind of bad input, in-process: `main` maps it to one `error:` line and status 2."""
    tiny_model.save(tmp_path / "model.keras")
    names = {"CORPUS": str(workdir / "corpus.txt"), "MODEL": str(tmp_path / "model.keras")}
    monkeypatch.chdir(tmp_path)
    assert cli.main([names.get(a, a) for a in arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.keras").exists()


def test_bench_without_a_checkout_says_it_needs_one(monkeypatch, capsys):
    monkeypatch.setattr(cli, "BENCHMARK", "/site-packages/benchmarks/train_speed.py")
    assert cli.main(["bench", "--steps", "2"]) == 2
    assert "comes with a source checkout of keras_nanogpt, not with an installed package" in capsys.readouterr().err


def test_bench_prints_the_training_speed_json():
    code, out, err = _finish(_start("bench", "--backends", BACKEND, "--precisions", "fp32", "--steps", "2",
                                    "--bursts", "1", "--steps-per-execution", "1", "--sequence-length", "16"))
    assert code == 0, err
    report = json.loads(out)
    assert report["config"] == "nano" and report["load_average_at_start"] >= 0
    (run,) = report["runs"]
    assert "error" not in run, run
    assert (run["backend"], run["precision"], run["sequence_length"]) == (BACKEND, "fp32", 16)
    assert run["ms_per_step"] > 0
    assert run["tokens_per_second"] == pytest.approx(12 * 16 / run["ms_per_step"] * 1000, rel=0.01)
    assert run["mfu"] == round(run["flops_per_second"] / (report["peak_fp32_gflops"] * 1e9), 3) > 0


def test_compilation_cache_keeps_the_jax_programs(workdir, tmp_path):
    """`--compilation-cache DIR`: JAX writes its compiled steps there; other backends refuse the flag first."""
    cache = tmp_path / "cache"
    code, out, err = _finish(_start("train", "--text", workdir / "corpus.txt", *TINY, "--steps", "4",
                                    "--checkpoint-every", "2", "--out", tmp_path / "m.keras",
                                    "--compilation-cache", cache))
    if BACKEND != "jax":
        assert code == 2 and "--compilation-cache" in err and not cache.exists() and not (tmp_path / "m.keras").exists()
        return
    assert code == 0, err[-2000:]
    assert (tmp_path / "m.keras").exists() and len(list(cache.iterdir())) >= 2  # the train and test steps at least


def test_prepare_then_train_and_evaluate_from_token_shards(workdir, tmp_path):
    """The big-corpus path: `prepare` writes shards, `train --data` streams them, `evaluate --data` scores the
    val split; a model with another tokenizer is refused, naming the shards."""
    shards, model = tmp_path / "shards", tmp_path / "d.keras"
    code, out, err = _finish(_start("prepare", workdir / "corpus.txt", "--out", shards, "--tokenizer", "char",
                                    "--val-fraction", "0.1", "--workers", "1"))
    assert code == 0, err
    assert json.loads(out)["tokens"]["train"] > 5000 and (shards / "manifest.json").exists()
    code, out, err = _finish(_start("train", "--data", shards, *TINY, "--steps", "4", "--checkpoint-every", "2",
                                    "--out", model, "--verbose", "0"))
    assert code == 0, err
    assert "saved" in out and model.exists()
    code, out, err = _finish(_start("evaluate", model, "--data", shards, "--batches", "2", "--batch-size", "4"))
    assert code == 0, err
    report = json.loads(out)
    assert 0 < report["validation_loss"] < 10 and report["bits_per_character"] is None
    other = tmp_path / "bytes"
    assert _finish(_start("prepare", workdir / "corpus.txt", "--out", other, "--tokenizer", "byte",
                          "--workers", "1"))[0] == 0
    code, out, err = _finish(_start("evaluate", model, "--data", other, "--batches", "1"))
    assert code == 2 and "another tokenizer" in err and str(other) in err, err


def test_compile_refuses_other_backends_and_the_opt_out_before_loading(tmp_path, capsys, monkeypatch):
    """`compile` builds PyTorch's AOTInductor packages (tests/test_torch_aot.py builds one): elsewhere, and
    with KERAS_NANOGPT_AOT=0, one `error:` line and status 2, before the model is read."""
    monkeypatch.setenv("KERAS_NANOGPT_AOT", "0")
    assert cli.main(["compile", str(tmp_path / "no_such_model.keras")]) == 2
    err = capsys.readouterr().err
    expected = "KERAS_NANOGPT_AOT='0' turns the packages off" if BACKEND == "torch" else "PyTorch backend only"
    assert err.startswith("error:") and expected in err and len(err.strip().splitlines()) == 1
