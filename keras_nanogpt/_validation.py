"""Argument checks shared by the public functions: each names the argument, the value and what is allowed."""

import numbers


def check_int(name, value, minimum=1):
    """Return `value` as an int, or raise naming `name` when it is not an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer >= {minimum}; got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value}.")
    return int(value)


def check_float(name, value, low, high, low_inclusive=True, high_inclusive=False):
    """Return `value` as a float, or raise naming `name` when it lies outside the interval."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number; got {value!r} ({type(value).__name__}).")
    value = float(value)
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if not (above and below):
        interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        raise ValueError(f"`{name}` must be in {interval}; got {value}.")
    return value


def check_choice(name, value, choices):
    """Return `value`, or raise naming `name` when it is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}; got {value!r}.")
    return value
