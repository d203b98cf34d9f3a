"""Files: atomic writes (beside the target, then a rename, so a crash leaves the old file or the new one),
and reads whose errors name the file and the argument it came from.

A write that fails (disk full, permission denied, read-only folder) raises an `OSError` that names the target
and the cause, and leaves the old file as it was.
"""

import contextlib
import errno
import json
import os
import shutil
import tempfile

_HINTS = {
    errno.ENOSPC: "free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free some space or write somewhere else",
    errno.EACCES: "this user may not write there: check the folder's permissions or write somewhere else",
    errno.EPERM: "this user may not write there: check the folder's permissions or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EFBIG: "the file is larger than this process may write (see `ulimit -f`)",
}


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same suffix); on success it replaces `path` in one rename.

    Any `OSError` while writing becomes one that names `path` and the cause; the old file stays.

    Args:
        path: the file to write.

    Example:
        >>> with atomic_path("model.keras") as tmp:  # doctest: +SKIP
        ...     model.save(tmp)
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    suffix = ".weights.h5" if base.endswith(".weights.h5") else os.path.splitext(base)[1]
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{suffix}", dir=directory)
        os.close(handle)
        os.remove(tmp)  # writers such as Keras refuse to overwrite without asking
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(directory)
    except OSError as error:
        raise write_error(path, error) from error
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary folder beside `path`; on success it replaces the folder `path` (the old one is
    kept until the new one is in place, then removed).

    Args:
        path: the folder to write.

    Example:
        >>> with atomic_directory("serving") as tmp:  # doctest: +SKIP
        ...     model.export(tmp)
    """
    target = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(target)
    tmp = old = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=parent)
        yield tmp
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".old", dir=parent)
            os.replace(target, os.path.join(old, "previous"))
        os.replace(tmp, target)
        _fsync_directory(parent)
    except OSError as error:
        raise write_error(target, error) from error
    finally:
        for folder in (tmp, old):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)


def write_bytes(path, data):
    """Write `data` to `path` atomically (see `atomic_path`).

    Example:
        >>> write_bytes("notes.txt", b"hello")  # doctest: +SKIP
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_error(path, error):
    """An `OSError` (same errno, so `PermissionError` stays one) saying that `path` could not be written and why."""
    code = getattr(error, "errno", None)
    cause = os.strerror(code) if code else (str(error) or type(error).__name__)
    hint = _HINTS.get(code)
    message = (f"Could not write {path!r}: {cause}{f' ({hint})' if hint else ''}. Nothing was replaced: "
               f"the file that was there, if any, is unchanged.")
    return OSError(code, message) if code else OSError(message)


def _fsync_directory(directory):
    """Make the rename itself durable (a power cut after `os.replace` keeps the new name)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not every platform opens folders
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems refuse to fsync a folder; the rename has still happened
    finally:
        os.close(handle)


def read_file(path, name=None):
    """The bytes of the file at `path`; a missing file raises naming it (and the argument `name`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`{name}`: no such file {path!r}." if name else f"No such file: {path!r}.")
    with open(path, "rb") as f:
        return f.read()


def read_json(path, name=None):
    """The JSON value of the file at `path`; a missing or invalid file raises naming it (and `name`)."""
    try:
        return json.loads(read_file(path, name))
    except ValueError as error:  # UnicodeDecodeError included
        where = f"`{name}` file {os.fspath(path)!r}" if name else repr(os.fspath(path))
        raise ValueError(f"{where} is not valid JSON: {error}") from None


def read_lines(source, name):
    """A list of strings as given, or the lines of the file at `source`."""
    if isinstance(source, (str, os.PathLike)):
        return read_file(source, name).decode("utf-8").splitlines()
    if not isinstance(source, (list, tuple)) or not all(isinstance(t, str) for t in source):
        raise TypeError(f"`{name}` must be a list of strings or a file path; got {type(source).__name__}.")
    return list(source)


def read_bytes(source, name):
    """Bytes as given, or the bytes of the file at `source`."""
    if isinstance(source, (str, os.PathLike)):
        return read_file(source, name)
    if not isinstance(source, bytes):
        raise TypeError(f"`{name}` must be a serialized proto (bytes) or a file path; "
                        f"got {type(source).__name__}.")
    return source
