"""Callbacks for `fit`: text samples while training."""

import keras

from keras_nanogpt import _validation


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
