"""Tokenizers: `Tokenizer` is the one type, over every level; `make_vectorizer` makes the Keras layer it wraps.

`make_vectorizer` returns the Keras layer (`TextVectorization`, `StringLookup` or a keras-hub tokenizer) that
`NanoGPT(vectorizer=...)` holds; `Tokenizer(layer)` encodes and decodes for every level, fast enough for corpora,
adds special tokens (`<|endoftext|>`, chat turns) and carries the config the `.keras` file saves.
`Tokenizer.for_corpus(name)` makes the tokenizers `keras-nanogpt prepare --tokenizer NAME` names. `prompt_ids`
turns prompt text into checked ids for generation, scoring and the server. TensorFlow is used here
(`TextVectorization` runs as an input pipeline under every backend).
"""

import base64
import hashlib
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
END_OF_TEXT = "<|endoftext|>"  # GPT-2's document separator; other levels get it as an added special token
# GPT-2's split pattern, as tiktoken writes it (tiktoken_ext.openai_public.r50k_pat_str).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CORPUS_TOKENIZERS = ("char", "byte", "gpt2", "word", "wordpiece", "sentencepiece")
SAMPLE_CHARACTERS = 10_000_000  # what the learned levels read of a corpus in Tokenizer.for_corpus
_DENSE_TABLE_LIMIT = 1 << 18  # char vocabularies below this code point encode through a direct table
_UNKNOWN_CHAR = "\ufffd"
# layer -> its base (what a Tokenizer looks up once: `decode` runs per streamed token); goes with its layer.
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
        >>> tokenizer = Tokenizer(make_vectorizer("hello world", level="char"))
        >>> tokenizer.decode(tokenizer.encode("hold"))
        'hold'
        >>> Tokenizer(make_vectorizer(level="byte")).decode([104, 105])
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
    return _byte_pair(*_checked_byte_pairs(vocabulary, _files.read_lines(merges, "merges")))


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


def _checked_byte_pairs(vocabulary, merges):
    if not isinstance(vocabulary, dict) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in vocabulary.items()):
        raise TypeError("`vocabulary` for level='bpe' must map token strings to integer ids.")
    merges = [m for m in merges if not isinstance(m, str) or (m.strip() and not m.startswith("#version"))]
    if not merges or any(not isinstance(m, str) or len(m.split(" ")) != 2 for m in merges):
        raise ValueError("`merges` for level='bpe' must be one or more rules 'a b' (merges.txt lines).")
    return vocabulary, merges


def _byte_pair(vocabulary, merges):
    """keras-hub's layer; special tokens such as `<|endoftext|>` are not unsplittable: plain text never
    yields them (tiktoken's `encode_ordinary`)."""
    return _hub().BytePairTokenizer(vocabulary=vocabulary, merges=merges)


def _hub():
    """keras_hub.tokenizers, imported on first use (it adds about a second to `import keras_nanogpt`)."""
    import keras_hub

    return keras_hub.tokenizers


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
            base, added = _base_from_config(layer_or_config)
        elif layer_or_config is None:
            raise TypeError("`layer_or_config` must be a tokenizer layer from make_vectorizer, a Tokenizer or "
                            "a get_config() dict; got None.")
        else:
            base, added = _base_of(layer_or_config), []
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
        return cls(config if isinstance(config, dict) else _bad_config(config))

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
    def for_corpus(cls, name, chunks=None, max_tokens=None, sample_characters=SAMPLE_CHARACTERS):
        """The tokenizer `--tokenizer NAME` means, with `<|endoftext|>` to separate documents.

        Args:
            name: "char" (vocabulary learned from `chunks` in one streaming pass, or given as a list of
                characters in `chunks`), "byte" (257 ids), "gpt2" (GPT-2's BPE through tiktoken; its file
                is downloaded on first use), "word" / "wordpiece" / "sentencepiece" (learned from the
                first `sample_characters` characters of `chunks`), a `tiktoken.Encoding` with GPT-2's
                pattern, a `Tokenizer`, or the path of a `.keras` model (that model's own tokenizer,
                any level, as it is: its `end_of_text_id` may be None).
            chunks: an iterable of str (or one str) to learn a vocabulary from.
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
        if name.endswith(".keras") or os.path.isfile(name):
            return cls._of_model_file(name)
        if name == "gpt2":
            return cls._gpt2()
        if name not in CORPUS_TOKENIZERS:
            raise ValueError(f"`name` must be one of {CORPUS_TOKENIZERS}, a .keras model path or a "
                             f"tiktoken.Encoding; got {name!r}.")
        if name == "byte":
            layer = make_vectorizer(level="byte")
        elif chunks is None:
            raise ValueError(f"Tokenizer.for_corpus({name!r}) learns its vocabulary: pass `chunks` (the text, "
                             f"as an iterable of str).")
        elif name == "char":
            if isinstance(chunks, (list, tuple)) and chunks and all(
                    isinstance(c, str) and len(c) == 1 for c in chunks) and len(set(chunks)) == len(chunks):
                characters = list(chunks)[:None if max_tokens is None else max_tokens - 2]
            else:
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
        return cls(_BytePairs.from_ranks(mergeable_ranks, special_tokens or {}))

    @classmethod
    def _gpt2(cls):
        try:
            from tiktoken_ext import openai_public
        except ImportError:
            raise ImportError("The 'gpt2' tokenizer needs tiktoken: pip install keras_nanogpt[bpe].") from None
        try:
            gpt2 = openai_public.gpt2()
        except Exception as error:  # requests / blobfile raise several kinds offline
            raise OSError(f"Could not load tiktoken's 'gpt2' encoding (downloaded on first use into "
                          f"TIKTOKEN_CACHE_DIR): {error}") from error
        return cls.from_ranks(gpt2["mergeable_ranks"], gpt2["special_tokens"], pattern=gpt2["pat_str"])

    @classmethod
    def _of_model_file(cls, path):
        import zipfile

        try:
            with zipfile.ZipFile(path) as archive:
                config = json.loads(archive.read("config.json"))
        except FileNotFoundError:
            raise FileNotFoundError(f"No such model file: {path!r}.") from None
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
            raise ValueError(f"{path!r} is not a .keras model file: {error}") from None
        tokenizer = (config.get("config") or {}).get("vectorizer") if isinstance(config, dict) else None
        if tokenizer is None:
            raise ValueError(f"The model {path!r} has no tokenizer (it was built without `vectorizer=`).")
        return cls(tokenizer)


def learn_char_vocabulary(chunks, max_tokens=None):
    """The characters of a text given chunk by chunk, most frequent first, in one pass that holds one chunk.

    Args:
        chunks: an iterable of str (a file read in pieces, documents, ...), or one str.
        max_tokens: keep the `max_tokens - 2` most frequent characters (ids 0 and 1 are padding and
            out-of-vocabulary); None keeps all.

    Returns:
        A list of single characters (ties in first-seen code point order).

    Example:
        >>> learn_char_vocabulary(["abb", "bc"])
        ['b', 'a', 'c']
    """
    if isinstance(chunks, str):
        chunks = [chunks]
    if max_tokens is not None:
        _validation.check_int("max_tokens", max_tokens, minimum=3)
    counts = {}
    for chunk in chunks:
        if not isinstance(chunk, str):
            raise TypeError(f"`chunks` must hold str; got {type(chunk).__name__}.")
        codes, found = np.unique(np.frombuffer(chunk.encode("utf-32-le"), "<u4"), return_counts=True)
        for code, count in zip(codes.tolist(), found.tolist()):
            counts[code] = counts.get(code, 0) + count
    if not counts:
        raise ValueError("`chunks` hold no characters; give the corpus text.")
    ordered = sorted(counts, key=lambda code: (-counts[code], code))
    return [chr(code) for code in ordered[:None if max_tokens is None else max_tokens - 2]]


def learn_bpe(text, vocabulary_size):
    """A small byte-level BPE learned from `text`, laid out as GPT-2's: 256 bytes, merges, `<|endoftext|>` last.

    A trainer for tests and benchmarks without network (Hugging Face `tokenizers`, which keras-hub
    installs); real corpora use GPT-2's ranks (`Tokenizer.for_corpus("gpt2")`).

    Args:
        text: a str or an iterable of str.
        vocabulary_size: ids in all, `<|endoftext|>` included (>= 258).

    Example:
        >>> tokenizer = learn_bpe("low lower lowest " * 50, 270)
        >>> tokenizer.size, tokenizer.end_of_text_id, len(tokenizer.encode(" lowest"))
        (270, 269, 1)
    """
    import tempfile

    import tokenizers as hf_tokenizers

    vocabulary_size = _validation.check_int("vocabulary_size", vocabulary_size, minimum=258)
    trainer = hf_tokenizers.ByteLevelBPETokenizer()
    trainer.train_from_iterator([text] if isinstance(text, str) else text, vocab_size=vocabulary_size - 1,
                                min_frequency=2, show_progress=False)
    with tempfile.TemporaryDirectory() as directory:
        trainer.save_model(directory)
        merges = _files.read_lines(os.path.join(directory, "merges.txt"), "merges")
    merges = [m for m in merges if m.strip() and not m.startswith("#version")]
    symbols = list(_byte_unicode().values())  # GPT-2's byte order: ids 0..255
    vocabulary = {symbol: i for i, symbol in enumerate(symbols)}
    for merge in merges:
        vocabulary.setdefault(merge.replace(" ", ""), len(vocabulary))
    vocabulary[END_OF_TEXT] = len(vocabulary)
    return Tokenizer(_BytePairs(vocabulary, merges))


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


# The bases: one per level, each encoding fast and exactly as its Keras layer does.

class _Base:
    """A level's vocabulary without added special tokens: `level`, `size`, `layer`, `specials` (the
    vocabulary's own special tokens), `padding_id`, `unknown_id`, `encode`, `decode`, `config`."""

    specials = {}
    padding_id = unknown_id = None

    def __init__(self, level, layer):
        self.level, self._layer = level, layer

    @property
    def layer(self):
        return self._layer

    @property
    def size(self):
        return int(self.layer.vocabulary_size())

    def encode(self, text):
        return np.asarray(keras.ops.convert_to_numpy(self.layer(text)), dtype="int32").reshape(-1)

    def encode_batch(self, texts):
        return [self.encode(text) if text else np.zeros((0,), "int32") for text in texts]

    def decode(self, ids):
        if self.padding_id is not None:
            ids = ids[ids != self.padding_id]
        text = self.layer.detokenize(ids.astype("int32"))
        if isinstance(text, tf.Tensor):
            text = text.numpy()
        return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


class _Vocabulary(_Base):
    """char, word, wordpiece and sentencepiece: a token list with reserved padding / out-of-vocabulary ids."""

    def __init__(self, level, layer):
        super().__init__(level, layer)
        self.tokens = [str(token) for token in layer.get_vocabulary()]
        index = {token: i for i, token in enumerate(self.tokens)}
        self.padding_id, self.unknown_id = (index.get(t) for t in _RESERVED.get(level, (None, None)))
        if level in ("char", "word"):
            shown = list(self.tokens)
            if level == "char" and self.unknown_id is not None:
                shown[self.unknown_id] = _UNKNOWN_CHAR
            self._shown = np.array(shown, dtype=object)
        if level == "char":
            single = [(ord(t), i) for i, t in enumerate(self.tokens) if len(t) == 1]
            default = -1 if self.unknown_id is None else self.unknown_id
            top = max((code for code, _ in single), default=0)
            if top < _DENSE_TABLE_LIMIT:  # a direct table: one gather per character
                self._table = np.full(top + 2, default, dtype="int32")
                for code, i in single:
                    self._table[code] = i
            else:
                order = sorted(single)
                self._codes = np.array([c for c, _ in order], dtype="uint32")
                self._ids = np.array([i for _, i in order], dtype="int32")
                self._table = None
            self._default = default

    @property
    def size(self):
        return len(self.tokens)

    def config(self):
        if self.level == "sentencepiece":
            return {"level": self.level, "vocabulary": base64.b64encode(self.layer.proto).decode("ascii")}
        return {"level": self.level, "vocabulary": list(self.tokens)}

    def encode(self, text):
        if self.level == "char":
            return self._encode_chars(text)
        if self.level == "word":
            return np.asarray(self.layer(tf.constant([text])), dtype="int32").reshape(-1)
        return super().encode(text)

    def _encode_chars(self, text):
        codes = np.frombuffer(text.encode("utf-32-le"), "<u4")
        if self._table is not None:
            ids = self._table[np.minimum(codes, len(self._table) - 1)]
        else:
            position = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)
            ids = np.where(self._codes[position] == codes, self._ids[position], self._default).astype("int32")
        if self.unknown_id is None and np.any(ids < 0):
            unknown = sorted({chr(c) for c in np.unique(codes[ids < 0])[:10].tolist()})
            raise ValueError(f"`text` holds characters outside this vocabulary, which has no "
                             f"out-of-vocabulary id: {unknown!r}.")
        return ids

    def decode(self, ids):
        if self.level not in ("char", "word"):
            return super().decode(ids)
        if self.padding_id is not None:
            ids = ids[ids != self.padding_id]
        return ("" if self.level == "char" else " ").join(self._shown[ids])


class _Bytes(_Base):
    """The 256 UTF-8 byte values (keras-hub's `ByteTokenizer`, which reads byte 0 as padding)."""

    padding_id = 0

    def __init__(self, layer=None):
        super().__init__("byte", layer)

    @property
    def layer(self):
        if self._layer is None:
            self._layer = _hub().ByteTokenizer(lowercase=False)
            _LOOKED_UP[self._layer] = self
        return self._layer

    @property
    def size(self):
        return 256

    def config(self):
        return {"level": "byte"}

    def encode(self, text):
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype("int32")

    def decode(self, ids):
        return ids[ids != 0].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class _BytePairs(_Base):
    """GPT-2's byte-level BPE: tiktoken where installed, else an exact pure-Python encoder (same pattern,
    same ranks); keras-hub's `BytePairTokenizer` is the layer, and the encoder only for vocabularies that
    lack some byte symbols (which tiktoken cannot load)."""

    def __init__(self, vocabulary=None, merges=None, layer=None, ranks=None, specials=None):
        super().__init__("bpe", layer)
        self._vocabulary, self._merges = vocabulary, merges
        if ranks is None:  # from vocab.json + merges.txt: a rank per byte and per merge, in merge order
            to_byte = {symbol: byte for byte, symbol in _byte_unicode().items()}
            merged = [m.replace(" ", "") for m in merges]
            produced = set(merged)
            singles = sorted((i, t) for t, i in vocabulary.items() if len(t) == 1 and t in to_byte)
            ordered = [t for _, t in singles] + list(dict.fromkeys(t for t in merged if t in vocabulary))
            self._complete = len(singles) == 256
            specials = {t: i for t, i in vocabulary.items()
                        if not (len(t) == 1 and t in to_byte) and t not in produced}
            ranks = {bytes(to_byte[c] for c in t): rank for rank, t in enumerate(ordered)}
            rank_ids = np.array([vocabulary[t] for t in ordered], dtype="int32")
            self._rank_ids = None if np.array_equal(rank_ids, np.arange(len(ordered))) else rank_ids
        else:
            self._complete, self._rank_ids = sum(len(b) == 1 for b in ranks) == 256, None
        self.specials, self._ranks = dict(specials), ranks
        self._size = max([*ranks.values(), *self.specials.values()]) + 1 if vocabulary is None else len(vocabulary)
        self._id_bytes = None
        self._encoder = self._python_cache = None

    @classmethod
    def from_ranks(cls, mergeable_ranks, special_tokens):
        if not isinstance(mergeable_ranks, dict) or not all(
                isinstance(k, bytes) and isinstance(v, int) for k, v in mergeable_ranks.items()):
            raise TypeError("`mergeable_ranks` must map token bytes to integer ranks (tiktoken's format).")
        if sum(len(token) == 1 for token in mergeable_ranks) != 256:
            raise ValueError("`mergeable_ranks` must hold all 256 single bytes.")
        if not isinstance(special_tokens, dict) or not all(
                isinstance(k, str) and isinstance(v, int) for k, v in special_tokens.items()):
            raise TypeError("`special_tokens` must map names to integer ids.")
        return cls(ranks=dict(mergeable_ranks), specials=special_tokens)

    @property
    def size(self):
        return self._size

    @property
    def vocabulary(self):
        if self._vocabulary is None:
            symbols = _byte_unicode()
            self._vocabulary = {"".join(symbols[b] for b in token): rank for token, rank in self._ranks.items()}
            self._vocabulary.update(self.specials)
        return self._vocabulary

    @property
    def merges(self):
        if self._merges is None:
            self._merges = _merges_from_ranks(self._ranks)
        return self._merges

    @property
    def layer(self):
        if self._layer is None:
            self._layer = _byte_pair(self.vocabulary, self.merges)
            _LOOKED_UP[self._layer] = self
        return self._layer

    def config(self):
        return {"level": "bpe", "vocabulary": {str(k): int(v) for k, v in self.vocabulary.items()},
                "merges": [str(m) for m in self.merges]}

    def _tiktoken(self):
        if self._encoder is None:
            try:
                import tiktoken
            except ImportError:
                self._encoder = False
            else:
                self._encoder = tiktoken.Encoding("keras_nanogpt_bpe", pat_str=GPT2_PATTERN,
                                                  mergeable_ranks=self._ranks, special_tokens={})
        return self._encoder

    def _to_ids(self, ranks):
        ranks = np.asarray(ranks, dtype="int32")
        return ranks if self._rank_ids is None else self._rank_ids[ranks]

    def encode(self, text):
        if not self._complete:
            return super().encode(text)  # keras-hub drops the characters it cannot spell
        encoder = self._tiktoken()
        return self._to_ids(encoder.encode_ordinary(text) if encoder else self._python_encode(text))

    def encode_batch(self, texts):
        encoder = self._tiktoken() if self._complete else None
        if not encoder:
            return super().encode_batch(texts)
        return [self._to_ids(ranks) for ranks in encoder.encode_ordinary_batch(texts)]

    def _python_encode(self, text):
        """tiktoken's algorithm in Python: split by GPT-2's pattern, then merge the lowest-ranked pair."""
        import regex

        if self._python_cache is None:
            self._python_cache = {}
        cache, ranks, out = self._python_cache, self._ranks, []
        for piece in regex.findall(GPT2_PATTERN, text):
            found = cache.get(piece)
            if found is None:
                found = _merge(piece.encode("utf-8"), ranks)
                if len(cache) < 100_000:
                    cache[piece] = found
            out.extend(found)
        return out

    def decode(self, ids):
        if self._id_bytes is None:
            table = [b""] * self.size
            for token, rank in self._ranks.items():
                table[rank if self._rank_ids is None else self._rank_ids[rank]] = token
            for name, i in self.specials.items():
                table[i] = name.encode("utf-8")
            self._id_bytes = table
        table = self._id_bytes
        return b"".join(table[i] for i in ids.tolist()).decode("utf-8", errors="replace")


def _merge(data, ranks, max_rank=None):
    """BPE of one piece's bytes by ranks (the lowest-ranked adjacent pair first), as tiktoken does."""
    if max_rank is None and data in ranks:
        return [ranks[data]]
    parts = [data[i:i + 1] for i in range(len(data))]
    while len(parts) > 1:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (max_rank is None or rank < max_rank) and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts if max_rank is not None else [ranks[p] for p in parts]


def _merges_from_ranks(ranks):
    """merges.txt rules ("a b", byte symbols) of tiktoken ranks: each token's last merge, in rank order."""
    symbols = _byte_unicode()
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _merge(token, ranks, max_rank=rank)
        if len(parts) != 2:
            raise ValueError(f"The ranks are not a byte-pair encoding: token {token!r} (rank {rank}) is not "
                             f"one merge of two lower-ranked tokens.")
        merges.append(" ".join("".join(symbols[b] for b in part) for part in parts))
    return merges


def _byte_unicode():
    """GPT-2's byte -> printable symbol map (vocab.json's alphabet), in its vocabulary order."""
    global _BYTE_UNICODE
    if _BYTE_UNICODE is None:
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        others = [b for b in range(256) if b not in printable]
        _BYTE_UNICODE = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
    return _BYTE_UNICODE


_BYTE_UNICODE = None


def _base_of(layer):
    """The base of a tokenizer layer (looked up once: `decode` runs per streamed token)."""
    if isinstance(layer, _Base):
        return layer
    base = _LOOKED_UP.get(layer) if isinstance(layer, keras.layers.Layer) else None
    if base is None:
        level = _level_of(layer)  # a TypeError naming `vectorizer` for anything else
        if level == "byte":
            base = _Bytes(layer)
        elif level == "bpe":
            base = _BytePairs(layer.vocabulary, [str(m) for m in layer.merges], layer=layer)
        else:
            base = _Vocabulary(level, layer)
        _LOOKED_UP[layer] = base
    return base


def _base_from_config(config):
    """`(base, added special token names)` of a `get_config()` dict."""
    expected = {"byte": (), "bpe": ("vocabulary", "merges")}
    level = config.get("level")
    keys = expected.get(level, ("vocabulary",))
    kinds = {"sentencepiece": str, "bpe": dict}
    special = config.get("special_tokens", [])
    if (level not in LEVELS or set(config) - {"special_tokens"} != {"level", *keys}
            or (keys and not isinstance(config["vocabulary"], kinds.get(level, list)))
            or (level == "bpe" and not isinstance(config["merges"], list))
            or not isinstance(special, list) or not all(isinstance(s, str) and s for s in special)):
        _bad_config(config)
    if level == "byte":
        return _Bytes(), list(special)
    if level == "bpe":
        layer_free = _BytePairs(*_checked_byte_pairs(config["vocabulary"], config["merges"]))
        return layer_free, list(special)
    arguments = {key: config[key] for key in keys}
    if level == "sentencepiece":
        arguments["vocabulary"] = base64.b64decode(config["vocabulary"])
    return _base_of(make_vectorizer(level=level, **arguments)), list(special)


def _bad_config(config):
    raise ValueError(f"`vectorizer` config must be a dict with a `level` in {LEVELS}, that level's vocabulary "
                     f"data and optionally `special_tokens` (a list of names); got {config!r:.200}.")


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
                    f"keras-hub tokenizer) or be a kn.tokenizers.Tokenizer; got {type(layer).__name__}.")


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
