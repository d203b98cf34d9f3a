"""Text corpora of any size into token shards: `prepare` (sources, pieces, worker processes, resumable writes).

The shards are llm.c / modded-nanogpt's format (see `shards.py`); `manifest.json` beside them names the
tokenizer, the counts and the sources. The work is cut into pieces of about 8 MB (`sources.py`: a large
text file on paragraph boundaries, a `.jsonl` file on line boundaries, a `.parquet` file by row group) that
worker processes tokenize while the main process writes the shards in order. A shard is a fixed run of
pieces, written beside its final name and renamed when complete, so a rerun after a kill redoes only the
shards that were not finished.
"""

import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
import time

import numpy as np

from keras_nanogpt import _files, _validation, shards, tokenizers
from keras_nanogpt import sources as _sources

_SAMPLE_BYTES = 1 << 20  # text tokenized to estimate tokens per byte (for sizing the shards)
_PLAN = "prepare.json"  # the settings and sources of the run that writes the folder (for reruns)


def prepare(sources, out, tokenizer="gpt2", val_fraction=0.1, workers=None, text_field="text",
            shard_tokens=100_000_000, progress=True):
    """Tokenize text files, `.jsonl` and `.parquet` files into train and validation token shards in `out`.

    A document is a text file (cleaned as `kn.data.clean_text` does), a `.jsonl` line or a parquet row;
    each ends with the tokenizer's end-of-text token. Every `1 / val_fraction`-th document goes to the
    validation shards; with fewer than `1 / val_fraction` documents the last `val_fraction` of every text
    document (from a line's start) does instead, as nanoGPT splits one novel. Shards are llm.c's format
    (uint16 tokens, or uint32 for vocabularies over 65,536); `manifest.json` records the tokenizer, the
    counts and the sources (sizes, SHA-256). Rerunning after a kill keeps the finished shards.

    Args:
        sources: a path, folder (its `.txt`, `.text`, `.md`, `.jsonl` and `.parquet` files, recursively) or
            glob, or a list of them.
        out: the folder for the shards (created; it must be empty or hold an earlier run of the same call).
        tokenizer: what `kn.tokenizers.Tokenizer.for_corpus` takes: "char" (its vocabulary learned from the
            corpus in one streaming pass), "byte", "gpt2", "word" / "wordpiece" / "sentencepiece" (learned
            from the corpus's start), a `.keras` model's path (its own tokenizer), a `Tokenizer` or a
            `tiktoken.Encoding`. Its `<|endoftext|>` id ends every document. "gpt2" downloads its BPE file on
            first use (tiktoken caches it).
        val_fraction: the share of documents (or of the text) for validation, in [0, 1).
        workers: processes that tokenize (default: every core).
        text_field: the field of a `.jsonl` object / column of a parquet table that holds the text.
        shard_tokens: about this many tokens per shard (llm.c writes 1e8).
        progress: print a progress line (tokens/s, time left) to stderr.

    Returns:
        The manifest (a dict; also `out/manifest.json`).

    Example:
        >>> manifest = prepare("books/", "shards", "gpt2")  # doctest: +SKIP
        >>> manifest["tokens"]
        {'train': 9843114, 'val': 1090433}
    """
    files = _sources.expand(sources)
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise TypeError(f"`out` must be the path of a folder for the shards; got {out!r}.")
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"`out` must be a folder; {out!r} is a file.")
    _check_tokenizer_name(tokenizer)
    val_fraction = _validation.check_float("val_fraction", val_fraction, 0.0, 1.0)
    workers = _validation.check_int("workers", workers if workers is not None else os.cpu_count() or 1)
    shard_tokens = _validation.check_int("shard_tokens", shard_tokens)
    text_field = _sources.check_text_field(text_field)

    described = [_sources.describe(path, text_field) for path in files]
    documents = sum(s["documents"] for s in described)
    if not documents or not sum(s["bytes"] for s in described):
        raise ValueError(f"The corpus is empty: {', '.join(repr(s['path']) for s in described)} hold no text.")
    by_tail = val_fraction > 0 and documents * val_fraction < 1
    if by_tail and not any(s["kind"] == "text" for s in described):
        raise ValueError(
            f"`val_fraction`={val_fraction} needs at least {math.ceil(1 / val_fraction)} documents to hold out "
            f"whole ones; the corpus has {documents}. Give more documents, or val_fraction=0 or >= {1 / documents}.")
    pieces = _sources.plan_pieces(described, val_fraction, by_tail)
    tokenizer = _corpus_tokenizer(tokenizer, pieces, text_field)
    dtype = shards.token_dtype(tokenizer.size)
    estimate = _tokens_per_byte(pieces, tokenizer, text_field)
    groups = _group(pieces, shard_tokens / estimate)
    plan = {"sources": [{k: s[k] for k in ("path", "bytes", "mtime_ns")} for s in described],
            "tokenizer": tokenizer.fingerprint(), "val_fraction": val_fraction, "text_field": text_field,
            "shard_tokens": shard_tokens, "dtype": dtype.name}
    done = _start_folder(out, plan, groups)
    todo = [p for p in pieces
            if any(p["group"][s] is not None and p["group"][s] not in done[s] for s in shards.SPLITS)]

    writers = {s: _ShardWriter(out, s, dtype, groups[s], done[s]) for s in shards.SPLITS}
    meter = _Progress(sum(p["bytes"] for p in todo), progress)
    # Forked workers start at once; a tokenizer whose encoding runs TensorFlow ops (word, wordpiece,
    # sentencepiece) gets fresh ("spawn") processes, as TensorFlow's threads do not survive a fork.
    fork = tokenizer.level in ("char", "byte", "bpe") and "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if fork else "spawn")
    pool = context.Pool(min(workers, max(1, len(todo) + len(described))), _start_worker,
                        (tokenizer.get_config(), text_field, dtype)) if workers > 1 else None
    try:
        hashes = [pool.apply_async(_sha256, (s["path"],)) for s in described] if pool else None
        results = pool.imap(_tokenize_piece, todo) if pool else _in_process(todo, tokenizer, text_field, dtype)
        for piece, result in zip(todo, results):
            for split in shards.SPLITS:
                writers[split].add(piece["group"][split], *result[split])
                if piece["closes"][split]:
                    writers[split].close(piece["group"][split])
            meter.update(piece["bytes"], sum(len(result[s][0]) for s in shards.SPLITS))
        digests = [h.get() for h in hashes] if pool else [_sha256(s["path"]) for s in described]
    finally:
        for writer in writers.values():
            writer.abandon()
        if pool:
            pool.terminate()
        meter.close()
    manifest = _manifest(out, tokenizer, dtype, described, digests, groups, val_fraction, by_tail, text_field)
    _files.write_bytes(os.path.join(out, shards.MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


# -- the tokenizer ----------------------------------------------------------------------------------------

def _check_tokenizer_name(tokenizer):
    """Refuse a tokenizer name that `Tokenizer.for_corpus` would not know, before any work."""
    if isinstance(tokenizer, (str, os.PathLike)):
        name = os.fspath(tokenizer)
        if name not in tokenizers.CORPUS_TOKENIZERS and not name.endswith(".keras") and not os.path.isfile(name):
            raise ValueError(f"`tokenizer` must be one of {tokenizers.CORPUS_TOKENIZERS}, the path of a .keras "
                             f"model, a kn.tokenizers.Tokenizer or a tiktoken.Encoding; got {name!r}.")
    elif not isinstance(tokenizer, tokenizers.Tokenizer) and not tokenizers._is_tiktoken_encoding(tokenizer):
        raise TypeError(f"`tokenizer` must be a tokenizer name {tokenizers.CORPUS_TOKENIZERS}, the path of a "
                        f".keras model, a kn.tokenizers.Tokenizer or a tiktoken.Encoding; got "
                        f"{type(tokenizer).__name__}.")
    return tokenizer


def _corpus_tokenizer(tokenizer, pieces, text_field):
    """`Tokenizer.for_corpus(tokenizer)`; a vocabulary to learn ("char", "word", ...) is learned from the corpus."""
    learned = isinstance(tokenizer, str) and tokenizer not in ("byte", "gpt2")
    chunks = (text for piece in pieces for text in _sources.texts(piece, text_field)) if learned else None
    tokenizer = tokenizers.Tokenizer.for_corpus(tokenizer, chunks=chunks)
    if tokenizer.end_of_text_id is None:
        raise ValueError(f"`tokenizer` ({tokenizer.describe()}) has no {tokenizers.END_OF_TEXT} token to end "
                         f"documents with; give one that has (tokenizer.with_special_tokens"
                         f"([{tokenizers.END_OF_TEXT!r}]), or a model trained with it).")
    return tokenizer


# -- planning: pieces of work and the shards they fill ----------------------------------------------------

def _tokens_per_byte(pieces, tokenizer, text_field):
    """Tokens per source byte on the first piece's first megabyte (sizes the shards; nothing depends on it)."""
    piece = dict(pieces[0])
    if piece["kind"] != "parquet":
        piece["range"] = (piece["range"][0], min(piece["range"][1], piece["range"][0] + _SAMPLE_BYTES))
        piece["last"] = False
    text = "".join(_sources.texts(piece, text_field, sample=True))
    sample_bytes = max(1, len(text.encode("utf-8")))
    return max(len(tokenizer.encode(text)), 1) / sample_bytes


def _group(pieces, bytes_per_shard):
    """Give each piece's train and val output a shard number (runs of pieces of about one shard each) and
    mark the piece that closes each shard; return the shard numbers per split."""
    groups = {}
    for split in shards.SPLITS:
        number, filled, last = -1, bytes_per_shard, {}
        for i, piece in enumerate(pieces):
            piece.setdefault("group", {})[split] = None
            if piece["estimate"][split] > 0:
                if filled + piece["estimate"][split] > bytes_per_shard and filled:
                    number, filled = number + 1, 0.0
                piece["group"][split], last[number] = number, i
                filled += piece["estimate"][split]
        closing = set(last.values())
        for i, piece in enumerate(pieces):
            piece.setdefault("closes", {})[split] = i in closing
        groups[split] = sorted(last)
    return groups


def _shard_name(split, number):
    return f"{split}_{number:06d}.bin"


def _start_folder(out, plan, groups):
    """Check `out` (empty, or an earlier run of this plan), record the plan; the finished shards per split."""
    plan_path = os.path.join(out, _PLAN)
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(plan_path):
            raise ValueError(f"`out` folder {out!r} is not empty and holds no {_PLAN} of an earlier prepare; "
                             f"give an empty or new folder.")
        earlier, plan = _files.read_json(plan_path, "out"), json.loads(json.dumps(plan))
        if earlier != plan:
            changed = sorted(k for k in set(earlier) | set(plan) if earlier.get(k) != plan.get(k))
            raise ValueError(f"`out` folder {out!r} holds shards of a different prepare (its {', '.join(changed)} "
                             f"differ); remove it or give another folder.")
    else:
        _files.write_bytes(plan_path, json.dumps(plan, indent=1).encode())
    done = {}
    for split in shards.SPLITS:
        done[split] = set()
        for number in groups[split]:
            path = os.path.join(out, _shard_name(split, number))
            if os.path.isfile(path):
                try:
                    shards.open_shard(path)
                    done[split].add(number)
                except ValueError:
                    os.remove(path)  # not ours to keep: it is rewritten
    return done


# -- the work ---------------------------------------------------------------------------------------------

def _encode_piece(piece, tokenizer, text_field, dtype):
    """`{split: (tokens, documents)}` of one piece: each document's ids, then end-of-text after a document's end."""
    texts = _sources.texts(piece, text_field)
    end = np.array([tokenizer.end_of_text_id], np.int64)
    if piece["kind"] == "text":
        parts = {s: [] for s in shards.SPLITS}
        parts[piece["split"]] = [np.asarray(tokenizer.encode(texts[0]))] + ([end] if piece["last"] else [])
        documents = {s: int(piece["last"] and s == piece["split"]) for s in shards.SPLITS}
    else:
        held = _sources.held_out(piece, len(texts))
        parts = {s: [] for s in shards.SPLITS}
        documents = {s: 0 for s in shards.SPLITS}
        for text, val in zip(texts, held):
            split = "val" if val else "train"
            parts[split] += [np.asarray(tokenizer.encode(text)), end]
            documents[split] += 1
    result = {}
    for split in shards.SPLITS:
        tokens = np.concatenate(parts[split]) if parts[split] else np.zeros(0, np.int64)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= tokenizer.size):
            raise ValueError(f"The tokenizer gave ids outside [0, {tokenizer.size}) for {piece['path']!r}.")
        result[split] = (tokens.astype(dtype), documents[split])
    return result


_WORKER = {}


def _start_worker(config, text_field, dtype):
    # A forked worker inherits the caller's signal handlers (a server's, `PreemptibleBackup`'s): with a Python
    # SIGTERM handler, `Pool.terminate` could not end a worker waiting for a task, and `prepare` hung.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's: it ends the pool
    _WORKER.update(tokenizer=tokenizers.Tokenizer.from_config(config), text_field=text_field, dtype=dtype)


def _tokenize_piece(piece):
    return _encode_piece(piece, _WORKER["tokenizer"], _WORKER["text_field"], _WORKER["dtype"])


def _in_process(pieces, tokenizer, text_field, dtype):
    for piece in pieces:
        yield _encode_piece(piece, tokenizer, text_field, dtype)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class _ShardWriter:
    """Writes one split's shards in order: tokens go to `.NAME.partial`, renamed to NAME when the shard is whole."""

    def __init__(self, out, split, dtype, numbers, done):
        self.out, self.split, self.dtype, self.done = out, split, dtype, done
        self.file = self.number = None
        self.count = self.documents = 0
        for number in numbers:  # a kill leaves a partial file behind; it is rewritten from its start
            stale = self._partial(number)
            if os.path.exists(stale):
                os.remove(stale)

    def _partial(self, number):
        return os.path.join(self.out, "." + _shard_name(self.split, number) + ".partial")

    def add(self, number, tokens, documents):
        if number is None or number in self.done:
            return
        if self.number != number:
            self.number, self.count, self.documents = number, 0, 0
            self.file = open(self._partial(number), "wb")
            self.file.write(bytes(shards.HEADER_BYTES))
        self.file.write(tokens.tobytes())
        self.count += len(tokens)
        self.documents += documents

    def close(self, number):
        """Finish shard `number`: the header (tokens, documents), fsync, rename into place."""
        if number is None or number in self.done:
            return
        target = os.path.join(self.out, _shard_name(self.split, number))
        if self.number != number:  # a shard whose pieces gave no token: still a shard, empty
            self.add(number, np.zeros(0, self.dtype), 0)
        try:
            values = shards.header(self.count, self.dtype)
            values[3] = self.documents
            self.file.seek(0)
            self.file.write(values.tobytes())
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self._partial(number), target)
            _files._fsync_directory(self.out)
        except OSError as error:
            raise _files.write_error(target, error) from error
        self.file, self.number = None, None
        self.done.add(number)

    def abandon(self):
        """Close an unfinished shard's file (a failed or interrupted run); a rerun writes it again."""
        if self.file is not None:
            self.file.close()
            self.file = None


class _Progress:
    """One stderr line: percent of the source bytes, tokens/s, time left (a carriage return rewrites it)."""

    def __init__(self, total_bytes, enabled):
        self.total, self.enabled = max(1, total_bytes), enabled
        self.bytes = self.tokens = 0
        self.started = self.shown = time.monotonic()

    def update(self, bytes_done, tokens):
        self.bytes += bytes_done
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and (now - self.shown > 0.25 or self.bytes >= self.total):
            self.shown = now
            elapsed = max(now - self.started, 1e-9)
            left = (self.total - self.bytes) * elapsed / max(self.bytes, 1)
            print(f"\rprepare: {100 * self.bytes / self.total:5.1f}% of {self.total / 1e6:,.1f} MB, "
                  f"{self.tokens:,} tokens, {self.tokens / elapsed:,.0f} tokens/s, "
                  f"{int(left) // 60}:{int(left) % 60:02d} left", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.enabled and self.shown != self.started:
            print(file=sys.stderr, flush=True)


def _manifest(out, tokenizer, dtype, sources, digests, groups, val_fraction, by_tail, text_field):
    listing, tokens, documents = {}, {}, {}
    for split in shards.SPLITS:
        listing[split] = []
        for number in groups[split]:
            name = _shard_name(split, number)
            with open(os.path.join(out, name), "rb") as f:
                head = np.frombuffer(f.read(shards.HEADER_BYTES), "<i4")
            listing[split].append({"file": name, "tokens": int(head[2]), "documents": int(head[3])})
        tokens[split] = sum(s["tokens"] for s in listing[split])
        documents[split] = sum(s["documents"] for s in listing[split])
    return {
        "format": "keras_nanogpt.shards", "version": 1,
        "tokenizer": {"level": tokenizer.level, "size": int(tokenizer.size),
                      "end_of_text_id": int(tokenizer.end_of_text_id), "fingerprint": tokenizer.fingerprint(),
                      "config": tokenizer.get_config()},
        "dtype": dtype.name, "tokens": tokens, "documents": documents, "shards": listing,
        "val_fraction": val_fraction, "val_by": "text tail" if by_tail else "documents", "text_field": text_field,
        "sources": [{"path": os.path.abspath(s["path"]), "kind": s["kind"], "bytes": s["bytes"], "sha256": d}
                    for s, d in zip(sources, digests)],
    }
