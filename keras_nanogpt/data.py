"""Text in, training windows out: loading and cleaning, tokenizers, and tf.data pipelines.

TensorFlow is used here (tf.data and `TextVectorization` run as input pipelines under every backend).
"""

import base64
import codecs
import io
import json
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
LEVELS = ("char", "word", "wordpiece", "sentencepiece", "byte", "bpe")
DEFAULT_MAX_TOKENS = {"wordpiece": 2048, "sentencepiece": 2048}
# (padding token, out-of-vocabulary token) of the vocabularies that have them.
_RESERVED = {"char": ("", "[UNK]"), "word": ("", "[UNK]"), "wordpiece": ("[PAD]", "[UNK]"),
             "sentencepiece": ("<pad>", "<unk>")}
_BPE_SPECIAL_TOKENS = ("<|endoftext|>",)  # GPT-2's document separator: never split
SAMPLINGS = ("sequential", "random")
_PREFETCH_BATCHES = 4  # batches each pipeline makes ahead of the model
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


def make_vectorizer(text=None, level="char", max_tokens=None, vocabulary=None, merges=None):
    """A tokenizer for `text`: learned from it, or built from a given vocabulary.

    Levels:
        "char": every character is a token; `decode` gives the text back exactly.
        "word": lower-cased words, punctuation dropped (the classic Keras setting).
        "wordpiece": keras-hub's WordPiece vocabulary learned from the text (case kept; words and
            punctuation come back separated by single spaces). Default 2048 tokens.
        "sentencepiece": a SentencePiece unigram model trained on the text with identity
            normalisation, newlines kept and byte fallback, so the round trip is exact and no
            character is out of vocabulary. Default 2048 tokens (fewer when the text is small).
        "byte": the 256 UTF-8 byte values (keras-hub's `ByteTokenizer`); nothing to learn, nothing
            out of vocabulary.
        "bpe": GPT-2's byte-level BPE from a `vocab.json` + `merges.txt` pair (keras-hub's
            `BytePairTokenizer`); `text` may be None. The vocabulary should hold all 256 byte
            symbols, as GPT-2's does.

    Char, word, wordpiece and sentencepiece vocabularies reserve id 0 for padding and id 1 for
    out-of-vocabulary tokens; byte and bpe have neither.

    Args:
        text: the training text. Not needed (and ignored) when `vocabulary` is given or for "byte".
        level: one of `LEVELS`.
        max_tokens: vocabulary size to learn (reserved ids included); None keeps every char/word,
            and gives 2048 for wordpiece/sentencepiece. Only when learning from `text`.
        vocabulary: use this vocabulary instead of learning one. "char"/"word": a list of tokens,
            ids are positions; it begins with "" and "[UNK]" for padding and out-of-vocabulary ids
            (as `get_vocabulary()` does), except that a char list without them has no reserved ids
            at all (nanoGPT's meta.pkl vocabularies; an unknown character is then an error).
            "wordpiece": a list of tokens holding "[UNK]", or a vocab.txt path. "sentencepiece":
            a serialized model proto (bytes) or a `.model` path. "bpe": a token -> id dict or a
            `vocab.json` path.
        merges: "bpe" only: a list of merge rules ("a b") or a `merges.txt` path.

    Returns:
        A `keras.layers.TextVectorization` ("char", "word"), a `keras.layers.StringLookup` (a char
        list without reserved ids) or a keras-hub tokenizer.

    Example:
        >>> vectorizer = make_vectorizer("hello world", level="char")
        >>> decode(vectorizer, encode(vectorizer, "hold"))
        'hold'
        >>> decode(make_vectorizer(level="byte"), [104, 105])
        'hi'
    """
    _validation.check_choice("level", level, LEVELS)
    if merges is not None and level != "bpe":
        raise ValueError(f"`merges` is for level='bpe' only; got level={level!r}.")
    if level == "bpe" and (vocabulary is None or merges is None):
        raise ValueError("level='bpe' needs `vocabulary` (vocab.json: token -> id) and `merges` "
                         "(merges.txt); a BPE vocabulary is not learned from text here.")
    learning = vocabulary is None and level != "byte"
    if max_tokens is not None:
        if not learning:
            raise ValueError(f"`max_tokens` sets the size of a vocabulary learned from `text`; "
                             f"level={level!r} with the given vocabulary takes none (got {max_tokens}).")
        _validation.check_int("max_tokens", max_tokens, minimum=3)
    if level == "byte":
        if vocabulary is not None:
            raise ValueError("level='byte' has a fixed vocabulary of 256 bytes; got `vocabulary`.")
        return _hub().ByteTokenizer(lowercase=False)
    if learning:
        _check_text(text)
        return _learn_vectorizer(text, level, max_tokens)
    if level in ("char", "word"):
        return _fixed_text_vectorization(level, vocabulary)
    if level == "wordpiece":
        return _word_piece(_read_lines(vocabulary, "vocabulary"))
    if level == "sentencepiece":
        return _sentence_piece(_read_bytes(vocabulary, "vocabulary"))
    return _byte_pair(_read_json(vocabulary, "vocabulary"), _read_lines(merges, "merges"))


def _learn_vectorizer(text, level, max_tokens):
    chunks = [text[i:i + 65536] for i in range(0, len(text), 65536)]
    if level in ("char", "word"):
        vectorizer = _text_vectorization(level, max_tokens=max_tokens)
        vectorizer.adapt(tf.data.Dataset.from_tensor_slices(chunks).batch(64))
        return vectorizer
    size = max_tokens or DEFAULT_MAX_TOKENS[level]
    if level == "wordpiece":
        return _word_piece(_hub().compute_word_piece_vocabulary(
            tf.data.Dataset.from_tensor_slices(chunks), size, reserved_tokens=list(_RESERVED[level])))
    return _sentence_piece(_train_sentence_piece(text, size))


def _train_sentence_piece(text, vocabulary_size):
    """A serialized SentencePiece unigram model whose `decode(encode(text)) == text` for any text."""
    import sentencepiece

    proto = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(text.splitlines(keepends=True)), model_writer=proto,
            vocab_size=vocabulary_size, hard_vocab_limit=False, model_type="unigram",
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            user_defined_symbols=["\n"], character_coverage=1.0, byte_fallback=True,
            max_sentence_length=1 << 16, pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, minloglevel=2)
    except RuntimeError as error:  # sentencepiece reports a too-small vocabulary this way
        raise ValueError(f"Could not train a sentencepiece vocabulary of max_tokens={vocabulary_size} "
                         f"on this text: {error}") from None
    return proto.getvalue()


def _text_vectorization(level, max_tokens=None, vocabulary=None):
    if level == "char":
        return keras.layers.TextVectorization(
            max_tokens=max_tokens, standardize=None, split="character", output_mode="int",
            vocabulary=vocabulary)
    return keras.layers.TextVectorization(
        max_tokens=max_tokens, standardize="lower_and_strip_punctuation", split="whitespace",
        output_mode="int", vocabulary=vocabulary)


def _fixed_text_vectorization(level, vocabulary):
    if not isinstance(vocabulary, (list, tuple)) or not all(isinstance(t, str) for t in vocabulary):
        raise TypeError(f"`vocabulary` for level={level!r} must be a list of strings; "
                        f"got {type(vocabulary).__name__}.")
    vocabulary = list(vocabulary)
    if len(set(vocabulary)) != len(vocabulary):
        raise ValueError(f"`vocabulary` for level={level!r} repeats tokens.")
    reserved = list(_RESERVED[level])
    if vocabulary[:2] == reserved and len(vocabulary) > 2:
        return _text_vectorization(level, vocabulary=vocabulary)
    if level == "word":
        raise ValueError(f"`vocabulary` for level='word' must begin with {reserved} (padding and "
                         f"out-of-vocabulary), as get_vocabulary() gives it; got {vocabulary[:2]!r}.")
    if not vocabulary or any(len(t) != 1 for t in vocabulary):
        raise ValueError("`vocabulary` for level='char' must be single characters (or begin with "
                         f"{reserved}); got {[t for t in vocabulary if len(t) != 1][:5]!r}.")
    return keras.layers.StringLookup(vocabulary=vocabulary, num_oov_indices=0, mask_token=None)


def _word_piece(vocabulary):
    if _RESERVED["wordpiece"][1] not in vocabulary:
        raise ValueError(f"A wordpiece `vocabulary` must hold the out-of-vocabulary token "
                         f"{_RESERVED['wordpiece'][1]!r}.")
    return _hub().WordPieceTokenizer(vocabulary=vocabulary, oov_token=_RESERVED["wordpiece"][1])


def _sentence_piece(proto):
    try:
        return _hub().SentencePieceTokenizer(proto=proto)
    except Exception as error:  # sentencepiece raises several kinds for a bad proto
        raise ValueError(f"`vocabulary` is not a valid sentencepiece model proto: {error}") from None


def _byte_pair(vocabulary, merges):
    if not isinstance(vocabulary, dict) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in vocabulary.items()):
        raise TypeError("`vocabulary` for level='bpe' must map token strings to integer ids.")
    merges = [m for m in merges if m.strip() and not m.startswith("#version")]
    if not merges or any(not isinstance(m, str) or len(m.split(" ")) != 2 for m in merges):
        raise ValueError("`merges` for level='bpe' must be one or more rules 'a b' (merges.txt lines).")
    special = [t for t in _BPE_SPECIAL_TOKENS if t in vocabulary]
    return _hub().BytePairTokenizer(vocabulary=vocabulary, merges=merges, unsplittable_tokens=special)


def _read_lines(source, name):
    """A list of strings as given, or the lines of the file at `source`."""
    if isinstance(source, (str, os.PathLike)):
        return _read_file(source, name).decode("utf-8").splitlines()
    if not isinstance(source, (list, tuple)) or not all(isinstance(t, str) for t in source):
        raise TypeError(f"`{name}` must be a list of strings or a file path; got {type(source).__name__}.")
    return list(source)


def _read_bytes(source, name):
    if isinstance(source, (str, os.PathLike)):
        return _read_file(source, name)
    if not isinstance(source, bytes):
        raise TypeError(f"`{name}` must be a serialized proto (bytes) or a file path; "
                        f"got {type(source).__name__}.")
    return source


def _read_json(source, name):
    if not isinstance(source, (str, os.PathLike)):
        return source
    try:
        return json.loads(_read_file(source, name))
    except ValueError as error:
        raise ValueError(f"`{name}` file {os.fspath(source)!r} is not valid JSON: {error}") from None


def _read_file(path, name):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`{name}`: no such file {path!r}.")
    with open(path, "rb") as f:
        return f.read()


def _hub():
    """keras_hub.tokenizers, imported on first use (it adds about a second to `import keras_nanogpt`)."""
    import keras_hub

    return keras_hub.tokenizers


def _level(vectorizer):
    """The vectorizer's level (cached on the layer: `decode` asks for it on every streamed token)."""
    cached = getattr(vectorizer, "_kn_level", None)
    if cached is None:
        cached = _find_level(vectorizer)
        object.__setattr__(vectorizer, "_kn_level", cached)
    return cached


def _find_level(vectorizer):
    _check_vectorizer(vectorizer)
    if isinstance(vectorizer, keras.layers.TextVectorization):
        return "char" if vectorizer.get_config()["split"] == "character" else "word"
    if isinstance(vectorizer, keras.layers.StringLookup):
        return "char"
    hub = _hub()
    for level, kind in (("wordpiece", hub.WordPieceTokenizer), ("sentencepiece", hub.SentencePieceTokenizer),
                        ("byte", hub.ByteTokenizer), ("bpe", hub.BytePairTokenizer)):
        if isinstance(vectorizer, kind):
            return level


def vocabulary_size(vectorizer):
    """Number of ids the vectorizer produces (padding and out-of-vocabulary included)."""
    _check_vectorizer(vectorizer)
    return int(vectorizer.vocabulary_size())


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
    if isinstance(vectorizer, keras.layers.TextVectorization):
        ids = vectorizer(tf.constant([text]))
    elif isinstance(vectorizer, keras.layers.StringLookup):
        unknown = sorted(set(text) - set(_vocabulary(vectorizer)))
        if unknown:
            raise ValueError(f"`text` holds characters outside this vocabulary, which has no "
                             f"out-of-vocabulary id: {unknown[:10]!r}.")
        ids = vectorizer(tf.strings.unicode_split(text, "UTF-8"))
    else:
        ids = vectorizer(text)
    return np.asarray(keras.ops.convert_to_numpy(ids), dtype="int32").reshape(-1)


def decode(vectorizer, ids):
    """Text of token ids (padding dropped; an unknown id reads as U+FFFD at char level, [UNK] at word level).

    Byte and BPE ids that stop inside a multi-byte character decode that character as U+FFFD.

    Args:
        vectorizer: from `make_vectorizer`.
        ids: a 1-D sequence of ints.

    Example:
        >>> vectorizer = make_vectorizer("abc")
        >>> decode(vectorizer, encode(vectorizer, "cab"))
        'cab'
    """
    level = _level(vectorizer)
    # The cached vocabulary's length for char/word: asking the lookup table costs a TF op per call.
    size = len(_vocabulary(vectorizer)) if level in ("char", "word") else vocabulary_size(vectorizer)
    ids = _validation.check_ids("ids", np.asarray(ids, dtype="int64").reshape(-1), size)
    padding, _ = _reserved_ids(vectorizer)
    if padding is not None:
        ids = ids[ids != padding]
    if level in ("char", "word"):
        tokens = _vocabulary_array(vectorizer)[ids]
        return ("" if level == "char" else " ").join(tokens)
    text = vectorizer.detokenize(ids.astype("int32"))
    if isinstance(text, tf.Tensor):
        text = text.numpy()
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def _vocabulary(vectorizer):
    """The tokens in id order (cached on the layer: vocabularies do not change once made)."""
    cached = getattr(vectorizer, "_kn_vocabulary", None)
    if cached is None:
        cached = [str(token) for token in vectorizer.get_vocabulary()]
        object.__setattr__(vectorizer, "_kn_vocabulary", cached)
    return cached


def _vocabulary_array(vectorizer):
    cached = getattr(vectorizer, "_kn_vocabulary_array", None)
    if cached is None:
        vocabulary = list(_vocabulary(vectorizer))
        _, unknown = _reserved_ids(vectorizer)
        if _level(vectorizer) == "char" and unknown is not None:
            vocabulary[unknown] = _UNKNOWN_CHAR
        cached = np.array(vocabulary, dtype=object)
        object.__setattr__(vectorizer, "_kn_vocabulary_array", cached)
    return cached


def _reserved_ids(vectorizer):
    """`(padding_id, unknown_id)`, each None where the vocabulary has no such token."""
    tokens = _RESERVED.get(_level(vectorizer))
    if tokens is None:
        return None, None
    vocabulary = _vocabulary(vectorizer)
    return tuple(vocabulary.index(t) if t in vocabulary else None for t in tokens)


def warn_unknown(vectorizer, text, ids):
    """Warn once when `text` holds tokens the vectorizer cannot represent (out-of-vocabulary or dropped)."""
    _, unknown_id = _reserved_ids(vectorizer)
    if unknown_id is not None and np.any(ids == unknown_id):
        unknown = sorted({c for c in text if _level(vectorizer) == "char"
                          and encode(vectorizer, c)[0] == unknown_id})
        detail = f": {unknown[:10]!r}" if unknown else ""
        warnings.warn(f"The prompt holds tokens never seen in training{detail}; they map to the "
                      f"out-of-vocabulary id {unknown_id}.", stacklevel=3)
    elif _level(vectorizer) == "bpe" and decode(vectorizer, ids) != text:
        warnings.warn("The prompt holds characters this BPE vocabulary cannot spell (it lacks some "
                      "byte symbols); they were dropped.", stacklevel=3)


def vectorizer_to_config(vectorizer):
    """A JSON-ready dict that `vectorizer_from_config` turns back into the same vectorizer.

    Example:
        >>> vectorizer_to_config(make_vectorizer("ab"))
        {'level': 'char', 'vocabulary': ['', '[UNK]', 'b', 'a']}
    """
    level = _level(vectorizer)
    if level == "byte":
        return {"level": level}
    if level == "sentencepiece":
        return {"level": level, "vocabulary": base64.b64encode(vectorizer.proto).decode("ascii")}
    if level == "bpe":
        return {"level": level, "vocabulary": {str(k): int(v) for k, v in vectorizer.vocabulary.items()},
                "merges": [str(m) for m in vectorizer.merges]}
    return {"level": level, "vocabulary": list(_vocabulary(vectorizer))}


def vectorizer_from_config(config):
    """The vectorizer described by `vectorizer_to_config`'s dict (vocabularies only, never file paths)."""
    expected = {"byte": (), "bpe": ("vocabulary", "merges")}
    level = config.get("level") if isinstance(config, dict) else None
    keys = expected.get(level, ("vocabulary",))
    kinds = {"sentencepiece": str, "bpe": dict}
    if (level not in LEVELS or set(config) != {"level", *keys}
            or (keys and not isinstance(config["vocabulary"], kinds.get(level, list)))
            or (level == "bpe" and not isinstance(config["merges"], list))):
        raise ValueError(f"`vectorizer` config must be a dict with a `level` in {LEVELS} and that "
                         f"level's vocabulary data; got {config!r:.200}.")
    arguments = {key: config[key] for key in keys}
    if level == "sentencepiece":
        arguments["vocabulary"] = base64.b64decode(config["vocabulary"])
    return make_vectorizer(level=level, **arguments)


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


def _check_text(text):
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str; got {type(text).__name__}. Use load_text() to read a file.")
    if not text.strip():
        raise ValueError("`text` is empty; give the text to train on (see load_text).")


def _check_vectorizer(vectorizer):
    if isinstance(vectorizer, (keras.layers.TextVectorization, keras.layers.StringLookup)):
        return
    hub = _hub()
    if not isinstance(vectorizer, (hub.WordPieceTokenizer, hub.SentencePieceTokenizer, hub.ByteTokenizer,
                                   hub.BytePairTokenizer)):
        raise TypeError(f"`vectorizer` must come from kn.data.make_vectorizer (a TextVectorization or a "
                        f"keras-hub tokenizer); got {type(vectorizer).__name__}.")
