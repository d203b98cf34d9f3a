"""The Keras layers of each tokenizer level: `make_vectorizer` learns or builds them (`kn.tokenizers.Tokenizer`
wraps them), and `learn_char_vocabulary` counts a corpus's characters in one streaming pass.

TensorFlow is used here (`TextVectorization` runs as an input pipeline under every backend).
"""

import io
import os

import keras
import numpy as np
import tensorflow as tf

from keras_nanogpt import _files, _validation

LEVELS = ("char", "word", "wordpiece", "sentencepiece", "byte", "bpe")
DEFAULT_MAX_TOKENS = {"wordpiece": 2048, "sentencepiece": 2048}
# (padding token, out-of-vocabulary token) of the vocabularies that have them.
_RESERVED = {"char": ("", "[UNK]"), "word": ("", "[UNK]"), "wordpiece": ("[PAD]", "[UNK]"),
             "sentencepiece": ("<pad>", "<unk>")}


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
        >>> from keras_nanogpt.tokenizers import Tokenizer
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
