"""nanoGPT's optimiser recipe for Keras: AdamW, weight decay on 2-D weights only, warmup + cosine, clipping."""

import keras

from keras_nanogpt import _validation


def _adamw():
    """`keras.optimizers.AdamW`, or on PyTorch its multi-tensor form (`_torch_training.ForeachAdamW`:
    Keras gives subclasses per-variable updates there, 2-3x slower at nanoGPT's CPU recipe)."""
    if keras.backend.backend() == "torch":
        from keras_nanogpt._torch_training import ForeachAdamW

        return ForeachAdamW
    return keras.optimizers.AdamW


@keras.saving.register_keras_serializable(package="keras_nanogpt")
class MatrixDecayAdamW(_adamw()):
    """AdamW that decays only weights with two or more dimensions (kernels, embeddings), as nanoGPT does.

    Biases and LayerNorm scales/offsets (1-D) are never decayed. Takes the arguments of
    `keras.optimizers.AdamW`; the rule needs no variable names, so it survives `.keras` save/load.

    Example:
        >>> optimizer = MatrixDecayAdamW(learning_rate=1e-3, weight_decay=0.1)
    """

    def _use_weight_decay(self, variable):
        return len(variable.shape) >= 2 and super()._use_weight_decay(variable)


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
        A `MatrixDecayAdamW` whose learning rate is a `keras.optimizers.schedules.CosineDecay`.

    Example:
        >>> model.compile(optimizer=nanogpt_optimizer(total_steps=2000))  # doctest: +SKIP
    """
    total_steps = _validation.check_int("total_steps", total_steps)
    warmup_steps = _validation.check_int("warmup_steps", warmup_steps, minimum=0)
    if warmup_steps >= total_steps:
        raise ValueError(f"`warmup_steps` must be smaller than `total_steps` ({total_steps}); got {warmup_steps}.")
    learning_rate = _validation.check_float("learning_rate", learning_rate, 0.0, float("inf"),
                                            low_inclusive=False)
    min_learning_rate = _validation.check_float("min_learning_rate", min_learning_rate, 0.0, learning_rate,
                                                high_inclusive=True)
    weight_decay = _validation.check_float("weight_decay", weight_decay, 0.0, float("inf"))
    beta_1 = _validation.check_float("beta_1", beta_1, 0.0, 1.0)
    beta_2 = _validation.check_float("beta_2", beta_2, 0.0, 1.0)
    if clipnorm is not None:
        clipnorm = _validation.check_float("clipnorm", clipnorm, 0.0, float("inf"), low_inclusive=False)
    if gradient_accumulation_steps is not None:
        gradient_accumulation_steps = _validation.check_int(
            "gradient_accumulation_steps", gradient_accumulation_steps, minimum=2)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else learning_rate,
        decay_steps=total_steps - warmup_steps,
        alpha=min_learning_rate / learning_rate,
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps)
    return MatrixDecayAdamW(
        learning_rate=schedule, weight_decay=weight_decay, beta_1=beta_1, beta_2=beta_2,
        epsilon=1e-8, global_clipnorm=clipnorm, gradient_accumulation_steps=gradient_accumulation_steps)
