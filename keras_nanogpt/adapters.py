"""LoRA fine-tuning and weight quantization of a `NanoGPT`, wired onto Keras's own support in
`Dense` and `Embedding` (`Dense.enable_lora`, `Model.quantize`).

LoRA. `enable_lora(model, rank, target)` calls Keras's `Dense.enable_lora` on the projections that
`target` names by role (the same names whatever the block's other options):

    "qkv"               the fused query/key/value projection of every block
    "attention_output"  the attention output projection of every block
    "mlp"               the MLP's input projection of every block
    "mlp_output"        the MLP's output projection of every block
    "head"              the output head, for models with `tie_embeddings=False`

and freezes every other weight (embeddings, norms, biases, the frozen kernels), except that a model with a
chat template (`kn.chat.add_chat_template`) keeps its token table and untied head trainable, so the rows of its
new turn tokens learn. Keras saves a LoRA
layer's kernel with its adapters merged in and zeroes the adapters when it loads; the model's
`_LoRAAdapters` (an untracked attribute, which Keras's saving visits after the layers) also saves
the adapters themselves and, when loading, puts them back and takes their product out of the merged
kernel again (under mixed precision, where Keras rounds that merged kernel to bfloat16, it saves the
float32 kernel too). A saved LoRA model thus loads as it was: the same logits, the same adapters (training,
and its optimizer state, go on where they stopped), and a model without LoRA that loads the same
weights gets the merged, fine-tuned kernels. `merge_lora(model)` folds the adapters into the kernels
for good and drops them.

Quantization. `NanoGPT.quantize(mode)` is `keras.Model.quantize` over the model's `Dense` and
`Embedding` layers. The token table is a `keras.layers.ReversibleEmbedding`, so the tied output
projection (`TokenAndPositionEmbedding.project_to_vocabulary`) runs on the int8/int4 table and its
per-token scales. `model_dtype_policy(model)` gives the `DTypePolicyMap` (layer path -> quantized
policy) that the model's config saves, as keras-hub's backbones do, so a quantized `.keras` file
loads as the quantized model.

Example:
    >>> model = kn.NanoGPT(65, 64, 2, 2, 32)  # doctest: +SKIP
    >>> model.enable_lora(4)                  # doctest: +SKIP
"""

import gc
import warnings
import weakref

import keras
from keras import ops

from keras_nanogpt import _keras_internals, _validation, backends

LORA_TARGETS = ("qkv", "attention_output", "mlp", "mlp_output", "head")
DEFAULT_LORA_TARGETS = ("qkv", "attention_output", "mlp", "mlp_output")
# Keras modes that need no calibration data and run on TensorFlow, JAX and PyTorch for Dense (all
# three) and Embedding (int8, int4; float8 leaves the embeddings in float). GPTQ and AWQ need a
# calibration set and are not wired here.
QUANTIZATION_MODES = ("int8", "int4", "float8")
_NOT_QUANTIZABLE = (r"Layer \w+ does not have a `quantize` method implemented"
                    r"|Invalid quantization mode\. Expected one of \('int8', 'int4'\)\. Received: "
                    r"quantization_mode=float8")


def role_layers(model):
    """`(role, Dense)` for every projection a LoRA `target` can name, in the model's layer order.

    Example:
        >>> [role for role, _ in role_layers(kn.NanoGPT(65, 64, 1, 2, 32))]  # doctest: +SKIP
        ['qkv', 'attention_output', 'mlp', 'mlp_output']
    """
    pairs = []
    for block in model.blocks:
        pairs += [("qkv", block.attention.qkv_dense), ("attention_output", block.attention.output_dense),
                  ("mlp", block.mlp_dense), ("mlp_output", block.mlp_output_dense)]
    if model.head is not None:
        pairs.append(("head", model.head))
    return pairs


def lora_layers(model):
    """The model's `Dense` layers with LoRA enabled, in layer order."""
    return [layer for _, layer in role_layers(model) if layer.lora_enabled]


def lora_config(model):
    """`{"rank", "alpha", "target"}` of the model's LoRA adapters, or None without LoRA."""
    roles = [(role, layer) for role, layer in role_layers(model) if layer.lora_enabled]
    if not roles:
        return None
    first = roles[0][1]
    return {"rank": int(first.lora_rank), "alpha": float(first.lora_alpha),
            "target": [role for role in LORA_TARGETS if role in {r for r, _ in roles}]}


def enable_lora(model, rank, target=DEFAULT_LORA_TARGETS, alpha=None):
    """Train low-rank adapters on the projections `target` names; freeze every other weight.

    Args:
        model: a `NanoGPT` without LoRA and not quantized.
        rank: rank of the adapters (>= 1).
        target: a role or a list of roles from `LORA_TARGETS`.
        alpha: the adapters' output is scaled by `alpha / rank` (None: `rank`, a scale of 1).

    Example:
        >>> enable_lora(model, 8, target=("qkv", "mlp"))  # doctest: +SKIP
    """
    rank = _validation.check_int("rank", rank)
    if alpha is not None:
        alpha = _validation.check_float("alpha", alpha, 0.0, float("inf"), low_inclusive=False)
    roles = _check_target(model, target)
    if lora_layers(model):
        raise ValueError(f"LoRA is already enabled on this model ({lora_config(model)}); call "
                         "merge_lora() first to fold those adapters in and start new ones.")
    quantized = _quantization_modes(model)
    if quantized:
        raise ValueError(f"LoRA trains float kernels; this model is quantized ({', '.join(quantized)}). "
                         "Enable LoRA on the float model, then merge_lora() and quantize.")
    _set_trainable(model, False)
    if getattr(model, "chat_template", None) is not None:  # its turn tokens' new rows must learn too
        model.embedding.token_embedding.trainable = True
        if model.head is not None and "head" not in roles:
            model.head.trainable = True
    for role, layer in role_layers(model):
        if role in roles:
            layer.trainable = True
            layer.enable_lora(rank, lora_alpha=alpha)  # Keras freezes the kernel itself
            if layer.bias is not None:
                layer.bias.trainable = False
    object.__setattr__(model, "_lora_adapters", _LoRAAdapters(model))  # untracked: see the module doc
    _rebuild_training(model)


def merge_lora(model):
    """Fold the adapters into their kernels (`kernel + alpha / rank * a @ b`) and drop them.

    The model is then a plain `NanoGPT` again with every weight trainable; it computes the same
    logits (to float32 rounding) and can be quantized.

    Example:
        >>> merge_lora(model)  # doctest: +SKIP
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("This model has no LoRA adapters to merge; enable_lora(rank) adds them.")
    for layer in layers:
        kernel = _keras_internals.dense_kernel(layer)
        merged = kernel + ops.cast(_delta(layer), kernel.dtype)
        for name in ("lora_kernel_a", "lora_kernel_b"):
            _keras_internals.delete_variable(layer, name)  # no gc.collect() per variable (0.4 s each)
        layer.lora_enabled = False
        layer.lora_rank = layer.lora_alpha = None
        kernel.assign(merged)
        for variable in (kernel, layer.bias):  # frozen by enable_lora (TensorFlow's setattr skips
            if variable is not None:          # `layer.trainable = True` on a layer already True)
                variable.trainable = True
    gc.collect()  # once: frees the adapters' buffers
    if hasattr(model, "_lora_adapters"):
        object.__delattr__(model, "_lora_adapters")
    _set_trainable(model, True)
    backends.retrack_variables(model)  # PyTorch's module parameters left after the deletion
    _rebuild_training(model)


def check_quantize(model, mode):
    """Refuse a quantization `keras.Model.quantize` would get wrong here, before any layer changes.

    Keras's own wrapper has already checked and resolved `mode` (and its config) by then.
    """
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"`mode` must be one of {QUANTIZATION_MODES} for a NanoGPT; got {mode!r} (GPTQ and "
                         "AWQ need a calibration set and are not supported).")
    if lora_layers(model):
        raise ValueError("This model has LoRA adapters; call merge_lora() first, then quantize.")
    quantized = _quantization_modes(model)
    if quantized:
        raise ValueError(f"This model is already quantized ({', '.join(quantized)}); quantize the float "
                         f"model instead.")


def quantize(model, quantize_layers, mode, config, filters, **kwargs):
    """Run `quantize_layers` (`keras.Model.quantize` bound to `model`) after `check_quantize`.

    Keras tries every leaf layer and warns for each that has no form in this mode (LayerNormalization
    and Dropout in every mode, Embedding in float8): those warnings are left out; others come through.
    """
    check_quantize(model, mode)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOT_QUANTIZABLE)
        quantize_layers(mode, config=config, filters=filters, **kwargs)
    _rebuild_training(model)  # the quantized kernels are not trainable


def config_state(model):
    """What `NanoGPT.get_config` saves of the adapters: the dtype policy (a `DTypePolicyMap` of the
    quantized layers' policies by layer path, once any layer is quantized) and the LoRA settings.

    Example:
        >>> sorted(config_state(model))  # doctest: +SKIP
        ['dtype']
    """
    policy = model.dtype_policy
    quantized = {layer.path: layer.dtype_policy for layer in _keras_internals.sublayers(model, include_self=False)
                 if layer.quantization_mode is not None}
    if quantized and not isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        policy = keras.dtype_policies.DTypePolicyMap(default_policy=policy, policy_map=quantized)
    state = {"dtype": keras.saving.serialize_keras_object(policy)}
    lora = lora_config(model)
    if lora is not None:  # state added after construction, as the quantized layers' policies are
        state["lora"] = lora
    return state


def from_config(make, config):
    """`make(**config)` for a config with `config_state`'s entries, the adapters then restored.

    Keras's default `Int4QuantizationConfig` is weight-only, but a `ReversibleEmbedding` built in int4
    without a config (as loading builds it) also quantizes the hidden states of its reverse projection
    (Keras 3.15): that is undone, so the loaded model computes what `quantize("int4")` gave.

    Example:
        >>> model = from_config(NanoGPT, config)  # doctest: +SKIP
    """
    config = dict(config)
    if isinstance(config.get("dtype"), dict):
        config["dtype"] = keras.saving.deserialize_keras_object(config["dtype"])
    lora = config.pop("lora", None)
    model = make(**config)
    for layer in _keras_internals.sublayers(model, include_self=False):
        if (isinstance(layer, keras.layers.ReversibleEmbedding) and layer.quantization_mode == "int4"
                and layer.quantization_config is None):
            layer.inputs_quantizer = None
    if lora is not None:
        model.enable_lora(**lora)
    return model


def _quantization_modes(model):
    return sorted({layer.quantization_mode for layer in _keras_internals.sublayers(model, include_self=False)
                   if layer.quantization_mode is not None})


def _check_target(model, target):
    roles = (target,) if isinstance(target, str) else target
    if not isinstance(roles, (list, tuple)) or not roles or not all(isinstance(r, str) for r in roles):
        raise TypeError(f"`target` must be a role or a non-empty list of roles from {LORA_TARGETS}; "
                        f"got {target!r}.")
    for role in roles:
        _validation.check_choice("target", role, LORA_TARGETS)
    if "head" in roles and model.head is None:
        raise ValueError("`target` 'head' needs an output head of its own; this model ties it to the token "
                         "embedding (tie_embeddings=True). Leave 'head' out.")
    return set(roles)


def _set_trainable(model, trainable):
    """Every sub-layer of the model (un)frozen; each one's setter recurses. (`model.trainable = True`
    would not: TensorFlow's `__setattr__` skips assigning the value an attribute already has.)"""
    for layer in model.layers:  # the direct children
        layer.trainable = trainable


def _delta(layer):
    """What a layer's adapters add to its kernel: `alpha / rank * a @ b`."""
    return (layer.lora_alpha / layer.lora_rank) * ops.matmul(layer.lora_kernel_a, layer.lora_kernel_b)


def _rebuild_training(model):
    """After the trainable weights changed: new step functions, and a fresh optimizer from the same
    compile arguments when the model was compiled (its old slots belong to other weights)."""
    model.train_function = model.test_function = model.predict_function = None
    compile_config = model.get_compile_config() if model.compiled else None
    if compile_config:
        model.compile_from_config(compile_config)


class _LoRAAdapters(keras.layers.Layer):
    """Saves a model's LoRA adapters with its weights and restores them after Keras loads the kernels.

    Keras visits the model's layers first (each LoRA `Dense` saves its kernel with the adapters merged
    in, and zeroes its adapters when it loads), then private attributes such as this one. Under mixed
    precision Keras saves that merged kernel in the compute dtype (bfloat16), which loses the frozen
    kernel's float32 digits; the exact kernel is then saved here too.
    """

    def __init__(self, model):
        super().__init__(name="lora_adapters")
        self._model_ref = weakref.ref(model)

    def save_own_variables(self, store):
        for i, layer in enumerate(lora_layers(self._model_ref())):
            store[f"a{i}"] = layer.lora_kernel_a
            store[f"b{i}"] = layer.lora_kernel_b
            kernel = _keras_internals.dense_kernel(layer)
            if layer.compute_dtype != kernel.dtype:
                store[f"kernel{i}"] = kernel

    def load_own_variables(self, store):
        layers = lora_layers(self._model_ref())
        keys = set(store.keys())
        if not keys:  # weights saved without adapters: start fresh ones (`b` = 0 adds nothing)
            for layer in layers:
                layer.lora_kernel_a.assign(keras.initializers.HeUniform()(layer.lora_kernel_a.shape))
            return
        saved = len([key for key in keys if key.startswith("a")])
        if saved != len(layers):
            raise ValueError(f"The file holds {saved} LoRA adapters; this model has {len(layers)}.")
        for i, layer in enumerate(layers):
            layer.lora_kernel_a.assign(store[f"a{i}"])
            layer.lora_kernel_b.assign(store[f"b{i}"])
            kernel = _keras_internals.dense_kernel(layer)
            if f"kernel{i}" in keys:
                kernel.assign(store[f"kernel{i}"])
            else:  # float32: the merged kernel less the adapters' product, exact to float32 rounding
                kernel.assign(kernel - ops.cast(_delta(layer), kernel.dtype))
