"""The GPT building blocks: embeddings, causal self-attention with a KV cache, and the transformer block.

Every layer uses `keras.ops` only, so the same code runs on the TensorFlow, JAX and PyTorch backends.
"""

import keras
from keras import ops

from keras_nanogpt import _validation


def _config(layer, *names):
    """`layer`'s base config plus its attributes `names` (initializers serialized), for `get_config`."""
    config = keras.layers.Layer.get_config(layer)
    for name in names:
        value = getattr(layer, name)
        config[name] = (keras.initializers.serialize(value)
                        if isinstance(value, keras.initializers.Initializer) else value)
    return config


def as_rows(x):
    """`x` `(batch, time, width)` as rows `(batch * time, width)`, and a function that gives a result its
    `(batch, time)` back. The projections multiply rows: XLA's CPU backward pass then multiplies the
    gradients as they lie, where 3-D activations are transposed first (benchmarks/RESULTS.md, issue 26).
    """
    batch, time = ops.shape(x)[0], ops.shape(x)[1]
    return (ops.reshape(x, (-1, ops.shape(x)[-1])),
            lambda rows: ops.reshape(rows, (batch, time, ops.shape(rows)[-1])))


POSITION_EMBEDDINGS = ("learned", "rotary")
NORMS = ("layer", "rms")


@keras.saving.register_keras_serializable(package="keras_nanogpt")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token embedding plus a learned position embedding; also projects back onto the vocabulary.

    Args:
        vocabulary_size: number of token ids.
        sequence_length: the longest sequence (the number of learned positions).
        hidden_dim: width of the embedding vectors.
        embeddings_initializer: initializer of both tables (nanoGPT: normal, stddev 0.02).
        position_embedding: "learned" (a table of `sequence_length` positions, GPT-2) or "rotary"
            (no table here: `CausalSelfAttention` rotates queries and keys instead).

    Example:
        >>> layer = TokenAndPositionEmbedding(vocabulary_size=65, sequence_length=64, hidden_dim=32)
        >>> tuple(layer(ops.zeros((2, 10), dtype="int32")).shape)
        (2, 10, 32)
    """

    def __init__(self, vocabulary_size, sequence_length, hidden_dim,
                 embeddings_initializer="random_normal", position_embedding="learned", **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = int(vocabulary_size)
        self.sequence_length = int(sequence_length)
        self.hidden_dim = int(hidden_dim)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.position_embedding_type = _validation.check_choice("position_embedding", position_embedding,
                                                     POSITION_EMBEDDINGS)
        # Keras's ReversibleEmbedding: the tied output projection stays right when quantized.
        self.token_embedding = keras.layers.ReversibleEmbedding(
            self.vocabulary_size, self.hidden_dim, tie_weights=True,
            embeddings_initializer=self.embeddings_initializer,
            dtype=self.dtype_policy, name="token_embedding")
        self.position_embedding = None if position_embedding == "rotary" else keras.layers.Embedding(
            self.sequence_length, self.hidden_dim,
            embeddings_initializer=self.embeddings_initializer,
            dtype=self.dtype_policy, name="position_embedding")

    def build(self, input_shape=None):
        self.token_embedding.build()
        if self.position_embedding is not None:
            self.position_embedding.build()
        self.built = True

    def call(self, token_ids, start_index=0):
        embedded = self.token_embedding(token_ids)  # (batch, time, hidden_dim)
        if self.position_embedding is None:
            return embedded
        positions = ops.arange(ops.shape(token_ids)[1], dtype="int32") + start_index
        return embedded + self.position_embedding(positions)[None]

    def project_to_vocabulary(self, hidden):
        """Logits from hidden states with the (tied) token table: `hidden @ embeddings.T`
        (int8/int4 kernels of a quantized model included)."""
        return self.token_embedding(hidden, reverse=True)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.hidden_dim,)

    def get_config(self):
        config = _config(self, "vocabulary_size", "sequence_length", "hidden_dim", "embeddings_initializer")
        return dict(config, position_embedding=self.position_embedding_type)


@keras.saving.register_keras_serializable(package="keras_nanogpt")
class CausalSelfAttention(keras.layers.Layer):
    """Multi-head causal self-attention with one fused QKV projection and an optional KV cache.

    Args:
        num_heads: number of attention heads; must divide `hidden_dim`.
        hidden_dim: width of the input and output.
        dropout: dropout rate on the output projection.
        use_bias: whether the projections have biases.
        kernel_initializer: initializer of the QKV projection.
        output_kernel_initializer: initializer of the output projection (nanoGPT scales it
            by 1/sqrt(2 * num_layers)).
        position_embedding: "learned" (positions arrive with the inputs) or "rotary" (queries and
            keys are rotated by their absolute position, keras-hub's `RotaryEmbedding`).
        qk_norm: RMS-normalise queries and keys per head (a learned scale each) before attending.
        rotary_max_wavelength: the longest rotary wavelength (RoFormer's 10000).
        norm_epsilon: epsilon of the query/key normalisation.

    Example:
        >>> attention = CausalSelfAttention(num_heads=4, hidden_dim=32, position_embedding="rotary",
        ...                                 qk_norm=True)
        >>> tuple(attention(ops.zeros((2, 10, 32))).shape)
        (2, 10, 32)
    """

    def __init__(self, num_heads, hidden_dim, dropout=0.0, use_bias=False,
                 kernel_initializer="glorot_uniform", output_kernel_initializer="glorot_uniform",
                 position_embedding="learned", qk_norm=False, rotary_max_wavelength=10000,
                 norm_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.num_heads, self.hidden_dim = _validation.check_heads(num_heads, hidden_dim)
        self.head_dim = self.hidden_dim // self.num_heads
        self.dropout = float(dropout)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.output_kernel_initializer = keras.initializers.get(output_kernel_initializer)
        self.qkv_dense = keras.layers.Dense(
            3 * self.hidden_dim, use_bias=self.use_bias, kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy, name="qkv")
        self.output_dense = keras.layers.Dense(
            self.hidden_dim, use_bias=self.use_bias,
            kernel_initializer=self.output_kernel_initializer,
            dtype=self.dtype_policy, name="output")
        self.output_dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.position_embedding = _validation.check_choice("position_embedding", position_embedding,
                                                POSITION_EMBEDDINGS)
        self.qk_norm = bool(qk_norm)
        self.rotary_max_wavelength = float(rotary_max_wavelength)
        self.norm_epsilon = float(norm_epsilon)
        self.rotary = None
        if self.position_embedding == "rotary":
            import keras_hub

            self.rotary = keras_hub.layers.RotaryEmbedding(
                max_wavelength=self.rotary_max_wavelength, dtype=self.dtype_policy, name="rotary")
        self.query_norm = self.key_norm = None
        if self.qk_norm:
            self.query_norm = keras.layers.RMSNormalization(
                epsilon=self.norm_epsilon, dtype=self.dtype_policy, name="query_norm")
            self.key_norm = keras.layers.RMSNormalization(
                epsilon=self.norm_epsilon, dtype=self.dtype_policy, name="key_norm")

    def build(self, input_shape):
        self.qkv_dense.build(input_shape)
        self.output_dense.build(tuple(input_shape[:-1]) + (self.hidden_dim,))
        if self.qk_norm:
            head_shape = (None, None, self.num_heads, self.head_dim)
            self.query_norm.build(head_shape)
            self.key_norm.build(head_shape)
        self.built = True

    def call(self, inputs, cache=None, cache_index=None, training=None):
        """Attend causally; with `cache`, write this step's keys/values at `cache_index` first.

        Args:
            inputs: `(batch, time, hidden_dim)`.
            cache: `None`, or `(keys, values)` so far: keys `(batch * num_heads, head_dim, max_length)`
                and values `(batch * num_heads, max_length, head_dim)`, the layouts that XLA updates in
                place and multiplies without transposing (see `NanoGPT.empty_cache`).
            cache_index: position of `inputs[:, 0]` in the cache (a scalar).
            training: whether dropout is active.

        Returns:
            The output `(batch, time, hidden_dim)`, and the updated cache when one was given.
        """
        batch, time = ops.shape(inputs)[0], ops.shape(inputs)[1]
        qkv = self.qkv_dense(as_rows(inputs)[0])  # (batch * time, 3 * hidden_dim)
        qkv = ops.reshape(qkv, (batch, time, 3, self.num_heads, self.head_dim))
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (batch, time, heads, head_dim)
        if self.qk_norm:
            query, key = self.query_norm(query), self.key_norm(key)
        if self.rotary is not None:  # each token rotated by its absolute position in the window
            start = 0 if cache is None else cache_index
            query = self.rotary(query, start_index=start)
            key = self.rotary(key, start_index=start)
        if cache is None:
            attended = ops.dot_product_attention(query, key, value, is_causal=True)
        else:
            attended, cache = self._attend_with_cache(query, key, value, cache, cache_index)
        attended, as_tokens = as_rows(ops.reshape(attended, (batch, time, self.hidden_dim)))
        outputs = self.output_dropout(as_tokens(self.output_dense(attended)), training=training)
        return outputs if cache is None else (outputs, cache)

    def _attend_with_cache(self, query, key, value, cache, cache_index):
        """Write `key`/`value` into the cache at `cache_index`, then attend over positions 0..its own."""
        batch, time = ops.shape(query)[0], ops.shape(query)[1]

        def heads_first(x):  # (batch, time, heads, head_dim) -> (batch * heads, time, head_dim)
            return ops.reshape(ops.transpose(x, (0, 2, 1, 3)), (-1, time, self.head_dim))

        key_cache, value_cache = cache
        key_cache = ops.slice_update(  # (batch * heads, head_dim, max_length)
            key_cache, [0, 0, cache_index],
            ops.cast(ops.transpose(heads_first(key), (0, 2, 1)), key_cache.dtype))
        value_cache = ops.slice_update(  # (batch * heads, max_length, head_dim)
            value_cache, [0, cache_index, 0], ops.cast(heads_first(value), value_cache.dtype))
        query = heads_first(query) * ops.cast(1.0 / self.head_dim ** 0.5, query.dtype)
        scores = ops.matmul(query, ops.cast(key_cache, query.dtype))  # (batch * heads, time, max_length)
        # Query i sits at cache_index + i and sees keys 0 .. cache_index + i.
        query_positions = ops.arange(time, dtype="int32") + cache_index
        key_positions = ops.arange(ops.shape(key_cache)[-1], dtype="int32")
        visible = query_positions[:, None] >= key_positions[None, :]  # (time, max_length)
        scores = ops.where(visible[None], ops.cast(scores, "float32"), float("-inf"))
        weights = ops.cast(ops.softmax(scores, axis=-1), query.dtype)
        attended = ops.matmul(weights, ops.cast(value_cache, query.dtype))  # (batch * heads, time, head_dim)
        attended = ops.reshape(attended, (batch, self.num_heads, time, self.head_dim))
        return ops.transpose(attended, (0, 2, 1, 3)), (key_cache, value_cache)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return _config(self, "num_heads", "hidden_dim", "dropout", "use_bias", "kernel_initializer",
                       "output_kernel_initializer", "position_embedding", "qk_norm", "rotary_max_wavelength",
                       "norm_epsilon")


@keras.saving.register_keras_serializable(package="keras_nanogpt")
class TransformerBlock(keras.layers.Layer):
    """Pre-norm GPT block: `x + attention(norm(x))`, then `x + mlp(norm(x))`.

    Args:
        num_heads: number of attention heads; must divide `hidden_dim`.
        hidden_dim: width of the input and output.
        intermediate_dim: width of the MLP's hidden layer (default `4 * hidden_dim`).
        dropout: dropout rate after attention and after the MLP.
        use_bias: whether projections and LayerNorms have biases.
        activation: the MLP's activation: "gelu" (exact), "gelu_approximate" (GPT-2), "relu",
            "silu" or "relu_squared" (`relu(x) ** 2`, the nanoGPT speedrun's).
        layer_norm_epsilon: epsilon of the normalisations.
        kernel_initializer: initializer of the QKV and MLP input projections.
        output_kernel_initializer: initializer of the two residual output projections.
        norm: "layer" (LayerNorm, GPT-2) or "rms" (RMSNorm).
        position_embedding: "learned" or "rotary" (see `CausalSelfAttention`).
        qk_norm: RMS-normalise queries and keys per head.

    Example:
        >>> block = TransformerBlock(num_heads=4, hidden_dim=32, norm="rms", activation="relu_squared")
        >>> tuple(block(ops.zeros((2, 10, 32))).shape)
        (2, 10, 32)
    """

    def __init__(self, num_heads, hidden_dim, intermediate_dim=None, dropout=0.0, use_bias=False,
                 activation="gelu", layer_norm_epsilon=1e-5, kernel_initializer="glorot_uniform",
                 output_kernel_initializer="glorot_uniform", norm="layer", position_embedding="learned",
                 qk_norm=False, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.hidden_dim = int(hidden_dim)
        self.intermediate_dim = int(intermediate_dim or 4 * hidden_dim)
        self.dropout = float(dropout)
        self.use_bias = bool(use_bias)
        self.activation = activation
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.output_kernel_initializer = keras.initializers.get(output_kernel_initializer)
        self.norm = _validation.check_choice("norm", norm, NORMS)
        self.position_embedding = position_embedding
        self.qk_norm = bool(qk_norm)
        self._activation_fn = _activation(activation)
        policy = self.dtype_policy
        self.attention_norm = make_norm(norm, self.layer_norm_epsilon, self.use_bias, policy, "attention_norm")
        self.attention = CausalSelfAttention(
            self.num_heads, self.hidden_dim, dropout=self.dropout, use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            output_kernel_initializer=self.output_kernel_initializer,
            position_embedding=position_embedding, qk_norm=qk_norm, norm_epsilon=self.layer_norm_epsilon,
            dtype=policy, name="attention")
        self.mlp_norm = make_norm(norm, self.layer_norm_epsilon, self.use_bias, policy, "mlp_norm")
        self.mlp_dense = keras.layers.Dense(
            self.intermediate_dim, use_bias=self.use_bias, kernel_initializer=self.kernel_initializer,
            dtype=policy, name="mlp")
        self.mlp_output_dense = keras.layers.Dense(
            self.hidden_dim, use_bias=self.use_bias, kernel_initializer=self.output_kernel_initializer,
            dtype=policy, name="mlp_output")
        self.mlp_dropout = keras.layers.Dropout(self.dropout, dtype=policy)

    def build(self, input_shape):
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape)
        self.mlp_norm.build(input_shape)
        self.mlp_dense.build(input_shape)
        self.mlp_output_dense.build(tuple(input_shape[:-1]) + (self.intermediate_dim,))
        self.built = True

    def call(self, inputs, cache=None, cache_index=None, training=None):
        """Apply the block; with `cache` (see `CausalSelfAttention.call`) also return the new cache."""
        attended = self.attention(self.attention_norm(inputs), cache=cache, cache_index=cache_index,
                                  training=training)
        if cache is not None:
            attended, cache = attended
        x = inputs + attended
        rows, as_tokens = as_rows(self.mlp_norm(x))  # (batch * time, hidden_dim)
        hidden = self._activation_fn(self.mlp_dense(rows))  # (batch * time, intermediate_dim)
        x = x + self.mlp_dropout(as_tokens(self.mlp_output_dense(hidden)), training=training)
        return x if cache is None else (x, cache)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return _config(self, "num_heads", "hidden_dim", "intermediate_dim", "dropout", "use_bias", "activation",
                       "layer_norm_epsilon", "kernel_initializer", "output_kernel_initializer", "norm",
                       "position_embedding", "qk_norm")


ACTIVATIONS = ("gelu", "gelu_approximate", "relu", "silu", "relu_squared")


def make_norm(norm, epsilon, center, dtype, name):
    """A LayerNorm (`norm="layer"`, with an offset when `center`) or an RMSNorm (`norm="rms"`)."""
    if norm == "rms":
        return keras.layers.RMSNormalization(epsilon=epsilon, dtype=dtype, name=name)
    return keras.layers.LayerNormalization(epsilon=epsilon, center=center, dtype=dtype, name=name)


def _activation(name):
    """The MLP activation for `name`: exact GELU, tanh-approximate GELU (GPT-2), ReLU², or a Keras name."""
    if name == "gelu":
        return lambda x: keras.activations.gelu(x, approximate=False)
    if name == "gelu_approximate":
        return lambda x: keras.activations.gelu(x, approximate=True)
    if name == "relu_squared":
        return lambda x: ops.square(ops.relu(x))
    if name in ACTIVATIONS:
        return keras.activations.get(name)
    raise ValueError(f"`activation` must be one of {ACTIVATIONS}; got {name!r}.")

