"""PyTorch backend only: the training step traced once into an ATen graph, the optimizer in multi-tensor
(`torch._foreach_*`) operations, and a warning where bfloat16 training would be slow.

Eagerly, Keras's torch trainer pays Python at every layer call of the forward pass, at every
operation of the loss, the metrics and the optimizer: more, at nanoGPT's CPU recipe, than nanoGPT's
own eager loop. `TracedStep` traces Keras's own step (forward, loss, gradients, clipping, the
optimizer's update, the loss tracker and metrics) once per input shape with `make_fx`, as one
function of the variables' values (`_torch_tracing.trace`), and runs that graph at every step, the
variables updated in place. Keras's `fit` loop around it is unchanged: callbacks, `validation_data`,
logs, checkpoints and backups behave as with the eager step. Dropout draws from torch's global
generator in the graph as eagerly, so a seed gives the same losses either way.

On CPU the train step then moves on to the same graph compiled ahead of time into an AOTInductor
package (`_torch_aot`, as decoding's steps: on disk, loaded in milliseconds by a later run; its
elementwise work fused, about `PACKAGE_SAVING` faster); `TracedStep.level` says which runs. When, as
in the ski-rental problem:

- a package on disk is used at once (and looked for again every `RECHECK_STEPS` steps, since another
  process may be building it);
- the step builds it itself, at once, when the time it would save (`PACKAGE_SAVING` of the graph's
  measured step time, over the steps `fit` has left, or over the steps run so far where `fit` does
  not say) reaches the expected build time (`expected_build_seconds`);
- otherwise the process starts a background builder for it as it exits (`_torch_aot.spawn`, lowest
  priority), so that the next run finds it: a builder beside training, nice or not, takes a core
  that PyTorch's threads wait for at every operation.

`KERAS_NANOGPT_TORCH_COMPILE` (`_torch_compile.compile_mode`) overrides: `always` builds at once,
`trace` and `never` keep the graph; `KERAS_NANOGPT_AOT=0` turns packages off. A package draws
dropout's masks from torch's generator as the graph does (`INDUCTOR_OPTIONS`): a seed gives the same
losses on every path.

Keras runs its multi-tensor AdamW on PyTorch only for `keras.optimizers.AdamW` itself; a subclass
such as `training.MatrixDecayAdamW` falls back to one small update per variable, and Keras's
global-norm clipping is two operations per variable. At nanoGPT's CPU recipe (27 variables) that
made the optimizer step 3-4x nanoGPT's (`clip_grad_norm_` + `torch.optim.AdamW`); see
benchmarks/RESULTS.md, issue 18.
"""

import atexit
import contextlib
import hashlib
import os
import time
import warnings

import keras
import torch

from keras_nanogpt import (_files, _keras_internals, _torch_aot, _torch_compile, _torch_keras_internals, _torch_tracing,
                           _version)

PACKAGE_SAVING = 0.15  # the share of the traced graph's step time a package saves (nano recipe, RESULTS.md)
BUILD_SECONDS = 45.0  # a cold AOTInductor build of the nano recipe's train step on a 2-core CPU (RESULTS.md)
# Random draws (dropout) as the graph makes them, from torch's generator: the eager step's masks, for a seed.
INDUCTOR_OPTIONS = {"fallback_random": True}
RECHECK_STEPS = 20  # how often a step without a package looks for the background builder's
_build_seconds = []  # builds of train steps measured in this process, most recent last


def expected_build_seconds():
    """How long building a train step's package is expected to take: as long as the last build in this
    process, else `BUILD_SECONDS`."""
    return _build_seconds[-1] if _build_seconds else BUILD_SECONDS


class ForeachAdamW(_torch_keras_internals.TorchAdamW):
    """Keras's PyTorch AdamW (`torch._foreach_*` updates), with global-norm clipping in foreach
    operations too; the same arithmetic as `keras.optimizers.AdamW`.

    Example:
        >>> optimizer = ForeachAdamW(learning_rate=1e-3, global_clipnorm=1.0)  # doctest: +SKIP
    """

    def _kn_clip_gradients(self, grads):
        if self.clipnorm or self.clipvalue or not self.global_clipnorm or any(g is None for g in grads):
            return super()._kn_clip_gradients(grads)
        # Keras's `clip_by_global_norm`: scale by clip / max(norm, clip); NaN where the norm is not finite.
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        clip = torch.as_tensor(self.global_clipnorm, dtype=norm.dtype, device=norm.device)
        scale = clip * torch.minimum(1.0 / norm, 1.0 / clip) + (norm - norm)
        return torch._foreach_mul(grads, scale)


def warn_if_slow_bfloat16(model):
    """Warn that training `model` in bfloat16 on PyTorch's CPU is slow, and why (`NanoGPT.compile` calls it
    through `backends.training_jit_compile`).

    Keras's mixed precision casts every weight at every layer call, and PyTorch's eager CPU kernels
    for bfloat16 are only fast with AMX matrix units (absent from the host measured): at
    nanoGPT's CPU recipe it trained at 0.10-0.2x float32's speed (benchmarks/RESULTS.md).
    """
    if model.compute_dtype != "bfloat16" or torch.cuda.is_available():
        return
    warnings.warn(
        "mixed_bfloat16 on the PyTorch backend's CPU trains several times slower than float32 (0.10x "
        "nanoGPT's speed against 0.58x at its CPU recipe; benchmarks/RESULTS.md): every layer call "
        "casts its weights to bfloat16 and eager bfloat16 CPU kernels are slow without AMX matrix "
        "units" + ("" if _has_amx() else ", which this CPU lacks") + ". Train in float32 on CPU "
        "(keras.config.set_dtype_policy('float32')), or bfloat16 on a GPU.", UserWarning,
        stacklevel=4)  # the line that called NanoGPT.compile


def _has_amx():
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check and check())


def jit_compile_choice(jit_compile):
    """`NanoGPT.compile`'s `jit_compile` for Keras on PyTorch: "auto" is False (no `torch.compile`).

    Keras's `jit_compile=True` on PyTorch runs `torch.compile` over its whole train step; at
    nanoGPT's CPU recipe it was slower per step than the eager step (benchmarks/RESULTS.md,
    issue 18), after a first step of a minute or more. "auto" runs `TracedStep` instead
    (`install_traced_step`).
    """
    return False if jit_compile == "auto" else jit_compile


def install_traced_steps(model, jit_compile):
    """Make `model.fit` and `model.evaluate` run `TracedStep`s (called by `NanoGPT.compile` after Keras's).

    Only for `jit_compile="auto"` and one step per execution (Keras's limit on PyTorch, which it
    reports itself); `run_eagerly=True` or `jit_compile=False` keep Keras's eager steps.
    """
    if jit_compile == "auto" and not model.run_eagerly and model.steps_per_execution == 1:
        model.train_function = TracedStep(model, training=True)
        model.test_function = TracedStep(model, training=False)


class TracedStep:
    """`model.train_function` (or `test_function`) on PyTorch: Keras's train (test) step as a traced ATen
    graph, one per input signature.

    Args:
        model: a compiled Keras model.
        training: the train step (forward, loss, gradients, optimizer update, metrics) or the test
            step (forward, loss, metrics).

    Example:
        >>> model.train_function = TracedStep(model, training=True)  # doctest: +SKIP
        >>> model.fit(dataset)  # doctest: +SKIP
    """

    def __init__(self, model, training):
        self.model = model
        self.training = training
        self.graphs = {}
        self.packages = {}  # signature -> _Package (train steps on CPU only)
        self.traces = 0
        self.trace_seconds = []
        self.remaining = None  # steps `fit` has left, where it says (`PlannedSteps`)
        self.level = "eager"  # what the last step ran: "eager", "graph" or "package"

    def __call__(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data[0])
        x, y, sample_weight = keras.tree.map_structure(
            lambda t: None if t is None else keras.ops.convert_to_tensor(t), (x, y, sample_weight))
        variables = self._variables()
        inputs = [t for t in (x, y, sample_weight) if t is not None]
        signature = (tuple(id(v) for v in variables), sample_weight is None,
                     tuple((tuple(t.shape), t.dtype) for t in inputs))
        if signature not in self.graphs:
            try:
                self.graphs[signature] = self._trace(variables, x, y, sample_weight)
            except Exception as error:  # e.g. an optimizer that reads a tensor's value in Python
                warnings.warn(f"Tracing the PyTorch {'train' if self.training else 'test'} step failed, so "
                              f"it runs eagerly (slower): {type(error).__name__}: {str(error)[:300]}",
                              RuntimeWarning, stacklevel=2)
                self.graphs[signature] = None
        graph = self.graphs[signature]
        if graph is None:  # Keras's own eager step
            self.level = "eager"
            step = self.model.train_step if self.training else self.model.test_step
            return step(data[0])
        tensors = [v.value for v in variables] + inputs
        package = self._package(signature, graph, tensors)
        start = time.perf_counter()
        with torch.no_grad():
            (package.run or graph)(*tensors)
        if package.key and not package.run:
            package.timed(time.perf_counter() - start)
        if self.remaining:
            self.remaining -= 1
        self.level = "package" if package.run else "graph"
        return self.model.get_metrics_result()

    def _package(self, signature, graph, tensors):
        """The `_Package` of the step `signature`: loaded where it is on disk, built now where the ski
        rental says so, a background builder started otherwise (module docstring)."""
        package = self.packages.get(signature)
        if package is None:
            usable = (self.training and tensors[0].device.type == "cpu" and _torch_aot.enabled()
                      and _torch_compile.compile_mode() in ("auto", "always"))
            package = self.packages[signature] = _Package(_package_key(graph, tensors) if usable else None)
        if package.key is None or package.run:
            return package
        if package.steps % RECHECK_STEPS == 0:
            package.run = _torch_aot.load(package.key)
            if package.run:
                _at_exit.pop(package.key, None)
                return package
        saving = package.saving(self.remaining)
        repaid = saving is not None and saving >= expected_build_seconds()
        build_now = repaid or _torch_compile.compile_mode() == "always"
        if (build_now or not package.requested) and not _torch_aot.can_build(package.key):
            package.key = None  # no compiler, or an earlier build failed (one warning says which)
            return package
        if build_now:
            start = time.perf_counter()
            try:
                _torch_aot.build(package.key, graph, [t.detach().clone() for t in tensors], INDUCTOR_OPTIONS)
            except Exception as error:  # e.g. a compiler error: keep the graph
                warnings.warn(f"Compiling the PyTorch train step failed, so it runs as a traced graph: "
                              f"{type(error).__name__}: {str(error)[:300]}", RuntimeWarning, stacklevel=3)
                package.key = None
                return package
            _build_seconds.append(time.perf_counter() - start)
            package.run = _torch_aot.load(package.key)
            _at_exit.pop(package.key, None)  # built: no builder at exit
        elif not package.requested:
            package.requested = True
            _build_at_exit(package.key, graph, [(tuple(t.shape), t.dtype) for t in tensors])
        return package

    def _variables(self):
        model = self.model
        metrics = [v for metric in model.metrics for v in metric.variables]
        unique = {}
        optimizer = model.optimizer.variables if self.training else []
        for variable in (*model.trainable_variables, *model.non_trainable_variables, *optimizer, *metrics):
            unique.setdefault(id(variable), variable)
        return list(unique.values())

    def _trace(self, variables, x, y, sample_weight):
        model = self.model
        trainable = model.trainable_variables
        count = len(trainable)  # the first `count` variables, in order

        def step(*tensors):
            values, inputs = tensors[:len(variables)], list(tensors[len(variables):])
            x, y = inputs[0], inputs[1]
            weight = inputs[2] if sample_weight is not None else None
            # Keras's TorchTrainer.train_step / test_step, with the gradients from autograd.grad.
            with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
                y_pred = model(x, training=self.training)
                loss = _keras_internals.compute_loss(model, x=x, y=y, y_pred=y_pred, sample_weight=weight,
                                                     training=self.training)
                _keras_internals.loss_tracker(model).update_state(loss, sample_weight=x.shape[0])
                if self.training:
                    gradients = torch.autograd.grad(model.optimizer.scale_loss(loss), values[:count])
                with torch.no_grad():
                    if self.training:
                        model.optimizer.apply(list(gradients), trainable)
                    model.compute_metrics(x, y, y_pred, sample_weight=weight)
                updates = [scope.get_current_value(v) for v in variables]
            with torch.no_grad():
                for value, update in zip(values, updates):
                    if update is not None and update is not value:
                        value.copy_(update)
            return loss.detach()

        start = time.perf_counter()
        rng_state = torch.random.get_rng_state()  # tracing draws dropout masks once: undo that
        example = [v.value.detach().clone().requires_grad_(self.training and i < count)
                   for i, v in enumerate(variables)]
        example += [t for t in (x, y, sample_weight) if t is not None]
        try:
            with _torch_keras_internals.conditions_in_the_graph(_cond_of_both_branches):
                graph = _torch_tracing.trace(step, example)
        finally:
            torch.random.set_rng_state(rng_state)
        self.trace_seconds.append(time.perf_counter() - start)
        self.traces += 1
        return graph


class _Package:
    """One train step signature's AOTInductor package: its key (None where packages are not used), its
    run function once loaded, and the traced graph's measured time until then."""

    def __init__(self, key):
        self.key = key
        self.run = None
        self.requested = False  # a background builder was asked for it
        self.steps = 0
        self.seconds = 0.0  # the graph's steps after the first (its one-off costs)

    def timed(self, seconds):
        if self.steps:
            self.seconds += seconds
        self.steps += 1

    def saving(self, remaining):
        """The seconds a package would save from now: `PACKAGE_SAVING` of the graph's rate over the
        `remaining` steps, or (not known) over the steps run so far (ski rental); None before a rate."""
        if self.steps < 3:
            return None
        rate = self.seconds / (self.steps - 1)
        return PACKAGE_SAVING * rate * (remaining if remaining is not None else self.steps)


def _package_key(graph, tensors):
    """The package name of the traced step `graph` for inputs like `tensors`: a digest of its code, its
    folded constants and its inputs' shapes and dtypes (any change to the model, the loss, the metrics,
    the optimizer or its schedule changes the code), the versions, this code and the device
    (`_torch_aot.package_key`)."""
    digest = hashlib.sha256(repr((torch.__version__, keras.__version__, _version.__version__, graph.code,
                                  [(tuple(t.shape), str(t.dtype)) for t in tensors],
                                  sorted(INDUCTOR_OPTIONS.items()))).encode())
    for name, buffer in sorted(graph.named_buffers()):
        digest.update(name.encode())
        digest.update(buffer.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return _torch_aot.package_key("train:" + digest.hexdigest()[:32], tensors[0].device)


_at_exit = {}  # package key -> (graph, inputs' shapes and dtypes): builders to start as the process exits


def _build_at_exit(key, graph, inputs):
    """Start a background builder for the package `key` of the traced step `graph` when this process
    exits (`_spawn_builders`), unless it is on disk by then."""
    if not _at_exit:
        atexit.register(_spawn_builders)
    _at_exit[key] = (graph, inputs, _torch_aot.directory())


def _spawn_builders():
    """The builders `_build_at_exit` asked for (each detached: it outlives this process), unless packages
    were turned off or moved to another folder since they were asked for."""
    for key, (graph, inputs, folder) in list(_at_exit.items()):
        _at_exit.pop(key)
        built = os.path.exists(_torch_aot.paths(key)[1])
        if _torch_aot.enabled() and _torch_aot.directory() == folder and not built:
            with contextlib.suppress(Exception):  # at exit: nothing left to tell
                _torch_aot.spawn(key, lambda path, graph=graph, inputs=inputs: _write_spec(path, graph, inputs))


def _write_spec(path, graph, inputs):
    """What a background builder (`_torch_aot_build`) needs to build a train step's package: the traced
    graph itself (a pickled `GraphModule`), its inputs' shapes and dtypes, and TorchInductor's options."""
    with _files.atomic_path(path) as tmp:
        torch.save({"graph": graph, "inputs": inputs, "options": INDUCTOR_OPTIONS}, tmp)


class PlannedSteps(keras.callbacks.Callback):
    """Tells the model's `TracedStep` how many steps `fit` will run (epochs x steps per epoch, where
    known), for the ski rental of its package (`NanoGPT.fit` adds it on PyTorch).

    Example:
        >>> model.fit(dataset, epochs=2, callbacks=[PlannedSteps()])  # doctest: +SKIP
    """

    def on_train_begin(self, logs=None):
        step = self.model.train_function
        if isinstance(step, TracedStep):
            epochs, steps = self.params.get("epochs"), self.params.get("steps")
            step.remaining = epochs * steps if epochs and steps else None


def _cond_of_both_branches(pred, true_fn, false_fn):
    """`keras.ops.cond(pred, true_fn, false_fn)` as a traced graph can hold it: both branches run, and `pred`
    selects (`torch.where`) the result and the new value of every variable either branch changed.

    Keras's PyTorch `cond` branches in Python (`if pred:`), which reads the tensor's value: no trace can
    (LossScaleOptimizer's finite-gradient check and loss-scale growth, gradient accumulation, the EMA
    overwrite). A branch changes a variable by assigning it (recorded in the StatelessScope the step runs
    in) or by writing its tensor in place (Keras's PyTorch optimizers); the first branch's in-place writes
    are undone before the second branch runs.
    """
    pred = pred.reshape(()).to(torch.bool)  # as `if pred:` reads it
    scope = _torch_keras_internals.current_stateless_scope()
    start = dict(scope.state_mapping)  # id(variable) -> tensor; each holds its value at the start again after a branch
    saved = {k: v.clone() for k, v in start.items()}  # the copies no in-place write uses leave the graph (dead code)
    keys = list(start)

    def run(branch):
        output, written = _torch_tracing.written_in_place([start[k] for k in keys], branch)
        written = {keys[i] for i in written}
        state = {}
        for k, value in scope.state_mapping.items():
            if k not in start:
                raise ValueError("a branch of keras.ops.cond assigned a variable the traced step does not hold")
            if value is not start[k] or k in written:
                state[k] = value.clone() if value is start[k] else value
        output = keras.tree.map_structure(
            lambda t: t.clone() if any(t is start[k] for k in written) else t, output)
        for k in written:
            start[k].copy_(saved[k])
        scope.state_mapping = dict(start)
        return output, state

    true_output, true_state = run(true_fn)
    false_output, false_state = run(false_fn)
    for k in set(true_state) | set(false_state):
        scope.state_mapping[k] = torch.where(pred, true_state.get(k, start[k]), false_state.get(k, start[k]))
    if true_output is None and false_output is None:
        return None
    return keras.tree.map_structure(
        lambda a, b: torch.where(pred, a, b) if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else a,
        true_output, false_output)
