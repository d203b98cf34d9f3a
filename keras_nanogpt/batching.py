"""Moved: `keras_nanogpt.batching` is now `keras_nanogpt.serve.batching`; this name warns, and works until 0.3.0."""

import warnings

from keras_nanogpt._version import REMOVED_IN
from keras_nanogpt.serve.batching import *  # noqa: F401,F403

warnings.warn(f"keras_nanogpt.batching moved to keras_nanogpt.serve.batching; import it from there "
              f"(the old name goes in keras_nanogpt {REMOVED_IN}).", DeprecationWarning, stacklevel=2)
