"""Scoring a text: per-token log-probabilities, total negative log-likelihood, perplexity, bits per character.

Token `i + 1` is scored by the model's prediction after tokens `..i`. A text longer than the context is
read in windows of `sequence_length` tokens that start `stride` tokens apart; each token is scored once,
in the first window that predicts it (Hugging Face's "perplexity of fixed-length models" recipe). With
`stride = sequence_length` (the default) the windows do not overlap, as `kn.data.make_datasets` cuts
them, so the total equals `model.evaluate`'s loss times the number of tokens; a smaller stride gives
every token more context (`stride=1`: each sees the `sequence_length` tokens before it, at one forward
pass per token).
"""

import dataclasses
import math

import numpy as np
from keras import ops

from keras_nanogpt import _validation, compiling, data, tokenizers


@dataclasses.dataclass(frozen=True)
class Score:
    """What `score` measured.

    Attributes:
        token_ids: the scored token ids `(n,)`.
        log_probs: `(n - 1,)` natural-log probability of `token_ids[i + 1]` given the tokens before it
            (keras-hub's `CausalLM.score(scoring_mode="loss")` gives the negatives of these).
        num_characters: characters of `token_ids[1:]` as the vectorizer decodes them (None without one).
    """

    token_ids: np.ndarray
    log_probs: np.ndarray
    num_characters: int = None

    @property
    def num_tokens(self):
        """How many tokens were scored (`n - 1`)."""
        return int(self.log_probs.shape[0])

    @property
    def total_nll(self):
        """Total negative log-likelihood in nats: `-sum(log_probs)`."""
        return -float(np.sum(self.log_probs, dtype="float64"))

    @property
    def mean_nll(self):
        """Mean negative log-likelihood per token in nats (the training loss)."""
        return self.total_nll / self.num_tokens

    @property
    def perplexity(self):
        """`exp(mean_nll)`."""
        return math.exp(self.mean_nll)

    @property
    def bits_per_token(self):
        return self.mean_nll / math.log(2)

    @property
    def bits_per_character(self):
        """Total NLL in bits over the characters of the scored tokens (None without a vectorizer)."""
        return bits_per_character(self.total_nll, self.num_characters)


def score(model, inputs, stride=None, batch_size=8):
    """Score a text (or token ids) with `model`.

    Args:
        model: a `NanoGPT`.
        inputs: a string (the model needs a vectorizer) or 1-D token ids, at least 2 tokens.
        stride: tokens between window starts, in [1, sequence_length] (None: sequence_length).
        batch_size: windows per forward pass; memory grows as `batch_size * sequence_length *
            vocabulary_size * 4` bytes of logits.

    Returns:
        A `Score`.

    Example:
        >>> result = score(model, "It is a truth universally acknowledged")  # doctest: +SKIP
        >>> result.perplexity, result.bits_per_character  # doctest: +SKIP
    """
    context = model.sequence_length
    stride = context if stride is None else _validation.check_int("stride", stride)
    if stride > context:
        raise ValueError(f"`stride` must be at most the model's sequence_length ({context}); got {stride}.")
    batch_size = _validation.check_int("batch_size", batch_size)
    ids = _token_ids(model, inputs)
    windows = _windows(len(ids), context, stride)
    width = max(end - begin for begin, end, _ in windows)
    width = min(context, 1 << (width - 1).bit_length())  # a power of two: few shapes to compile
    rows = np.zeros((len(windows), width), "int32")
    targets = np.zeros((len(windows), width), "int32")
    for row, (begin, end, _) in enumerate(windows):
        rows[row, :end - begin] = ids[begin:end]
        targets[row, :end - begin] = ids[begin + 1:end + 1]
    log_probs = compiling.compiled_function(model, ("score", batch_size, width),
                                            lambda: _log_probs_function(model))
    values = []
    for start in range(0, len(windows), batch_size):
        x, y = rows[start:start + batch_size], targets[start:start + batch_size]
        pad = batch_size - len(x)  # one shape for every call
        x, y = (np.pad(a, ((0, pad), (0, 0))) for a in (x, y))
        values.append(np.asarray(ops.convert_to_numpy(log_probs(x, y)))[:batch_size - pad])
    values = np.concatenate(values)
    scored = np.concatenate([values[row, first - begin:end - begin]
                             for row, (begin, end, first) in enumerate(windows)])
    characters = None if model.tokenizer is None else count_characters(model.tokenizer, ids)
    return Score(token_ids=ids, log_probs=scored.astype("float32"), num_characters=characters)


def count_characters(tokenizer, ids):
    """Characters that `ids[1:]` decode to after `ids[0]` (so a word vocabulary counts its spaces)."""
    tokenizer = tokenizers.Tokenizer(tokenizer)
    return len(tokenizer.decode(list(ids))) - len(tokenizer.decode(list(ids[:1])))


def bits_per_character(total_nll, num_characters):
    """`total_nll` (nats) in bits per character; None when the characters are unknown or none."""
    if not num_characters:
        return None
    return total_nll / math.log(2) / num_characters


def evaluate_text(model, text, validation_split=0.1, batch_size=32):
    """The model's loss, perplexity, bits per character and accuracy on the held-out end of `text`: the
    windows `kn.data.make_datasets` holds out for validation (`keras-nanogpt evaluate`).

    Args:
        model: a `NanoGPT` with a vectorizer (compiled with the defaults when it is not compiled).
        text: the text (`kn.data.load_text`); its last `validation_split` is scored.
        validation_split: the share held out, in (0, 1).
        batch_size: windows per batch.

    Returns:
        A dict: "validation_loss" (nats per token), "perplexity", "bits_per_character" (None when the
        tokens' characters are unknown) and "accuracy" (NaN when the model's metrics have none).

    Example:
        >>> evaluate_text(model, kn.data.load_text("pride_and_prejudice"))  # doctest: +SKIP
        {'validation_loss': 1.52, 'perplexity': 4.57, 'bits_per_character': 2.19, 'accuracy': 0.54}
    """
    _validation.check_float("validation_split", validation_split, 0.0, 1.0, low_inclusive=False)
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("`model` has no tokenizer, so it cannot read text.")
    _, val = data.make_datasets(text, model.tokenizer, model.sequence_length, batch_size,
                                validation_split=validation_split)
    if not model.compiled:
        model.compile()
    results = model.evaluate(val, verbose=0, return_dict=True)
    loss = float(results["loss"])
    targets = np.concatenate([y.reshape(-1) for _, y in val.as_numpy_iterator()])  # every scored token
    context = np.concatenate([x[:1, 0] for x, _ in val.take(1).as_numpy_iterator()])  # the one before them
    characters = count_characters(model.tokenizer, np.concatenate([context, targets]))
    return {"validation_loss": loss, "perplexity": math.exp(loss),
            "bits_per_character": bits_per_character(loss * len(targets), characters),
            "accuracy": float(results.get("accuracy", math.nan))}


def evaluate_shards(model, path, batch_size=32, batches=100):
    """The model's loss, perplexity and accuracy on `batches` batches of token shards' "val" split (the
    same batches each call: back-to-back windows in the order seed 0 gives; `keras-nanogpt evaluate --data`).

    Args:
        model: a `NanoGPT` (compiled with the defaults when it is not compiled); when the shards record a
            tokenizer, it must be the model's.
        path: what `kn.data.token_dataset` reads: a `prepare` folder, llm.c shards or nanoGPT's files.
        batch_size: windows per batch.
        batches: batches scored (>= 1).

    Returns:
        A dict as `evaluate_text` gives; "bits_per_character" is None (shards hold no characters).

    Example:
        >>> evaluate_shards(model, "shards", batches=20)  # doctest: +SKIP
        {'validation_loss': 3.31, 'perplexity': 27.4, 'bits_per_character': None, 'accuracy': 0.36}
    """
    batches = _validation.check_int("batches", batches)
    val = data.token_dataset(path, model.sequence_length, batch_size, split="val", sampling="shuffled",
                             seed=0, tokenizer=model.tokenizer).take(batches)
    if not model.compiled:
        model.compile()
    results = model.evaluate(val, verbose=0, return_dict=True)
    loss = float(results["loss"])
    return {"validation_loss": loss, "perplexity": math.exp(loss), "bits_per_character": None,
            "accuracy": float(results.get("accuracy", math.nan))}


def _token_ids(model, inputs):
    if isinstance(inputs, str):
        ids = tokenizers.prompt_ids(model.tokenizer, inputs, name="inputs")
    else:
        ids = _validation.check_id_array("inputs", inputs, 1, model.vocabulary_size,
                                         "a string or 1-D integer token ids")
    if len(ids) < 2:
        raise ValueError(f"`inputs` must hold at least 2 tokens (the first is only context); got {len(ids)}.")
    return ids.astype("int32")


def _windows(length, context, stride):
    """`(begin, end, first)` per window: inputs `ids[begin:end]`, scoring targets `first..end - 1`
    (target `j` is `ids[j + 1]`)."""
    windows, begin, done = [], 0, 0
    while done < length - 1:
        end = min(begin + context, length - 1)
        windows.append((begin, end, done))
        done, begin = end, begin + stride
    return windows


def _log_probs_function(model):
    def log_probs(ids, targets):  # (batch, width) each
        logits = model(ids, training=False)  # (batch, width, vocabulary_size), float32
        log_softmax = ops.log_softmax(logits, axis=-1)
        return ops.take_along_axis(log_softmax, targets[..., None], axis=-1)[..., 0]

    return log_probs
