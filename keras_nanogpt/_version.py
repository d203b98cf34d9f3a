"""The package's version, on the ground floor: it imports nothing, so every module may read it.

Example:
    >>> from keras_nanogpt._version import __version__
    >>> __version__.count(".")
    2
"""

__version__ = "0.1.0"
# Names that moved keep working, with a DeprecationWarning, until this version removes them
# (the list: docs/ARCHITECTURE.md, "Moved names").
REMOVED_IN = "0.3.0"
