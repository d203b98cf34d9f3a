"""Text corpora of any size into token shards: `prepare` (sources, pieces, worker processes, resumable writes).

The shards are llm.c / modded-nanogpt's format (see `shards.py`); `manifest.json` beside them names the
tokenizer, the counts and the sources. The work is cut into pieces of about `_PIECE_BYTES` (a large text
file on paragraph boundaries, a `.jsonl` file on line boundaries, a `.parquet` file by row group) that
worker processes tokenize while the main process writes the shards in order. A shard is a fixed run of
pieces, written beside its final name and renamed when complete, so a rerun after a kill redoes only the
shards that were not finished.
"""

import glob
import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
import time

import numpy as np

from keras_nanogpt import _files, _validation, data, shards, tokenizers

TEXT_SUFFIXES = (".txt", ".text", ".md")  # what a folder's text files end with (a named file may end otherwise)
_PIECE_BYTES = 8 << 20  # source bytes per piece of work
_SAMPLE_BYTES = 1 << 20  # text tokenized to estimate tokens per byte (for sizing the shards)
_PLAN = "prepare.json"  # the settings and sources of the run that writes the folder (for reruns)
# Cut before the whitespace run that holds a blank line: no regex pre-tokenizer chunk of GPT-2's kind
# spans a non-space/space boundary, so a document cut there tokenizes as it would whole.
_PARAGRAPH = re.compile(rb"\S(\s*?\n[ \t\r\f\v]*\n)")
_GUTENBERG_END = re.compile(rb"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG", re.MULTILINE)  # data.py's, in bytes


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
    files = _expand(sources)
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise TypeError(f"`out` must be the path of a folder for the shards; got {out!r}.")
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"`out` must be a folder; {out!r} is a file.")
    _check_tokenizer_name(tokenizer)
    val_fraction = _validation.check_float("val_fraction", val_fraction, 0.0, 1.0)
    workers = _validation.check_int("workers", workers if workers is not None else os.cpu_count() or 1)
    shard_tokens = _validation.check_int("shard_tokens", shard_tokens)
    text_field = _check_text_field(text_field)

    sources = [_describe_source(path, text_field) for path in files]
    documents = sum(s["documents"] for s in sources)
    if not documents or not sum(s["bytes"] for s in sources):
        raise ValueError(f"The corpus is empty: {', '.join(repr(s['path']) for s in sources)} hold no text.")
    by_tail = val_fraction > 0 and documents * val_fraction < 1
    if by_tail and not any(s["kind"] == "text" for s in sources):
        raise ValueError(
            f"`val_fraction`={val_fraction} needs at least {math.ceil(1 / val_fraction)} documents to hold out "
            f"whole ones; the corpus has {documents}. Give more documents, or val_fraction=0 or >= {1 / documents}.")
    pieces = _pieces(sources, val_fraction, by_tail)
    tokenizer = _corpus_tokenizer(tokenizer, pieces, text_field)
    dtype = shards.token_dtype(tokenizer.size)
    estimate = _tokens_per_byte(pieces, tokenizer, text_field)
    groups = _group(pieces, shard_tokens / estimate)
    plan = {"sources": [{k: s[k] for k in ("path", "bytes", "mtime_ns")} for s in sources],
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
    pool = context.Pool(min(workers, max(1, len(todo) + len(sources))), _start_worker,
                        (tokenizer.get_config(), text_field, dtype)) if workers > 1 else None
    try:
        hashes = [pool.apply_async(_sha256, (s["path"],)) for s in sources] if pool else None
        results = pool.imap(_tokenize_piece, todo) if pool else _in_process(todo, tokenizer, text_field, dtype)
        for piece, result in zip(todo, results):
            for split in shards.SPLITS:
                writers[split].add(piece["group"][split], *result[split])
                if piece["closes"][split]:
                    writers[split].close(piece["group"][split])
            meter.update(piece["bytes"], sum(len(result[s][0]) for s in shards.SPLITS))
        digests = [h.get() for h in hashes] if pool else [_sha256(s["path"]) for s in sources]
    finally:
        for writer in writers.values():
            writer.abandon()
        if pool:
            pool.terminate()
        meter.close()
    manifest = _manifest(out, tokenizer, dtype, sources, digests, groups, val_fraction, by_tail, text_field)
    _files.write_bytes(os.path.join(out, shards.MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


# -- sources ----------------------------------------------------------------------------------------------

def _expand(sources):
    """The source files, in order: folders walked (sorted), globs expanded (sorted); missing ones raise."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not isinstance(sources, (list, tuple)) or not sources:
        raise TypeError(f"`sources` must be a path, folder or glob, or a non-empty list of them; got {sources!r}.")
    files = []
    for source in sources:
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"`sources` must hold paths, folders or globs; got {source!r}.")
        source = os.fspath(source)
        if os.path.isdir(source):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(source) for name in names
                           if name.endswith(TEXT_SUFFIXES + (".jsonl", ".parquet")))
            if not found:
                raise ValueError(f"The source folder {source!r} holds no text ({', '.join(TEXT_SUFFIXES)}), "
                                 f".jsonl or .parquet files.")
        elif os.path.isfile(source):
            found = [source]
        elif glob.has_magic(source):
            found = sorted(f for f in glob.glob(source, recursive=True) if os.path.isfile(f))
            if not found:
                raise FileNotFoundError(f"The source glob {source!r} matches no file.")
        else:
            raise FileNotFoundError(f"No such source file or folder: {source!r}.")
        files += found
    return files


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
    chunks = (text for piece in pieces for text in _texts(piece, text_field)) if learned else None
    tokenizer = tokenizers.Tokenizer.for_corpus(tokenizer, chunks=chunks)
    if tokenizer.end_of_text_id is None:
        raise ValueError(f"`tokenizer` ({tokenizer.describe()}) has no {tokenizers.END_OF_TEXT} token to end "
                         f"documents with; give one that has (tokenizer.with_special_tokens"
                         f"([{tokenizers.END_OF_TEXT!r}]), or a model trained with it).")
    return tokenizer


def _check_text_field(text_field):
    if not isinstance(text_field, str) or not text_field:
        raise TypeError(f"`text_field` must be the name of the field holding the text; got {text_field!r}.")
    return text_field


def _describe_source(path, text_field):
    """kind, bytes, mtime and document count of one source file, checked before any work."""
    stat = os.stat(path)
    kind = "jsonl" if path.endswith(".jsonl") else "parquet" if path.endswith(".parquet") else "text"
    source = {"path": path, "kind": kind, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if kind == "text":
        source["documents"] = 1 if stat.st_size else 0
        source["end"] = _gutenberg_end(path, stat.st_size)
    elif kind == "jsonl":
        source["pieces"] = _jsonl_pieces(path, text_field, stat.st_size) if stat.st_size else []
        source["documents"] = sum(count for _, _, count in source["pieces"])
    else:
        source["row_groups"] = _parquet_row_groups(path, text_field)
        source["documents"] = sum(rows for rows, _ in source["row_groups"])
    return source


def _gutenberg_end(path, size):
    """Where a Project Gutenberg licence footer starts (its END line, looked for in the last megabyte), or `size`.

    A document in several pieces ends there, so that no piece holds part of the footer.
    """
    begin = max(0, size - (1 << 20))
    with open(path, "rb") as f:
        f.seek(begin)
        match = _GUTENBERG_END.search(f.read())
    return begin + match.start() if match else size


def _jsonl_pieces(path, text_field, size):
    """Check the first line of a `.jsonl` file; its pieces: `(begin, end, documents)` on line boundaries."""
    with open(path, "rb") as f:
        first = f.readline()
        try:
            value = json.loads(first)
        except ValueError as error:
            raise ValueError(f"{path!r} line 1 is not JSON: {error}") from None
        if not isinstance(value, dict) or not isinstance(value.get(text_field), str):
            keys = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise ValueError(f"{path!r} line 1 has no string field {text_field!r} (`text_field`); it holds {keys}.")
        bounds = [0]
        while size - bounds[-1] > _PIECE_BYTES:
            f.seek(bounds[-1] + _PIECE_BYTES)
            f.readline()
            if f.tell() >= size:
                break
            bounds.append(f.tell())
        bounds.append(size)
        pieces = []
        for begin, end in zip(bounds, bounds[1:]):
            f.seek(begin)
            pieces.append((begin, end, sum(1 for line in f.read(end - begin).splitlines() if line.strip())))
    return pieces


def _parquet_row_groups(path, text_field):
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise ValueError(f"{path!r} is not a readable parquet file: {error}") from None
    names = file.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path!r} has no column {text_field!r} (`text_field`); its columns are {names}.")
    column = file.schema_arrow.field(text_field).type
    if str(column) not in ("string", "large_string", "string_view"):
        raise ValueError(f"{path!r} column {text_field!r} is {column}, not text.")
    meta = file.metadata
    return [(meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]


# -- planning: pieces of work and the shards they fill ----------------------------------------------------

def _is_val(index, val_fraction):
    """Whether document `index` is held out: every 1/val_fraction-th, evenly (a numpy array of indices too)."""
    index = np.asarray(index, np.int64)
    return np.floor((index + 1) * val_fraction) > np.floor(index * val_fraction)


def _pieces(sources, val_fraction, by_tail):
    """The pieces of work, in corpus order, each with its bytes and its train / val byte estimates."""
    pieces, document = [], 0
    for source in sources:
        path, size = source["path"], source["bytes"]
        if source["kind"] == "text" and size:
            split = "val" if not by_tail and _is_val(document, val_fraction) else "train"
            end = source["end"]
            cut = _line_cut(path, int(end * (1 - val_fraction)), end) if by_tail else end
            ranges = [(0, size, split)] if cut == end and end - 0 <= _PIECE_BYTES else []  # whole: clean_text
            for begin, stop, part in ((0, cut, split), (cut, end, "val")) if not ranges else ():
                bounds = _cuts(path, begin, stop)
                ranges += [(a, b, part) for a, b in zip(bounds, bounds[1:]) if b > a]
            for a, b, part in ranges:
                pieces.append({"kind": "text", "path": path, "range": (a, b), "split": part, "first": a == 0,
                               "last": b >= end, "footer": end < size, "bytes": b - a,
                               "estimate": {s: (b - a) * (s == part) for s in shards.SPLITS}})
        elif source["kind"] != "text":
            parts = ([{"range": (a, b), "bytes": b - a, "rows": rows} for a, b, rows in source["pieces"]]
                     if source["kind"] == "jsonl" else
                     [{"row_group": i, "bytes": stored, "rows": rows}
                      for i, (rows, stored) in enumerate(source["row_groups"])])
            for part in parts:
                held = int(_is_val(np.arange(part["rows"]) + document, val_fraction).sum()) if part["rows"] else 0
                rows = max(part["rows"], 1)
                pieces.append(dict(part, kind=source["kind"], path=path, document=document,
                                   val_fraction=val_fraction,
                                   estimate={"train": part["bytes"] * (rows - held) / rows,
                                             "val": part["bytes"] * held / rows}))
                document += part["rows"]
            continue
        document += source["documents"]
    return pieces


def _cuts(path, begin, end):
    """Offsets from `begin` to `end` about `_PIECE_BYTES` apart, each at a paragraph boundary."""
    bounds = [begin]
    while end - bounds[-1] > _PIECE_BYTES:
        cut = _paragraph_cut(path, bounds[-1] + _PIECE_BYTES, end)
        if cut >= end:
            break
        bounds.append(cut)
    return bounds + [end]


def _paragraph_cut(path, target, end):
    """The first paragraph boundary at or after `target` (before the blank line's whitespace), or `end`."""
    with open(path, "rb") as f:
        position = max(0, target - 1)
        while position < end:
            f.seek(position)
            chunk = f.read(min(1 << 20, end - position))
            match = _PARAGRAPH.search(chunk)
            if match:
                return position + match.start(1)
            if len(chunk) < 2:
                break
            position += len(chunk) - 64  # overlap: a blank line may straddle two reads
    return end


def _line_cut(path, target, end):
    """Where validation text starts: just after the first newline at or after `target`, or (with no newline
    before `end`) at `target` itself, moved forward to a character boundary that does not split a CRLF."""
    with open(path, "rb") as f:
        f.seek(target)
        f.readline()
        if f.tell() < end:
            return f.tell()
        f.seek(max(0, target - 1))
        ahead = f.read(8)
    skip = 1 if ahead[:1] == b"\r" else 0
    while skip + 1 < len(ahead) and ahead[skip + 1] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        skip += 1
    return min(target + skip, end)


def _tokens_per_byte(pieces, tokenizer, text_field):
    """Tokens per source byte on the first piece's first megabyte (sizes the shards; nothing depends on it)."""
    piece = dict(pieces[0])
    if piece["kind"] != "parquet":
        piece["range"] = (piece["range"][0], min(piece["range"][1], piece["range"][0] + _SAMPLE_BYTES))
        piece["last"] = False
    text = "".join(_texts(piece, text_field, sample=True))
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

def _texts(piece, text_field, sample=False):
    """The documents' texts of one piece (a text piece gives one part of one document)."""
    path = piece["path"]
    if piece["kind"] == "parquet":
        import pyarrow.parquet as pq

        column = pq.ParquetFile(path).read_row_group(piece["row_group"], columns=[text_field]).column(0)
        return [t or "" for t in column.to_pylist()]
    a, b = piece["range"]
    with open(path, "rb") as f:
        f.seek(a)
        raw = f.read(b - a)
    if sample:
        raw = raw.decode("utf-8", errors="ignore").encode()
    if piece["kind"] == "text":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path!r} is not valid UTF-8 at byte {a + error.start}.") from None
        return [_clean_piece(text, piece["first"], piece["last"], piece.get("footer", False))]
    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)[text_field])
        except (ValueError, KeyError, TypeError):
            if sample:
                continue
            raise ValueError(f"{path!r}: a line in bytes {a}-{b} (its {number}th) is not a JSON object with a "
                             f"string {text_field!r} field.") from None
    return texts


def _clean_piece(text, first, last, footer):
    """`data.clean_text` for one piece of a document: the header goes with the first piece; the last one ends
    where the licence footer began (`footer`: it was cut off when the pieces were planned)."""
    if first and last and not footer:
        return data.clean_text(text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if first:
        text = text.lstrip("\ufeff")
        start = data._GUTENBERG_START.search(text)
        if start:
            text = data._PRODUCED_BY.sub("", text[start.end():].lstrip())
    if last and footer:
        text = data._END_OF_EBOOK.sub("", text.rstrip()).rstrip() + "\n"
    return text


def _encode_piece(piece, tokenizer, text_field, dtype):
    """`{split: (tokens, documents)}` of one piece: each document's ids, then end-of-text after a document's end."""
    texts = _texts(piece, text_field)
    end = np.array([tokenizer.end_of_text_id], np.int64)
    if piece["kind"] == "text":
        parts = {s: [] for s in shards.SPLITS}
        parts[piece["split"]] = [np.asarray(tokenizer.encode(texts[0]))] + ([end] if piece["last"] else [])
        documents = {s: int(piece["last"] and s == piece["split"]) for s in shards.SPLITS}
    else:
        held = _held(piece, len(texts))
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


def _held(piece, count):
    """Which of a jsonl / parquet piece's documents are validation ones (their split was fixed when planned)."""
    if piece["estimate"]["val"] <= 0:
        return np.zeros(count, bool)
    if piece["estimate"]["train"] <= 0:
        return np.ones(count, bool)
    return _is_val(np.arange(count) + piece["document"], piece["val_fraction"])


_WORKER = {}


def _start_worker(config, text_field, dtype):
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
