"""Argument checks shared by the public functions: each names the argument, the value and what is allowed."""

import numbers
import warnings

import numpy as np

from keras_nanogpt._version import REMOVED_IN


def check_int(name, value, minimum=1, maximum=None, limit=None):
    """Return `value` as an int, or raise naming `name` when it is not an integer in [`minimum`, `maximum`].

    `limit` says where `maximum` comes from (e.g. "the server's --max-tokens").
    """
    allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    allowed += f" ({limit})" if limit else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer {allowed}; got {value!r} ({type(value).__name__}).")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"`{name}` must be an integer {allowed}; got {value}.")
    return int(value)


def check_float(name, value, low, high, low_inclusive=True, high_inclusive=False):
    """Return `value` as a float, or raise naming `name` when it lies outside the interval."""
    interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number in {interval}; got {value!r} ({type(value).__name__}).")
    value = float(value)
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if not (above and below):
        raise ValueError(f"`{name}` must be in {interval}; got {value}.")
    return value


def check_choice(name, value, choices):
    """Return `value`, or raise naming `name` when it is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}; got {value!r}.")
    return value


def check_flag(name, value):
    """Return `value` as a bool, or raise naming `name` when it is not True or False."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False; got {value!r}.")
    return bool(value)


def check_heads(num_heads, hidden_dim):
    """Return `(num_heads, hidden_dim)` as ints, or raise when either is not a positive integer or
    `num_heads` does not divide `hidden_dim`."""
    num_heads, hidden_dim = check_int("num_heads", num_heads), check_int("hidden_dim", hidden_dim)
    if hidden_dim % num_heads:
        raise ValueError(f"`hidden_dim` must be divisible by `num_heads`; got hidden_dim={hidden_dim}, "
                         f"num_heads={num_heads}.")
    return num_heads, hidden_dim


def check_ids(name, ids, size):
    """Return the integer array `ids`, or raise naming `name` when an id lies outside [0, size).

    Checked on the host because JAX clamps out-of-range ids silently.
    """
    bad = ids[(ids < 0) | (ids >= size)]
    if bad.size:
        raise ValueError(f"`{name}` must hold token ids in [0, {size}) (the vocabulary); got "
                         f"{np.unique(bad)[:10].tolist()}.")
    return ids


def check_id_array(name, value, ndim, size, allowed):
    """Return `value` as an int32 array of `ndim` dimensions, none empty, holding ids in [0, size), or
    raise naming `name`; `allowed` says what the argument takes (e.g. "a string or 1-D integer token ids")."""
    try:
        ids = np.asarray(value)
    except ValueError:  # ragged lists
        ids = np.asarray([], dtype=object)
    if ids.ndim != ndim or 0 in ids.shape or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"`{name}` must be {allowed}; got shape {ids.shape} of {ids.dtype}.")
    return check_ids(name, ids, size).astype("int32")


def check_text(text):
    """Return `text`, or raise when it is not a non-empty str (a corpus to learn from or train on)."""
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str; got {type(text).__name__}. Use load_text() to read a file.")
    if not text.strip():
        raise ValueError("`text` is empty; give the text to train on (see load_text).")
    return text


def moved(module, name, names):
    """For a module's `__getattr__`: the object a name that moved now is, with a `DeprecationWarning`
    naming its new place; an `AttributeError` for any other name."""
    if name not in names:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new = names[name]
    warnings.warn(f"{module}.{name} moved to {new.__module__}.{new.__name__}; the old name will be removed "
                  f"in keras_nanogpt {REMOVED_IN}.", DeprecationWarning, stacklevel=3)
    return new
