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

Keras runs its multi-tensor AdamW on PyTorch only for `keras.optimizers.AdamW` itself; a subclass
such as `training.MatrixDecayAdamW` falls back to one small update per variable, and Keras's
global-norm clipping is two operations per variable. At nanoGPT's CPU recipe (27 variables) that
made the optimizer step 3-4x nanoGPT's (`clip_grad_norm_` + `torch.optim.AdamW`); see
benchmarks/RESULTS.md, issue 18.
"""

import time
import warnings

import keras
import torch

from keras_nanogpt import _keras_internals, _torch_keras_internals, _torch_tracing


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
        self.traces = 0
        self.trace_seconds = []

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
            step = self.model.train_step if self.training else self.model.test_step
            return step(data[0])
        with torch.no_grad():
            graph(*[v.value for v in variables], *inputs)
        return self.model.get_metrics_result()

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
