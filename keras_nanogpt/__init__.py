"""keras_nanogpt: nanoGPT as a Keras 3 package, on TensorFlow, JAX and PyTorch."""

from keras_nanogpt._version import __version__
from keras_nanogpt import (adapters, backends, backup, callbacks, chat, convert, data, distribute, export,
                           generation, saving, scoring, tokenizers, training)
from keras_nanogpt.layers import CausalSelfAttention, TokenAndPositionEmbedding, TransformerBlock
from keras_nanogpt.model import CONFIGS, NanoGPT, load_model
from keras_nanogpt.scoring import score

backends.keep_heap_padding()  # JAX: malloc keeps its heaps' tops, or XLA's steps page-fault (see there)

__all__ = [
    "__version__",
    "CONFIGS",
    "CausalSelfAttention",
    "NanoGPT",
    "TokenAndPositionEmbedding",
    "TransformerBlock",
    "adapters",
    "backends",
    "backup",
    "callbacks",
    "chat",
    "convert",
    "data",
    "distribute",
    "export",
    "generation",
    "saving",
    "scoring",
    "tokenizers",
    "training",
    "load_model",
    "score",
]
