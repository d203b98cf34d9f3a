"""Serving artefacts: a TensorFlow SavedModel, and ONNX / LiteRT decoders that run without Keras.

An ONNX or LiteRT export is a folder of two graphs and a vocabulary:

- `prefill.*`: token ids `(1, context)` (the prompt, right-padded) -> logits `(1, context, vocabulary)`
  and the KV cache; the logits at the prompt's last position give the first new token.
- `decode.*`: one token `(1, 1)`, its position `cache_index` (an int32 scalar) and the cache -> logits
  `(1, 1, vocabulary)` and the updated cache. The cache is explicit: per block, keys
  `(heads, head_dim, context)` then values `(heads, context, head_dim)` (`NanoGPT.empty_cache`), inputs
  `key_0, value_0, key_1, ...` after `token_ids, cache_index`, outputs in the same order after `logits`.
- `vocabulary.json`: the tokens in id order and how text splits into them, the special tokens (name -> id,
  ids after the tokens) and the chat template (`ChatTemplate.get_config()`, or null), for
  `examples/onnx_generate.py` and `examples/litert_generate.py` (numpy and the runtime only).

Both graphs are `NanoGPT.call_with_cache`, exported by Keras's `model.export` on the TensorFlow backend
(ONNX through tf2onnx, LiteRT through TensorFlow's converter).
"""

import json
import os

import keras

from keras_nanogpt import _files, backends

FORMATS = ("tf_saved_model", "preset", "onnx", "litert")
BACKENDS = {"tf_saved_model": ("tensorflow", "jax"), "preset": ("tensorflow", "jax", "torch"),
            "onnx": ("tensorflow",), "litert": ("tensorflow",)}
# PyTorch: torch.onnx's graph of the cache write mixes int32 and int64 indices (Concat, ScatterND), which
# onnxruntime refuses to load (torch 2.13, onnxscript 0.7); JAX: Keras's route needs jax2onnx. Both are
# refused by `check_backend`, which names TensorFlow; the .keras file loads there.
QUANTIZATIONS = (None, "int8")
_SUFFIX = {"onnx": ".onnx", "litert": ".tflite"}


def export(model, directory, format="tf_saved_model", quantize=None):
    """Write `model` to the folder `directory` in `format` (replacing a folder that is there).

    Args:
        model: a `NanoGPT` (float32).
        directory: the folder to write.
        format: "tf_saved_model" (`serve`: int32 ids `(batch, time)` -> logits), "preset"
            (keras-hub's layout, `NanoGPT.from_preset`), "onnx" or "litert" (prefill and decode
            graphs and `vocabulary.json`).
        quantize: "litert" only: "int8" stores the weights as int8 (the converter's dynamic-range
            quantization); None keeps float32.

    Example:
        >>> export(model, "pride_onnx", format="onnx")  # doctest: +SKIP
    """
    from keras_nanogpt import _validation

    _validation.check_choice("format", format, FORMATS)
    _validation.check_choice("quantize", quantize, QUANTIZATIONS)
    if quantize is not None and format != "litert":
        raise ValueError(f"`quantize` applies to format='litert' only; got format={format!r}.")
    backend = check_backend(format)
    if format == "preset":
        return model.save_to_preset(directory)
    if format in _SUFFIX:
        vocabulary = vocabulary_json(model)  # refuses a tokenizer the reference loops cannot run
        from keras_nanogpt import adapters

        quantized = adapters._quantization_modes(model)
        if model.compute_dtype != "float32" or quantized:
            raise ValueError(f"format={format!r} exports a float32 model; this one computes in "
                             f"{model.compute_dtype}{f' and is quantized ({quantized})' if quantized else ''}.")
    with _files.atomic_directory(directory) as tmp:
        if format == "tf_saved_model":
            model.export(tmp, format=format, verbose=False,
                         input_signature=[keras.InputSpec(shape=(None, None), dtype="int32")])
            return
        for step in ("prefill", "decode"):
            graph = _CacheStep(model, decode=step == "decode")
            options = {}
            if quantize == "int8":
                import tensorflow as tf

                options["optimizations"] = [tf.lite.Optimize.DEFAULT]
            if format == "onnx" and backend == "tensorflow":
                _register_tf2onnx_ops()
            graph.export(os.path.join(tmp, step + _SUFFIX[format]), format=format, verbose=False,
                         input_signature=[graph.input_specs()], **options)
        _files.write_bytes(os.path.join(tmp, "vocabulary.json"),
                           json.dumps(vocabulary, ensure_ascii=False, indent=1).encode("utf-8"))


def check_backend(format):
    """The running backend, when it can write `format`; otherwise a `ValueError` naming the one to use.

    Example:
        >>> check_backend("litert")  # doctest: +SKIP
        'tensorflow'
    """
    backend = backends.name()
    if backend not in BACKENDS.get(format, (backend,)):
        raise ValueError(f"format={format!r} cannot be written on the {backend} backend; run with "
                         f"KERAS_BACKEND={BACKENDS[format][0]} (a .keras file loads under any backend).")
    return backend


def vocabulary_json(model):
    """What `vocabulary.json` holds: the tokens in id order, the padding and unknown ids, the context, the
    special tokens and the chat template.

    Only character vocabularies are written (every character is one token, so a plain loop can
    encode and decode); other tokenizers are refused with a `ValueError`.

    Example:
        >>> vocabulary_json(model)["level"]  # doctest: +SKIP
        'char'
    """
    if model.tokenizer is None:
        raise ValueError("This model has no vectorizer, so the exported reference loops could not read or "
                         "write text; build it with `vectorizer=kn.data.make_vectorizer(text)`.")
    config = model.tokenizer.get_config()
    if config["level"] != "char":
        raise ValueError(f"ONNX and LiteRT exports support character vocabularies only; this model's "
                         f"tokenizer is level={config['level']!r}. Use format='tf_saved_model' or 'preset'.")
    tokens = config["vocabulary"]
    reserved = tokens[:2] == ["", "[UNK]"]
    template = getattr(model, "chat_template", None)
    return {"level": "char", "tokens": tokens, "padding_id": 0 if reserved else None,
            "unknown_id": 1 if reserved else None, "context": model.sequence_length,
            "num_layers": model.num_layers, "special_tokens": model.tokenizer.special_tokens,
            "chat_template": None if template is None else template.get_config()}


class _CacheStep(keras.Model):
    """`model.call_with_cache` with the cache as flat inputs and outputs: the graph that is exported.

    Prefill takes `[token_ids (1, context)]` and starts from an empty cache; decode takes
    `[token_ids (1, 1), cache_index, key_0, value_0, ...]`. Both return `[logits, key_0, value_0, ...]`.
    """

    def __init__(self, model, decode):
        super().__init__(name="decode" if decode else "prefill")
        self.model = model
        self.decode = decode
        self.built = True

    def input_specs(self):
        if not self.decode:
            return [keras.InputSpec(shape=(1, self.model.sequence_length), dtype="int32", name="token_ids")]
        specs = [keras.InputSpec(shape=(1, 1), dtype="int32", name="token_ids"),
                 keras.InputSpec(shape=(), dtype="int32", name="cache_index")]
        for i, (keys, values) in enumerate(self.model.empty_cache(1)):
            specs += [keras.InputSpec(shape=tuple(keys.shape), dtype="float32", name=f"key_{i}"),
                      keras.InputSpec(shape=tuple(values.shape), dtype="float32", name=f"value_{i}")]
        return specs

    def call(self, inputs):
        if self.decode:
            token_ids, cache_index, *flat = inputs
            cache = tuple(zip(flat[0::2], flat[1::2]))
        else:
            token_ids, cache_index, cache = inputs[0], 0, self.model.empty_cache(1)
        logits, _, cache = self.model.call_with_cache(token_ids, cache, cache_index)
        return [logits, *(tensor for pair in cache for tensor in pair)]


def _register_tf2onnx_ops():
    """Teach tf2onnx the two TensorFlow ops our graphs hold that it lacks: `XlaDynamicUpdateSlice`
    (`keras.ops.slice_update`, the cache write) and `Erfc` (exact GELU)."""
    from onnx import TensorProto
    from tf2onnx.handler import tf_op

    @tf_op("XlaDynamicUpdateSlice")
    class _DynamicUpdateSlice:  # noqa: F841 (registered by the decorator)
        @classmethod
        def version_11(cls, ctx, node, **kwargs):
            operand, update, indices = node.input
            shape = ctx.get_shape(update)
            if shape and all(d is not None and d > 0 for d in shape):
                return _scatter_update(ctx, node, shape)
            # out = where(mask, pad(update), input): pad the update to the input's shape at the indices.
            start = ctx.make_node("Cast", [indices], attr={"to": TensorProto.INT64}).output[0]
            operand_shape = ctx.make_node("Shape", [operand]).output[0]
            update_shape = ctx.make_node("Shape", [update]).output[0]
            rest = ctx.make_node("Sub", [operand_shape, update_shape]).output[0]
            end = ctx.make_node("Sub", [rest, start]).output[0]
            pads = ctx.make_node("Concat", [start, end], attr={"axis": 0}).output[0]
            padded = ctx.make_node("Pad", [update, pads]).output[0]
            ones = ctx.make_node("ConstantOfShape", [update_shape], attr={"value": _one_tensor()}).output[0]
            mask = ctx.make_node("Cast", [ctx.make_node("Pad", [ones, pads]).output[0]],
                                 attr={"to": TensorProto.BOOL}).output[0]
            shapes, dtypes = node.output_shapes, node.output_dtypes
            ctx.remove_node(node.name)
            ctx.make_node("Where", [mask, padded, operand], outputs=node.output, name=node.name,
                          shapes=shapes, dtypes=dtypes)

    @tf_op("Erfc")
    class _Erfc:  # noqa: F841 (registered by the decorator)
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            import numpy as np

            erf = ctx.make_node("Erf", [node.input[0]]).output[0]
            one = ctx.make_const(f"{node.name}_one", np.array(1.0, np.float32)).output[0]
            shapes, dtypes = node.output_shapes, node.output_dtypes
            ctx.remove_node(node.name)
            ctx.make_node("Sub", [one, erf], outputs=node.output, name=node.name, shapes=shapes, dtypes=dtypes)


def _scatter_update(ctx, node, shape):
    """`XlaDynamicUpdateSlice` of a static update shape in two operations (the decode graph's cache write: 8
    of them per token at nano, each 11 operations the other way): `ScatterND(operand, grid + start, update)`,
    the grid a constant of the update's element positions. An update as large as the operand is the result
    itself (XLA clamps the start so that the update fits: it starts at 0)."""
    import numpy as np
    from onnx import TensorProto

    operand, update, indices = node.input
    shapes, dtypes = node.output_shapes, node.output_dtypes
    ctx.remove_node(node.name)
    if list(shape) == list(ctx.get_shape(operand) or []):
        ctx.make_node("Identity", [update], outputs=node.output, name=node.name, shapes=shapes, dtypes=dtypes)
        return
    grid = np.stack(np.meshgrid(*[np.arange(d) for d in shape], indexing="ij"), axis=-1).astype(np.int64)
    grid = ctx.make_const(f"{node.name}_grid", grid).output[0]
    start = ctx.make_node("Cast", [indices], attr={"to": TensorProto.INT64}).output[0]
    positions = ctx.make_node("Add", [grid, start]).output[0]
    ctx.make_node("ScatterND", [operand, positions, update], outputs=node.output, name=node.name,
                  shapes=shapes, dtypes=dtypes)


def _one_tensor():
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ones((1,), np.float32))
