"""Moved: `keras_nanogpt.playground` is now `keras_nanogpt.serve.page`; this name warns and still works."""

import warnings

from keras_nanogpt.serve.page import *  # noqa: F401,F403

warnings.warn("keras_nanogpt.playground moved to keras_nanogpt.serve.page; import it from there.",
              DeprecationWarning, stacklevel=2)
