"""Tokenizers: `make_vectorizer` makes one for each level, `Tokenizer` is the one small type over them all.

`make_vectorizer` returns the Keras layer (`TextVectorization`, `StringLookup` or a keras-hub tokenizer) that
`NanoGPT(vectorizer=...)` holds and saves; `Tokenizer(layer)` gives any of them one interface. `prompt_ids`
turns prompt text into checked ids for generation, scoring and the server. TensorFlow is used here
(`TextVectorization` runs as an input pipeline under every backend).
"""

import base64
import io
import json
import os
import warnings
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_nanogpt import _files, _validation

LEVELS = ("char", "word", "wordpiece", "sentencepiece", "byte", "bpe")
DEFAULT_MAX_TOKENS = {"wordpiece": 2048, "sentencepiece": 2048}
# (padding token, out-of-vocabulary token) of the vocabularies that have them.
_RESERVED = {"char": ("", "[UNK]"), "word": ("", "[UNK]"), "wordpiece": ("[PAD]", "[UNK]"),
             "sentencepiece": ("<pad>", "<unk>")}
_BPE_SPECIAL_TOKENS = ("<|endoftext|>",)  # GPT-2's document separator: never split
_UNKNOWN_CHAR = "\ufffd"
# layer -> what a Tokenizer looks up once (`decode` runs per streamed token); an entry goes with its layer.
_LOOKED_UP = weakref.WeakKeyDictionary()


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
        _validation.check_text(text)
        return _learn_vectorizer(text, level, max_tokens)
    if level in ("char", "word"):
        return _fixed_text_vectorization(level, vocabulary)
    if level == "wordpiece":
        return _word_piece(_files.read_lines(vocabulary, "vocabulary"))
    if level == "sentencepiece":
        return _sentence_piece(_files.read_bytes(vocabulary, "vocabulary"))
    if isinstance(vocabulary, (str, os.PathLike)):
        vocabulary = _files.read_json(vocabulary, "vocabulary")
    return _byte_pair(vocabulary, _files.read_lines(merges, "merges"))


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


def _hub():
    """keras_hub.tokenizers, imported on first use (it adds about a second to `import keras_nanogpt`)."""
    import keras_hub

    return keras_hub.tokenizers


class Tokenizer:
    """One interface over the layers `make_vectorizer` gives: encode, decode, size, config, save and load.

    Args:
        layer: a `keras.layers.TextVectorization`, a `keras.layers.StringLookup` or a keras-hub
            tokenizer, as `make_vectorizer` returns and `model.vectorizer` holds.

    Example:
        >>> tokenizer = Tokenizer(make_vectorizer("hello world"))
        >>> tokenizer.decode(tokenizer.encode("hold"))
        'hold'
        >>> tokenizer.level, tokenizer.size
        ('char', 10)
    """

    def __init__(self, layer):
        self.layer = layer
        looked_up = _LOOKED_UP.get(layer) if isinstance(layer, keras.layers.Layer) else None
        if looked_up is None:
            looked_up = _look_up(layer)  # a TypeError naming `vectorizer` for anything else
            _LOOKED_UP[layer] = looked_up
        self.level, self._tokens, self._token_array, self._reserved = looked_up

    @property
    def size(self):
        """Number of ids the tokenizer produces (padding and out-of-vocabulary included)."""
        return len(self._tokens) if self._tokens is not None else int(self.layer.vocabulary_size())

    def encode(self, text):
        """Token ids of `text` as a 1-D int32 numpy array."""
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str; got {type(text).__name__}.")
        if not text:
            return np.zeros((0,), dtype="int32")
        layer = self.layer
        if isinstance(layer, keras.layers.TextVectorization):
            ids = layer(tf.constant([text]))
        elif isinstance(layer, keras.layers.StringLookup):
            unknown = sorted(set(text) - set(self._tokens))
            if unknown:
                raise ValueError(f"`text` holds characters outside this vocabulary, which has no "
                                 f"out-of-vocabulary id: {unknown[:10]!r}.")
            ids = layer(tf.strings.unicode_split(text, "UTF-8"))
        else:
            ids = layer(text)
        return np.asarray(keras.ops.convert_to_numpy(ids), dtype="int32").reshape(-1)

    def decode(self, ids):
        """Text of token ids (padding dropped; an unknown id reads as U+FFFD at char level, [UNK] at word level).

        Byte and BPE ids that stop inside a multi-byte character decode that character as U+FFFD.
        """
        ids = _validation.check_ids("ids", np.asarray(ids, dtype="int64").reshape(-1), self.size)
        padding, _ = self._reserved
        if padding is not None:
            ids = ids[ids != padding]
        if self._token_array is not None:
            return ("" if self.level == "char" else " ").join(self._token_array[ids])
        text = self.layer.detokenize(ids.astype("int32"))
        if isinstance(text, tf.Tensor):
            text = text.numpy()
        return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)

    def warn_unknown(self, text, ids, stacklevel=2):
        """Warn when `text` holds tokens the tokenizer cannot represent (out-of-vocabulary or dropped)."""
        _, unknown_id = self._reserved
        if unknown_id is not None and np.any(ids == unknown_id):
            unknown = sorted({c for c in text if self.level == "char" and self.encode(c)[0] == unknown_id})
            detail = f": {unknown[:10]!r}" if unknown else ""
            warnings.warn(f"The prompt holds tokens never seen in training{detail}; they map to the "
                          f"out-of-vocabulary id {unknown_id}.", stacklevel=stacklevel + 1)
        elif self.level == "bpe" and self.decode(ids) != text:
            warnings.warn("The prompt holds characters this BPE vocabulary cannot spell (it lacks some "
                          "byte symbols); they were dropped.", stacklevel=stacklevel + 1)

    def get_config(self):
        """A JSON-ready dict that `from_config` turns back into the same tokenizer."""
        if self.level == "byte":
            return {"level": self.level}
        if self.level == "sentencepiece":
            return {"level": self.level, "vocabulary": base64.b64encode(self.layer.proto).decode("ascii")}
        if self.level == "bpe":
            return {"level": self.level,
                    "vocabulary": {str(k): int(v) for k, v in self.layer.vocabulary.items()},
                    "merges": [str(m) for m in self.layer.merges]}
        return {"level": self.level, "vocabulary": list(self._tokens)}

    @classmethod
    def from_config(cls, config):
        """The tokenizer described by `get_config`'s dict (vocabularies only, never file paths)."""
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
        return cls(make_vectorizer(level=level, **arguments))

    def save(self, path):
        """Write the tokenizer's config to `path` as JSON (atomically)."""
        _files.write_bytes(os.fspath(path), json.dumps(self.get_config()).encode("utf-8"))

    @classmethod
    def load(cls, path):
        """The tokenizer `save` wrote to `path`."""
        return cls.from_config(_files.read_json(path, "path"))


def prompt_ids(vectorizer, text, name="prompt"):
    """Token ids of a text prompt: a warning for tokens the vocabulary lacks, an error when it holds none.

    The one path from prompt text to ids for generation, scoring and the server.

    Args:
        vectorizer: the model's vectorizer (None raises: the model cannot read text).
        text: the prompt.
        name: the argument's name in errors, e.g. "prompt" or "prompt[1]".

    Returns:
        A 1-D int32 numpy array, at least one id long.

    Example:
        >>> prompt_ids(make_vectorizer("hello"), "hell").tolist()
        [4, 5, 2, 2]
    """
    if vectorizer is None:
        raise ValueError(f"A text `{name}` needs a model with a `vectorizer`; this model has none. "
                         f"Pass token ids instead, or build NanoGPT(..., vectorizer=...).")
    tokenizer = Tokenizer(vectorizer)
    ids = tokenizer.encode(text)
    tokenizer.warn_unknown(text, ids, stacklevel=3)
    if ids.size == 0:
        raise ValueError(f"`{name}` holds no tokens ({text!r}); give at least one.")
    return ids


# The functions of kn.data's tokenizer API, kept: each is the `Tokenizer` method of the same job.

def vocabulary_size(vectorizer):
    """`Tokenizer(vectorizer).size`: ids the vectorizer produces (padding and out-of-vocabulary included)."""
    return Tokenizer(vectorizer).size


def encode(vectorizer, text):
    """`Tokenizer(vectorizer).encode(text)`: token ids of `text` as a 1-D int32 numpy array.

    Example:
        >>> encode(make_vectorizer("abc"), "cab").shape
        (3,)
    """
    return Tokenizer(vectorizer).encode(text)


def decode(vectorizer, ids):
    """`Tokenizer(vectorizer).decode(ids)`: the text of 1-D token ids.

    Example:
        >>> vectorizer = make_vectorizer("abc")
        >>> decode(vectorizer, encode(vectorizer, "cab"))
        'cab'
    """
    return Tokenizer(vectorizer).decode(ids)


def warn_unknown(vectorizer, text, ids):
    """`Tokenizer(vectorizer).warn_unknown(text, ids)`: warn about tokens the vectorizer cannot represent."""
    Tokenizer(vectorizer).warn_unknown(text, ids, stacklevel=3)


def vectorizer_to_config(vectorizer):
    """`Tokenizer(vectorizer).get_config()`: a JSON-ready dict for `vectorizer_from_config`.

    Example:
        >>> vectorizer_to_config(make_vectorizer("ab"))
        {'level': 'char', 'vocabulary': ['', '[UNK]', 'b', 'a']}
    """
    return Tokenizer(vectorizer).get_config()


def vectorizer_from_config(config):
    """`Tokenizer.from_config(config).layer`: the vectorizer `vectorizer_to_config` described."""
    return Tokenizer.from_config(config).layer


def check_vectorizer(vectorizer, size):
    """The tokenizer layer of `vectorizer` (a layer, or the dict a saved config holds), or None; raises
    when it has more tokens than `size`, the model's `vocabulary_size`."""
    if isinstance(vectorizer, dict):
        vectorizer = vectorizer_from_config(vectorizer)
    tokens = 0 if vectorizer is None else vocabulary_size(vectorizer)
    if tokens > size:
        raise ValueError(f"`vectorizer` has {tokens} tokens but `vocabulary_size` is {size}; pass "
                         f"vocabulary_size >= {tokens}.")
    return vectorizer


class Untracked:
    """Holds a model's tokenizer out of sight of Keras's layer tracking and `.keras` state walking: the
    vocabulary travels in the model's config (a tracked `TextVectorization` saves but does not load)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _look_up(layer):
    """`(level, tokens or None, token_array (char/word only) or None, (padding_id, unknown_id))`."""
    level = _level_of(layer)
    vocabulary = [str(token) for token in layer.get_vocabulary()] if level in _RESERVED else []
    reserved = tuple(vocabulary.index(t) if t in vocabulary else None for t in _RESERVED.get(level, ("", "")))
    if level not in ("char", "word"):
        return level, vocabulary or None, None, reserved
    shown = list(vocabulary)
    if level == "char" and reserved[1] is not None:
        shown[reserved[1]] = _UNKNOWN_CHAR
    return level, vocabulary, np.array(shown, dtype=object), reserved


def _level_of(layer):
    if isinstance(layer, keras.layers.TextVectorization):
        return "char" if layer.get_config()["split"] == "character" else "word"
    if isinstance(layer, keras.layers.StringLookup):
        return "char"
    hub = _hub()
    for level, kind in (("wordpiece", hub.WordPieceTokenizer), ("sentencepiece", hub.SentencePieceTokenizer),
                        ("byte", hub.ByteTokenizer), ("bpe", hub.BytePairTokenizer)):
        if isinstance(layer, kind):
            return level
    raise TypeError(f"`vectorizer` must come from kn.data.make_vectorizer (a TextVectorization or a "
                    f"keras-hub tokenizer); got {type(layer).__name__}.")
