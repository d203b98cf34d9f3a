"""Tokenizers: `Tokenizer` is the one type, over every level; `make_vectorizer` makes the Keras layer it wraps.

`make_vectorizer` returns the Keras layer (`TextVectorization`, `StringLookup` or a keras-hub tokenizer) that
`NanoGPT(vectorizer=...)` holds; `Tokenizer(layer)` encodes and decodes for every level, fast enough for corpora,
adds special tokens (`<|endoftext|>`, chat turns) and carries the config the `.keras` file saves.
`Tokenizer.for_corpus(name)` makes the tokenizers `keras-nanogpt prepare --tokenizer NAME` names. `prompt_ids`
turns prompt text into checked ids for generation, scoring and the server. Behind the type:
`_tokenizer_layers.py` (the Keras layers of each level) and `_tokenizer_encoders.py` (the fast encoders).
"""

import hashlib
import json
import os
import warnings

import numpy as np

from keras_nanogpt import _files, _tokenizer_encoders, _validation
from keras_nanogpt._tokenizer_encoders import END_OF_TEXT, GPT2_PATTERN, base_of, bad_config  # noqa: F401
from keras_nanogpt._tokenizer_layers import (_RESERVED, DEFAULT_MAX_TOKENS, LEVELS,  # noqa: F401
                                             _fixed_text_vectorization, _text_vectorization,
                                             learn_char_vocabulary, make_vectorizer)

CORPUS_TOKENIZERS = ("char", "byte", "gpt2", "word", "wordpiece", "sentencepiece")
SAMPLE_CHARACTERS = 10_000_000  # what the learned levels read of a corpus in Tokenizer.for_corpus


class Tokenizer:
    """The one tokenizer type: encode, decode, size, special tokens, config and fingerprint of any level.

    Wraps the Keras layer that `make_vectorizer` returns (and `NanoGPT(vectorizer=...)` holds) or a
    config from `get_config`. Encoding is fast enough for corpora: a numpy lookup for characters and
    bytes, tiktoken (or an exact pure-Python fallback) for BPE. Special tokens (`<|endoftext|>`, chat
    turn tokens) get ids after the base vocabulary; encoding plain text never yields them.

    Args:
        layer_or_config: a tokenizer layer from `make_vectorizer`, a `get_config()` dict, or a
            `Tokenizer` (copied, so `special_tokens` can be added).
        special_tokens: names of special tokens to add (ids appended in this order); names the
            vocabulary already holds (BPE's `<|endoftext|>`) keep their ids.

    Example:
        >>> tokenizer = Tokenizer(make_vectorizer("hello world"), special_tokens=["<|endoftext|>"])
        >>> tokenizer.decode(tokenizer.encode("hold"))
        'hold'
        >>> tokenizer.level, tokenizer.size, tokenizer.end_of_text_id
        ('char', 11, 10)
    """

    def __init__(self, layer_or_config, special_tokens=None):
        if isinstance(layer_or_config, Tokenizer):
            base, added = layer_or_config._base, list(layer_or_config._added)
        elif isinstance(layer_or_config, dict):
            base, added = _tokenizer_encoders.base_from_config(layer_or_config)
        elif layer_or_config is None:
            raise TypeError("`layer_or_config` must be a tokenizer layer from make_vectorizer, a Tokenizer or "
                            "a get_config() dict; got None.")
        else:
            base, added = base_of(layer_or_config), []
        if isinstance(special_tokens, str):
            special_tokens = [special_tokens]
        for name in special_tokens or ():
            if not isinstance(name, str) or not name:
                raise TypeError(f"`special_tokens` must be non-empty strings; got {name!r}.")
            if name not in base.specials and name not in added:
                added.append(name)
        self._base, self._added = base, tuple(added)
        self._special = {**base.specials, **{name: base.size + i for i, name in enumerate(self._added)}}
        self._fingerprint = None

    @property
    def level(self):
        """The level: one of `LEVELS`."""
        return self._base.level

    @property
    def size(self):
        """Number of ids: the base vocabulary (padding and out-of-vocabulary included) plus added special tokens."""
        return self._base.size + len(self._added)

    @property
    def layer(self):
        """The Keras layer `NanoGPT(vectorizer=...)` holds (`model.vectorizer`)."""
        return self._base.layer

    @property
    def special_tokens(self):
        """Special token name -> id (the vocabulary's own, such as GPT-2's `<|endoftext|>`, and added ones)."""
        return dict(self._special)

    @property
    def end_of_text_id(self):
        """The id of `<|endoftext|>` (the document separator), or None when this tokenizer has none."""
        return self._special.get(END_OF_TEXT)

    def with_special_tokens(self, names):
        """A new Tokenizer with the special tokens `names` added (ids appended after the current ones).

        Example:
            >>> Tokenizer.for_corpus("byte").with_special_tokens(["<|user|>"]).special_tokens
            {'<|endoftext|>': 256, '<|user|>': 257}
        """
        return Tokenizer(self, special_tokens=names)

    def encode(self, text):
        """Token ids of `text` as a 1-D int32 numpy array (never a special token's id)."""
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str; got {type(text).__name__}.")
        if not text:
            return np.zeros((0,), dtype="int32")
        return self._base.encode(text)

    def encode_batch(self, texts):
        """`[encode(text) for text in texts]`, on several threads for BPE (tiktoken)."""
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"`texts` must hold str; got {type(text).__name__}.")
        return self._base.encode_batch(texts)

    def decode(self, ids):
        """Text of token ids: padding dropped, special ids read as their names; an unknown id reads as
        U+FFFD at char level, [UNK] at word level. Byte and BPE ids that stop inside a multi-byte
        character decode that character as U+FFFD.
        """
        ids = _validation.check_ids("ids", np.asarray(ids, dtype="int64").reshape(-1), self.size)
        base_size = self._base.size
        if not self._added or not np.any(ids >= base_size):
            return self._base.decode(ids)
        parts, start = [], 0
        for index in np.flatnonzero(ids >= base_size):
            if index > start:
                parts.append(self._base.decode(ids[start:index]))
            parts.append(self._added[ids[index] - base_size])
            start = index + 1
        if start < len(ids):
            parts.append(self._base.decode(ids[start:]))
        return (" " if self.level == "word" else "").join(parts)

    def warn_unknown(self, text, ids, stacklevel=2):
        """Warn when `text` holds tokens the tokenizer cannot represent (out-of-vocabulary or dropped)."""
        unknown_id = self._base.unknown_id
        if unknown_id is not None and np.any(ids == unknown_id):
            unknown = sorted({c for c in text if self.level == "char" and self.encode(c)[0] == unknown_id})
            detail = f": {unknown[:10]!r}" if unknown else ""
            warnings.warn(f"The prompt holds tokens never seen in training{detail}; they map to the "
                          f"out-of-vocabulary id {unknown_id}.", stacklevel=stacklevel + 1)
        elif self.level == "bpe" and self.decode(ids) != text:
            warnings.warn("The prompt holds characters this BPE vocabulary cannot spell (it lacks some "
                          "byte symbols); they were dropped.", stacklevel=stacklevel + 1)

    def check_size(self, vocabulary_size):
        """Return self, or raise when the tokenizer has more ids than a model's `vocabulary_size`."""
        if self.size > vocabulary_size:
            raise ValueError(f"`vectorizer` has {self.size} tokens but `vocabulary_size` is {vocabulary_size}; "
                             f"pass vocabulary_size >= {self.size}.")
        return self

    def get_config(self):
        """A JSON-ready dict that `from_config` turns back into the same tokenizer (special tokens included)."""
        config = dict(self._base.config())
        if self._added:
            config["special_tokens"] = list(self._added)
        return config

    @classmethod
    def from_config(cls, config):
        """The tokenizer described by `get_config`'s dict (vocabularies only, never file paths)."""
        return cls(config if isinstance(config, dict) else bad_config(config))

    def fingerprint(self):
        """A short stable hash of `get_config()`: equal for tokenizers that encode and decode alike.

        Example:
            >>> Tokenizer.for_corpus("byte").fingerprint() == Tokenizer.for_corpus("byte").fingerprint()
            True
        """
        if self._fingerprint is None:
            canonical = json.dumps(self.get_config(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            self._fingerprint = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
        return self._fingerprint

    def describe(self):
        """A one-line description for messages, e.g. "byte tokenizer, 257 ids, fingerprint 1a2b..."."""
        return f"{self.level} tokenizer, {self.size} ids, fingerprint {self.fingerprint()}"

    def check_same(self, other, what="the data", this="the model"):
        """Raise a `ValueError` naming both when `other` (a Tokenizer or a config) is another tokenizer.

        Example:
            >>> Tokenizer.for_corpus("byte").check_same(Tokenizer.for_corpus("byte"))
        """
        other = other if isinstance(other, Tokenizer) else Tokenizer(other)
        if other != self:
            raise ValueError(f"{what} was encoded by another tokenizer than {this}'s: {other.describe()} "
                             f"against {self.describe()}. Use the same tokenizer for both (e.g. "
                             f"prepare the data with --tokenizer MODEL.keras).")

    def __eq__(self, other):
        return isinstance(other, Tokenizer) and other.fingerprint() == self.fingerprint()

    def __hash__(self):
        return hash(self.fingerprint())

    def __repr__(self):
        return f"Tokenizer({self.describe()})"

    def save(self, path):
        """Write the tokenizer's config to `path` as JSON (atomically)."""
        _files.write_bytes(os.fspath(path), json.dumps(self.get_config()).encode("utf-8"))

    @classmethod
    def load(cls, path):
        """The tokenizer `save` wrote to `path`."""
        return cls.from_config(_files.read_json(path, "path"))

    @classmethod
    def for_corpus(cls, name, chunks=None, vocabulary=None, max_tokens=None, sample_characters=SAMPLE_CHARACTERS):
        """The tokenizer `--tokenizer NAME` means, with `<|endoftext|>` to separate documents.

        Args:
            name: "char" (vocabulary learned from `chunks` in one streaming pass, or given as
                `vocabulary`), "byte" (257 ids), "gpt2" (GPT-2's BPE through tiktoken; its file
                is downloaded on first use), "word" / "wordpiece" / "sentencepiece" (learned from the
                first `sample_characters` characters of `chunks`), a `tiktoken.Encoding` with GPT-2's
                pattern, a `Tokenizer`, or the path of a `.keras` model (that model's own tokenizer,
                any level, as it is: its `end_of_text_id` may be None).
            chunks: an iterable of str (or one str) to learn a vocabulary from.
            vocabulary: "char" only: the characters (e.g. from `learn_char_vocabulary`), instead of `chunks`.
            max_tokens: vocabulary size to learn (char: the most frequent characters; reserved ids included).
            sample_characters: how much of `chunks` the learned levels (word, wordpiece,
                sentencepiece) read.

        Example:
            >>> tokenizer = Tokenizer.for_corpus("char", ["hello ", "world"])
            >>> tokenizer.size, tokenizer.end_of_text_id
            (11, 10)
        """
        if isinstance(name, Tokenizer):
            return name
        if _is_tiktoken_encoding(name):
            return cls.from_ranks(name._mergeable_ranks, name._special_tokens, pattern=name._pat_str)
        if not isinstance(name, (str, os.PathLike)):
            raise TypeError(f"`name` must be a tokenizer name {CORPUS_TOKENIZERS}, a .keras path or a "
                            f"tiktoken.Encoding; got {name!r}.")
        name = os.fspath(name)
        if vocabulary is not None and name != "char":
            raise ValueError(f"`vocabulary` is for name='char' only; got name={name!r}.")
        if name not in CORPUS_TOKENIZERS:
            if name.endswith(".keras") or os.path.isfile(name):
                return cls(_tokenizer_encoders.model_file_config(name))
            raise ValueError(f"`name` must be one of {CORPUS_TOKENIZERS}, a .keras model path or a "
                             f"tiktoken.Encoding; got {name!r}.")
        if name == "gpt2":
            ranks, special, pattern = _tokenizer_encoders.gpt2_ranks()
            return cls.from_ranks(ranks, special, pattern=pattern)
        if name == "byte":
            layer = make_vectorizer(level="byte")
        elif name == "char" and vocabulary is not None:
            if not isinstance(vocabulary, (list, tuple)) or not all(
                    isinstance(c, str) and len(c) == 1 for c in vocabulary):
                raise ValueError(f"`vocabulary` must be a list of single characters; got {vocabulary!r:.100}.")
            layer = _fixed_text_vectorization("char", list(_RESERVED["char"]) + list(vocabulary))
        elif chunks is None:
            raise ValueError(f"Tokenizer.for_corpus({name!r}) learns its vocabulary: pass `chunks` (the text, "
                             f"as an iterable of str)" + (" or `vocabulary`." if name == "char" else "."))
        elif name == "char":
            characters = learn_char_vocabulary(chunks, max_tokens=max_tokens)
            layer = _text_vectorization("char", vocabulary=list(_RESERVED["char"]) + characters)
        else:
            layer = make_vectorizer(_sample(chunks, sample_characters), level=name, max_tokens=max_tokens)
        return cls(layer, special_tokens=[END_OF_TEXT])

    @classmethod
    def from_ranks(cls, mergeable_ranks, special_tokens=None, pattern=None):
        """A byte-level BPE tokenizer from tiktoken ranks (bytes -> id), as `tiktoken.Encoding` takes them.

        Args:
            mergeable_ranks: dict of token bytes -> rank (its id), all 256 single bytes included.
            special_tokens: dict of name -> id, such as `{"<|endoftext|>": 50256}`.
            pattern: the split pattern; only GPT-2's (`GPT2_PATTERN`, the default) is supported.

        Example:
            >>> ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256}
            >>> tokenizer = Tokenizer.from_ranks(ranks, {"<|endoftext|>": 257})
            >>> tokenizer.encode("abc").tolist(), tokenizer.end_of_text_id
            ([256, 99], 257)
        """
        if pattern is not None and pattern != GPT2_PATTERN:
            raise ValueError(f"Only GPT-2's split pattern is supported (GPT2_PATTERN); got {pattern!r:.80}.")
        return cls(_tokenizer_encoders._BytePairs.from_ranks(mergeable_ranks, special_tokens or {}))


def learn_bpe(text, vocabulary_size):
    """A small byte-level BPE learned from `text`, laid out as GPT-2's: 256 bytes, merges, `<|endoftext|>` last.

    A trainer for tests and benchmarks without network (Hugging Face `tokenizers`, which keras-hub
    installs); real corpora use GPT-2's ranks (`Tokenizer.for_corpus("gpt2")`).

    Args:
        text: a str or an iterable of str.
        vocabulary_size: ids in all, `<|endoftext|>` included (>= 258); fewer when the text runs out of
            pairs seen twice.

    Example:
        >>> tokenizer = learn_bpe("low lower lowest " * 50, 260)
        >>> tokenizer.size, tokenizer.end_of_text_id, tokenizer.decode(tokenizer.encode(" lowest"))
        (260, 259, ' lowest')
    """
    vocabulary_size = _validation.check_int("vocabulary_size", vocabulary_size, minimum=258)
    return Tokenizer(_tokenizer_encoders.learned_byte_pairs(text, vocabulary_size))


def prompt_ids(tokenizer, text, name="prompt"):
    """Token ids of a text prompt: a warning for tokens the vocabulary lacks, an error when it holds none.

    The one path from prompt text to ids for generation, scoring and the server.

    Args:
        tokenizer: the model's `Tokenizer` or vectorizer layer (None raises: the model cannot read text).
        text: the prompt.
        name: the argument's name in errors, e.g. "prompt" or "prompt[1]".

    Returns:
        A 1-D int32 numpy array, at least one id long.

    Example:
        >>> prompt_ids(make_vectorizer("hello"), "hell").tolist()
        [4, 5, 2, 2]
    """
    if tokenizer is None:
        raise ValueError(f"A text `{name}` needs a model with a `vectorizer`; this model has none. "
                         f"Pass token ids instead, or build NanoGPT(..., vectorizer=...).")
    tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    ids = tokenizer.encode(text)
    tokenizer.warn_unknown(text, ids, stacklevel=3)
    if ids.size == 0:
        raise ValueError(f"`{name}` holds no tokens ({text!r}); give at least one.")
    return ids


class Untracked:
    """Holds a model's tokenizer out of sight of Keras's layer tracking and `.keras` state walking: the
    vocabulary travels in the model's config (a tracked `TextVectorization` saves but does not load)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _sample(chunks, limit):
    if isinstance(chunks, str):
        return chunks[:limit]
    parts, total = [], 0
    for chunk in chunks:
        if not isinstance(chunk, str):
            raise TypeError(f"`chunks` must hold str; got {type(chunk).__name__}.")
        parts.append(chunk[:limit - total])
        total += len(parts[-1])
        if total >= limit:
            break
    return "".join(parts)


def _is_tiktoken_encoding(value):
    # tiktoken keeps an Encoding's ranks, special tokens and pattern in private attributes
    # (`_mergeable_ranks`, `_special_tokens`, `_pat_str`); they are its constructor's arguments.
    return type(value).__name__ == "Encoding" and type(value).__module__.startswith("tiktoken")


# The module functions kn.data has always had, kept as deprecated shims for users: each is a
# `Tokenizer` method. Package code calls `Tokenizer`.

REMOVED_IN = "0.3.0"


def _vocabulary_size(vectorizer):
    return Tokenizer(vectorizer).size


def _encode(vectorizer, text):
    return Tokenizer(vectorizer).encode(text)


def _decode(vectorizer, ids):
    return Tokenizer(vectorizer).decode(ids)


def _warn_unknown(vectorizer, text, ids):
    Tokenizer(vectorizer).warn_unknown(text, ids, stacklevel=3)


def _vectorizer_to_config(vectorizer):
    return Tokenizer(vectorizer).get_config()


def _vectorizer_from_config(config):
    return Tokenizer.from_config(config).layer


def _check_vectorizer(vectorizer, size):
    return None if vectorizer is None else Tokenizer(vectorizer).check_size(size).layer


DEPRECATED = {
    "vocabulary_size": (_vocabulary_size, "Tokenizer(vectorizer).size"),
    "encode": (_encode, "Tokenizer(vectorizer).encode(text)"),
    "decode": (_decode, "Tokenizer(vectorizer).decode(ids)"),
    "warn_unknown": (_warn_unknown, "Tokenizer(vectorizer).warn_unknown(text, ids)"),
    "vectorizer_to_config": (_vectorizer_to_config, "Tokenizer(vectorizer).get_config()"),
    "vectorizer_from_config": (_vectorizer_from_config, "Tokenizer.from_config(config).layer"),
    "check_vectorizer": (_check_vectorizer, "Tokenizer(vectorizer).check_size(vocabulary_size)"),
}


def deprecated(module, name):
    """For a module's `__getattr__`: a deprecated tokenizer function, with a `DeprecationWarning` that names
    its replacement and the version that removes it; an `AttributeError` for any other name."""
    if name not in DEPRECATED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    function, use = DEPRECATED[name]
    warnings.warn(f"{module}.{name} is deprecated and will be removed in keras_nanogpt {REMOVED_IN}; use "
                  f"keras_nanogpt.tokenizers.{use}.", DeprecationWarning, stacklevel=3)
    return function


def __getattr__(name):
    return deprecated(__name__, name)
