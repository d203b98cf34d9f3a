"""NanoGPT: token ids in, next-token logits out; compile defaults, named configurations, save/load, generate."""

import io
import math
import os

import keras
import numpy as np
from keras import ops

from keras_nanogpt import _files, _validation
from keras_nanogpt.layers import (ACTIVATIONS, NORMS, POSITION_EMBEDDINGS, TokenAndPositionEmbedding,
                                  TransformerBlock, make_norm)

# The modern architecture (the nanoGPT speedrun's choices); see benchmarks/RESULTS.md for the ablation.
MODERN = dict(position_embedding="rotary", qk_norm=True, norm="rms", activation="relu_squared",
              zero_init_residual=True, tie_embeddings=False)

CONFIGS = {
    # nanoGPT's shakespeare_char recipe on CPU.
    "nano": dict(num_layers=4, num_heads=4, hidden_dim=128, sequence_length=64, dropout=0.0),
    # nanoGPT's shakespeare_char recipe on GPU ("baby GPT").
    "baby": dict(num_layers=6, num_heads=6, hidden_dim=384, sequence_length=256, dropout=0.2),
    # GPT-2 small (124M with GPT-2's 50257-token vocabulary).
    "gpt2": dict(num_layers=12, num_heads=12, hidden_dim=768, sequence_length=1024, dropout=0.0),
}
CONFIGS["nano-modern"] = dict(CONFIGS["nano"], **MODERN)
CONFIGS["baby-modern"] = dict(CONFIGS["baby"], **MODERN)


@keras.saving.register_keras_serializable(package="keras_nanogpt")
class NanoGPT(keras.Model):
    """A GPT language model: token + position embedding -> transformer blocks -> norm -> logits.

    The defaults are GPT-2's layout, as nanoGPT builds it; `from_config_name("nano-modern", ...)`
    picks the modern one (rotary positions, QK-norm, RMSNorm, ReLU², zero-initialised residual
    projections, an untied head). Initialised as nanoGPT does: normal(0.02) everywhere, residual
    output projections at 0.02 / sqrt(2 * num_layers) (or zero).

    Args:
        vocabulary_size: number of token ids.
        sequence_length: the context length (number of learned positions).
        num_layers: number of transformer blocks.
        num_heads: attention heads per block; must divide `hidden_dim`.
        hidden_dim: width of the model.
        dropout: dropout rate in [0, 1).
        use_bias: biases in projections and LayerNorms (GPT-2: True; nanoGPT's recipe: False).
        tie_embeddings: reuse the token embedding as the output head.
        activation: MLP activation: "gelu" (exact), "gelu_approximate" (GPT-2), "relu", "silu" or
            "relu_squared".
        layer_norm_epsilon: epsilon of every normalisation.
        position_embedding: "learned" (a position table, GPT-2) or "rotary" (rotary embeddings in
            attention, no table; generation past the context works alike).
        qk_norm: RMS-normalise queries and keys per head before attention.
        norm: "layer" (LayerNorm) or "rms" (RMSNorm), in every block and at the end.
        zero_init_residual: start the attention and MLP output projections at zero, so each block
            begins as the identity.
        vectorizer: optional adapted tokenizer from `kn.data.make_vectorizer`; it is saved in the
            `.keras` file and lets `generate` take and return text.

    Example:
        >>> model = NanoGPT(vocabulary_size=65, sequence_length=64, num_layers=2, num_heads=2,
        ...                 hidden_dim=32)
        >>> tuple(model(ops.zeros((1, 8), dtype="int32")).shape)
        (1, 8, 65)
    """

    def __init__(self, vocabulary_size, sequence_length, num_layers, num_heads, hidden_dim,
                 dropout=0.0, use_bias=False, tie_embeddings=True, activation="gelu",
                 layer_norm_epsilon=1e-5, vectorizer=None, position_embedding="learned", qk_norm=False,
                 norm="layer", zero_init_residual=False, **kwargs):
        vocabulary_size = _validation.check_int("vocabulary_size", vocabulary_size)
        sequence_length = _validation.check_int("sequence_length", sequence_length)
        num_layers = _validation.check_int("num_layers", num_layers)
        num_heads = _validation.check_int("num_heads", num_heads)
        hidden_dim = _validation.check_int("hidden_dim", hidden_dim)
        if hidden_dim % num_heads:
            raise ValueError(
                f"`hidden_dim` must be divisible by `num_heads`; got hidden_dim={hidden_dim}, "
                f"num_heads={num_heads}.")
        dropout = _validation.check_float("dropout", dropout, 0.0, 1.0)
        _validation.check_choice("activation", activation, ACTIVATIONS)
        _validation.check_choice("position_embedding", position_embedding, POSITION_EMBEDDINGS)
        _validation.check_choice("norm", norm, NORMS)
        for name, flag in (("qk_norm", qk_norm), ("zero_init_residual", zero_init_residual),
                           ("use_bias", use_bias), ("tie_embeddings", tie_embeddings)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"`{name}` must be True or False; got {flag!r}.")
        layer_norm_epsilon = _validation.check_float(
            "layer_norm_epsilon", layer_norm_epsilon, 0.0, math.inf, low_inclusive=False)
        vectorizer = _resolve_vectorizer(vectorizer, vocabulary_size)
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.sequence_length = sequence_length
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = dropout
        self.use_bias = bool(use_bias)
        self.tie_embeddings = bool(tie_embeddings)
        self.activation = activation
        self.layer_norm_epsilon = layer_norm_epsilon
        self.position_embedding = position_embedding
        self.qk_norm = bool(qk_norm)
        self.norm = norm
        self.zero_init_residual = bool(zero_init_residual)
        self._vectorizer_holder = _Untracked(vectorizer)

        initializer = keras.initializers.RandomNormal(stddev=0.02)
        residual_initializer = ("zeros" if self.zero_init_residual else
                                keras.initializers.RandomNormal(stddev=0.02 / math.sqrt(2 * num_layers)))
        policy = self.dtype_policy
        self.embedding = TokenAndPositionEmbedding(
            vocabulary_size, sequence_length, hidden_dim, embeddings_initializer=initializer,
            position_embedding=position_embedding, dtype=policy, name="embedding")
        self.embedding_dropout = keras.layers.Dropout(dropout, dtype=policy)
        self.blocks = [
            TransformerBlock(
                num_heads, hidden_dim, dropout=dropout, use_bias=self.use_bias, activation=activation,
                layer_norm_epsilon=layer_norm_epsilon, kernel_initializer=initializer,
                output_kernel_initializer=residual_initializer, norm=norm,
                position_embedding=position_embedding, qk_norm=self.qk_norm, dtype=policy,
                name=f"block_{i}")
            for i in range(num_layers)
        ]
        self.final_norm = make_norm(norm, layer_norm_epsilon, self.use_bias, policy, "final_norm")
        self.head = None if self.tie_embeddings else keras.layers.Dense(
            vocabulary_size, use_bias=False, kernel_initializer=initializer, dtype=policy, name="head")
        self.build((None, sequence_length))

    def build(self, input_shape):
        hidden_shape = (input_shape[0], input_shape[1], self.hidden_dim)
        self.embedding.build(input_shape)
        for block in self.blocks:
            block.build(hidden_shape)
        self.final_norm.build(hidden_shape)
        if self.head is not None:
            self.head.build(hidden_shape)
        self.built = True

    @classmethod
    def from_config_name(cls, name, vocabulary_size, **overrides):
        """A model of the named size: "nano" (nanoGPT CPU recipe), "baby" (6/6/384) or "gpt2" (12/12/768),
        in GPT-2's layout; "nano-modern" and "baby-modern" are those sizes in the modern one.

        Args:
            name: one of `kn.model.CONFIGS`.
            vocabulary_size: number of token ids.
            **overrides: any other `NanoGPT` argument, replacing the named value.

        Example:
            >>> model = NanoGPT.from_config_name("nano", vocabulary_size=65)
            >>> model.num_layers, model.sequence_length
            (4, 64)
        """
        _validation.check_choice("name", name, CONFIGS)
        return cls(vocabulary_size=vocabulary_size, **{**CONFIGS[name], **overrides})

    @property
    def vectorizer(self):
        """The tokenizer saved with the model (a `TextVectorization` or keras-hub tokenizer), or None."""
        return self._vectorizer_holder.value

    def call(self, token_ids, training=None):
        x = self.embedding_dropout(self.embedding(token_ids), training=training)  # (batch, time, hidden)
        for block in self.blocks:
            x = block(x, training=training)
        return self._logits(self.final_norm(x))

    def call_with_cache(self, token_ids, cache, cache_index):
        """Run `token_ids` at positions `cache_index...` against a KV cache (no dropout).

        Args:
            token_ids: `(batch, time)` ids (the whole prompt when prefilling, then one token).
            cache: one `(keys, values)` pair per block, from `empty_cache`.
            cache_index: position of `token_ids[:, 0]` (a scalar).

        Returns:
            `(logits, hidden_states, cache)`, as keras-hub's `CausalLM.call_with_cache`: logits
            `(batch, time, vocabulary_size)`, final hidden states `(batch, time, hidden_dim)` and
            the updated cache.
        """
        x = self.embedding(token_ids, start_index=cache_index)
        layer_caches = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block(x, cache=layer_cache, cache_index=cache_index, training=False)
            layer_caches.append(layer_cache)
        hidden_states = self.final_norm(x)
        return self._logits(hidden_states), hidden_states, tuple(layer_caches)

    def empty_cache(self, batch_size, max_length=None):
        """A zero KV cache: per block, keys `(batch * heads, head_dim, max_length)` and values
        `(batch * heads, max_length, head_dim)` (see `CausalSelfAttention.call`)."""
        max_length = max_length or self.sequence_length
        head_dim = self.hidden_dim // self.num_heads
        rows = batch_size * self.num_heads
        return tuple((ops.zeros((rows, head_dim, max_length), dtype=self.compute_dtype),
                      ops.zeros((rows, max_length, head_dim), dtype=self.compute_dtype))
                     for _ in self.blocks)

    def _logits(self, hidden):
        logits = (self.embedding.project_to_vocabulary(hidden) if self.head is None
                  else self.head(hidden))
        return ops.cast(logits, "float32")  # (batch, time, vocabulary_size), float32 under mixed precision

    def compile(self, optimizer=None, loss=None, metrics=None, jit_compile="auto", **kwargs):
        """Compile with nanoGPT-friendly defaults; every argument the caller passes wins.

        Defaults: `Adam(1e-3)`, `SparseCategoricalCrossentropy(from_logits=True)`, accuracy. With
        `jit_compile="auto"` on TensorFlow outside a distribution strategy, training is XLA-compiled
        on CPU too (Keras's own "auto" leaves XLA off on CPU-only machines; at nanoGPT's CPU
        recipe XLA trains 1.5x faster, see benchmarks/RESULTS.md).

        Example:
            >>> model = NanoGPT(65, 64, 2, 2, 32)
            >>> model.compile()
        """
        if (jit_compile == "auto" and keras.backend.backend() == "tensorflow"
                and not kwargs.get("run_eagerly") and self._distribute_strategy is None):
            jit_compile = True
        requested = jit_compile
        if keras.backend.backend() == "torch":
            from keras_nanogpt import _torch_training

            jit_compile = _torch_training.jit_compile_choice(jit_compile)
            _torch_training.warn_if_slow_bfloat16(self)
        super().compile(
            optimizer=keras.optimizers.Adam(1e-3) if optimizer is None else optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True) if loss is None else loss,
            metrics=["accuracy"] if metrics is None else metrics,
            jit_compile=jit_compile, **kwargs)
        # The optimizer's and the metrics' variables now, for token-id targets, rather than inside the
        # first training step: on TensorFlow a tf.function that creates variables is traced twice,
        # which doubled the first step's start-up (benchmarks/RESULTS.md). Targets of another shape (a
        # loss of the caller's) are built by Keras in the first step, as usual.
        ids = keras.KerasTensor((None, self.sequence_length), "int32")
        try:
            self._symbolic_build(data_batch=(ids, ids))
        except (ValueError, TypeError, RuntimeError):
            self.optimizer.build(self.trainable_variables)
        if keras.backend.backend() == "torch":
            _torch_training.install_traced_steps(self, requested)

    def fit(self, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`, plus a guard that stops with a clear error when the loss turns NaN/inf.

        Token-id arrays (numpy `x`, `y`) are checked against the vocabulary first.

        Example:
            >>> model.fit(train_ds, validation_data=val_ds, epochs=3)  # doctest: +SKIP
        """
        from keras_nanogpt.callbacks import StopOnNonFiniteLoss

        x = args[0] if args else kwargs.get("x")
        y = args[1] if len(args) > 1 else kwargs.get("y")
        for name, ids in (("x", x), ("y", y)):
            if isinstance(ids, np.ndarray) and np.issubdtype(ids.dtype, np.integer):
                _validation.check_ids(name, ids, self.vocabulary_size)
        if hasattr(x, "element_spec"):  # a tf.data.Dataset shuffles itself; Keras warns on shuffle=True
            kwargs.setdefault("shuffle", False)
        callbacks = list(callbacks or [])
        if not any(isinstance(c, StopOnNonFiniteLoss) for c in callbacks):
            # First, so that it stops before a checkpoint saving every few steps writes the step.
            callbacks.insert(0, StopOnNonFiniteLoss())
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def compile_from_config(self, config):
        """Recompile a loaded model from its saved compile config (optimizer state then loads too)."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    def generate(self, prompt, max_new_tokens=100, temperature=1.0, top_k=None, seed=None, **kwargs):
        """Continue `prompt`: text in, the prompt plus new text out; ids `(batch, time)` in, ids out.

        See `keras_nanogpt.generation.generate` for every option (top_p, stop, samplers, batches).

        Example:
            >>> model = NanoGPT(65, 64, 2, 2, 32)
            >>> model.generate([[1, 2, 3]], max_new_tokens=5, seed=0).shape
            (1, 8)
        """
        from keras_nanogpt import generation

        return generation.generate(self, prompt, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, seed=seed, **kwargs)

    def stream(self, prompt, max_new_tokens=100, temperature=1.0, top_k=None, seed=None, **kwargs):
        """Yield the new text (or ids) piece by piece; `prompt + "".join(pieces) == generate(...)`.

        Example:
            >>> model = NanoGPT(65, 64, 2, 2, 32)
            >>> len(list(model.stream([[1, 2, 3]], max_new_tokens=4, seed=0)))
            4
        """
        from keras_nanogpt import generation

        return generation.stream(self, prompt, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, seed=seed, **kwargs)

    def enable_lora(self, rank, target=("qkv", "attention_output", "mlp", "mlp_output"), alpha=None):
        """Fine-tune low-rank adapters (Keras's `Dense.enable_lora`) and freeze every other weight.

        See `keras_nanogpt.adapters`: `target` names projections by role ("qkv",
        "attention_output", "mlp", "mlp_output", "head"); `model.save` keeps the adapters.

        Example:
            >>> model = NanoGPT(65, 64, 2, 2, 32)
            >>> model.enable_lora(4)
            >>> sum(int(np.prod(v.shape)) for v in model.trainable_variables)
            4096
        """
        from keras_nanogpt import adapters

        adapters.enable_lora(self, rank, target=target, alpha=alpha)

    def merge_lora(self):
        """Fold the LoRA adapters into their kernels for serving; every weight is trainable again.

        Example:
            >>> model = NanoGPT(65, 64, 2, 2, 32)
            >>> model.enable_lora(4)
            >>> model.merge_lora()
        """
        from keras_nanogpt import adapters

        adapters.merge_lora(self)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """`keras.Model.quantize` of the Dense and Embedding layers: "int8", "int4" or "float8".

        The tied output head is quantized with the token table (see `keras_nanogpt.adapters`); the
        quantized model generates, saves and loads as it is.

        Example:
            >>> model = NanoGPT(65, 64, 2, 2, 32)
            >>> model.quantize("int8")
            >>> model.blocks[0].mlp_dense.dtype_policy.name
            'int8_from_float32'
        """
        from keras_nanogpt import adapters

        adapters.quantize(self, super().quantize, mode, config, filters, **kwargs)

    def score(self, inputs, stride=None, batch_size=8):
        """Per-token log-probabilities, total NLL, perplexity and bits per character of a text.

        See `keras_nanogpt.scoring.score`.

        Example:
            >>> NanoGPT(65, 64, 2, 2, 32).score([1, 2, 3, 4]).num_tokens
            3
        """
        from keras_nanogpt import scoring

        return scoring.score(self, inputs, stride=stride, batch_size=batch_size)

    def save(self, filepath, overwrite=True, **kwargs):
        """Save to a `.keras` file atomically: a crash leaves the old file or the new one, never half.

        A write that fails (disk full, permission denied, read-only folder) raises an `OSError` naming
        `filepath` and the cause, and leaves the old file as it was.

        Example:
            >>> NanoGPT(65, 64, 2, 2, 32).save("model.keras")  # doctest: +SKIP
        """
        _check_target(filepath, ".keras", overwrite)
        with _files.atomic_path(filepath) as tmp:
            super().save(tmp, **kwargs)

    def save_weights(self, filepath, overwrite=True, **kwargs):
        """Save weights to a `.weights.h5` file atomically (used by checkpoint callbacks too).

        The HDF5 file is made in memory, then written: HDF5 writing straight to a full disk can crash the
        process (measured: a segmentation fault), while this raises an `OSError` naming `filepath` and the
        cause and leaves the old file as it was.

        Example:
            >>> NanoGPT(65, 64, 2, 2, 32).save_weights("model.weights.h5")  # doctest: +SKIP
        """
        _check_target(filepath, ".weights.h5", overwrite)
        data = None if kwargs.get("max_shard_size") else _weights_h5_bytes(self)
        if data is not None:
            _files.write_bytes(filepath, data)
            return
        with _files.atomic_path(filepath) as tmp:
            super().save_weights(tmp, **kwargs)

    def save_to_preset(self, preset_dir):
        """Write a keras-hub preset folder: config.json, model.weights.h5, the tokenizer, metadata.json.

        See `keras_nanogpt.saving.save_to_preset`; `keras_hub.upload_preset(uri, preset_dir)` uploads it.

        Example:
            >>> NanoGPT(65, 64, 2, 2, 32).save_to_preset("my_preset")  # doctest: +SKIP
        """
        from keras_nanogpt import saving

        saving.save_to_preset(self, preset_dir)

    @classmethod
    def from_preset(cls, preset):
        """Load a preset folder, or a remote one keras-hub resolves ("hf://user/name", "kaggle://...").

        See `keras_nanogpt.saving.from_preset`.

        Example:
            >>> model = NanoGPT.from_preset("my_preset")  # doctest: +SKIP
        """
        from keras_nanogpt import saving

        return saving.from_preset(preset)

    def get_config(self):
        from keras_nanogpt import adapters, data

        config = {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.saving.serialize_keras_object(adapters.model_dtype_policy(self)),
            "vocabulary_size": self.vocabulary_size,
            "sequence_length": self.sequence_length,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "hidden_dim": self.hidden_dim,
            "dropout": self.dropout,
            "use_bias": self.use_bias,
            "tie_embeddings": self.tie_embeddings,
            "activation": self.activation,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "position_embedding": self.position_embedding,
            "qk_norm": self.qk_norm,
            "norm": self.norm,
            "zero_init_residual": self.zero_init_residual,
            "vectorizer": None,
        }
        if self.vectorizer is not None:
            config["vectorizer"] = data.vectorizer_to_config(self.vectorizer)
        lora = adapters.lora_config(self)
        if lora is not None:  # state added after construction, as the quantized layers' dtype policies are
            config["lora"] = lora
        return config

    @classmethod
    def from_config(cls, config):
        from keras_nanogpt import adapters

        config = dict(config)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.saving.deserialize_keras_object(config["dtype"])
        lora = config.pop("lora", None)
        model = cls(**config)
        adapters.match_int4_defaults(model)
        if lora is not None:
            model.enable_lora(**lora)
        return model


def load_model(filepath, **kwargs):
    """`keras.models.load_model` with errors that name the file when it is missing, truncated, corrupt
    or refused by `safe_mode` (a lambda, or a class that is not registered).

    Args:
        filepath: a `.keras` file saved by `NanoGPT.save`.
        **kwargs: passed to `keras.models.load_model` (`safe_mode` stays on unless you turn it off).

    Example:
        >>> model = load_model("pride.keras")  # doctest: +SKIP
    """
    import zipfile
    import zlib

    if not isinstance(filepath, (str, os.PathLike)):
        raise TypeError(f"`filepath` must be the path of a .keras file; got {filepath!r}.")
    path = os.fspath(filepath)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such model file: {path!r}.")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path!r} is not a readable .keras file (truncated or not a zip archive).")
    try:
        return keras.models.load_model(path, **kwargs)
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{path!r} is corrupted: its zip archive cannot be read ({error}).") from error
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{path!r} could not be loaded as a .keras model: {error}") from error


def _weights_h5_bytes(model):
    """The `.weights.h5` file Keras's `save_weights` writes, made in memory (None where Keras lacks the parts)."""
    try:
        from keras.src.saving import saving_lib

        store = saving_lib.H5IOStore(io.BytesIO(), mode="w")
        save_state = saving_lib._save_state
    except (ImportError, AttributeError, TypeError):
        return None
    save_state(model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set())
    buffer = store.path_or_io
    store.close()
    return buffer.getvalue()


def _check_target(filepath, suffix, overwrite):
    """Refuse a file name Keras would refuse (before the temporary name hides it) or may not replace."""
    if not isinstance(filepath, (str, os.PathLike)):
        raise TypeError(f"`filepath` must be a path ending in {suffix!r}; got {filepath!r}.")
    path = os.fspath(filepath)
    if not path.endswith(suffix):
        raise ValueError(f"`filepath` must end in {suffix!r}; got {path!r}.")
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it.")


class _Untracked:
    """Holds the vectorizer out of sight of Keras's layer tracking and `.keras` state walking.

    The vocabulary travels in the model's config instead: a tracked `TextVectorization` sub-layer
    saves but does not load (its lookup-table asset is not restored).
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _resolve_vectorizer(vectorizer, vocabulary_size):
    """Accept a tokenizer layer, or the dict a saved config holds, and check its size."""
    if vectorizer is None:
        return None
    from keras_nanogpt import data

    if isinstance(vectorizer, dict):
        vectorizer = data.vectorizer_from_config(vectorizer)
    size = data.vocabulary_size(vectorizer)
    if size > vocabulary_size:
        raise ValueError(
            f"`vectorizer` has {size} tokens but `vocabulary_size` is {vocabulary_size}; "
            f"pass vocabulary_size >= {size}.")
    return vectorizer
