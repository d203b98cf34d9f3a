"""Text generation: prompts in, continued text or ids out.

First version: a plain loop that recomputes the (cropped) context for every new token.
"""

import numpy as np
from keras import ops

from keras_nanogpt import _validation


def generate(model, prompt, max_new_tokens=100, temperature=1.0, top_k=None, seed=None):
    """Continue `prompt` with `max_new_tokens` sampled tokens.

    Args:
        model: a `NanoGPT`.
        prompt: a string (needs `model.vectorizer`), or int ids `(batch, time)`.
        max_new_tokens: number of tokens to add (>= 0).
        temperature: softmax temperature (> 0), or 0 for greedy decoding.
        top_k: sample only among the `top_k` most likely tokens (None: all).
        seed: integer seed for repeatable sampling.

    Returns:
        The prompt followed by the new text (for a string), or ids `(batch, time + max_new_tokens)`.

    Example:
        >>> generate(model, "It is a truth", max_new_tokens=20, seed=0)  # doctest: +SKIP
    """
    ids, as_text = _prompt_ids(model, prompt)
    max_new_tokens = _validation.check_int("max_new_tokens", max_new_tokens, minimum=0)
    temperature = _validation.check_float("temperature", temperature, 0.0, float("inf"))
    if top_k is not None:
        top_k = _validation.check_int("top_k", top_k)
    rng = np.random.default_rng(seed)
    for _ in range(max_new_tokens):
        context = ids[:, -model.sequence_length:]
        logits = ops.convert_to_numpy(model(context, training=False))[:, -1].astype("float64")
        ids = np.concatenate([ids, _sample(logits, temperature, top_k, rng)[:, None]], axis=1)
    if as_text:
        from keras_nanogpt import data

        return data.decode(model.vectorizer, ids[0])
    return ids


def _prompt_ids(model, prompt):
    if isinstance(prompt, str):
        if model.vectorizer is None:
            raise ValueError("A text `prompt` needs a model with a `vectorizer`; this model has none. "
                             "Pass token ids (batch, time) or build NanoGPT(..., vectorizer=...).")
        from keras_nanogpt import data

        ids = data.encode(model.vectorizer, prompt)
        data.warn_unknown(model.vectorizer, prompt, ids)
        if ids.size == 0:
            raise ValueError("`prompt` is empty; give at least one token.")
        return ids[None].astype("int32"), True
    ids = np.asarray(prompt)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"`prompt` must be a string or integer ids of shape (batch, time) with time >= 1; "
                         f"got shape {ids.shape} of {ids.dtype}.")
    if ids.min() < 0 or ids.max() >= model.vocabulary_size:
        raise ValueError(f"`prompt` ids must lie in [0, {model.vocabulary_size}); got {ids.min()}..{ids.max()}.")
    return ids.astype("int32"), False


def _sample(logits, temperature, top_k, rng):
    """One token id per row of `logits` (batch, vocabulary)."""
    if temperature == 0:
        return logits.argmax(axis=-1).astype("int32")
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probabilities = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probabilities], dtype="int32")
