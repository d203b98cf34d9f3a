"""What the package does differently on TensorFlow, JAX and PyTorch, in one place.

The rest of the package asks these functions and never reads `keras.backend.backend()` itself; the
PyTorch-only machinery they call lives in `_torch_*.py` (imported only when PyTorch runs), the
strategies and multi-host helpers in `distribute.py`.

- Generation and scoring: `compile_function` (`jax.jit` / `tf.function(jit_compile=True)` of a
  function that takes the weights as arguments; PyTorch runs it without autograd) and
  `compile_decode` (PyTorch: a loop over one token's step, traced or compiled by TorchInductor) and
  `compile_prefill`.
- Ahead of time: `building_packages` (PyTorch: the decode step's AOTInductor packages, built now).
- Training: `training_jit_compile` and `after_compile` (`NanoGPT.compile`'s defaults: XLA on
  TensorFlow's CPU too, traced ATen steps on PyTorch), `adamw_class`, `retrack_variables`, and
  `keep_heap_padding` (JAX: the host allocator's setting that `import keras_nanogpt` makes).

Example:
    >>> name() in ("tensorflow", "jax", "torch")
    True
"""

import ctypes
import os
import sys

import keras
from keras import ops

from keras_nanogpt import _keras_internals, decoding

_HEAP_TOP_PAD = 64 << 20  # bytes glibc's malloc keeps at the top of a heap (M_TOP_PAD) under JAX


def name():
    """The running backend: "tensorflow", "jax" or "torch" (Keras reads `KERAS_BACKEND` once)."""
    return keras.backend.backend()


def compile_function(model, function, on_trace):
    """`function` compiled for the backend, taking the model's weights as arguments.

    JAX: `jax.jit` of a stateless function whose first argument is the weights (as keras-hub's
    `CausalLM.generate` does). TensorFlow: `tf.function(jit_compile=True)`, weights likewise passed
    in. PyTorch: run eagerly without autograd (scoring and search samplers; the decode loop is
    `compile_decode`'s, the prefill `compile_prefill`'s). New weights (training, loading) never retrace.

    Args:
        model: the `NanoGPT` whose variables `function` reads.
        function: a `keras.ops` function of tensors.
        on_trace: called each time the function is traced (JAX, TensorFlow).

    Example:
        >>> logits = compile_function(model, lambda ids: model(ids), lambda: None)  # doctest: +SKIP
    """
    backend = name()
    if backend not in ("jax", "tensorflow"):

        def run(*args, **kwargs):
            args, kwargs = keras.tree.map_structure(ops.convert_to_tensor, (args, kwargs))
            if backend == "torch":
                import torch

                with torch.no_grad():
                    return function(*args, **kwargs)
            return function(*args, **kwargs)

        return run

    variables = model.variables

    def stateless(values, *args, **kwargs):
        on_trace()  # runs only while tracing
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return function(*args, **kwargs)

    if backend == "jax":
        import jax

        compiled = jax.jit(stateless)
    else:
        import tensorflow as tf

        compiled = tf.function(stateless, jit_compile=True)
    return lambda *args, **kwargs: compiled([v.value for v in variables], *args, **kwargs)


def compile_prefill(model, on_trace):
    """The prefill (`decoding.prefill`: the KV cache after the prompt), compiled for the backend.

    PyTorch: `_torch_compile.Prefill`, eagerly or from its AOTInductor package (one per prompt bucket).
    Elsewhere: `compile_function`.

    Args:
        model: a `NanoGPT`.
        on_trace: called at each trace (JAX, TensorFlow).

    Example:
        >>> cache = compile_prefill(model, lambda: None)(tokens, model.empty_cache(1))  # doctest: +SKIP
    """
    if name() == "torch":
        from keras_nanogpt import _torch_compile

        return _torch_compile.Prefill(model)
    return compile_function(model, decoding.prefill(model), on_trace)


def compile_decode(model, sampler, steps, on_trace):
    """The decode loop (`decoding.decode_loop`) for `sampler`, compiled for the backend.

    PyTorch: a Python loop over one token's step, which `_torch_compile.Decoder` runs eagerly, as a
    traced ATen graph or compiled by TorchInductor, whichever the call's length pays for; `steps`
    (a dict kept with the model) shares those compiled steps between samplers. Elsewhere:
    `compile_function` of the whole `ops.while_loop`.

    Args:
        model: a `NanoGPT`.
        sampler: a keras-hub token sampler.
        steps: the model's dict of PyTorch decode steps (unused elsewhere).
        on_trace: called at each trace or compilation.

    Example:
        >>> decode = compile_decode(model, keras_hub.samplers.GreedySampler(), {}, lambda: None)  # doctest: +SKIP
    """
    if name() == "torch":
        from keras_nanogpt import _torch_compile

        return _torch_compile.Decoder(model, sampler, decoding.token_step(model, sampler), steps, on_trace)
    return compile_function(model, decoding.decode_loop(model, sampler), on_trace)


def building_packages():
    """A context in which generation builds each missing compiled package of its decode step at once, in
    this process (PyTorch's AOTInductor packages, `_torch_aot`); `keras-nanogpt compile` runs in one.

    Returns:
        `(context, counts)`: the context manager, and a function giving this process's package counts
        (`{"loaded": ..., "built": ..., "spawned": ..., "rejected": ...}`) and their folder.

    Example:
        >>> context, counts = building_packages()  # doctest: +SKIP
    """
    if name() != "torch":
        raise ValueError(f"Decoding is compiled ahead of time into packages on the PyTorch backend only; this "
                         f"process runs {name()} (set KERAS_BACKEND=torch).")
    from keras_nanogpt import _torch_aot

    if not _torch_aot.enabled():
        raise ValueError(f"{_torch_aot.ENVIRONMENT_VARIABLE}={os.environ[_torch_aot.ENVIRONMENT_VARIABLE]!r} "
                         f"turns the packages off: unset it to build them.")
    if not _torch_aot.compiler_available():
        raise ValueError("Building packages needs a C++ compiler (g++, c++, clang++ or $CXX) on the PATH.")
    return _torch_aot.building_now(), lambda: {**_torch_aot.counters, "directory": _torch_aot.directory()}


def training_jit_compile(model, jit_compile, run_eagerly=False):
    """The `jit_compile` that `NanoGPT.compile` gives Keras for the caller's `jit_compile`.

    "auto" on TensorFlow outside a distribution strategy: True, XLA on CPU too (Keras's own "auto"
    leaves it off on CPU-only machines; at nanoGPT's CPU recipe XLA trains 1.5x faster,
    benchmarks/RESULTS.md). PyTorch: "auto" is False for Keras (no `torch.compile`; `after_compile`
    installs the traced steps instead), with a warning where bfloat16 would train slowly.

    Args:
        model: the `NanoGPT` being compiled.
        jit_compile: the caller's value (True, False or "auto").
        run_eagerly: the caller's `run_eagerly`.

    Example:
        >>> training_jit_compile(model, "auto")  # doctest: +SKIP
        True
    """
    backend = name()
    if backend == "tensorflow":
        # A model created under a strategy keeps XLA off.
        if jit_compile == "auto" and not run_eagerly and _keras_internals.created_under_strategy(model) is None:
            return True
    elif backend == "torch":
        from keras_nanogpt import _torch_training

        _torch_training.warn_if_slow_bfloat16(model)
        return _torch_training.jit_compile_choice(jit_compile)
    return jit_compile


def after_compile(model, jit_compile):
    """Finish `NanoGPT.compile`: build the optimizer's and the metrics' variables now, for token-id
    targets, rather than inside the first training step (on TensorFlow a `tf.function` that creates
    variables is traced twice, which doubled the first step's start-up, benchmarks/RESULTS.md); on
    PyTorch, Keras's train and test steps become traced ATen graphs (`_torch_training.TracedStep`)
    unless `jit_compile` asked for something else. Targets of another shape (a loss of the caller's)
    are built by Keras in the first step, as usual.

    Example:
        >>> after_compile(model, "auto")  # doctest: +SKIP
    """
    ids = keras.KerasTensor((None, model.sequence_length), "int32")
    try:
        _keras_internals.symbolic_build(model, data_batch=(ids, ids))
    except (ValueError, TypeError, RuntimeError):
        model.optimizer.build(model.trainable_variables)
    if name() == "torch":
        from keras_nanogpt import _torch_training

        _torch_training.install_traced_steps(model, jit_compile)


def fit_callbacks(model, callbacks):
    """`callbacks` for `NanoGPT.fit`, with what the backend's train step needs to know of the run: on
    PyTorch, how many steps `fit` will run (`_torch_training.PlannedSteps`, for when to compile).

    Example:
        >>> callbacks = fit_callbacks(model, [])  # doctest: +SKIP
    """
    callbacks = list(callbacks or [])
    if name() == "torch":
        from keras_nanogpt import _torch_training

        if isinstance(model.train_function, _torch_training.TracedStep):
            callbacks.append(_torch_training.PlannedSteps())
    return callbacks


def keep_heap_padding():
    """JAX under glibc: let malloc keep 64 MB at the top of each heap it grows or trims
    (`mallopt(M_TOP_PAD)`). `import keras_nanogpt` calls it, since it only holds for the heaps made after
    it (XLA's threads make theirs at the first JAX computation). A `MALLOC_TOP_PAD_` of the user's wins
    (`MALLOC_TOP_PAD_=131072` keeps glibc's default); other backends and platforms are left as they are.

    XLA's CPU runtime allocates each step's buffers and frees them after it. With glibc's default pad
    (128 KB) its threads' heaps then grow and shrink at every step, and the page faults took a quarter
    of the CPU time: at nanoGPT's CPU recipe the training step went from 55 to 42 ms, peak memory up 6%
    (benchmarks/RESULTS.md, issue 26).

    Example:
        >>> keep_heap_padding()  # doctest: +SKIP
    """
    if name() != "jax" or "MALLOC_TOP_PAD_" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-2, _HEAP_TOP_PAD)  # -2: M_TOP_PAD
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        pass


def cache_compilations(directory):
    """Keep JAX's compiled programs in `directory` (its persistent compilation cache): a later process
    that trains or generates with the same model and shapes loads them instead of compiling again.

    Args:
        directory: a folder (made when missing); safe to share between runs of one JAX version.

    Example:
        >>> cache_compilations("~/.cache/keras_nanogpt_jax")  # doctest: +SKIP
    """
    if name() != "jax":
        raise ValueError(f"A compilation cache is kept for the JAX backend only; this process runs {name()} "
                         f"(set KERAS_BACKEND=jax).")
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(os.fspath(directory)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def adamw_class():
    """`keras.optimizers.AdamW`, or on PyTorch its multi-tensor form (`_torch_training.ForeachAdamW`:
    Keras gives subclasses per-variable updates there, 2-3x slower at nanoGPT's CPU recipe).

    Example:
        >>> issubclass(adamw_class(), keras.optimizers.Optimizer)
        True
    """
    if name() == "torch":
        from keras_nanogpt import _torch_training

        return _torch_training.ForeachAdamW
    return keras.optimizers.AdamW


def retrack_variables(model):
    """After variables were deleted from the model's layers (LoRA merged), register the ones left
    again where the backend keeps its own list (PyTorch's module parameters).

    Example:
        >>> retrack_variables(model)  # doctest: +SKIP
    """
    if name() == "torch":
        from keras_nanogpt import _torch_keras_internals

        for layer in _keras_internals.sublayers(model):
            _torch_keras_internals.track_variables(layer)
