"""Callbacks for `fit`: samples while training, throughput and MFU, loss plots, a NaN-loss guard."""

import math
import os
import time

import keras

from keras_nanogpt import _files, _validation, generation


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


def with_loss_guard(callbacks):
    """`callbacks` as a list with a `StopOnNonFiniteLoss` first, unless it holds one (`NanoGPT.fit`'s):
    first, so that it stops before a checkpoint saving every few steps writes the broken step.

    Example:
        >>> type(with_loss_guard(None)[0]).__name__
        'StopOnNonFiniteLoss'
    """
    callbacks = list(callbacks or [])
    if not any(isinstance(c, StopOnNonFiniteLoss) for c in callbacks):
        callbacks.insert(0, StopOnNonFiniteLoss())
    return callbacks


class TextGenerationCallback(keras.callbacks.Callback):
    """Print (and optionally log to TensorBoard) generated samples every `every` epochs during `fit`.

    It calls `model.generate`, whose compiled decode loop is made once and reused at every epoch
    (the weights are its arguments), so sampling costs no retracing while training goes on. Bad
    generation arguments are refused when the callback is made, a prompt that does not suit the
    model when training begins: never after an epoch of work.

    Args:
        prompt: a string or a list of strings (the model needs a vectorizer), or int ids
            `(batch, time)`; a list generates all prompts in one batch.
        max_new_tokens: tokens to generate per sample.
        every: sample after every `every`-th epoch.
        print_fn: where samples go (default `print`; None: nowhere).
        log_dir: a TensorBoard log directory to write the samples to as text (None: no logging).
        **generate_kwargs: passed to `model.generate` (temperature, top_k, top_p, seed, stop, ...).

    Example:
        >>> callback = TextGenerationCallback(["It is a truth", "Mr. Darcy"], max_new_tokens=80,
        ...                                   temperature=0.8, top_p=0.95, log_dir="logs")
    """

    def __init__(self, prompt, max_new_tokens=100, every=1, print_fn=print, log_dir=None,
                 **generate_kwargs):
        super().__init__()
        generation.check_arguments(max_new_tokens=max_new_tokens, **generate_kwargs)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.every = _validation.check_int("every", every)
        self.print_fn = print_fn
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.generate_kwargs = generate_kwargs
        self.samples = []
        self._writer = None

    def on_train_begin(self, logs=None):
        # Checks the prompt and stop sequences against the model (no tokens are made).
        self.model.generate(self.prompt, max_new_tokens=0, **self.generate_kwargs)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        sample = self.model.generate(self.prompt, max_new_tokens=self.max_new_tokens,
                                     **self.generate_kwargs)
        self.samples.append(sample)
        texts = [sample] if isinstance(sample, str) else [str(s) for s in sample]
        if self.print_fn is not None:
            self.print_fn(f"\n--- samples after epoch {epoch + 1} ---\n" + "\n---\n".join(texts) + "\n")
        if self.log_dir is not None:
            self._log(texts, epoch + 1)

    def _log(self, texts, step):
        import tensorflow as tf  # TensorBoard's writer; TensorFlow is installed with every backend

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "samples"))
        with self._writer.as_default():
            for i, text in enumerate(texts):
                tf.summary.text(f"sample_{i}", text, step=step)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ThroughputCallback(keras.callbacks.Callback):
    """Log training tokens/s and model FLOPs utilisation (MFU) into the progress bar and history.

    FLOPs per token follow nanoGPT's estimate: `6 * N + 12 * layers * time * width`, with N the
    parameters without the position table; MFU divides the achieved FLOP/s by `peak_flops`.

    Args:
        tokens_per_step: tokens in one training batch (`batch_size * sequence_length`).
        peak_flops: the hardware's peak FLOP/s to compare against (None: MFU is not logged).
            nanoGPT uses 312e12 (A100, bf16).

    Example:
        >>> callback = ThroughputCallback(tokens_per_step=32 * 128, peak_flops=312e12)
    """

    def __init__(self, tokens_per_step, peak_flops=None):
        super().__init__()
        self.tokens_per_step = _validation.check_int("tokens_per_step", tokens_per_step)
        if peak_flops is not None:
            peak_flops = _validation.check_float("peak_flops", peak_flops, 0.0, math.inf, low_inclusive=False)
        self.peak_flops = peak_flops
        self._epoch_start = None
        self._steps = 0  # steps run this epoch
        self._flops_per_token = None

    def on_train_begin(self, logs=None):
        self._flops_per_token = flops_per_token(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        if logs is None:
            return
        self._steps = batch + 1  # `batch` counts from 0 each epoch, in jumps with steps_per_execution
        self._add(logs, self._steps / (time.perf_counter() - self._epoch_start))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._steps:
            self._add(logs, self._steps / (time.perf_counter() - self._epoch_start))

    def _add(self, logs, steps_per_second):
        tokens_per_second = steps_per_second * self.tokens_per_step
        logs["tokens_per_second"] = tokens_per_second
        if self.peak_flops:
            logs["mfu"] = tokens_per_second * self._flops_per_token / self.peak_flops


def flops_per_token(model):
    """nanoGPT's estimate of training FLOPs per token: `6 * N + 12 * layers * time * width`.

    N counts the parameters without the position table, as nanoGPT does.

    Example:
        >>> flops_per_token(kn.NanoGPT.from_config_name("nano", vocabulary_size=65))  # doctest: +SKIP
    """
    parameters = model.count_params() - model.sequence_length * model.hidden_dim
    return 6 * parameters + 12 * model.num_layers * model.sequence_length * model.hidden_dim


class LossPlotCallback(keras.callbacks.Callback):
    """Write a PNG of training and validation loss after every epoch (needs matplotlib).

    The file is written to a temporary name and renamed, so it is never half-written.

    Args:
        path: the PNG to write.

    Example:
        >>> callback = LossPlotCallback("loss.png")
    """

    def __init__(self, path):
        super().__init__()
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("LossPlotCallback needs matplotlib: pip install keras_nanogpt[plot]") from None
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"`path` must be the path of a PNG file to write; got {path!r}.")
        if os.path.isdir(path):
            raise ValueError(f"`path` must be the path of a PNG file to write; got the folder {path!r}.")
        self.path = os.fspath(path)
        self.history = {"loss": [], "val_loss": []}

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        for key in self.history:
            self.history[key].append(logs.get(key, math.nan))
        save_loss_plot(self.history, self.path)


def save_loss_plot(history, path):
    """Plot `history["loss"]` (and `history["val_loss"]`) per epoch into the PNG at `path`, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        values = history.get(key) or []
        if any(math.isfinite(v) for v in values):
            axes.plot(range(1, len(values) + 1), values, marker="o", label=label)
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    axes.legend()
    axes.grid(alpha=0.3)
    with _files.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    pyplot.close(figure)
