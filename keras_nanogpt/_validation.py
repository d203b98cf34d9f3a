"""Argument checks shared by the public functions: each names the argument, the value and what is allowed."""

import numbers

import numpy as np


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


def check_ids(name, ids, size):
    """Return the integer array `ids`, or raise naming `name` when an id lies outside [0, size).

    Checked on the host because JAX clamps out-of-range ids silently.
    """
    bad = ids[(ids < 0) | (ids >= size)]
    if bad.size:
        raise ValueError(f"`{name}` must hold token ids in [0, {size}) (the vocabulary); got "
                         f"{np.unique(bad)[:10].tolist()}.")
    return ids


def check_text(text):
    """Return `text`, or raise when it is not a non-empty str (a corpus to learn from or train on)."""
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str; got {type(text).__name__}. Use load_text() to read a file.")
    if not text.strip():
        raise ValueError("`text` is empty; give the text to train on (see load_text).")
    return text
