"""PyTorch only: the train step's AOTInductor package (keras_nanogpt/_torch_training.py): built by the
ski rental in the process where the run repays it, else by a builder started as the process exits and
loaded by the next run; its losses within 1e-4 (relative) of Keras's eager step; counted builds,
loads and traces; dropout's masks the same on every path.

Each test builds one package of a 1-layer, 16-wide model in a folder of its own (tens of seconds)."""

import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import BACKEND

import keras_nanogpt as kn

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="the train step's packages are PyTorch's")

STEPS = 20
BUILD_SECONDS = 600  # the bound on one build (a busy 2-core machine)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Trains STEPS seeded steps of a small model and prints its losses, the level of each step, the
# package counters and the traces: run in this process (eager, in-process builds) and as a fresh one.
SCRIPT = """
import json, sys
import keras, numpy as np
import keras_nanogpt as kn
from keras_nanogpt import _torch_aot

class Record(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.losses, self.levels = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))
        self.levels.append(getattr(self.model.train_function, "level", "eager"))

def train(jit_compile, steps, dropout=0.0):
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(vocabulary_size=24, sequence_length=16, num_layers=1, num_heads=2, hidden_dim=16,
                       dropout=dropout)
    model.compile(optimizer=kn.training.nanogpt_optimizer(steps, warmup_steps=5), jit_compile=jit_compile)
    starts = np.random.default_rng(0).integers(0, 24, (4 * steps, 1))
    ids = ((starts + np.arange(17)) % 24).astype("int32")
    record = Record()
    model.fit(ids[:, :-1], ids[:, 1:], batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[record])
    return dict(losses=record.losses, levels=record.levels, counters=dict(_torch_aot.counters),
                traces=getattr(model.train_function, "traces", 0))

if __name__ == "__main__":
    print(json.dumps(train("auto", int(sys.argv[1]))))
"""


@pytest.fixture
def script(tmp_path, monkeypatch):
    """The training script as a module of this process, packages on in a folder of the test's own."""
    path = tmp_path / "train_script.py"
    path.write_text(SCRIPT)
    monkeypatch.setenv("KERAS_NANOGPT_AOT", "1")
    monkeypatch.setenv("KERAS_NANOGPT_AOT_DIR", str(tmp_path / "aot"))
    monkeypatch.syspath_prepend(str(tmp_path))
    import train_script

    yield path, train_script
    sys.modules.pop("train_script", None)


def run_fresh(path, aot, steps=STEPS):
    env = dict(os.environ, KERAS_BACKEND="torch", KERAS_NANOGPT_AOT="1", KERAS_NANOGPT_AOT_DIR=str(aot),
               PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, str(path), str(steps)], env=env, capture_output=True, text=True,
                          timeout=BUILD_SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_for_package(aot):
    """Wait for the detached builder a finished run started (ended by its process id if it overruns)."""
    deadline = time.monotonic() + BUILD_SECONDS
    while time.monotonic() < deadline:
        if list(aot.glob("*.json")) or list(aot.glob("*.failed")):
            break
        time.sleep(1)
    else:
        for lock in aot.glob("*.building"):
            os.kill(int(lock.read_text().strip()), 15)
        pytest.fail(f"no package after {BUILD_SECONDS} s")
    assert not list(aot.glob("*.failed")), [p.read_text()[-2000:] for p in aot.glob("*.failed")]


def test_a_run_builds_the_package_as_it_exits_and_the_next_run_loads_it(script, tmp_path):
    path, module = script
    aot = tmp_path / "aot"
    eager = module.train(False, STEPS)
    first = run_fresh(path, aot)
    assert set(first["levels"]) == {"graph"} and first["traces"] == 1
    assert first["counters"] == {"loaded": 0, "built": 0, "spawned": 0, "rejected": 0}  # spawned at exit
    wait_for_package(aot)
    assert len(list(aot.glob("*.pt2"))) == 1
    second = run_fresh(path, aot)
    assert set(second["levels"]) == {"package"} and second["traces"] == 1  # traced for its key only
    assert second["counters"] == {"loaded": 1, "built": 0, "spawned": 0, "rejected": 0}
    np.testing.assert_allclose(second["losses"], eager["losses"], rtol=1e-4)
    np.testing.assert_allclose(first["losses"], eager["losses"], rtol=1e-5)
    assert len(list(aot.glob("*.pt2"))) == 1 and not list(aot.glob("*.building"))  # no second builder


def test_a_run_that_repays_the_build_builds_in_process(script, monkeypatch):
    """With dropout: the package draws the eager step's masks."""
    from keras_nanogpt import _torch_aot, _torch_training

    _, module = script
    eager = module.train(False, STEPS, 0.1)
    monkeypatch.setattr(_torch_training, "expected_build_seconds", lambda: 1e-3)  # repaid by any run
    monkeypatch.setattr(_torch_training, "_at_exit", {})
    before = dict(_torch_aot.counters)
    run = module.train("auto", STEPS, 0.1)
    assert run["levels"][:3] == ["graph"] * 3 and set(run["levels"][3:]) == {"package"}  # 3 steps measured
    assert run["traces"] == 1
    assert {k: run["counters"][k] - before[k] for k in before} == {
        "loaded": 1, "built": 1, "spawned": 0, "rejected": 0}
    assert not _torch_training._at_exit  # built here: no builder as the process exits
    np.testing.assert_allclose(run["losses"], eager["losses"], rtol=1e-4)


def test_a_short_run_keeps_the_graph_and_asks_for_a_builder_at_exit(script, monkeypatch):
    from keras_nanogpt import _torch_aot, _torch_training

    _, module = script
    monkeypatch.setattr(_torch_training, "_at_exit", {})
    before = dict(_torch_aot.counters)
    run = module.train("auto", STEPS)
    assert set(run["levels"]) == {"graph"} and _torch_aot.counters == before
    assert len(_torch_training._at_exit) == 1  # the package this process's exit would build
    monkeypatch.setenv("KERAS_NANOGPT_AOT", "0")
    _torch_training._at_exit.clear()
    run = module.train("auto", STEPS)  # packages off: nothing asked for
    assert set(run["levels"]) == {"graph"} and not _torch_training._at_exit
