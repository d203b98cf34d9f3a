"""Callbacks for `fit`: text samples while training, a guard against a NaN loss."""

import math

import keras

from keras_nanogpt import _validation


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or infinite."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stop `fit` with a clear error as soon as the loss is NaN or infinite.

    It raises instead of setting `stop_training`, so no later callback (a checkpoint at the end of
    the epoch, a backup) writes the broken weights: the last good checkpoint and model stay as they
    were. `NanoGPT.fit` adds it unless the callbacks already hold one.

    Example:
        >>> model.fit(dataset, callbacks=[StopOnNonFiniteLoss()])  # doctest: +SKIP
    """

    def __init__(self):
        super().__init__()
        self._step = 0

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"The training loss became {float(loss)} at step {self._step}; training stopped and "
                f"nothing more was saved (earlier checkpoints and model files are untouched). Lower the "
                f"learning rate, clip gradients (clipnorm=1.0) or check the data.")


class TextGenerationCallback(keras.callbacks.Callback):
    """Print a generated sample every `every` epochs while `fit` runs.

    Args:
        prompt: a string (the model needs a vectorizer) or int ids `(batch, time)`.
        max_new_tokens: tokens to generate per sample.
        every: print after every `every`-th epoch.
        print_fn: where samples go (default `print`).
        **generate_kwargs: passed to `model.generate` (temperature, top_k, seed, ...).

    Example:
        >>> callback = TextGenerationCallback("It is a truth", max_new_tokens=80, temperature=0.8)
    """

    def __init__(self, prompt, max_new_tokens=100, every=1, print_fn=print, **generate_kwargs):
        super().__init__()
        self.prompt = prompt
        self.max_new_tokens = _validation.check_int("max_new_tokens", max_new_tokens, minimum=0)
        self.every = _validation.check_int("every", every)
        self.print_fn = print_fn
        self.generate_kwargs = generate_kwargs
        self.samples = []

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        sample = self.model.generate(self.prompt, max_new_tokens=self.max_new_tokens,
                                     **self.generate_kwargs)
        self.samples.append(sample)
        self.print_fn(f"\n--- sample after epoch {epoch + 1} ---\n{sample}\n")
