"""How the package's layers call their sublayers: `Layer.__call__`, except on eager PyTorch where
calling the layer's computation directly changes nothing but the time.

`keras.Layer.__call__` converts and checks inputs, resolves the `training` argument from the call
context, propagates masks, opens name scopes and autocast scopes, and (on PyTorch) goes through
`torch.nn.Module.__call__`. Under JAX and TensorFlow that runs once, while tracing; on PyTorch it runs
at every call, about 0.1 ms of Python each, 40 and more times in one forward pass of a 4-layer GPT
(benchmarks/RESULTS.md, issue 18). `call_sublayer(layer, ...)` skips it there when none of it
applies: the layer is built, its variables need no autocasting (its compute dtype is its variable
dtype and no autocast scope is open), it has no activity regularizer or rematerialization, the
first argument is a backend tensor (not a symbolic one, so no functional-model graph is being
built), and `training` is passed where the layer's `call` takes it. A quantized layer's
`quantized_call` runs, as `__call__` would run it.

Example:
    >>> dense = keras.layers.Dense(4)
    >>> call_sublayer(dense, ops.ones((2, 3))).shape  # doctest: +SKIP
    (2, 4)
"""

import keras
from keras.src.backend import get_autocast_scope

_TORCH = keras.backend.backend() == "torch"


def call_sublayer(layer, inputs, *args, **kwargs):
    """`layer(inputs, *args, **kwargs)`, computed the same way with less Python on eager PyTorch."""
    if _TORCH and _is_plain_call(layer, inputs, kwargs):
        if layer.quantization_mode is not None:
            return layer.quantized_call(inputs, *args, **kwargs)
        return layer.call(inputs, *args, **kwargs)
    return layer(inputs, *args, **kwargs)


def _is_plain_call(layer, inputs, kwargs):
    import torch

    return (isinstance(inputs, torch.Tensor)
            and layer.built
            and (not layer._call_has_training_arg or "training" in kwargs
                 or type(layer).call is keras.layers.Dense.call)  # Dense takes `training` and ignores it
            and layer.compute_dtype == layer.variable_dtype
            and get_autocast_scope() is None
            and layer.activity_regularizer is None
            and getattr(layer, "_remat_mode", None) is None)
