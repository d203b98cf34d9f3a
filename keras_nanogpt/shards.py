"""Token shards on disk: the file formats, memory-mapped reading into `fit`, the data position, per-host rows.

Writing shards from text is `corpus.py` (`kn.data.prepare`). This module reads what it writes and what
nanoGPT and llm.c write:

| layout                                   | header                                   | tokens           |
| ---------------------------------------- | ---------------------------------------- | ---------------- |
| a `prepare` folder (`manifest.json`)      | 256 x int32: magic, version, token count | uint16 or uint32 |
| llm.c / modded-nanogpt `*_train_*.bin`   | 20240520, 1, count (uint16 tokens)       | from byte 1024   |
| llm.c uint32 shards                      | 20240801, 7, count (uint32 tokens)       | from byte 1024   |
| nanoGPT `train.bin` / `val.bin` (+ `meta.pkl`) | none                               | uint16           |

`token_dataset` maps the shards read-only and gives a `tf.data.Dataset` of `(ids, next_ids)` batches.
Batch `k` of the stream is a pure function of the corpus, the settings, the seed and `k`, so a run resumes
at batch `start` without reading the batches before it, and every process of a multi-host run can read
just its own rows of every global batch.
"""

import glob
import os
import pickle

import numpy as np
import tensorflow as tf

from keras_nanogpt import _validation, distribute, tokenizers

HEADER_INTS = 256  # the header: 256 little-endian int32 (1024 bytes)
HEADER_BYTES = HEADER_INTS * 4
FORMATS = {  # magic number -> (version, token dtype): llm.c's two shard kinds
    20240520: (1, np.dtype("<u2")),
    20240801: (7, np.dtype("<u4")),
}
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
SAMPLINGS = ("random", "shuffled")
_PREFETCH_BATCHES = 4  # batches made ahead of the model (as data.py's pipelines)
_NANOGPT_FILES = {"train": "train.bin", "val": "val.bin"}


class ShardError(ValueError):
    """A token file that cannot be read as a shard (damaged, truncated, a foreign format); names the file."""


def header(token_count, dtype):
    """The 1024-byte header of a shard of `token_count` tokens of `dtype` (uint16 or uint32).

    Example:
        >>> header(10, np.uint16)[:3].tolist()
        [20240520, 1, 10]
    """
    dtype = np.dtype(dtype).newbyteorder("<")
    magic = next((m for m, (_, d) in FORMATS.items() if d == dtype), None)
    if magic is None:
        raise ValueError(f"`dtype` must be uint16 or uint32; got {dtype}.")
    values = np.zeros(HEADER_INTS, "<i4")
    values[:3] = magic, FORMATS[magic][0], token_count
    return values


def token_dtype(vocabulary_size):
    """uint16 when every id of a `vocabulary_size` vocabulary fits, else uint32.

    Example:
        >>> token_dtype(50257), token_dtype(100277)
        (dtype('uint16'), dtype('uint32'))
    """
    return np.dtype("<u2") if vocabulary_size <= 2 ** 16 else np.dtype("<u4")


def open_shard(path, headerless=False):
    """Map the tokens of one shard read-only (nothing is read until used): a 1-D `np.memmap`.

    Args:
        path: a shard file.
        headerless: read nanoGPT's format (uint16 tokens, no header) when the file has no shard header.

    Raises:
        ShardError: naming `path`: not a shard (a foreign magic number), truncated or damaged.

    Example:
        >>> tokens = open_shard("shards/train_000000.bin")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such token shard: {path!r}.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = np.frombuffer(f.read(HEADER_BYTES), "<i4")
    magic = int(head[0]) if len(head) else None
    if magic in FORMATS:
        version, dtype = FORMATS[magic]
        if len(head) < HEADER_INTS:
            raise ShardError(f"Token shard {path!r} is truncated: {size} bytes, shorter than its 1024-byte header.")
        if int(head[1]) != version:
            raise ShardError(f"Token shard {path!r} has magic {magic} with version {int(head[1])}; "
                             f"this reader knows version {version} for that magic.")
        count = int(head[2])
        expected = HEADER_BYTES + count * dtype.itemsize
        if count < 0 or size != expected:
            raise ShardError(
                f"Token shard {path!r} is truncated or damaged: its header says {count} {dtype.name} tokens "
                f"({expected} bytes with the header), but the file has {size} bytes.")
        offset = HEADER_BYTES
    elif headerless:
        dtype, offset, count = np.dtype("<u2"), 0, size // 2
        if size % 2:
            raise ShardError(f"nanoGPT token file {path!r} is damaged: {size} bytes is not a whole number "
                             f"of uint16 tokens.")
    else:
        raise ShardError(
            f"{path!r} is not a token shard: its magic number is {magic} (a shard starts with "
            f"{' or '.join(map(str, FORMATS))}). nanoGPT's headerless files must be named train.bin / val.bin.")
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def read_meta(path):
    """nanoGPT's `meta.pkl` (vocab_size, stoi, itos) through an unpickler that builds only plain values.

    Only dicts, lists, tuples, strings, numbers, booleans and None are accepted: a pickle that asks for any
    class or function (which could run code) is refused.

    Example:
        >>> read_meta("data/shakespeare_char/meta.pkl")["vocab_size"]  # doctest: +SKIP
        65
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            meta = _PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ShardError(f"{path!r} is not a plain nanoGPT meta.pkl: {error}") from None
    if not isinstance(meta, dict):
        raise ShardError(f"{path!r} holds a {type(meta).__name__}, not nanoGPT's meta dict.")
    return meta


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it asks for {module}.{name}; only plain dicts, lists, strings and "
                                     f"numbers are read")


def shard_files(path, split="train"):
    """The shard files of `split` under `path`, and whether they are nanoGPT's headerless files.

    `path` is a `prepare` folder (its manifest lists the shards), a folder of llm.c / modded-nanogpt shards
    (names holding `train` / `val`), a nanoGPT folder (`train.bin`, `val.bin`), one shard file or a glob.

    Example:
        >>> files, headerless = shard_files("shards", "val")  # doctest: +SKIP
    """
    _validation.check_choice("split", split, SPLITS)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a folder of token shards, a shard file or a glob; got {path!r}.")
    path = os.fspath(path)
    if os.path.isdir(path):
        manifest = os.path.join(path, MANIFEST)
        if os.path.isfile(manifest):
            files = [os.path.join(path, s["file"]) for s in read_manifest(path)["shards"][split]]
            if not files:
                raise FileNotFoundError(f"The {split} split of {path!r} is empty: its {MANIFEST} lists no "
                                        f"{split} shards (prepare with a larger val_fraction, or more text).")
            return files, False
        nanogpt = os.path.join(path, _NANOGPT_FILES[split])
        if os.path.isfile(nanogpt):
            return [nanogpt], True
        files = sorted(f for f in glob.glob(os.path.join(glob.escape(path), "*.bin"))
                       if split in os.path.basename(f))
        where = f"folder {path!r}"
    elif os.path.isfile(path):
        return [path], os.path.basename(path) in _NANOGPT_FILES.values()
    else:
        files = sorted(glob.glob(path))
        where = f"glob {path!r}"
    if not files:
        raise FileNotFoundError(
            f"No {split} token shards in the {where}: expected a {MANIFEST} (from prepare), nanoGPT's "
            f"{_NANOGPT_FILES[split]} or llm.c shards named *{split}*.bin.")
    return files, False


def read_manifest(path):
    """The `manifest.json` a `prepare` folder holds (tokenizer, counts, shards, sources).

    Example:
        >>> read_manifest("shards")["tokens"]  # doctest: +SKIP
        {'train': 1003854, 'val': 111540}
    """
    import json

    file = os.path.join(os.fspath(path), MANIFEST)
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except ValueError as error:
        raise ShardError(f"{file!r} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "keras_nanogpt.shards":
        raise ShardError(f"{file!r} is not a keras_nanogpt shard manifest (its 'format' is not "
                         f"'keras_nanogpt.shards').")
    return manifest


def token_info(path):
    """What a token folder holds: vocabulary size, tokens per split, the tokenizer (from `prepare`) or nanoGPT's meta.

    Only headers and the manifest / `meta.pkl` are read. `vocabulary_size` is None when nothing records it
    (llm.c shards; nanoGPT's GPT-2 files without a `meta.pkl`).

    Example:
        >>> token_info("data/shakespeare_char")["vocabulary_size"]  # doctest: +SKIP
        65
    """
    tokens, meta, tokenizer = {}, None, None
    for split in SPLITS:
        try:
            files, headerless = shard_files(path, split)
        except FileNotFoundError:
            files, headerless = [], False
        tokens[split] = sum(len(open_shard(f, headerless)) for f in files)
        if headerless and os.path.isfile(os.path.join(os.path.dirname(files[0]), "meta.pkl")):
            meta = read_meta(os.path.join(os.path.dirname(files[0]), "meta.pkl"))
    if os.path.isfile(os.path.join(os.fspath(path), MANIFEST)):
        tokenizer = read_manifest(path)["tokenizer"]
    size = tokenizer["size"] if tokenizer else meta.get("vocab_size") if meta else None
    return {"vocabulary_size": size, "tokens": tokens, "tokenizer": tokenizer, "meta": meta}


class TokenWindows:
    """The `(sequence_length + 1)`-token windows of a split's shards and the batches drawn from them.

    Batch `k` is a pure function of the shards, the settings, the seed and `k`: "random" draws each start
    uniformly (nanoGPT's `get_batch`) from a generator seeded by `(seed, k)`; "shuffled" visits every
    back-to-back window once per epoch, in an order that a keyed Feistel permutation of the window indices
    gives (a new key each epoch; nothing the size of the corpus is stored). The files are mapped, not read.

    Args:
        files: shard files, in order.
        sequence_length: tokens per window (the model's context).
        batch_size: windows per global batch.
        sampling: one of `SAMPLINGS`.
        seed: an int.
        headerless: the files are nanoGPT's headerless uint16 files.
        rows: the `(first, stop)` rows of every batch this process reads; the others stay zero.

    Example:
        >>> windows = TokenWindows(["train.bin"], 64, 12, "random", 0, headerless=True)  # doctest: +SKIP
        >>> windows.batch(0).shape
        (12, 65)
    """

    def __init__(self, files, sequence_length, batch_size, sampling, seed, headerless=False, rows=None):
        self.files, self.headerless = list(files), headerless
        self.sequence_length, self.batch_size, self.sampling, self.seed = (
            sequence_length, batch_size, sampling, int(seed))
        self.rows = rows or (0, batch_size)
        self._tokens = [open_shard(f, headerless) for f in self.files]  # maps: only the headers are read
        counts = np.array([len(tokens) for tokens in self._tokens], np.int64)
        if sampling == "random":
            per_file = np.maximum(counts - sequence_length, 0)  # starts whose window fits in the file
        else:
            per_file = np.maximum(counts - 1, 0) // sequence_length  # back-to-back windows
        self.token_count = int(counts.sum())
        self._first = np.concatenate([[0], np.cumsum(per_file)])
        self.window_count = int(self._first[-1])
        self.batches_per_epoch = self.window_count // batch_size

    def starts(self, k):
        """The global window numbers of batch `k` (all `batch_size` of them)."""
        if self.sampling == "random":
            rng = np.random.default_rng([self.seed, k])
            return rng.integers(0, self.window_count, self.batch_size)
        epoch, index = divmod(int(k), self.batches_per_epoch)
        positions = np.arange(index * self.batch_size, (index + 1) * self.batch_size, dtype=np.uint64)
        return feistel_permutation(positions, self.window_count, (self.seed, epoch)).astype(np.int64)

    def batch(self, k):
        """Batch `k`: `(batch_size, sequence_length + 1)` int32 ids, zero outside `rows`."""
        windows = self.starts(k)
        out = np.zeros((self.batch_size, self.sequence_length + 1), np.int32)
        first, stop = self.rows
        files = np.searchsorted(self._first, windows[first:stop], side="right") - 1
        for row, (file, window) in enumerate(zip(files, windows[first:stop]), start=first):
            offset = int(window - self._first[file])
            if self.sampling == "shuffled":
                offset *= self.sequence_length
            out[row] = self._tokens[file][offset:offset + self.sequence_length + 1]
        return out


def feistel_permutation(x, n, key, rounds=4):
    """A keyed bijection of [0, n) applied to the uint64 array `x` (a Feistel network and cycle walking).

    The network permutes [0, 4^h) for the smallest 4^h >= n; values that land at or past `n` go through it
    again until they fall inside, which keeps the map a bijection of [0, n). Cost: a few vector operations
    per round; nothing of size `n` is made.

    Args:
        x: uint64 values in [0, n).
        n: the domain size.
        key: ints that choose the permutation.
        rounds: Feistel rounds.

    Example:
        >>> sorted(feistel_permutation(np.arange(10, dtype=np.uint64), 10, (0, 1)).tolist())
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.random.SeedSequence(list(key)).generate_state(rounds, np.uint64)
    x = np.array(x, np.uint64)
    todo = np.ones(x.shape, bool)
    while todo.any():
        y = x[todo]
        left, right = y >> np.uint64(half), y & mask
        for round_key in keys:
            left, right = right, left ^ (_mix(right ^ round_key) & mask)
        x[todo] = (left << np.uint64(half)) | right
        todo[todo] = x[todo] >= np.uint64(n)
    return x


def _mix(z):
    """splitmix64's finaliser: every output bit depends on every input bit (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def token_dataset(path, sequence_length, batch_size, split="train", sampling="random", seed=None, start=0,
                  process_index=None, process_count=None, tokenizer=None):
    """A `tf.data.Dataset` of `(ids, next_ids)` batches read from token shards through memory maps.

    The stream never ends: "random" draws windows at random offsets as nanoGPT's `get_batch` does;
    "shuffled" gives every back-to-back window once per epoch, in a new seeded order each epoch. Give
    `fit` a `steps_per_epoch` (and `validation_steps`, or use `.take(n)` for a fixed validation set).
    Nothing is read at the start but the shards' 1024-byte headers; batches are made ahead of the model.

    Under JAX multi-host `keras.distribution` (more than one process), each process reads only the rows
    that Keras's data sharding hands it, `[i * batch_size / P, (i + 1) * batch_size / P)` of every global
    batch, and leaves the others zero; the union over the processes is the one-process batch. Make the
    dataset after `kn.distribute.scope("multi-host")` (asking JAX for the process count starts its backend).

    Args:
        path: a `prepare` folder, a folder of llm.c / modded-nanogpt shards, a nanoGPT folder (`train.bin`,
            `val.bin`), one shard file, or a glob of shard files.
        sequence_length: tokens per window (the model's context).
        batch_size: windows per (global) batch.
        split: "train" or "val".
        sampling: "random" or "shuffled".
        seed: the seed of the offsets / orders; None draws one (then a resumed run cannot continue the stream).
        start: the first batch of the stream: a resumed run passes the step its backup restored.
        process_index: this process's index (default: JAX's, 0 elsewhere).
        process_count: the number of processes reading (default: JAX's, 1 elsewhere).
        tokenizer: the model's tokenizer (a `Tokenizer` or its layer), or None: shards whose manifest
            records another tokenizer are refused, with an error naming both.

    Returns:
        A dataset of `(ids, next_ids)`, each `(batch_size, sequence_length)` int32.

    Example:
        >>> train = token_dataset("shards", 64, 12, seed=0)  # doctest: +SKIP
        >>> model.fit(train, steps_per_epoch=100, epochs=20)
    """
    sequence_length = _validation.check_int("sequence_length", sequence_length)
    batch_size = _validation.check_int("batch_size", batch_size)
    _validation.check_choice("split", split, SPLITS)
    _validation.check_choice("sampling", sampling, SAMPLINGS)
    start = _validation.check_int("start", start, minimum=0)
    if seed is None:
        if start:
            raise ValueError(f"`start`={start} continues a seeded stream: pass the `seed` the run began with.")
        seed = int(np.random.SeedSequence().generate_state(1, np.uint32)[0])
    seed = _validation.check_int("seed", seed, minimum=0)
    count = process_count if process_count is not None else distribute.process_count()
    count = _validation.check_int("process_count", count)
    index = process_index if process_index is not None else distribute.process_index()
    index = _validation.check_int("process_index", index, minimum=0, maximum=count - 1)
    if batch_size % count:
        raise ValueError(f"`batch_size`={batch_size} must be a multiple of the {count} processes "
                         f"(each reads batch_size / processes rows).")
    files, headerless = shard_files(path, split)
    if tokenizer is not None and os.path.isfile(os.path.join(os.fspath(path), MANIFEST)):
        tokenizers.Tokenizer(tokenizer).check_same(
            tokenizers.Tokenizer.from_config(read_manifest(path)["tokenizer"]["config"]),
            what=f"the token shards in {os.fspath(path)!r}", this="the given tokenizer")
    meta = os.path.join(os.path.dirname(files[0]), "meta.pkl")
    if headerless and os.path.isfile(meta):
        read_meta(meta)  # a pickle that is not plain data is refused before anything else
    rows = (index * batch_size // count, (index + 1) * batch_size // count)
    windows = TokenWindows(files, sequence_length, batch_size, sampling, seed, headerless, rows)
    if windows.batches_per_epoch < 1:
        raise ValueError(
            f"The {split} shards under {os.fspath(path)!r} hold {windows.token_count} tokens: "
            f"{windows.window_count} {sampling} windows of sequence_length={sequence_length}, fewer than "
            f"batch_size={batch_size}. Use a smaller sequence_length / batch_size or more text.")

    def read(k):
        return windows.batch(int(k))

    def load(k):
        batch = tf.numpy_function(read, [k], tf.int32, stateful=False)
        batch = tf.ensure_shape(batch, (batch_size, sequence_length + 1))
        return batch[:, :-1], batch[:, 1:]

    options = tf.data.Options()
    options.autotune.enabled = False  # see data._prefetched: autotuning stalls the end of every fit
    options.deterministic = True
    return (tf.data.Dataset.counter(start)
            .map(load, num_parallel_calls=2, deterministic=True)
            .prefetch(_PREFETCH_BATCHES)
            .with_options(options))
