"""Moved: `keras_nanogpt.batching` is now `keras_nanogpt.serve.batching`; this name warns and still works."""

import warnings

from keras_nanogpt.serve.batching import *  # noqa: F401,F403

warnings.warn("keras_nanogpt.batching moved to keras_nanogpt.serve.batching; import it from there.",
              DeprecationWarning, stacklevel=2)
