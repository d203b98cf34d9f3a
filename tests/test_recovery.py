"""Preemption, damaged backups and failing writes, as a user meets them: real signals, real processes, a real
full and a real read-only file system.

- `keras-nanogpt train --checkpoint-dir` gets SIGTERM mid-run (then a storm of further SIGTERMs until its backup
  is on disk): it exits 143 after one line naming the backup, and the same command ends where a run never
  stopped ends, weight for weight. The same for `fit` with `kn.backup.PreemptibleBackup` and SIGINT (130).
- Under JAX multi-host (two processes on 127.0.0.1, gloo), SIGTERM to one process stops both at the same step.
- A truncated, garbage or bit-flipped newest backup is set aside and the previous one restored; when none can
  be used, or they belong to another model, the error names every file and says how to start afresh.
- `model.save`, `save_weights` and a backup into a full (1 MiB tmpfs) or read-only folder raise an `OSError`
  naming the path and the cause, and leave the old files as they were.
"""

import contextlib
import errno
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile

import keras
import numpy as np
import pytest
from conftest import BACKEND, free_port, largest_difference, messages, to_numpy

import keras_nanogpt as kn
from keras_nanogpt import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(os.path.dirname(sys.executable), "keras-nanogpt")
STEPS, EVERY = 60, 10
TRAIN = ["train", "--layers", "1", "--heads", "2", "--hidden-dim", "16", "--sequence-length", "16",
         "--batch-size", "8", "--dropout", "0.1", "--steps", str(STEPS), "--checkpoint-every", str(EVERY),
         "--validation-split", "0", "--verbose", "0"]  # no validation: one compilation less per run
NOTICE = re.compile(r"^(SIG\w+): backed up step (\d+) to (\S+); the same command resumes from there\.$")


def _environment(**extra):
    """This test's backend, KERAS_HOME and this checkout's package first, for the console script."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, KERAS_BACKEND=BACKEND, PYTHONPATH=path, **extra)


def _iterations(model):
    return int(to_numpy(model.optimizer.iterations))


def _interrupt(process, folder, number, deadline_s=400):
    """Once `process` has written its first backup, send it `number` every 2 ms until it exits (so signals also
    arrive while the backup is written and while the process shuts down). Returns (signals sent, its stderr,
    read meanwhile)."""
    lines = []

    def read():
        for line in process.stderr:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + deadline_s
    while not list(folder.glob("backup-*.npz")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert list(folder.glob("backup-*.npz")), "no backup before the deadline, or the run ended early"
    sent = 0
    while process.poll() is None and time.monotonic() < deadline:
        process.send_signal(number)
        sent += 1
        time.sleep(0.002)
    process.wait(timeout=300)
    reader.join(timeout=60)
    return sent, "".join(lines)


@pytest.fixture()
def corpus(tmp_path, small_text):
    path = tmp_path / "corpus.txt"
    path.write_text(small_text[:6000], encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Signals: the console script, fit, several processes
# ---------------------------------------------------------------------------------------------

def test_sigterm_backs_up_the_step_and_the_same_command_finishes_as_if_never_stopped(tmp_path, corpus, capsys):
    keras.config.set_dtype_policy("float32")
    command = [*TRAIN, "--text", str(corpus), "--checkpoint-dir", str(tmp_path / "ckpt"),
               "--out", str(tmp_path / "m.keras")]
    stopped = subprocess.Popen([SCRIPT, *command], env=_environment(), text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    interrupted = {}

    def watch():
        try:
            interrupted["sent"], interrupted["err"] = _interrupt(stopped, tmp_path / "ckpt", signal.SIGTERM)
        except BaseException as error:  # shown by the test below
            interrupted["error"] = error

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # Meanwhile, in this process: a run never stopped (the reference).
        assert cli.main([*TRAIN, "--text", str(corpus), "--out", str(tmp_path / "never_stopped.keras")]) == 0
        watcher.join(timeout=600)
        stopped.communicate(timeout=300)
    finally:
        if stopped.poll() is None:
            stopped.kill()
            stopped.communicate()
    assert "error" not in interrupted, interrupted.get("error")
    sent, err = interrupted["sent"], interrupted["err"]
    assert stopped.returncode == 143, err
    (line,) = messages(err)
    name, step, path = NOTICE.match(line).groups()
    step = int(step)
    assert name == "SIGTERM" and EVERY <= step < STEPS and sent >= 1
    assert path == str(tmp_path / "ckpt" / f"backup-{step:09d}.npz")
    assert kn.backup.read_backup(path)[0]["step"] == step  # whole, though signals came while it was written
    assert not (tmp_path / "m.keras").exists()

    # The same command, in this process.
    capsys.readouterr()
    assert cli.main(command) == 0
    out = capsys.readouterr().out
    assert f"resuming from step {step}\n" in out and f"after {STEPS} steps" in out
    assert not (tmp_path / "ckpt").exists()  # removed once the model is saved
    resumed, never_stopped = (kn.load_model(tmp_path / n) for n in ("m.keras", "never_stopped.keras"))
    assert _iterations(resumed) == _iterations(never_stopped) == STEPS
    # The default recipe is the modern one, so Muon's state (and AdamW's beside it) came back too.
    assert isinstance(resumed.optimizer, kn.training.MatrixDecayMuon)
    assert resumed.get_config()["position_embedding"] == "rotary"
    # measured: 0.0 on all three backends
    assert largest_difference(resumed.get_weights(), never_stopped.get_weights()) <= 1e-5


class _SignalDuringStep(keras.callbacks.Callback):
    """Sends `number` to this (the main) thread as step `step` begins: the handler runs at once, then the step.

    `handlers` records the SIGINT and SIGTERM handlers at that moment."""

    def __init__(self, step, number):
        super().__init__()
        self.step, self.number, self.seen = step, number, 0

    def on_train_batch_begin(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            self.handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
            signal.raise_signal(self.number)


@pytest.fixture()
def default_sigint():
    """SIGINT as in an interactive Python (KeyboardInterrupt), even where pytest runs as a background job,
    which ignores it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class _TinyRun:
    """One small model with dropout, compiled once for this module; `reset()` puts it back to its first state
    (weights, dropout seeds, optimizer, PyTorch's generator) and returns the same random-window data again.

    No XLA on TensorFlow, to spare compilation time (the console-script test above runs with XLA).
    """

    def __init__(self, vectorizer, text):
        keras.config.set_dtype_policy("float32")
        keras.utils.set_random_seed(7)
        self.vectorizer, self.text = vectorizer, text
        self.model = kn.NanoGPT(vectorizer.vocabulary_size(), 16, 1, 2, 16, dropout=0.1, vectorizer=vectorizer)
        self.model.compile(optimizer=keras.optimizers.AdamW(3e-3), jit_compile=BACKEND != "tensorflow" and "auto")
        self.model.optimizer.build(self.model.trainable_variables)
        self.variables = list(self.model.variables) + list(self.model.optimizer.variables)
        self.start = [to_numpy(v) for v in self.variables]
        # One step first: a model's first fit draws from PyTorch's generator before its first step (later
        # fits do not), so the runs compared below all start from the same draws.
        self.model.fit(self.reset(), steps_per_epoch=1, verbose=0)

    def reset(self):
        for variable, value in zip(self.variables, self.start):
            variable.assign(value)
        keras.utils.set_random_seed(7)
        train, _ = kn.data.make_datasets(self.text, self.vectorizer, 16, 8, validation_split=0.0,
                                         sampling="random", seed=3)
        return train.repeat()

    def weights(self):
        return [to_numpy(w) for w in self.model.weights]


@pytest.fixture(scope="module")
def tiny(small_text, char_vectorizer):
    return _TinyRun(char_vectorizer, small_text[:6000])


def test_sigint_during_fit_backs_up_and_a_resumed_fit_ends_as_one_never_stopped(tmp_path, tiny, monkeypatch,
                                                                                default_sigint):
    model = tiny.model
    data = tiny.reset()
    model.fit(data, steps_per_epoch=5, epochs=4, verbose=0)
    never_stopped = tiny.weights()
    assert _iterations(model) == 20

    data = tiny.reset()
    lines = []
    backup = kn.backup.PreemptibleBackup(tmp_path / "ckpt", save_every=5, print_fn=lines.append)
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        model.fit(data, steps_per_epoch=5, epochs=4, verbose=0, callbacks=[_SignalDuringStep(8, signal.SIGINT),
                                                                          backup])
    assert stopped.value.code == 130 and backup.interrupted_by == "SIGINT" and _iterations(model) == 8
    assert lines == [f"SIGINT: backed up step 8 to {tmp_path / 'ckpt' / 'backup-000000008.npz'}; the same "
                     f"command resumes from there."]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["backup-000000005.npz",
                                                                     "backup-000000008.npz"]
    # While the process would be exiting (30 s), another SIGINT changes nothing; after that (here: at once),
    # fit being over, it goes to the handler that was there before (KeyboardInterrupt), which is back.
    # (raise_signal: to this thread, the main one, so the handler runs before the next line.)
    signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(backup, "_exiting_until", 0.0)
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
        time.sleep(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous

    data = tiny.reset()  # the first state again: everything of step 8 must come from the backup
    backup = kn.backup.PreemptibleBackup(tmp_path / "ckpt", save_every=5)
    step = backup.restore(model)
    assert step == 8 and _iterations(model) == 8
    history = model.fit(data.skip(step), steps_per_epoch=5, epochs=4, verbose=0, callbacks=[backup])
    assert len(history.history["loss"]) == 3  # epoch 2 (its last 2 steps), 3 and 4
    assert _iterations(model) == 20
    assert largest_difference(tiny.weights(), never_stopped) <= 1e-5  # measured: 0.0
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["backup-000000015.npz", "backup-000000020.npz"]
    backup.delete()
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.skipif(BACKEND != "jax", reason="the multi-host path is keras.distribution on JAX")
def test_sigterm_to_one_of_two_jax_processes_stops_both_at_one_step(tmp_path, corpus):
    def start(process_id, port):
        env = _environment(JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                           KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}",
                           KERAS_DISTRIBUTION_NUM_PROCESSES="2", KERAS_DISTRIBUTION_PROCESS_ID=str(process_id))
        return subprocess.Popen(
            [SCRIPT, *TRAIN, "--text", str(corpus), "--strategy", "multi-host", "--checkpoint-dir",
             str(tmp_path / "ckpt"), "--out", str(tmp_path / f"m{process_id}.keras")],
            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def finish(processes):
        try:
            return [p.communicate(timeout=300) for p in processes]
        finally:
            for p in processes:
                if p.poll() is None:
                    p.kill()
                    p.communicate()

    port = free_port()
    processes = [start(i, port) for i in range(2)]
    try:
        _, signalled = _interrupt(processes[1], tmp_path / "ckpt", signal.SIGTERM)  # process 1 only
    finally:
        outputs = finish(processes)
    outputs[1] = ("", signalled)
    steps = set()
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 143, err[-3000:]
        (line,) = messages(err)
        name, step, path = NOTICE.match(line).groups()
        steps.add((int(step), path))
    ((step, path),) = steps  # both processes stopped at the same step and name the same file
    assert EVERY <= step < STEPS and kn.backup.read_backup(path)[0]["step"] == step

    port = free_port()
    processes = [start(i, port) for i in range(2)]
    outputs = finish(processes)
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
        assert f"resuming from step {step}\n" in out
    first, second = (kn.load_model(tmp_path / f"m{i}.keras") for i in range(2))
    assert _iterations(first) == _iterations(second) == STEPS
    # (test_distribute: two processes train as one does)
    assert largest_difference(first.get_weights(), second.get_weights()) == 0.0


# ---------------------------------------------------------------------------------------------
# Damaged backups
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backed_up(tmp_path_factory, tiny):
    """A folder with backups at step 5 (every 5 steps) and 7 (SIGTERM, `exit_on_signal=False`: fit returns)."""
    folder = tmp_path_factory.mktemp("backed_up") / "ckpt"
    model, data = tiny.model, tiny.reset()
    backup = kn.backup.PreemptibleBackup(folder, save_every=5, exit_on_signal=False, print_fn=lambda line: None)
    sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for nohup or a background job
    previous = signal.getsignal(signal.SIGTERM)
    signaller = _SignalDuringStep(7, signal.SIGTERM)
    try:
        model.fit(data, steps_per_epoch=5, epochs=4, verbose=0, callbacks=[signaller, backup])
    finally:
        after = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGINT, sigint)
    return (folder, backup.interrupted_by, _iterations(model), signaller.handlers,
            after == (signal.SIG_IGN, previous), backup)


def test_exit_on_signal_false_backs_up_and_returns_from_fit(backed_up):
    folder, interrupted_by, iterations, during_fit, given_back, backup = backed_up
    assert interrupted_by == "SIGTERM" and iterations == 7 and given_back
    assert during_fit == (signal.SIG_IGN, backup._on_signal)  # an ignored SIGINT stays ignored
    assert sorted(p.name for p in folder.iterdir()) == ["backup-000000005.npz", "backup-000000007.npz"]


@pytest.fixture()
def two_backups(tmp_path, backed_up):
    """A copy of `backed_up`'s folder: (folder, newest backup, previous backup)."""
    folder = shutil.copytree(backed_up[0], tmp_path / "ckpt")
    return folder, folder / "backup-000000007.npz", folder / "backup-000000005.npz"


def _restored(tiny, folder):
    tiny.reset()
    return tiny.model, kn.backup.PreemptibleBackup(folder).restore(tiny.model)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path):
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _flip_a_weight(path):
    """Flip one byte of the largest array's numbers: the archive still opens, its checksum fails."""
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    data[member.header_offset + 30 + name_length + extra_length + member.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_console_script_with_no_usable_backup_says_how_to_start_afresh(tmp_path, corpus, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "backup-000000010.npz").write_bytes(b"not a backup")
    assert cli.main([*TRAIN, "--text", str(corpus), "--checkpoint-dir", str(folder),
                     "--out", str(tmp_path / "m.keras")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: No backup in") and str(folder / "backup-000000010.npz") in line
    assert f"Remove the folder {str(folder)!r} to start training afresh" in line
    assert os.listdir(folder) == ["backup-000000010.npz"] and not (tmp_path / "m.keras").exists()


@pytest.mark.parametrize("damage, reason", [(_truncate, "truncated"), (_garbage, "truncated, or not a backup"),
                                            (_flip_a_weight, "Bad CRC-32")])
def test_a_damaged_newest_backup_is_set_aside_and_the_previous_one_restored(two_backups, tiny, damage, reason):
    folder, newest, previous = two_backups
    _, saved, _ = kn.backup.read_backup(previous)
    damage(newest)
    with pytest.warns(UserWarning) as caught:
        model, step = _restored(tiny, folder)
    (warning,) = [str(w.message) for w in caught if "cannot be used" in str(w.message)]
    assert str(newest) in warning and reason in warning and "step 5" in warning
    assert step == 5 and _iterations(model) == 5
    assert all(np.array_equal(to_numpy(v), a) for v, a in zip(model.variables, saved))
    assert sorted(p.name for p in folder.iterdir()) == ["backup-000000005.npz", "backup-000000007.npz.damaged"]


def test_no_usable_backup_names_every_file_and_how_to_start_afresh(two_backups, tiny):
    folder, newest, previous = two_backups
    _truncate(newest)
    _garbage(previous)
    with pytest.raises(kn.backup.DamagedBackupError) as error:
        _restored(tiny, folder)
    message = str(error.value)
    assert str(newest) in message and str(previous) in message and f"Remove the folder {str(folder)!r}" in message
    assert sorted(p.name for p in folder.iterdir()) == ["backup-000000005.npz", "backup-000000007.npz"]


def test_backups_of_another_model_are_refused_with_what_differs(two_backups, char_vectorizer):
    folder, newest, previous = two_backups
    wider = kn.NanoGPT(char_vectorizer.vocabulary_size(), 16, 1, 2, 32, dropout=0.1, vectorizer=char_vectorizer)
    wider.compile(optimizer=keras.optimizers.AdamW(3e-3))
    with pytest.raises(kn.backup.DamagedBackupError, match="hidden_dim=16 there, 32 here") as error:
        kn.backup.PreemptibleBackup(folder).restore(wider)
    assert str(newest) in str(error.value) and str(previous) in str(error.value)
    other_optimizer = kn.NanoGPT(char_vectorizer.vocabulary_size(), 16, 1, 2, 16, dropout=0.1,
                                 vectorizer=char_vectorizer)
    other_optimizer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    with pytest.raises(kn.backup.DamagedBackupError, match="optimizer AdamW, not SGD"):
        kn.backup.PreemptibleBackup(folder).restore(other_optimizer)


# ---------------------------------------------------------------------------------------------
# Writes that fail: a full folder, a read-only folder
# ---------------------------------------------------------------------------------------------

def _mount_tmpfs(path, size="1m"):
    """Mount a tmpfs of `size` at `path`; False where this user may not mount."""
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _unmount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def _faulty_folder(tmp_path, kind):
    """A folder holding old files where every new write fails: "full" (a 1 MiB tmpfs, filled) or
    "read-only" (a tmpfs remounted read-only, or `chmod 555` for a user other than root).

    Yields `(folder, write_files, errno)`: call `write_files(folder)` first, while writes still work."""
    folder = tmp_path / kind
    mounted = _mount_tmpfs(folder)
    if not mounted and kind == "read-only" and os.geteuid() == 0:
        pytest.fail("root may ignore file permissions, and mounting a tmpfs is not permitted here")
    state = {}

    def prepare(write):
        write(folder)
        if kind == "full":
            free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
            (folder / "filler").write_bytes(b"\0" * max(free - 8192, 0))
        elif mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, timeout=30)
        else:
            os.chmod(folder, 0o555)
        state["before"] = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    try:
        if kind == "full" and not mounted:
            yield None, None, None  # no tmpfs: see test_a_write_past_the_file_size_limit_...
        else:
            yield folder, prepare, errno.ENOSPC if kind == "full" else (errno.EROFS if mounted else errno.EACCES)
        after = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if state else {}
        assert after == state.get("before", after)  # every old file as it was, no temporary file left
    finally:
        if mounted:
            _unmount(folder)
        elif folder.exists():
            os.chmod(folder, 0o755)


def _write_model_weights_and_backup(model, data):
    def write(folder):
        model.save(folder / "m.keras")
        model.save_weights(folder / "m.weights.h5")
        model.fit(data, steps_per_epoch=3, epochs=1, verbose=0,
                  callbacks=[kn.backup.PreemptibleBackup(folder / "ckpt", save_every=3)])
    return write


@pytest.mark.parametrize("kind", ["full", "read-only"])
def test_a_failed_write_names_the_path_and_the_cause_and_keeps_the_old_files(tmp_path, tiny, kind):
    with _faulty_folder(tmp_path, kind) as (folder, prepare, code):
        if folder is None:  # no tmpfs here: the kernel's file-size limit makes the writes fail instead
            _check_writes_past_the_file_size_limit(tmp_path, tiny)
            return
        model, data = tiny.model, tiny.reset()
        prepare(_write_model_weights_and_backup(model, data))
        cause = os.strerror(code)
        for write, path in ((model.save, folder / "m.keras"), (model.save_weights, folder / "m.weights.h5")):
            with pytest.raises(OSError, match=re.escape(f"Could not write {str(path)!r}: {cause}")) as error:
                write(path)
            assert error.value.errno == code and "Nothing was replaced" in str(error.value)
        backup = folder / "ckpt" / "backup-000000006.npz"
        with pytest.raises(OSError, match=re.escape(f"Could not write {str(backup)!r}: {cause}")):
            model.fit(data, steps_per_epoch=3, epochs=2, verbose=0,
                      callbacks=[kn.backup.PreemptibleBackup(folder / "ckpt", save_every=3)])
        assert kn.backup.read_backup(folder / "ckpt" / "backup-000000003.npz")[0]["step"] == 3


def test_a_write_past_the_file_size_limit_names_the_path_and_keeps_the_old_files(tmp_path, tiny):
    """A full disk without mounting anything (any user): RLIMIT_FSIZE makes the kernel refuse the write."""
    _check_writes_past_the_file_size_limit(tmp_path, tiny)


def _check_writes_past_the_file_size_limit(tmp_path, tiny):
    """Write a model file, its weights and a backup; then, with RLIMIT_FSIZE below their sizes (SIGXFSZ ignored,
    so a write past it fails with EFBIG as on a full disk), write them again."""
    folder = tmp_path / "limited"
    model, data = tiny.model, tiny.reset()
    _write_model_weights_and_backup(model, data)(folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (min(len(b) for b in before.values()) // 2, hard))
    errors = {}
    try:
        for path, write in ((folder / "m.keras", model.save), (folder / "m.weights.h5", model.save_weights),
                            (folder / "ckpt" / "backup-000000006.npz", lambda path: model.fit(
                                data, steps_per_epoch=3, epochs=2, verbose=0,
                                callbacks=[kn.backup.PreemptibleBackup(path.parent, save_every=3)]))):
            try:
                write(path)
            except OSError as error:
                errors[path] = error
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert len(errors) == 3, errors
    for path, error in errors.items():
        assert error.errno == errno.EFBIG and str(error).startswith(
            f"[Errno {errno.EFBIG}] Could not write {str(path)!r}: {os.strerror(errno.EFBIG)}")
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_every_optimizer_variable_comes_back_muon_included(tmp_path, small_text, char_vectorizer):
    """Muon (orthogonalised momentum on 2-D weights, AdamW on the rest) keeps its own state: all of it returns."""
    keras.utils.set_random_seed(1)
    model = kn.NanoGPT(char_vectorizer.vocabulary_size(), 16, 1, 2, 16, vectorizer=char_vectorizer)
    model.compile(optimizer=keras.optimizers.Muon(learning_rate=0.02), jit_compile=BACKEND != "tensorflow" and "auto")
    train, _ = kn.data.make_datasets(small_text[:6000], char_vectorizer, 16, 8, validation_split=0.0, seed=0)
    model.fit(train.repeat(), steps_per_epoch=3, verbose=0,
              callbacks=[kn.backup.PreemptibleBackup(tmp_path / "ckpt", save_every=3)])
    variables = list(model.variables) + list(model.optimizer.variables)
    saved = [to_numpy(v) for v in variables]
    assert sum(float(np.abs(a).sum()) > 0 for a in saved[len(model.variables):]) > len(model.trainable_variables)
    for variable in variables:
        variable.assign(np.zeros(variable.shape, keras.backend.standardize_dtype(variable.dtype)))
    assert kn.backup.PreemptibleBackup(tmp_path / "ckpt").restore(model) == 3
    assert all(np.array_equal(to_numpy(v), a) for v, a in zip(variables, saved))


def test_the_archive_keeps_every_dtype_and_shape(tmp_path):
    import ml_dtypes

    arrays = [np.arange(6, dtype=ml_dtypes.bfloat16).reshape(2, 3), np.int64(7), np.array([1, 2], np.uint32),
              np.ones((2, 2), np.float32)[:, :1]]  # bfloat16 (stored as its bits), a scalar, a strided view
    manifest = {"format": kn.backup.FORMAT, "version": kn.backup.VERSION, "step": 7,
                "variables": [[f"v{i}", list(np.shape(a)), np.asarray(a).dtype.name] for i, a in enumerate(arrays)]}
    kn.backup.write_backup(tmp_path / "backup-000000007.npz", manifest, [np.asarray(a) for a in arrays],
                           {"torch_cpu": np.arange(5, dtype=np.uint8)})
    read, back, random_states = kn.backup.read_backup(tmp_path / "backup-000000007.npz")
    assert read["step"] == 7 and list(random_states["torch_cpu"]) == [0, 1, 2, 3, 4]
    for original, restored in zip(arrays, back):
        original = np.asarray(original)
        assert restored.dtype == original.dtype and restored.shape == original.shape
        assert np.array_equal(restored.astype(np.float64), original.astype(np.float64))
    assert os.listdir(tmp_path) == ["backup-000000007.npz"]
