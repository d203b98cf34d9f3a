"""The encoders behind `kn.tokenizers.Tokenizer`, one per level, each fast on corpora and exactly equal to
its Keras layer: a numpy lookup over code points (char), the UTF-8 bytes (byte), tiktoken or an exact
pure-Python copy of it (GPT-2's byte-level BPE); word, wordpiece and sentencepiece run their layers.
"""

import base64
import json
import os
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_nanogpt._tokenizer_layers import (_RESERVED, LEVELS, _byte_pair, _checked_byte_pairs, _hub, _level_of,
                                             make_vectorizer)

# GPT-2's split pattern, as tiktoken writes it (tiktoken_ext.openai_public.r50k_pat_str).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
END_OF_TEXT = "<|endoftext|>"  # GPT-2's document separator; other levels get it as an added special token
_DENSE_TABLE_LIMIT = 1 << 18  # char vocabularies below this code point encode through a direct table
_UNKNOWN_CHAR = "\ufffd"
# layer -> its base (what a Tokenizer looks up once: `decode` runs per streamed token); goes with its layer.
_LOOKED_UP = weakref.WeakKeyDictionary()


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


def base_of(layer):
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


def base_from_config(config):
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
        bad_config(config)
    if level == "byte":
        return _Bytes(), list(special)
    if level == "bpe":
        layer_free = _BytePairs(*_checked_byte_pairs(config["vocabulary"], config["merges"]))
        return layer_free, list(special)
    arguments = {key: config[key] for key in keys}
    if level == "sentencepiece":
        arguments["vocabulary"] = base64.b64decode(config["vocabulary"])
    return base_of(make_vectorizer(level=level, **arguments)), list(special)


def bad_config(config):
    raise ValueError(f"`vectorizer` config must be a dict with a `level` in {LEVELS}, that level's vocabulary "
                     f"data and optionally `special_tokens` (a list of names); got {config!r:.200}.")


def learned_byte_pairs(text, vocabulary_size):
    """The base of `kn.tokenizers.learn_bpe`: Hugging Face `tokenizers`' byte-level trainer, GPT-2's layout."""
    import tempfile

    import tokenizers as hf_tokenizers

    from keras_nanogpt import _files

    trainer = hf_tokenizers.ByteLevelBPETokenizer()
    trainer.train_from_iterator([text] if isinstance(text, str) else text, vocab_size=vocabulary_size - 1,
                                min_frequency=2, show_progress=False)
    with tempfile.TemporaryDirectory() as directory:
        trainer.save_model(directory)
        merges = _files.read_lines(os.path.join(directory, "merges.txt"), "merges")
    merges = [m for m in merges if m.strip() and not m.startswith("#version")]
    vocabulary = {symbol: i for i, symbol in enumerate(_byte_unicode().values())}  # GPT-2's byte order
    for merge in merges:
        vocabulary.setdefault(merge.replace(" ", ""), len(vocabulary))
    vocabulary[END_OF_TEXT] = len(vocabulary)
    return _BytePairs(vocabulary, merges)


def gpt2_ranks():
    """tiktoken's `gpt2` encoding as `(mergeable_ranks, special_tokens, pattern)` (downloaded on first use)."""
    try:
        from tiktoken_ext import openai_public
    except ImportError:
        raise ImportError("The 'gpt2' tokenizer needs tiktoken: pip install keras_nanogpt[bpe].") from None
    try:
        gpt2 = openai_public.gpt2()
    except Exception as error:  # requests / blobfile raise several kinds offline
        raise OSError(f"Could not load tiktoken's 'gpt2' encoding (downloaded on first use into "
                      f"TIKTOKEN_CACHE_DIR): {error}") from error
    return gpt2["mergeable_ranks"], gpt2["special_tokens"], gpt2["pat_str"]


def model_file_config(path):
    """The tokenizer config a `.keras` file's model config holds, read without loading the weights."""
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
    return tokenizer
