"""Distribution for real on this CPU: several logical devices give the weights one device gives.

TensorFlow: MirroredStrategy over 2 logical CPUs, and a run killed mid-way resumed by BackupAndRestore.
JAX: DataParallel and ModelParallel (with `kn.distribute.layout_map`) over 4 host devices, and two
processes on 127.0.0.1 ("multi-host", gloo collectives). Each runs in fresh processes, because the
device count is fixed when the backend starts. PyTorch: no Keras distribution API, a clear error.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
from conftest import BACKEND, free_port, largest_difference

import keras_nanogpt as kn

# Trains a copy of the same model for 4 steps on one device and under `strategy`, with the same
# global batch and initial weights, and prints the largest weight difference as JSON.
SCRIPT = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    import keras_nanogpt as kn

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    strategy = sys.argv[1]
    text = kn.data.load_text("pride_and_prejudice")[:8000]
    vectorizer = kn.data.make_vectorizer(text)

    def trained(name, weights=None):
        # The same 4 batches in the same order for both runs.
        train, _ = kn.data.make_datasets(text, vectorizer, 16, 8, validation_split=0.0, shuffle=False)
        with kn.distribute.scope(name):
            keras.utils.set_random_seed(0)
            model = kn.NanoGPT(vectorizer.vocabulary_size(), 16, 2, 2, 16, vectorizer=vectorizer)
            if weights is not None:
                model.set_weights(weights)
            start = model.get_weights()
            # SGD with momentum: the update is linear in the all-reduced gradient, so this checks the
            # gradient aggregation exactly. (Under TF's MirroredStrategy Keras's Adam drifts from one
            # device by ~1e-2 after 4 steps at lr 1e-2 while the losses agree to 1e-6; see the README.)
            optimizer = (keras.optimizers.SGD(0.5, momentum=0.9) if backend == "tensorflow"
                         else keras.optimizers.Adam(1e-2))
            model.compile(optimizer=optimizer)
            model.fit(train.take(4), verbose=0)
        return model, start

    single, start = trained("none")
    distributed, _ = trained(strategy, start)
    differences = [float(np.max(np.abs(a - b)))
                   for a, b in zip(single.get_weights(), distributed.get_weights())]
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(start, single.get_weights()))
    report = {"difference": max(differences), "moved": moved,
              "devices": len(keras.distribution.list_devices()) if backend == "jax" else
                         distributed.distribute_strategy.num_replicas_in_sync,
              "sample": distributed.generate("It is", max_new_tokens=5, temperature=0),
              "jit_compile": [single.jit_compile, distributed.jit_compile]}
    if strategy == "model-parallel":
        kernel = distributed.blocks[0].attention.qkv_dense.kernel
        report["qkv_sharding"] = str(kernel.value.sharding.spec)
    print("REPORT" + json.dumps(report))
""")


def run_script(strategy, **environment):
    env = dict(os.environ, KERAS_BACKEND=BACKEND, **environment)
    result = subprocess.run([sys.executable, "-c", SCRIPT, strategy], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("REPORT")[-1])


@pytest.mark.skipif(BACKEND != "tensorflow", reason="MirroredStrategy is TensorFlow's")
def test_mirrored_strategy_equals_one_device():
    report = run_script("mirrored")
    assert report["devices"] == 2
    assert report["jit_compile"] == [True, False]  # XLA on one CPU; Keras's choice under a strategy
    assert report["moved"] > 1e-3  # training changed the weights ...
    assert report["difference"] <= 1e-4  # ... and two replicas changed them as one device did
    assert report["sample"].startswith("It is") and len(report["sample"]) == len("It is") + 5


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on the JAX backend")
@pytest.mark.parametrize("strategy", ["data-parallel", "model-parallel"])
def test_jax_distribution_equals_one_device(strategy):
    report = run_script(strategy, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    assert report["devices"] == 4
    assert report["moved"] > 1e-3
    assert report["difference"] <= 1e-4
    assert report["sample"].startswith("It is")
    if strategy == "model-parallel":
        assert "model" in report["qkv_sharding"]


# One of two "multi-host" processes, configured by KERAS_DISTRIBUTION_* as the README's recipe is. Each
# process holds only its own rows of every global batch (the others are zeroed, which would change the
# result if they were trained on): the test passes only if fit shards the input per process.
MULTI_HOST_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, keras, numpy as np
    import keras_nanogpt as kn

    strategy = kn.distribute.scope("multi-host")  # first: it starts JAX's distributed runtime
    process, processes = jax.process_index(), jax.process_count()
    text = kn.data.load_text("pride_and_prejudice")[:8000]
    vectorizer = kn.data.make_vectorizer(text)
    train, _ = kn.data.make_datasets(text, vectorizer, 16, 8, validation_split=0.0, shuffle=False)
    own = np.zeros((8, 1), "int32")
    own[process * 8 // processes:(process + 1) * 8 // processes] = 1
    train = train.take(4).map(lambda x, y: (x * own, y * own))
    start = np.load(sys.argv[1])
    with strategy:
        model = kn.NanoGPT(vectorizer.vocabulary_size(), 16, 2, 2, 16, vectorizer=vectorizer)
        model.set_weights([start[f"arr_{i}"] for i in range(len(start.files))])
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        model.fit(train, verbose=0)
    np.savez(sys.argv[2], *model.get_weights())
    print("REPORT" + json.dumps({"process": process, "processes": processes,
                                 "devices": len(keras.distribution.list_devices()),
                                 "local_devices": jax.local_device_count()}))
""")


def _weights(path):
    arrays = np.load(path)
    return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


@pytest.mark.skipif(BACKEND != "jax", reason="the multi-host path is keras.distribution on JAX")
def test_two_jax_processes_train_as_one(tmp_path):
    text = kn.data.load_text("pride_and_prejudice")[:8000]
    vectorizer = kn.data.make_vectorizer(text)
    train, _ = kn.data.make_datasets(text, vectorizer, 16, 8, validation_split=0.0, shuffle=False)
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(vectorizer.vocabulary_size(), 16, 2, 2, 16, vectorizer=vectorizer)
    start = model.get_weights()
    np.savez(tmp_path / "start.npz", *start)
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{free_port()}",
               KERAS_DISTRIBUTION_NUM_PROCESSES="2")
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    workers = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as output:
                workers.append(subprocess.Popen(
                    [sys.executable, "-c", MULTI_HOST_SCRIPT, str(tmp_path / "start.npz"),
                     str(tmp_path / f"process{i}.npz")],
                    env=dict(env, KERAS_DISTRIBUTION_PROCESS_ID=str(i)), stdout=output,
                    stderr=subprocess.STDOUT))
        # One process, one device, the same 4 global batches, while the two processes train.
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        model.fit(train.take(4), verbose=0)
        deadline = time.monotonic() + 300  # a process that fails leaves the other waiting: stop both
        while (any(w.poll() is None for w in workers) and not any(w.poll() for w in workers)
               and time.monotonic() < deadline):
            time.sleep(0.2)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    outputs = [log.read_text() for log in logs]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, f"exit {worker.returncode}: {output[-3000:]}"
    reports = [json.loads(output.split("REPORT")[-1]) for output in outputs]
    assert [r["process"] for r in reports] == [0, 1]
    assert all(r["processes"] == 2 and r["devices"] == 4 and r["local_devices"] == 2 for r in reports)
    first, second = (_weights(tmp_path / f"process{i}.npz") for i in range(2))
    assert all(np.array_equal(a, b) for a, b in zip(first, second))  # the processes agree exactly ...
    assert largest_difference(start, model.get_weights()) > 1e-3
    assert largest_difference(first, model.get_weights()) <= 1e-4  # ... and trained as one process did


@pytest.mark.skipif(BACKEND != "jax", reason="the multi-host path is keras.distribution on JAX")
def test_multi_host_after_jax_work_says_to_call_it_first():
    keras.ops.convert_to_numpy(keras.ops.ones(1))  # JAX's backend is running in this process
    with pytest.raises(RuntimeError, match="before any JAX work"):
        kn.distribute.scope("multi-host", job_addresses="127.0.0.1:1", num_processes=2, process_id=0)


# "first": trains 4 epochs of 3 steps under MirroredStrategy (the reference), then again from the same
# weights with BackupAndRestore, and SIGKILLs itself after step 7 (the last backup: step 6).
# "resume": the same fit again, which restores that backup and finishes.
RESUME_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import keras, numpy as np
    import tensorflow as tf
    import keras_nanogpt as kn

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    mode, backup, reference = sys.argv[1:]
    text = kn.data.load_text("pride_and_prejudice")[:8000]
    vectorizer = kn.data.make_vectorizer(text)
    train, _ = kn.data.make_datasets(text, vectorizer, 16, 8, validation_split=0.0, shuffle=False)
    train = train.take(3)  # one epoch: the same 3 batches every time

    class Steps(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.begin, self.batches = int(self.model.optimizer.iterations.numpy()), 0

        def on_train_batch_end(self, batch, logs=None):
            self.batches += 1
            if mode == "first" and int(self.model.optimizer.iterations.numpy()) == 7:
                os.kill(os.getpid(), signal.SIGKILL)

    def build(weights=None):
        with kn.distribute.scope("mirrored"):
            keras.utils.set_random_seed(0)
            model = kn.NanoGPT(vectorizer.vocabulary_size(), 16, 2, 2, 16, vectorizer=vectorizer)
            model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9))
        if weights is not None:
            model.set_weights(weights)
        return model

    model = build()
    if mode == "first":
        start = model.get_weights()
        model.fit(train, epochs=4, verbose=0)
        np.savez(reference, *model.get_weights())
        print("MOVED", max(float(np.max(np.abs(a - b))) for a, b in zip(start, model.get_weights())),
              flush=True)
        model = build(start)
    steps = Steps()
    model.fit(train, epochs=4, verbose=0,
              callbacks=[keras.callbacks.BackupAndRestore(backup, save_freq="epoch"), steps])
    saved = np.load(reference)
    print("REPORT" + json.dumps({
        "begin": steps.begin, "batches": steps.batches,
        "iterations": int(model.optimizer.iterations.numpy()),
        "replicas": model.distribute_strategy.num_replicas_in_sync,
        "difference": max(float(np.max(np.abs(saved[f"arr_{i}"] - w)))
                          for i, w in enumerate(model.get_weights()))}))
""")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="MirroredStrategy is TensorFlow's")
def test_backup_and_restore_resumes_a_killed_mirrored_run(tmp_path):
    backup, reference = tmp_path / "backup", tmp_path / "reference.npz"
    env = dict(os.environ, KERAS_BACKEND="tensorflow")

    def run(mode):
        return subprocess.run([sys.executable, "-c", RESUME_SCRIPT, mode, str(backup), str(reference)],
                              env=env, capture_output=True, text=True, timeout=600)

    first = run("first")
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert float(first.stdout.split("MOVED")[-1]) > 1e-3  # the reference run changed the weights
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 2  # backed up at step 6

    resumed = run("resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout.split("REPORT")[-1])
    assert report["replicas"] == 2
    assert (report["begin"], report["batches"], report["iterations"]) == (6, 6, 12)
    assert report["difference"] <= 1e-4  # the killed-and-resumed run ends where the uninterrupted one does
    assert not backup.exists()  # a finished fit removes its backup


@pytest.mark.skipif(BACKEND == "torch", reason="keras.distribution (devices, meshes) has no torch backend")
def test_layout_map_covers_every_large_kernel():
    devices = keras.distribution.list_devices()[:1]
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), devices)
    layouts = kn.distribute.layout_map(mesh)
    model = kn.NanoGPT(50, 16, 2, 2, 16, tie_embeddings=False)
    sharded = [v.path for v in model.weights if layouts[v.path] is not None]
    for part in ("token_embedding", "position_embedding", "qkv/kernel", "attention/output/kernel",
                 "mlp/kernel", "mlp_output/kernel", "head/kernel"):
        assert any(part in path for path in sharded), part
    assert all(len(v.shape) == 2 for v in model.weights if v.path in sharded)
    # The modern layout: its matrices sharded the same way, its new weights (the query and key norms'
    # scales, RMSNorm scales; rotary positions have none) replicated on purpose, as all 1-D weights are.
    modern = kn.NanoGPT.from_config_name("nano-modern", vocabulary_size=50)
    split = {v.path for v in modern.weights if layouts[v.path] is not None}
    assert {v.path for v in modern.weights if len(v.shape) == 2} == split
    for part in ("query_norm", "key_norm"):
        assert any(part in v.path for v in modern.weights if v.path not in split), part
    with pytest.raises(ValueError, match="model_axis|axis"):
        kn.distribute.layout_map(mesh, model_axis="tensor")


@pytest.mark.parametrize("name, message", [
    ("multi-worker-mirrored", "20585"),
    ("horovod", "strategy"),
])
def test_unsupported_strategies_are_explained(name, message):
    with pytest.raises(ValueError, match=message):
        kn.distribute.scope(name)


def test_strategy_on_the_wrong_backend_names_the_right_one():
    name = "data-parallel" if BACKEND != "jax" else "mirrored"
    with pytest.raises(ValueError, match="backend") as error:
        kn.distribute.scope(name)
    if BACKEND == "torch":
        assert "JAX" in str(error.value) and "no Keras distribution API" in str(error.value)
