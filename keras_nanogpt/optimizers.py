"""The optimizers the recipes use, with their learning-rate schedule: nanoGPT's (AdamW, weight decay on
2-D weights only, warmup + cosine, clipping) and the modern one (Muon on the blocks' matrices, AdamW on the
rest, warmup-stable-decay). `kn.training` re-exports every public name here."""

import math

import keras
from keras import ops

from keras_nanogpt import _keras_internals, _validation, backends

DECAY_SHAPES = ("cosine", "linear")


@keras.saving.register_keras_serializable(package="keras_nanogpt")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, a stable phase at `peak`, then a cosine or linear decay to `final`.

    Step `t` (from 0) of the warmup gets `peak * (t + 1) / (warmup_steps + 1)`, as nanoGPT's
    `get_lr` does (never 0). The decay takes the last `decay_steps` of `total_steps`: all the steps
    after the warmup by default (nanoGPT's warmup + cosine); fewer make it warmup-stable-decay.

    Args:
        peak: the learning rate after the warmup.
        total_steps: steps of the whole run; `final` is reached there and kept after.
        warmup_steps: steps of linear warmup.
        decay_steps: steps of the decay at the end (None: every step after the warmup).
        final: the learning rate at `total_steps`.
        shape: "cosine" or "linear".

    Example:
        >>> schedule = WarmupDecay(1e-3, total_steps=2000, warmup_steps=100, final=1e-4)
        >>> round(float(schedule(100)), 6), round(float(schedule(2000)), 6)
        (0.001, 0.0001)
    """

    def __init__(self, peak, total_steps, warmup_steps=0, decay_steps=None, final=0.0, shape="cosine"):
        self.peak = _validation.check_float("peak", peak, 0.0, math.inf, low_inclusive=False)
        self.total_steps = _validation.check_int("total_steps", total_steps)
        self.warmup_steps = _validation.check_int("warmup_steps", warmup_steps, minimum=0)
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"`warmup_steps` must be smaller than `total_steps` ({self.total_steps}); "
                             f"got {self.warmup_steps}.")
        after_warmup = self.total_steps - self.warmup_steps
        self.decay_steps = after_warmup if decay_steps is None else _validation.check_int(
            "decay_steps", decay_steps)
        if self.decay_steps > after_warmup:
            raise ValueError(f"`decay_steps` must be at most the {after_warmup} steps after the warmup; "
                             f"got {self.decay_steps}.")
        self.final = _validation.check_float("final", final, 0.0, self.peak, high_inclusive=True)
        self.shape = _validation.check_choice("shape", shape, DECAY_SHAPES)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = self.peak * (step + 1.0) / (self.warmup_steps + 1.0)
        start = float(self.total_steps - self.decay_steps)
        progress = ops.clip((step - start) / float(self.decay_steps), 0.0, 1.0)
        fraction = (0.5 * (1.0 + ops.cos(math.pi * progress)) if self.shape == "cosine"
                    else 1.0 - progress)  # 1 at the start of the decay, 0 at its end
        decayed = self.final + (self.peak - self.final) * fraction
        return ops.where(step < self.warmup_steps, warmup, decayed)

    def get_config(self):
        return dict(peak=self.peak, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                    decay_steps=self.decay_steps, final=self.final, shape=self.shape)


@keras.saving.register_keras_serializable(package="keras_nanogpt")
class MatrixDecayAdamW(_keras_internals.MatrixWeightDecay, backends.adamw_class()):
    """AdamW that decays only weights with two or more dimensions (kernels, embeddings), as nanoGPT does.

    Biases and LayerNorm scales/offsets (1-D) are never decayed. Takes the arguments of
    `keras.optimizers.AdamW`; the rule needs no variable names, so it survives `.keras` save/load.

    Example:
        >>> optimizer = MatrixDecayAdamW(learning_rate=1e-3, weight_decay=0.1)
    """


def nanogpt_optimizer(total_steps, learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=100,
                      weight_decay=0.1, beta_1=0.9, beta_2=0.99, clipnorm=1.0,
                      gradient_accumulation_steps=None):
    """nanoGPT's `train.py` optimiser: AdamW with linear warmup, then cosine decay to a floor.

    Args:
        total_steps: optimizer steps of the whole run (the cosine reaches `min_learning_rate` there).
        learning_rate: peak learning rate, reached after `warmup_steps`.
        min_learning_rate: the floor at the end of the cosine, <= `learning_rate`.
        warmup_steps: steps of linear warmup from 0, < `total_steps`.
        weight_decay: decoupled weight decay on 2-D weights only.
        beta_1: Adam's first-moment decay.
        beta_2: Adam's second-moment decay (nanoGPT's small-model recipe: 0.99).
        clipnorm: clip the global norm of all gradients together to this, as nanoGPT's
            `clip_grad_norm_` does (None: no clipping).
        gradient_accumulation_steps: apply the update every this many batches (None: every batch).

    Returns:
        A `MatrixDecayAdamW` whose learning rate is a `WarmupDecay` (nanoGPT's `get_lr`).

    Example:
        >>> model.compile(optimizer=nanogpt_optimizer(total_steps=2000))  # doctest: +SKIP
    """
    total_steps, warmup_steps, clipnorm, gradient_accumulation_steps = _check_run(
        total_steps, warmup_steps, clipnorm, gradient_accumulation_steps)
    learning_rate = _validation.check_float("learning_rate", learning_rate, 0.0, float("inf"),
                                            low_inclusive=False)
    min_learning_rate = _validation.check_float("min_learning_rate", min_learning_rate, 0.0, learning_rate,
                                                high_inclusive=True)
    weight_decay = _validation.check_float("weight_decay", weight_decay, 0.0, float("inf"))
    beta_1 = _validation.check_float("beta_1", beta_1, 0.0, 1.0)
    beta_2 = _validation.check_float("beta_2", beta_2, 0.0, 1.0)
    schedule = WarmupDecay(learning_rate, total_steps, warmup_steps, final=min_learning_rate)
    return MatrixDecayAdamW(
        learning_rate=schedule, weight_decay=weight_decay, beta_1=beta_1, beta_2=beta_2,
        epsilon=1e-8, global_clipnorm=clipnorm, gradient_accumulation_steps=gradient_accumulation_steps)


@keras.saving.register_keras_serializable(package="keras_nanogpt")
class MatrixDecayMuon(_keras_internals.MatrixWeightDecay, _keras_internals.WeightDecayStep,
                      keras.optimizers.Muon):
    """Keras's Muon with decoupled weight decay as AdamW has it: only on weights with two or more
    dimensions, and the AdamW weights' at AdamW's learning rate (Keras's Muon decays them at Muon's,
    `1 / adam_lr_ratio` times faster). The schedule is read once per step (Keras's: once per variable).

    Takes the arguments of `keras.optimizers.Muon`: Muon on 2-D weights that are neither embeddings
    nor in `exclude_layers`, AdamW (at `learning_rate * adam_lr_ratio`) on everything else.

    Example:
        >>> optimizer = MatrixDecayMuon(learning_rate=0.02, exclude_layers=["head"])
    """

    def decay_weights(self, variables):
        """Decay `variables` (Keras calls it once a step): AdamW's weights at AdamW's rate, the rest at Muon's."""
        learning_rate = self.learning_rate  # a schedule is evaluated here, once
        for variable in variables:
            if not _keras_internals.uses_weight_decay(self, variable):
                continue
            if _keras_internals.muon_uses_adamw(self, variable):
                decay = self.adam_weight_decay * self.adam_lr_ratio
            else:
                decay = self.weight_decay
            if decay:
                factor = ops.cast(learning_rate, variable.dtype) * ops.cast(decay, variable.dtype)
                variable.assign(variable - variable * factor)


def muon_optimizer(total_steps, learning_rate=0.01, adam_learning_rate=3e-3, warmup_steps=100,
                   decay_fraction=1.0, final_ratio=0.1, decay_shape="cosine", momentum=0.95,
                   weight_decay=0.0, adam_weight_decay=0.1, adam_beta_1=0.9, adam_beta_2=0.99,
                   clipnorm=1.0, ns_steps=5, gradient_accumulation_steps=None):
    """The modern recipe's optimiser: Muon on the blocks' matrices, AdamW on embeddings, head and norms.

    Muon (`keras.optimizers.Muon`: momentum orthogonalised by Newton-Schulz iterations, its update
    scaled to AdamW's size) trains every 2-D kernel inside the transformer blocks; AdamW trains the
    token (and position) tables, an untied `head` and the norm scales. Both follow one schedule:
    linear warmup, then a cosine or linear decay over the last `decay_fraction` of the steps
    (1.0: all of them after the warmup; less: warmup-stable-decay) to `final_ratio` of the peak.

    Args:
        total_steps: optimizer steps of the whole run.
        learning_rate: Muon's peak learning rate.
        adam_learning_rate: AdamW's peak learning rate (embeddings, head, norms).
        warmup_steps: steps of linear warmup, < `total_steps`.
        decay_fraction: the share of `total_steps` spent decaying, in (0, 1].
        final_ratio: the learning rates at the end, as a fraction of their peaks, in [0, 1].
        decay_shape: "cosine" or "linear".
        momentum: Muon's (Nesterov) momentum.
        weight_decay: decoupled weight decay of the Muon matrices.
        adam_weight_decay: decoupled weight decay of AdamW's 2-D weights (tables, head); norms never.
        adam_beta_1: AdamW's first-moment decay.
        adam_beta_2: AdamW's second-moment decay.
        clipnorm: clip the global norm of all gradients to this (None: no clipping).
        ns_steps: Newton-Schulz iterations per Muon update.
        gradient_accumulation_steps: apply the update every this many batches (None: every batch).

    Returns:
        A `MatrixDecayMuon` whose learning rate is a `WarmupDecay`.

    Example:
        >>> model = kn.NanoGPT.from_config_name("nano-modern", vocabulary_size=65)  # doctest: +SKIP
        >>> model.compile(optimizer=muon_optimizer(total_steps=2000))  # doctest: +SKIP
    """
    total_steps, warmup_steps, clipnorm, gradient_accumulation_steps = _check_run(
        total_steps, warmup_steps, clipnorm, gradient_accumulation_steps)
    learning_rate = _validation.check_float("learning_rate", learning_rate, 0.0, math.inf, low_inclusive=False)
    adam_learning_rate = _validation.check_float("adam_learning_rate", adam_learning_rate, 0.0, math.inf,
                                                 low_inclusive=False)
    decay_fraction = _validation.check_float("decay_fraction", decay_fraction, 0.0, 1.0, low_inclusive=False,
                                             high_inclusive=True)
    final_ratio = _validation.check_float("final_ratio", final_ratio, 0.0, 1.0, high_inclusive=True)
    momentum = _validation.check_float("momentum", momentum, 0.0, 1.0)
    weight_decay = _validation.check_float("weight_decay", weight_decay, 0.0, math.inf)
    adam_weight_decay = _validation.check_float("adam_weight_decay", adam_weight_decay, 0.0, math.inf)
    adam_beta_1 = _validation.check_float("adam_beta_1", adam_beta_1, 0.0, 1.0)
    adam_beta_2 = _validation.check_float("adam_beta_2", adam_beta_2, 0.0, 1.0)
    ns_steps = _validation.check_int("ns_steps", ns_steps)
    decay_steps = min(total_steps - warmup_steps, max(1, round(decay_fraction * total_steps)))
    schedule = WarmupDecay(learning_rate, total_steps, warmup_steps, decay_steps=decay_steps,
                           final=learning_rate * final_ratio, shape=decay_shape)
    return MatrixDecayMuon(
        learning_rate=schedule, adam_lr_ratio=adam_learning_rate / learning_rate, momentum=momentum,
        weight_decay=weight_decay, adam_weight_decay=adam_weight_decay, adam_beta_1=adam_beta_1,
        adam_beta_2=adam_beta_2, epsilon=1e-8, global_clipnorm=clipnorm, exclude_layers=["head"],
        ns_steps=ns_steps, gradient_accumulation_steps=gradient_accumulation_steps)


def _check_run(total_steps, warmup_steps, clipnorm, gradient_accumulation_steps):
    """The arguments both recipes share, checked: `(total_steps, warmup_steps, clipnorm, accumulation)`."""
    total_steps = _validation.check_int("total_steps", total_steps)
    warmup_steps = _validation.check_int("warmup_steps", warmup_steps, minimum=0)
    if warmup_steps >= total_steps:
        raise ValueError(f"`warmup_steps` must be smaller than `total_steps` ({total_steps}); got {warmup_steps}.")
    if clipnorm is not None:
        clipnorm = _validation.check_float("clipnorm", clipnorm, 0.0, math.inf, low_inclusive=False)
    if gradient_accumulation_steps is not None:
        gradient_accumulation_steps = _validation.check_int(
            "gradient_accumulation_steps", gradient_accumulation_steps, minimum=2)
    return total_steps, warmup_steps, clipnorm, gradient_accumulation_steps
