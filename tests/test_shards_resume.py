"""Exact resume from token shards: a run stopped by SIGTERM or killed by SIGKILL and started again with
`token_dataset(..., start=step)` has the losses, step for step, of a run never stopped (one step per
epoch, so each epoch's loss is that step's).

Batch k of a shard stream depends only on the shards, the settings, the seed and k, so the backup's step is
the data position and nothing before it is read again.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import BACKEND, QUICK_COMPILE

import keras_nanogpt as kn
from keras_nanogpt import shards

STEPS = 8

# `_fit` below in a process of its own that kills itself with SIGKILL after a step (argv: shards folder,
# backup folder, the step, compile arguments as JSON).
SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import keras
    import keras_nanogpt as kn

    folder, backup_folder, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Kill(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(257, 16, 1, 2, 16)
    model.compile(**json.loads(sys.argv[4]))
    backup = kn.backup.PreemptibleBackup(backup_folder, save_every=2)
    train = kn.data.token_dataset(folder, 16, 4, seed=5, start=backup.restore(model))
    model.fit(train, steps_per_epoch=1, epochs=%d, verbose=0, callbacks=[Kill(), backup])
""" % STEPS)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    with open(os.path.join(os.environ["KERAS_HOME"], "datasets", "pride_and_prejudice.txt"), encoding="utf-8") as f:
        (root / "pride.txt").write_text(f.read()[:40_000], encoding="utf-8")
    kn.data.prepare(root / "pride.txt", root / "out", "byte", workers=1, progress=False)
    return root / "out"


def _fit(folder, backup=None, callbacks=()):
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(257, 16, 1, 2, 16)
    model.compile(**QUICK_COMPILE)
    step = backup.restore(model) if backup else 0
    train = kn.data.token_dataset(folder, 16, 4, seed=5, start=step)
    history = model.fit(train, steps_per_epoch=1, epochs=STEPS, verbose=0,
                        callbacks=list(callbacks) + ([backup] if backup else []))
    return step, history.history["loss"]


class _SignalAfterStep(keras.callbacks.Callback):
    def __init__(self, step, number):
        super().__init__()
        self.step, self.number = step, number

    def on_train_batch_end(self, batch, logs=None):
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == self.step:
            signal.raise_signal(self.number)


@pytest.fixture(scope="module")
def never_stopped(folder):
    _, losses = _fit(folder)
    assert len(losses) == STEPS
    return losses


def test_sigterm_then_the_same_call_trains_on_exactly_the_batches_of_a_run_never_stopped(tmp_path, folder,
                                                                                         never_stopped):
    backup = kn.backup.PreemptibleBackup(tmp_path / "ckpt", save_every=2, exit_on_signal=False,
                                         print_fn=lambda line: None)
    _, before = _fit(folder, backup, [_SignalAfterStep(5, signal.SIGTERM)])
    assert backup.interrupted_by == "SIGTERM" and sorted(os.listdir(tmp_path / "ckpt"))[-1] == "backup-000000005.npz"
    step, after = _fit(folder, kn.backup.PreemptibleBackup(tmp_path / "ckpt", save_every=2))
    assert step == 5 and before + after == never_stopped  # equal, not close: the same batches, the same weights


def test_a_process_killed_by_sigkill_continues_from_its_last_backup_as_if_never_killed(tmp_path, folder,
                                                                                       never_stopped):
    killed = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(tmp_path / "ckpt"), "5",
                             json.dumps(QUICK_COMPILE)], env=dict(os.environ, KERAS_BACKEND=BACKEND),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["backup-000000002.npz", "backup-000000004.npz"]
    step, after = _fit(folder, kn.backup.PreemptibleBackup(tmp_path / "ckpt", save_every=2))
    assert step == 4 and after == never_stopped[4:]


def test_resuming_reads_none_of_the_skipped_batches(folder, monkeypatch):
    read = []
    original = shards.TokenWindows.batch

    def counted(self, k):
        read.append(k)
        return original(self, k)

    monkeypatch.setattr(shards.TokenWindows, "batch", counted)
    batches = list(kn.data.token_dataset(folder, 16, 4, seed=5, start=1_000_000).take(2))
    assert len(batches) == 2 and min(read) == 1_000_000
