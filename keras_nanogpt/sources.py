"""Corpus sources as pieces of work: files, folders and globs; text, `.jsonl` and `.parquet` documents; which
documents are held out for validation; cuts at paragraph and line boundaries; each piece's cleaned texts.

`corpus.prepare` plans with `describe` and `plan_pieces`, and its workers read with `texts` and `held_out`.
Nothing here reads a large file whole: cuts are found by seeking, pieces are read one at a time.
"""

import glob
import json
import os
import re

import numpy as np

from keras_nanogpt import cleaning, shards

TEXT_SUFFIXES = (".txt", ".text", ".md")  # what a folder's text files end with (a named file may end otherwise)
PIECE_BYTES = 8 << 20  # source bytes per piece of work
# Cut before the whitespace run that holds a blank line: no regex pre-tokenizer chunk of GPT-2's kind
# spans a non-space/space boundary, so a document cut there tokenizes as it would whole.
_PARAGRAPH = re.compile(rb"\S(\s*?\n[ \t\r\f\v]*\n)")
_GUTENBERG_END = re.compile(rb"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG", re.MULTILINE)  # cleaning.py's, in bytes


def expand(sources):
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


def check_text_field(text_field):
    if not isinstance(text_field, str) or not text_field:
        raise TypeError(f"`text_field` must be the name of the field holding the text; got {text_field!r}.")
    return text_field


def describe(path, text_field):
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
        while size - bounds[-1] > PIECE_BYTES:
            f.seek(bounds[-1] + PIECE_BYTES)
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


def is_held_out(index, val_fraction):
    """Whether document `index` is held out: every 1/val_fraction-th, evenly (a numpy array of indices too)."""
    index = np.asarray(index, np.int64)
    return np.floor((index + 1) * val_fraction) > np.floor(index * val_fraction)


def plan_pieces(sources, val_fraction, by_tail):
    """The pieces of work, in corpus order, each with its bytes and its train / val byte estimates."""
    pieces, document = [], 0
    for source in sources:
        path, size = source["path"], source["bytes"]
        if source["kind"] == "text" and size:
            split = "val" if not by_tail and is_held_out(document, val_fraction) else "train"
            end = source["end"]
            cut = _line_cut(path, int(end * (1 - val_fraction)), end) if by_tail else end
            ranges = [(0, size, split)] if cut == end and end - 0 <= PIECE_BYTES else []  # whole: clean_text
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
                held = int(is_held_out(np.arange(part["rows"]) + document, val_fraction).sum()) if part["rows"] else 0
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
    """Offsets from `begin` to `end` about `PIECE_BYTES` apart, each at a paragraph boundary."""
    bounds = [begin]
    while end - bounds[-1] > PIECE_BYTES:
        cut = _paragraph_cut(path, bounds[-1] + PIECE_BYTES, end)
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


def texts(piece, text_field, sample=False):
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
        return [cleaning.clean_piece(text, piece["first"], piece["last"], piece.get("footer", False))]
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


def held_out(piece, count):
    """Which of a jsonl / parquet piece's documents are validation ones (their split was fixed when planned)."""
    if piece["estimate"]["val"] <= 0:
        return np.zeros(count, bool)
    if piece["estimate"]["train"] <= 0:
        return np.ones(count, bool)
    return is_held_out(np.arange(count) + piece["document"], piece["val_fraction"])
