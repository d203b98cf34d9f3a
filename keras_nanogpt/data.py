"""Text in, training windows out: loading and cleaning, tokenizers, and tf.data pipelines.

TensorFlow is used here (tf.data and `TextVectorization` run as input pipelines under every backend).
"""

import os
import re
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_nanogpt import _validation

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
LEVELS = ("char", "word")
SAMPLINGS = ("sequential", "random")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE)
_PRODUCED_BY = re.compile(r"^Produced by[^\n]*(\n[^\n]+)*\n+")
_END_OF_EBOOK = re.compile(r"\n+End of (the )?Project Gutenberg[^\n]*$", re.IGNORECASE)
_UNKNOWN_CHAR = "\ufffd"


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
    except LookupError:
        raise ValueError(f"`encoding` {encoding!r} is not a known codec.") from None
    text = clean_text(text)
    if not text.strip():
        raise ValueError(f"{path!r} holds no text.")
    return text


def clean_text(text):
    """Drop a BOM and a Project Gutenberg header/footer, and turn CRLF/CR line endings into LF.

    Args:
        text: the raw text.

    Example:
        >>> clean_text("\\ufeffhi\\r\\nthere\\r\\n")
        'hi\\nthere\\n'
    """
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    if start or end:
        text = _PRODUCED_BY.sub("", text.strip())
        text = _END_OF_EBOOK.sub("", text).strip() + "\n"
    return text


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


def make_vectorizer(text, level="char", max_tokens=None):
    """An adapted `keras.layers.TextVectorization` for `text`.

    At char level every character is a token and the text comes back exactly from `decode`
    (case, punctuation, newlines). At word level text is lower-cased, punctuation is dropped and
    words are split on whitespace (the classic Keras setting).

    Args:
        text: the training text.
        level: "char" or "word".
        max_tokens: keep only the most frequent tokens (including the padding and out-of-vocabulary
            tokens); None keeps all.

    Returns:
        The adapted layer; ids 0 and 1 are padding and out-of-vocabulary.

    Example:
        >>> vectorizer = make_vectorizer("hello world", level="char")
        >>> decode(vectorizer, encode(vectorizer, "hold"))
        'hold'
    """
    _check_text(text)
    _validation.check_choice("level", level, LEVELS)
    if max_tokens is not None:
        _validation.check_int("max_tokens", max_tokens, minimum=3)
    vectorizer = _text_vectorization(level, max_tokens=max_tokens)
    chunks = [text[i:i + 65536] for i in range(0, len(text), 65536)]
    vectorizer.adapt(tf.data.Dataset.from_tensor_slices(chunks).batch(64))
    return vectorizer


def _text_vectorization(level, max_tokens=None, vocabulary=None):
    if level == "char":
        return keras.layers.TextVectorization(
            max_tokens=max_tokens, standardize=None, split="character", output_mode="int",
            vocabulary=vocabulary)
    return keras.layers.TextVectorization(
        max_tokens=max_tokens, standardize="lower_and_strip_punctuation", split="whitespace",
        output_mode="int", vocabulary=vocabulary)


def _level(vectorizer):
    _check_vectorizer(vectorizer)
    return "char" if vectorizer.get_config()["split"] == "character" else "word"


def vocabulary_size(vectorizer):
    """Number of ids the vectorizer produces (padding and out-of-vocabulary included)."""
    _check_vectorizer(vectorizer)
    return vectorizer.vocabulary_size()


def encode(vectorizer, text):
    """Token ids of `text` as a 1-D int32 numpy array.

    Args:
        vectorizer: from `make_vectorizer` (or a saved model's `vectorizer`).
        text: a string.

    Example:
        >>> vectorizer = make_vectorizer("abc")
        >>> encode(vectorizer, "cab").shape
        (3,)
    """
    _check_vectorizer(vectorizer)
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str; got {type(text).__name__}.")
    if not text:
        return np.zeros((0,), dtype="int32")
    ids = vectorizer(tf.constant([text]))
    return np.asarray(keras.ops.convert_to_numpy(ids), dtype="int32").reshape(-1)


def decode(vectorizer, ids):
    """Text of token ids (padding dropped; an unknown id reads as U+FFFD at char level, [UNK] at word level).

    Args:
        vectorizer: from `make_vectorizer`.
        ids: a 1-D sequence of ints.

    Example:
        >>> vectorizer = make_vectorizer("abc")
        >>> decode(vectorizer, encode(vectorizer, "cab"))
        'cab'
    """
    vocabulary = _vocabulary_array(vectorizer)
    ids = np.asarray(ids, dtype="int64").reshape(-1)
    ids = ids[ids != 0]
    if np.any((ids < 0) | (ids >= len(vocabulary))):
        raise ValueError(f"`ids` must lie in [0, {len(vocabulary)}); got {ids.min()}..{ids.max()}.")
    tokens = vocabulary[ids]
    if _level(vectorizer) == "char":
        return "".join(tokens)
    return " ".join(tokens)


def _vocabulary_array(vectorizer):
    cached = getattr(vectorizer, "_kn_vocabulary_array", None)
    if cached is None:
        vocabulary = list(vectorizer.get_vocabulary())
        if _level(vectorizer) == "char":
            vocabulary[1] = _UNKNOWN_CHAR
        cached = np.array(vocabulary, dtype=object)
        object.__setattr__(vectorizer, "_kn_vocabulary_array", cached)
    return cached


def warn_unknown(vectorizer, text, ids):
    """Warn once when `text` holds tokens the vectorizer never saw (they become id 1)."""
    if np.any(ids == 1):
        unknown = sorted({c for c in text if _level(vectorizer) == "char"
                          and encode(vectorizer, c)[0] == 1})
        detail = f": {unknown[:10]!r}" if unknown else ""
        warnings.warn(f"The prompt holds tokens never seen in training{detail}; they map to the "
                      f"out-of-vocabulary id 1.", stacklevel=3)


def vectorizer_to_config(vectorizer):
    """A JSON-ready dict that `vectorizer_from_config` turns back into the same vectorizer."""
    return {"level": _level(vectorizer), "vocabulary": list(vectorizer.get_vocabulary())}


def vectorizer_from_config(config):
    """The vectorizer described by `vectorizer_to_config`'s dict."""
    if not isinstance(config, dict) or config.get("level") not in LEVELS or "vocabulary" not in config:
        raise ValueError(f"`vectorizer` config must be a dict with a `level` in {LEVELS} and a "
                         f"`vocabulary`; got {config!r:.200}.")
    return _text_vectorization(config["level"], vocabulary=config["vocabulary"])


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
    _check_text(text)
    _check_vectorizer(vectorizer)
    sequence_length = _validation.check_int("sequence_length", sequence_length)
    batch_size = _validation.check_int("batch_size", batch_size)
    validation_split = _validation.check_float("validation_split", validation_split, 0.0, 1.0)
    _validation.check_choice("sampling", sampling, SAMPLINGS)
    ids = encode(vectorizer, text)
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
             .batch(batch_size, drop_remainder=True)
             .prefetch(tf.data.AUTOTUNE))
    if not validation_split:
        return train, None
    val_windows = (len(val_ids) - 1) // sequence_length
    val_ids = val_ids[:val_windows * sequence_length + 1]
    val = (tf.data.Dataset.from_tensor_slices(_windows(val_ids, sequence_length))
           .map(_split_window)
           .batch(batch_size)
           .prefetch(tf.data.AUTOTUNE))
    return train, val


def _windows(ids, sequence_length):
    count = (len(ids) - 1) // sequence_length
    index = np.arange(count)[:, None] * sequence_length + np.arange(sequence_length + 1)[None]
    return ids[index]  # (count, sequence_length + 1)


def _split_window(window):
    return window[:-1], window[1:]


def _check_text(text):
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str; got {type(text).__name__}. Use load_text() to read a file.")
    if not text.strip():
        raise ValueError("`text` is empty; give the text to train on (see load_text).")


def _check_vectorizer(vectorizer):
    if not isinstance(vectorizer, keras.layers.TextVectorization):
        raise TypeError(f"`vectorizer` must come from kn.data.make_vectorizer; got {type(vectorizer).__name__}.")
