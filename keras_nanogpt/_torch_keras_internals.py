"""PyTorch backend only: every private name of Keras's PyTorch backend the package relies on, in one place
(the backend-neutral ones are in `_keras_internals.py`; the same rules hold: each item says what the package
needs and why no public API does it, and tests/test_keras_internals.py tests each).

Checked against Keras 3.15.1 with torch 2.13.0.

| item | private name | used by |
|---|---|---|
| `TorchAdamW` | `keras.src.backend.torch.optimizers.torch_adamw.AdamW`, `_clip_gradients` | `_torch_training` |
| `track_variables` | `TorchLayer._track_variables` | backends.retrack_variables |
| `seeded_categorical`, `traceable_categorical` | Keras's torch seeding (`torch_seed_generator`) | `_torch_compile` |
| `traceable_draws` | `keras.src.backend.torch.random.categorical` | `_torch_compile._traced_draw` |
| `conditions_in_the_graph` | `keras.src.backend.torch.core.cond`, `convert_to_numpy` | `_torch_training` |
| `current_stateless_scope` | `keras.src.backend.get_stateless_scope` | `_torch_training` (traced `cond`) |

`traceable_draws` is the one place the package puts a function of its own into Keras: once, a dispatcher
in place of the torch backend's `categorical`, which calls Keras's own function unchanged except inside
`with traceable_draws():` (a context variable, so per thread and per task), where the package traces
a sampler's draw. Nothing else in the process sees a difference. `conditions_in_the_graph` does the same
for the torch backend's `cond` and `convert_to_numpy` while a train step is traced.
"""

import contextlib
import contextvars
import functools
import threading

import torch
from keras import ops
from keras.src import backend as _keras_backend
from keras.src.backend.torch import random as _keras_torch_random
from keras.src.backend.torch.optimizers.torch_adamw import AdamW as _KerasTorchAdamW

from keras_nanogpt import _keras_internals


class TorchAdamW(_KerasTorchAdamW):
    """Keras's AdamW as its PyTorch backend runs it (multi-tensor `torch._foreach_*` updates), with Keras's
    gradient-clipping hook under a name of the package's own: subclasses override `_kn_clip_gradients`.

    Needed: Keras gives its multi-tensor AdamW only to `keras.optimizers.AdamW` itself (a subclass gets
    per-variable updates, 2-3x slower at nanoGPT's CPU recipe), and global-norm clipping happens in the
    private `_clip_gradients`, which `apply` calls. No public class or hook does either.
    """

    def _clip_gradients(self, grads):  # Keras's hook: `BaseOptimizer.apply` calls it before the update
        return self._kn_clip_gradients(grads)

    def _kn_clip_gradients(self, grads):
        """Keras's own clipping (`clipnorm`, `clipvalue`, `global_clipnorm`); subclasses override this."""
        return super()._clip_gradients(grads)


def track_variables(layer):
    """Register `layer`'s variables again as its PyTorch module parameters.

    Needed: after variables are deleted from a layer (LoRA merged), `model.parameters()` must not hold
    them. No public API: Keras rebuilds that list only when a variable is added.
    """
    layer._track_variables()


@torch.library.custom_op("keras_nanogpt::seeded_categorical", mutates_args=())
def seeded_categorical(logits: torch.Tensor, seed: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Keras's torch `random.categorical` as one operator: a generator seeded from the two seed words
    (their uint32 bits added, as Keras's private `torch_seed_generator` does), so that it traces."""
    generator = torch.Generator(device=logits.device)
    generator.manual_seed(int(seed[0] + seed[1]) & 0xFFFFFFFF)
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples, replacement=True, generator=generator)


@seeded_categorical.register_fake
def _(logits, seed, num_samples):
    return logits.new_empty((logits.shape[0], num_samples), dtype=torch.int64)


def traceable_categorical(logits, num_samples, dtype="int32", seed=None):
    """`keras.random.categorical` on torch with its generator inside `seeded_categorical`: Keras's tokens
    for the same seed, in a form `make_fx` traces (Keras's own reads the seed as a Python int)."""
    return ops.cast(seeded_categorical(ops.convert_to_tensor(logits), _keras_internals.draw_seed(seed),
                                       int(num_samples)), dtype)


_tracing_draws = contextvars.ContextVar("keras_nanogpt_tracing_draws", default=False)
_install_lock = threading.Lock()


def _dispatcher(keras_categorical):
    @functools.wraps(keras_categorical)
    def categorical(logits, num_samples, dtype="int32", seed=None):
        if _tracing_draws.get():
            return traceable_categorical(logits, num_samples, dtype=dtype, seed=seed)
        return keras_categorical(logits, num_samples, dtype=dtype, seed=seed)

    categorical.keras_nanogpt_dispatcher = True
    return categorical


def _install_dispatcher():
    with _install_lock:
        current = _keras_torch_random.categorical
        if not getattr(current, "keras_nanogpt_dispatcher", False):
            _keras_torch_random.categorical = _dispatcher(current)


@contextlib.contextmanager
def traceable_draws():
    """Inside: `keras.random.categorical` on torch is `traceable_categorical`, for this thread (task) only.

    Needed: keras-hub's samplers draw through `keras.random.categorical`, which calls the torch backend's
    `categorical` by its module attribute; that function seeds a `torch.Generator` from a Python int, which
    tracing cannot follow. No public API lets a caller choose how a seeded draw is made.
    """
    _install_dispatcher()
    token = _tracing_draws.set(True)
    try:
        yield
    finally:
        _tracing_draws.reset(token)


_tracing_conditions = contextvars.ContextVar("keras_nanogpt_tracing_conditions", default=None)


def _condition_dispatchers(keras_cond, keras_to_numpy):
    @functools.wraps(keras_cond)
    def cond(pred, true_fn, false_fn):
        in_graph = _tracing_conditions.get()
        if in_graph is not None and isinstance(pred, torch.Tensor) and current_stateless_scope() is not None:
            return in_graph(pred, true_fn, false_fn)
        return keras_cond(pred, true_fn, false_fn)

    @functools.wraps(keras_to_numpy)
    def convert_to_numpy(x):
        if _tracing_conditions.get() is not None and isinstance(x, torch.Tensor):
            return x.detach()
        return keras_to_numpy(x)

    cond.keras_nanogpt_dispatcher = convert_to_numpy.keras_nanogpt_dispatcher = True
    return cond, convert_to_numpy


@contextlib.contextmanager
def conditions_in_the_graph(cond_in_graph):
    """Inside, for this thread (task) only: `keras.ops.cond` on a tensor, within a StatelessScope, is
    `cond_in_graph(pred, true_fn, false_fn)`, and `convert_to_numpy` of a tensor gives the tensor.

    Needed: Keras's PyTorch `cond` branches in Python (`if pred:`), which a trace cannot follow
    (LossScaleOptimizer, gradient accumulation, the EMA overwrite), and its PyTorch Nadam divides by
    `convert_to_numpy` of a variable, whose value a trace would keep from the tracing call. Both are module
    attributes of the torch backend's `core`, called by their names; no public API lets a caller choose
    how a condition or a conversion runs. Keras's own functions run everywhere else.

    Example:
        >>> with conditions_in_the_graph(lambda pred, t, f: t()):  # doctest: +SKIP
        ...     graph = trace(step, inputs)
    """
    core = _keras_backend.core
    with _install_lock:
        if not getattr(core.cond, "keras_nanogpt_dispatcher", False):
            core.cond, core.convert_to_numpy = _condition_dispatchers(core.cond, core.convert_to_numpy)
    token = _tracing_conditions.set(cond_in_graph)
    try:
        yield
    finally:
        _tracing_conditions.reset(token)


def current_stateless_scope():
    """The `keras.StatelessScope` the code runs in, or None.

    Needed: a traced `cond` reads and sets the variables' values in the scope the train step runs in. No
    public API gives the current scope (`keras.StatelessScope` only makes a new one).
    """
    return _keras_backend.get_stateless_scope()
