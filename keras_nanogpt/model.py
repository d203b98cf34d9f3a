"""NanoGPT: token ids in, next-token logits out; its named configurations, compile defaults and the thin
methods that hand generation, scoring, saving and adapters to their modules."""

import math

import keras
import numpy as np
from keras import ops

from keras_nanogpt import _validation, adapters, backends, chat, generation, saving, scoring, tokenizers
from keras_nanogpt.callbacks import with_loss_guard
from keras_nanogpt.configs import ARGUMENTS, CONFIGS, MODERN, check_arguments  # noqa: F401 (kn.model's names)
from keras_nanogpt.layers import TokenAndPositionEmbedding, TransformerBlock, as_rows, make_norm

load_model = saving.load_model  # kn.model.load_model, as before


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
        zero_init_residual: start the residual output projections at zero (each block the identity).
        logit_softcap: squash the logits into (-cap, cap) as `cap * tanh(logits / cap)`, or None.
        vectorizer: optional tokenizer (`kn.data.make_vectorizer`'s layer or a `Tokenizer`); saved in the
            `.keras` file and lets `generate` take and return text.
        chat_template: the model's `kn.chat.ChatTemplate` (or its name or config), or None (chat uses the
            plain default); its special tokens must be in the tokenizer. `kn.chat.add_chat_template` sets it.

    Example:
        >>> model = NanoGPT(vocabulary_size=65, sequence_length=64, num_layers=2, num_heads=2,
        ...                 hidden_dim=32)
        >>> tuple(model(ops.zeros((1, 8), dtype="int32")).shape)
        (1, 8, 65)
    """

    def __init__(self, vocabulary_size, sequence_length, num_layers, num_heads, hidden_dim,
                 dropout=0.0, use_bias=False, tie_embeddings=True, activation="gelu",
                 layer_norm_epsilon=1e-5, vectorizer=None, position_embedding="learned", qk_norm=False,
                 norm="layer", zero_init_residual=False, logit_softcap=None, chat_template=None, **kwargs):
        arguments = check_arguments(locals())  # the ARGUMENTS, each checked, before any work
        size = arguments["vocabulary_size"]
        tokenizer = None if vectorizer is None else tokenizers.Tokenizer(vectorizer).check_size(size)
        template = chat.as_template(chat_template, tokenizer)
        super().__init__(**kwargs)
        for name, value in arguments.items():
            setattr(self, name, value)
        self._tokenizer_holder = tokenizers.Untracked(tokenizer)
        self._chat_template_holder = tokenizers.Untracked(template)

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

    tokenizer = property(lambda self: self._tokenizer_holder.value,
                         doc="The model's `kn.tokenizers.Tokenizer` (special tokens included), or None.")
    vectorizer = property(lambda self: None if self.tokenizer is None else self.tokenizer.layer,
                          doc="The tokenizer's Keras layer (`TextVectorization` or keras-hub), or None.")
    chat_template = property(lambda self: self._chat_template_holder.value,
                             doc="The model's own `kn.chat.ChatTemplate`, or None (chat uses the plain default).")

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
        rows, as_tokens = as_rows(hidden)  # (batch * time, hidden_dim)
        logits = self.embedding.project_to_vocabulary(rows) if self.head is None else self.head(rows)
        logits, cap = ops.cast(as_tokens(logits), "float32"), self.logit_softcap  # float32 in mixed precision
        return logits if cap is None else cap * ops.tanh(logits / cap)  # (batch, time, vocabulary)

    def compile(self, optimizer=None, loss=None, metrics=None, jit_compile="auto", **kwargs):
        """Compile with nanoGPT-friendly defaults; every argument the caller passes wins.

        Defaults: `Adam(1e-3)`, `SparseCategoricalCrossentropy(from_logits=True)`, accuracy. With
        `jit_compile="auto"`, each backend's fastest step (`backends.training_jit_compile`): XLA on
        TensorFlow's CPU too, a traced ATen graph on PyTorch.

        Example:
            >>> model = NanoGPT(65, 64, 2, 2, 32)
            >>> model.compile()
        """
        super().compile(
            optimizer=keras.optimizers.Adam(1e-3) if optimizer is None else optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True) if loss is None else loss,
            metrics=["accuracy"] if metrics is None else metrics,
            jit_compile=backends.training_jit_compile(self, jit_compile, kwargs.get("run_eagerly")),
            **kwargs)
        backends.after_compile(self, jit_compile)  # optimizer variables now; PyTorch's traced steps

    def fit(self, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`, plus a guard that stops with a clear error when the loss turns NaN/inf.

        Token-id arrays (numpy `x`, `y`) are checked against the vocabulary first.

        Example:
            >>> model.fit(train_ds, validation_data=val_ds, epochs=3)  # doctest: +SKIP
        """
        x = args[0] if args else kwargs.get("x")
        y = args[1] if len(args) > 1 else kwargs.get("y")
        for name, ids in (("x", x), ("y", y)):
            if isinstance(ids, np.ndarray) and np.issubdtype(ids.dtype, np.integer):
                _validation.check_ids(name, ids, self.vocabulary_size)
        if hasattr(x, "element_spec"):  # a tf.data.Dataset shuffles itself; Keras warns on shuffle=True
            kwargs.setdefault("shuffle", False)
        return super().fit(*args, callbacks=backends.fit_callbacks(self, with_loss_guard(callbacks)), **kwargs)

    def compile_from_config(self, config):
        """Recompile a loaded model from its saved compile config (optimizer state then loads too)."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    def generate(self, prompt, max_new_tokens=100, temperature=1.0, top_k=None, seed=None, **kwargs):
        """Continue `prompt`: text in, text out; ids in, ids out (`generation.generate`: every option).

        Example:
            >>> NanoGPT(65, 64, 2, 2, 32).generate([[1, 2, 3]], max_new_tokens=5, seed=0).shape
            (1, 8)
        """
        return generation.generate(self, prompt, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, seed=seed, **kwargs)

    def stream(self, prompt, max_new_tokens=100, temperature=1.0, top_k=None, seed=None, **kwargs):
        """Yield the new text (or ids) piece by piece; `prompt + "".join(pieces) == generate(...)`.

        Example:
            >>> len(list(NanoGPT(65, 64, 2, 2, 32).stream([[1, 2, 3]], max_new_tokens=4, seed=0)))
            4
        """
        return generation.stream(self, prompt, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, seed=seed, **kwargs)

    def chat(self, messages, max_new_tokens=200, temperature=1.0, top_k=None, top_p=None, seed=None, stop=None,
             stream=False):
        """The assistant's reply to OpenAI-style `messages` (`kn.chat.chat`): the text up to the turn's end
        token or a stop string, the same tokens `generate` makes from `kn.chat.render(model, messages)`
        with `stop=kn.chat.stop_sequences(model) + stop`; `stream=True` yields its pieces.

        Example:
            >>> model.chat([{"role": "user", "content": "Who is Mr. Darcy?"}], seed=0)  # doctest: +SKIP
        """
        return chat.chat(self, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=seed, stop=stop, stream=stream)

    def enable_lora(self, rank, target=adapters.DEFAULT_LORA_TARGETS, alpha=None):
        """Fine-tune low-rank adapters (Keras's `Dense.enable_lora`) on the projections `target` names
        by role, every other weight frozen (`keras_nanogpt.adapters.enable_lora`); `save` keeps them.

        Example:
            >>> NanoGPT(65, 64, 2, 2, 32).enable_lora(4)
        """
        adapters.enable_lora(self, rank, target=target, alpha=alpha)

    def merge_lora(self):
        """Fold the LoRA adapters into their kernels for serving; every weight is trainable again.

        Example:
            >>> model.merge_lora()  # doctest: +SKIP
        """
        adapters.merge_lora(self)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """`keras.Model.quantize` of the Dense and Embedding layers: "int8", "int4" or "float8"; the
        tied head is quantized with the token table (see `keras_nanogpt.adapters`).

        Example:
            >>> NanoGPT(65, 64, 2, 2, 32).quantize("int8")
        """
        adapters.quantize(self, super().quantize, mode, config, filters, **kwargs)

    def score(self, inputs, stride=None, batch_size=8):
        """Per-token log-probabilities, perplexity and bits per character of a text (`scoring.score`).

        Example:
            >>> NanoGPT(65, 64, 2, 2, 32).score([1, 2, 3, 4]).num_tokens
            3
        """
        return scoring.score(self, inputs, stride=stride, batch_size=batch_size)

    def save(self, filepath, overwrite=True, **kwargs):
        """Save to a `.keras` file atomically (`saving.save_model`): a crash leaves the old file as it was.

        Example:
            >>> NanoGPT(65, 64, 2, 2, 32).save("model.keras")  # doctest: +SKIP
        """
        saving.save_model(self, filepath, overwrite, **kwargs)

    def save_weights(self, filepath, overwrite=True, **kwargs):
        """Save weights to a `.weights.h5` file atomically (`saving.save_weights`).

        Example:
            >>> NanoGPT(65, 64, 2, 2, 32).save_weights("model.weights.h5")  # doctest: +SKIP
        """
        saving.save_weights(self, filepath, overwrite, **kwargs)

    def save_to_preset(self, preset_dir):
        """Write a keras-hub preset folder (`saving.save_to_preset`), for `keras_hub.upload_preset`.

        Example:
            >>> NanoGPT(65, 64, 2, 2, 32).save_to_preset("my_preset")  # doctest: +SKIP
        """
        saving.save_to_preset(self, preset_dir)

    @classmethod
    def from_preset(cls, preset):
        """Load a preset folder, or a remote one keras-hub resolves ("hf://user/name", "kaggle://...").

        Example:
            >>> model = NanoGPT.from_preset("my_preset")  # doctest: +SKIP
        """
        return saving.from_preset(preset)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, **{name: getattr(self, name) for name in ARGUMENTS},
                "vectorizer": None if self.tokenizer is None else self.tokenizer.get_config(),
                **adapters.config_state(self),  # the dtype policies of quantized layers, LoRA
                # only when there is one: the configs (and backups) of models without one stay as they were
                **({} if self.chat_template is None else {"chat_template": self.chat_template.get_config()})}

    @classmethod
    def from_config(cls, config):
        return adapters.from_config(cls, config)
