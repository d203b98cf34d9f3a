"""Text in, training windows out: loading a text (cleaned by `cleaning.py`) and tf.data pipelines of windows.

Tokenizers are `tokenizers.py`'s; corpora larger than memory go through `prepare` and `token_dataset`
(token shards on disk: `corpus.py`, `shards.py`), which this module re-exports as `kn.data`'s names, as it
does `chat_dataset` (conversations for supervised fine-tuning: `chat.py`).

TensorFlow is used here (tf.data runs as the input pipeline under every backend).
"""

import codecs
import os

import keras
import numpy as np
import tensorflow as tf

from keras_nanogpt import _validation, tokenizers
from keras_nanogpt.chat import chat_dataset  # noqa: F401  (SFT windows: chat.py makes them)
from keras_nanogpt.cleaning import clean_text  # noqa: F401  (kn.data.clean_text; load_text calls it)
from keras_nanogpt.corpus import prepare  # noqa: F401  (token shards: corpus.py writes them, shards.py reads)
from keras_nanogpt.shards import token_dataset  # noqa: F401
# The tokenizer names kn.data documents; they live in keras_nanogpt.tokenizers. Its old tokenizer functions
# (encode, decode, vocabulary_size, warn_unknown, vectorizer_to_config, vectorizer_from_config) are
# deprecated shims, served by `__getattr__` below.
from keras_nanogpt.tokenizers import DEFAULT_MAX_TOKENS, LEVELS, make_vectorizer  # noqa: F401

KNOWN_TEXTS = {
    "pride_and_prejudice": (
        "https://raw.githubusercontent.com/GITenberg/Pride-and-Prejudice_1342/"
        "81db45c9c48c592f0b77f01fc59e677ad0a5634e/1342-0.txt",
        "48e0522844402a86a3ea98f0947ba85ea54838db3c59022299298ed968a5a163",
    ),
    "tinyshakespeare": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/"
        "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
}
SAMPLINGS = ("sequential", "random")
_PREFETCH_BATCHES = 4  # batches each pipeline makes ahead of the model


def load_text(name_or_path, encoding="utf-8", errors="strict"):
    """Read a known corpus or a text file, cleaned for training.

    A known name ("pride_and_prejudice", "tinyshakespeare") is fetched once with
    `keras.utils.get_file` (checked by SHA-256) into the Keras dataset cache. The text loses a
    byte-order mark, a Project Gutenberg header and licence footer, and CRLF line endings.

    Args:
        name_or_path: a key of `KNOWN_TEXTS` or the path of a text file.
        encoding: the file's encoding.
        errors: how to treat undecodable bytes: "strict" (raise), "replace" or "ignore".

    Returns:
        The text as a `str`.

    Example:
        >>> text = load_text("pride_and_prejudice")
        >>> text[:19]
        'PRIDE AND PREJUDICE'
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"`name_or_path` must be a corpus name {tuple(KNOWN_TEXTS)} or a file path; "
                        f"got {name_or_path!r}.")
    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError):
        raise ValueError(f"`encoding` must be a codec name such as 'utf-8' or 'latin-1'; "
                         f"got {encoding!r}.") from None
    try:
        codecs.lookup_error(errors)
    except (LookupError, TypeError):
        raise ValueError(f"`errors` must be 'strict', 'replace', 'ignore' or another codecs error "
                         f"handler; got {errors!r}.") from None
    if str(name_or_path) in KNOWN_TEXTS:
        path = _download(str(name_or_path))
    else:
        path = os.fspath(name_or_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No such text file: {path!r} (and not a known corpus name: {tuple(KNOWN_TEXTS)}).")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode(encoding, errors=errors)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path!r} is not valid {encoding}: byte {error.start} ({raw[error.start:error.start + 1]!r}) "
            f"cannot be decoded. Pass `encoding=` (e.g. 'latin-1') or `errors='replace'`.") from None
    text = clean_text(text)
    if not text.strip():
        raise ValueError(f"{path!r} holds no text (it is empty or only whitespace).")
    return text


def __getattr__(name):
    if name == "check_vectorizer":  # never kn.data's
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return tokenizers.deprecated(__name__, name)


def _download(name):
    url, sha256 = KNOWN_TEXTS[name]
    fname = f"{name}.txt"
    try:
        return keras.utils.get_file(fname=fname, origin=url, file_hash=sha256)
    except Exception as error:  # get_file raises several kinds; the user needs the same advice for all.
        cache = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "datasets")
        raise OSError(
            f"Could not download {name!r} from {url} ({error}). Put the file at "
            f"{os.path.join(cache, fname)!r}, or pass the path of a local copy to load_text.") from error


def make_datasets(text, vectorizer, sequence_length, batch_size, validation_split=0.1,
                  sampling="sequential", shuffle=True, seed=None):
    """Training and validation `tf.data.Dataset`s of `(ids, next_ids)` windows.

    The text is encoded once. The first `1 - validation_split` of the ids feed training windows, the
    rest validation windows, so no window spans both. Each window is `sequence_length + 1` ids:
    inputs are the first `sequence_length`, targets the same shifted by one.

    Args:
        text: the training text.
        vectorizer: from `make_vectorizer`.
        sequence_length: tokens per window (the model's context).
        batch_size: windows per batch.
        validation_split: fraction in [0, 1) held out from the end; 0 gives no validation set.
        sampling: "sequential" (back-to-back windows, shuffled every epoch) or "random"
            (nanoGPT's: windows at random offsets, as many per epoch as "sequential" gives).
        shuffle: shuffle the training windows every epoch.
        seed: seed of the shuffling / random offsets.

    Returns:
        `(train, validation)`; `validation` is None when `validation_split` is 0. Training batches
        all have exactly `batch_size` windows (the remainder is dropped).

    Example:
        >>> text = "abcdefghij" * 100
        >>> train, val = make_datasets(text, make_vectorizer(text), 16, 4)
        >>> [tuple(t.shape) for t in next(iter(train))]
        [(4, 16), (4, 16)]
    """
    _validation.check_text(text)
    tokenizer = tokenizers.Tokenizer(vectorizer)
    sequence_length = _validation.check_int("sequence_length", sequence_length)
    batch_size = _validation.check_int("batch_size", batch_size)
    validation_split = _validation.check_float("validation_split", validation_split, 0.0, 1.0)
    _validation.check_choice("sampling", sampling, SAMPLINGS)
    ids = tokenizer.encode(text)
    split = int(round(len(ids) * (1 - validation_split)))
    train_ids, val_ids = ids[:split], ids[split:]
    window = sequence_length + 1
    train_windows = (len(train_ids) - 1) // sequence_length
    if train_windows < batch_size:
        raise ValueError(
            f"The text is too short: its {len(train_ids)} training tokens make {train_windows} windows of "
            f"sequence_length={sequence_length}, fewer than batch_size={batch_size}. Use more text or "
            f"a smaller sequence_length / batch_size.")
    if validation_split and len(val_ids) < window:
        raise ValueError(
            f"The validation part ({len(val_ids)} tokens for validation_split={validation_split}) is "
            f"shorter than one window of {window} tokens; raise validation_split or lower "
            f"sequence_length.")

    train_tensor = tf.constant(train_ids)
    if sampling == "random":
        max_start = len(train_ids) - window
        starts = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(train_windows)
        starts = starts.map(lambda r: tf.cast(r % (max_start + 1), tf.int32))
    else:
        starts = tf.data.Dataset.range(0, train_windows * sequence_length, sequence_length)
        if shuffle:
            starts = starts.shuffle(train_windows, seed=seed, reshuffle_each_iteration=True)
    train = (starts.map(lambda s: _split_window(train_tensor[s:s + window]),
                        num_parallel_calls=tf.data.AUTOTUNE)
             .batch(batch_size, drop_remainder=True))
    if not validation_split:
        return _prefetched(train), None
    val_windows = (len(val_ids) - 1) // sequence_length
    val_ids = val_ids[:val_windows * sequence_length + 1]
    val = (tf.data.Dataset.from_tensor_slices(_windows(val_ids, sequence_length))
           .map(_split_window)
           .batch(batch_size))
    return _prefetched(train), _prefetched(val)


def _prefetched(dataset):
    """`dataset` with `_PREFETCH_BATCHES` batches made ahead and tf.data's autotuning off.

    The autotuning thread sleeps in doubling periods (10 ms up to a minute) and deleting an iterator waits
    for it to wake, so every `fit`/`evaluate` on an autotuned pipeline could end with a stall of up to a
    minute (measured: 250-step `fit` calls of 11-13 s took 20.48 s). Slicing windows is cheap; fixed
    prefetching keeps the model fed without it.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.prefetch(_PREFETCH_BATCHES).with_options(options)


def _windows(ids, sequence_length):
    count = (len(ids) - 1) // sequence_length
    index = np.arange(count)[:, None] * sequence_length + np.arange(sequence_length + 1)[None]
    return ids[index]  # (count, sequence_length + 1)


def _split_window(window):
    return window[:-1], window[1:]
