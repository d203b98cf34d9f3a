"""Every private Keras and keras-hub name the package relies on, one small function each, in one place.

A Keras (or keras-hub) release may rename or change any of these without notice. Each function says what
the package needs, why no public API does it, and the version it was checked against; each has a test in
tests/test_keras_internals.py that fails on the day Keras changes it, and that test file also checks that
no other module of the package touches these names (nor imports `keras.src` / `keras_hub.src`).
PyTorch-only items are in `_torch_keras_internals.py` (imported only when PyTorch runs).

Checked against Keras 3.15.1 and keras-hub 0.32.0.

| item | private name | used by |
|---|---|---|
| `sublayers` | `Layer._flatten_layers` | adapters, convert, backends |
| `dense_kernel` | `Dense._kernel` | adapters (LoRA merge, save, load) |
| `delete_variable` | `Layer._untrack_variable`, `Layer.__delattr__` bypassed | adapters (LoRA merge) |
| `created_under_strategy` | `Model._distribute_strategy` (TensorFlow) | backends (XLA on TensorFlow) |
| `symbolic_build` | `Trainer._symbolic_build` | backends (after compile) |
| `compute_loss` | `Trainer._compute_loss` | `_torch_training` (traced step) |
| `loss_tracker` | `Trainer._loss_tracker` | `_torch_training` (traced step) |
| `callback_model` | `Callback._model` | backup |
| `set_initial_epoch` | `Trainer._initial_epoch` | backup (resume inside `fit`) |
| `weights_h5_bytes` | `keras.src.saving.saving_lib` (`H5IOStore`, `_save_state`) | saving |
| `preset_file`, `preset_file_exists` | `keras_hub.src.utils.preset_utils` | saving (remote presets) |
| `draw_seed` | `keras.src.random.seed_generator.draw_seed` | `_torch_keras_internals` (traceable draw) |
| `MatrixWeightDecay` | `BaseOptimizer._use_weight_decay` (overridden) | optimizers (nanoGPT's AdamW, Muon) |
| `WeightDecayStep` | `BaseOptimizer._apply_weight_decay` (overridden) | optimizers (Muon's decay) |
| `uses_weight_decay` | `BaseOptimizer._use_weight_decay` | optimizers (Muon's decay) |
| `muon_uses_adamw` | `Muon._should_use_adamw` | optimizers (Muon's decay) |
"""

import io

import keras

VERSION_CHECKED = "keras 3.15.1, keras-hub 0.32.0"


def sublayers(layer, include_self=True):
    """Every layer under `layer` (itself first unless `include_self=False`), recursively, each once.

    Needed: to find every quantized layer, every `ReversibleEmbedding`, every layer whose PyTorch parameters
    must be tracked again. No public API: `Model.layers` lists the direct children only, and `keras.Layer`
    has no list of its sublayers at all.
    """
    return layer._flatten_layers(include_self=include_self)


def dense_kernel(layer):
    """The kernel variable of a `Dense` layer itself.

    Needed: with LoRA on, `Dense.kernel` is a computed tensor (kernel + the adapters' product); merging,
    saving and restoring the adapters must read and assign the frozen kernel variable. No public API gives
    that variable (`layer.weights` holds it, but only its position or name would tell it apart).
    """
    return layer._kernel


def delete_variable(layer, name):
    """Remove the variable attribute `name` from `layer` (untracked, then deleted), without a gc.collect().

    Needed: `merge_lora` drops the two adapters of every LoRA layer. Keras's `Layer.__delattr__` does this
    but then runs `gc.collect()` per variable (0.4 s each); the package collects once afterwards. No public
    API removes a variable from a layer.
    """
    layer._untrack_variable(getattr(layer, name))
    super(keras.layers.Layer, layer).__delattr__(name)


def created_under_strategy(model):
    """The `tf.distribute` strategy `model` was created under, or None (TensorFlow backend only).

    Needed: XLA stays off for training under a strategy. No public API: `model.distribute_strategy` falls
    back to the strategy in scope now (the default strategy outside any), so it is never None.
    """
    return model._distribute_strategy


def symbolic_build(model, data_batch):
    """Build `model`'s optimizer, loss and metric variables for `data_batch` (KerasTensors), as `fit` does
    before its first step.

    Needed: building them at compile time instead of inside the first (traced) step. No public API builds
    the compiled metrics and loss; `optimizer.build` covers only the optimizer (the caller's fallback).
    """
    model._symbolic_build(data_batch=data_batch)


def compute_loss(model, x, y, y_pred, sample_weight, training):
    """The loss as Keras's own `train_step` / `test_step` compute it.

    Needed: the traced PyTorch step repeats Keras's step exactly. Public `Model.compute_loss` is what this
    calls; the private wrapper also supports overrides of `compute_loss` without the `training` argument,
    as Keras's step does.
    """
    return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)


def loss_tracker(model):
    """The `Mean` metric behind the "loss" that `fit` and `evaluate` report.

    Needed: the traced PyTorch step updates it as Keras's step does. No public API names it (it is one of
    `model.metrics`, told apart only by position).
    """
    return model._loss_tracker


def callback_model(callback):
    """The model a `keras.callbacks.Callback` was given, without syncing its training state.

    Needed: per-batch bookkeeping (`stop_training`, the initial epoch). Public `Callback.model` on JAX
    copies the whole training state back into the variables at each access (`jax_state_sync`), which a
    per-batch flag does not need.
    """
    return callback._model


def set_initial_epoch(model, epoch):
    """Make the running (or next) `fit` start at `epoch` (None: the caller's `initial_epoch` again).

    Needed: a backup restored by a callback at the start of `fit` resumes at its epoch. No public API: the
    `initial_epoch` argument is the caller's; Keras's own `BackupAndRestore` sets this attribute too.
    """
    model._initial_epoch = epoch


def weights_h5_bytes(model):
    """The `.weights.h5` file `model.save_weights` writes, made in memory; None where Keras lacks the parts.

    Needed: presets and atomic saves write the weights file without a temporary file of Keras's. No public
    API writes an in-memory weights file (`save_weights` takes a path).
    """
    try:
        from keras.src.saving import saving_lib

        store = saving_lib.H5IOStore(io.BytesIO(), mode="w")
        save_state = saving_lib._save_state
    except (ImportError, AttributeError, TypeError):
        return None
    save_state(model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set())
    buffer = store.path_or_io
    store.close()
    return buffer.getvalue()


def preset_file(handle, name):
    """The local path of file `name` of the keras-hub preset `handle` ("hf://...", "kaggle://...", a
    folder), downloaded and cached by keras-hub.

    Needed: `NanoGPT.from_preset` reads its own files from keras-hub's handles. No public API: keras-hub
    exposes only whole-model loaders (`Backbone.from_preset`) and `upload_preset`.
    """
    from keras_hub.src.utils import preset_utils

    return preset_utils.get_file(handle, name)


def preset_file_exists(handle, name):
    """Whether the keras-hub preset `handle` holds file `name` (see `preset_file`)."""
    from keras_hub.src.utils import preset_utils

    return preset_utils.check_file_exists(handle, name)


def draw_seed(seed):
    """The two seed words Keras's random functions draw from `seed` (an int, a `SeedGenerator`, or None),
    advancing a generator's state as they do.

    Needed: the traceable categorical draw (`_torch_keras_internals`) must give Keras's own tokens for
    the same seed. No public API: `SeedGenerator.next()` covers generators only, not ints or None.
    """
    from keras.src.random.seed_generator import draw_seed as keras_draw_seed

    return keras_draw_seed(seed)


class MatrixWeightDecay:
    """A mixin (before a Keras optimizer class): weight decay only on weights of two or more dimensions.

    Needed: nanoGPT decays matrices and embeddings, never biases or norm scales, whatever their names. No
    public API takes such a rule: `exclude_from_weight_decay` takes variables or names, fixed when it is
    called, which a `.keras` file does not keep. Keras asks `BaseOptimizer._use_weight_decay(variable)` for
    each variable; this mixin overrides it.

    Example:
        >>> class Decay(MatrixWeightDecay, keras.optimizers.AdamW): pass
    """

    def _use_weight_decay(self, variable):
        return len(variable.shape) >= 2 and super()._use_weight_decay(variable)


class WeightDecayStep:
    """A mixin (before a Keras optimizer class): the optimizer's weight decay is its `decay_weights(variables)`.

    Needed: Keras's Muon decays its AdamW weights at Muon's learning rate and reads the schedule once per
    variable; the recipes decay them at AdamW's rate, reading the schedule once a step. Keras applies the
    decay in `BaseOptimizer._apply_weight_decay(variables)` and no public hook replaces it; this mixin
    overrides it and hands the variables to the optimizer's own `decay_weights`.

    Example:
        >>> class Decay(WeightDecayStep, keras.optimizers.Muon):
        ...     def decay_weights(self, variables): pass
    """

    def _apply_weight_decay(self, variables):
        self.decay_weights(variables)


def uses_weight_decay(optimizer, variable):
    """Whether Keras would decay `variable` under `optimizer` (its weight decay set, the variable not excluded).

    Needed: a `decay_weights` of `WeightDecayStep` must skip what Keras skips. No public API asks it:
    Keras's rule is `BaseOptimizer._use_weight_decay`.
    """
    return optimizer._use_weight_decay(variable)


def muon_uses_adamw(optimizer, variable):
    """Whether Keras's Muon updates `variable` with its AdamW part (not Muon's orthogonalised momentum).

    Needed: the recipes' Muon decays the AdamW weights at AdamW's rate. No public API says which part
    updates a variable: Keras's rule is `Muon._should_use_adamw`.
    """
    return optimizer._should_use_adamw(variable)
