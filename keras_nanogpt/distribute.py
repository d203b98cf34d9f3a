"""Several devices or machines in one call: TensorFlow strategies and `keras.distribution` on JAX.

`scope(name)` turns a strategy name into a context manager: create, compile and fit the model inside it.

| name             | backend    | what it is                                                         |
| ---------------- | ---------- | ------------------------------------------------------------------ |
| `none`           | any        | one device                                                         |
| `mirrored`       | TensorFlow | `tf.distribute.MirroredStrategy`: every local GPU (or CPU device)  |
| `tpu`            | TensorFlow | `tf.distribute.TPUStrategy` on the TPU this host reaches           |
| `data-parallel`  | JAX        | `keras.distribution.DataParallel` over every local device          |
| `model-parallel` | JAX        | `keras.distribution.ModelParallel` with `layout_map` (batch x model mesh) |
| `multi-host`     | JAX        | `keras.distribution.initialize(...)`, then data-parallel over every host's devices |

Batch sizes are global: `make_datasets(batch_size=64)` under 4 replicas gives each replica 16 windows
per step, so results match one device with the same global batch.
"""

import contextlib
import os

import keras
import numpy as np

from keras_nanogpt import _validation

STRATEGIES = ("none", "mirrored", "tpu", "data-parallel", "model-parallel", "multi-host")
_BACKENDS = {"mirrored": "tensorflow", "tpu": "tensorflow", "data-parallel": "jax",
             "model-parallel": "jax", "multi-host": "jax"}


def scope(name="none", model_parallel_size=2, job_addresses=None, num_processes=None, process_id=None):
    """A context manager that distributes the models created, compiled and fit inside it.

    "multi-host" starts JAX's distributed runtime when `scope` is called, so call it before any JAX work
    (`kn.data.make_datasets` included) and fit inside the scope: only there does Keras give each process
    its own shard of every global tf.data batch.

    Args:
        name: one of `STRATEGIES`.
        model_parallel_size: devices along the mesh's model axis for "model-parallel"; must divide the
            device count.
        job_addresses: for "multi-host", the coordinator's "host:port" (all processes pass the same); by
            default from `KERAS_DISTRIBUTION_JOB_ADDRESSES`.
        num_processes: for "multi-host", the number of processes (default `KERAS_DISTRIBUTION_NUM_PROCESSES`).
        process_id: for "multi-host", this process's index from 0 (default `KERAS_DISTRIBUTION_PROCESS_ID`).

    Example:
        >>> with scope("mirrored"):  # doctest: +SKIP
        ...     model = kn.NanoGPT(...)
        ...     model.compile()
        ...     model.fit(train_ds)
    """
    if name == "multi-worker-mirrored":
        raise ValueError(
            "`strategy` 'multi-worker-mirrored' is not supported: Keras 3's fit fails under TensorFlow's "
            "MultiWorkerMirroredStrategy (keras-team/keras#20585). For several machines use the JAX backend "
            "with strategy 'multi-host' (keras.distribution.initialize + DataParallel).")
    _validation.check_choice("strategy", name, STRATEGIES)
    if name == "none":
        return contextlib.nullcontext()
    backend = keras.backend.backend()
    if backend != _BACKENDS[name]:
        hint = ("The PyTorch backend has no Keras distribution API: train on one device, or use the JAX "
                "backend (data-parallel, model-parallel, multi-host) or TensorFlow (mirrored, tpu)."
                if backend == "torch" else f"Run with KERAS_BACKEND={_BACKENDS[name]}.")
        raise ValueError(f"`strategy` {name!r} needs the {_BACKENDS[name]} backend, not {backend}. {hint}")
    if name == "mirrored":
        import tensorflow as tf

        return tf.distribute.MirroredStrategy().scope()
    if name == "tpu":
        import tensorflow as tf

        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver).scope()
    if name == "multi-host":
        _initialize(job_addresses, num_processes, process_id)
    devices = keras.distribution.list_devices()
    if name == "model-parallel":
        model_parallel_size = _validation.check_int("model_parallel_size", model_parallel_size)
        if len(devices) % model_parallel_size:
            raise ValueError(f"`model_parallel_size` must divide the {len(devices)} devices; "
                             f"got {model_parallel_size}.")
        mesh = keras.distribution.DeviceMesh(
            (len(devices) // model_parallel_size, model_parallel_size), ("batch", "model"), devices)
        return keras.distribution.ModelParallel(layout_map=layout_map(mesh), batch_dim_name="batch").scope()
    return keras.distribution.DataParallel(devices=devices).scope()


def layout_map(device_mesh, model_axis="model"):
    """A `keras.distribution.LayoutMap` that shards NanoGPT's large kernels over the mesh's model axis.

    The token and position tables are split along their width, the fused QKV and MLP input kernels
    along their outputs, and the attention and MLP output kernels along their inputs (Megatron style),
    so each block needs one all-reduce per residual branch.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` with an axis named `model_axis`.
        model_axis: the mesh axis the kernels are split over.

    Example:
        >>> mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"))  # doctest: +SKIP
        >>> distribution = keras.distribution.ModelParallel(layout_map=layout_map(mesh), batch_dim_name="batch")
    """
    if model_axis not in device_mesh.axis_names:
        raise ValueError(f"`device_mesh` has no axis {model_axis!r}; its axes are {device_mesh.axis_names}.")
    layouts = keras.distribution.LayoutMap(device_mesh)
    layouts[r".*embedding/embeddings"] = (None, model_axis)
    layouts[r".*attention/qkv/kernel"] = (None, model_axis)
    layouts[r".*attention/output/kernel"] = (model_axis, None)
    layouts[r".*mlp/kernel"] = (None, model_axis)
    layouts[r".*mlp_output/kernel"] = (model_axis, None)
    layouts[r".*head/kernel"] = (None, model_axis)
    return layouts


def _initialize(job_addresses, num_processes, process_id):
    try:
        keras.distribution.initialize(
            job_addresses or os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES"),
            num_processes if num_processes is not None else _env_int("KERAS_DISTRIBUTION_NUM_PROCESSES"),
            process_id if process_id is not None else _env_int("KERAS_DISTRIBUTION_PROCESS_ID"))
    except RuntimeError as error:
        if "before" not in str(error):
            raise
        # JAX refuses once anything (kn.data.make_datasets' encoding included) has started its backend.
        raise RuntimeError(
            "`strategy` 'multi-host' must be set up before any JAX work in this process: call "
            "kn.distribute.scope('multi-host') first, before kn.data.make_datasets or creating a model, "
            f"and enter it later. ({error})") from error


def _env_int(name):
    value = os.environ.get(name)
    return None if value is None else int(value)


# -- JAX multi-host: one decision for all processes (PreemptibleBackup asks these every step) ---------------

def process_count():
    """Processes in this JAX multi-host run (1 on one host and on the other backends)."""
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count()


def process_index():
    """This process's index in a JAX multi-host run (0 on one host and on the other backends)."""
    if keras.backend.backend() != "jax":
        return 0
    import jax

    return jax.process_index()


def _gather(value):
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


def agreed(value, what, reduce=None):
    """`value` when every process has the same one (or `reduce` of them all); else an error naming `what`."""
    if process_count() == 1:
        return value
    values = _gather(np.int64(value)).tolist()
    if reduce is not None:
        return type(value)(reduce(values))
    if len(set(values)) != 1:
        raise ValueError(f"The processes disagree on {what}: {values}. Every process must read the same "
                         f"backup folder (a shared file system).")
    return value


def agreed_signal(received):
    """The signal any process received (the first one by process order), or None: the same for all."""
    numbers = [n for n in _gather(np.int32(received or 0)).tolist() if n]
    return numbers[0] if numbers else None


def host_array(variable):
    """A variable's value on the host, whole (gathered from every process where it is split across them)."""
    value = variable.value
    if process_count() > 1 and not (value.is_fully_addressable or value.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(keras.ops.convert_to_numpy(value))


def model_strategy(model):
    """The TensorFlow `tf.distribute` strategy `model` was created under, or None (and on other backends).

    Example:
        >>> with (model_strategy(model) or contextlib.nullcontext()):  # doctest: +SKIP
        ...     model.optimizer.build(model.trainable_variables)
    """
    if keras.backend.backend() != "tensorflow":
        return None
    return getattr(model, "distribute_strategy", None)
