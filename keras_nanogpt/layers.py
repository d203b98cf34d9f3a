"""The GPT building blocks: embeddings, causal self-attention with a KV cache, and the transformer block.

Every layer uses `keras.ops` only, so the same code runs on the TensorFlow, JAX and PyTorch backends.
"""

import keras
from keras import ops


def _serialize(initializer):
    return keras.initializers.serialize(keras.initializers.get(initializer))


@keras.saving.register_keras_serializable(package="keras_nanogpt")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token embedding plus a learned position embedding; also projects back onto the vocabulary.

    Args:
        vocabulary_size: number of token ids.
        sequence_length: the longest sequence (the number of learned positions).
        hidden_dim: width of the embedding vectors.
        embeddings_initializer: initializer of both tables (nanoGPT: normal, stddev 0.02).

    Example:
        >>> layer = TokenAndPositionEmbedding(vocabulary_size=65, sequence_length=64, hidden_dim=32)
        >>> tuple(layer(ops.zeros((2, 10), dtype="int32")).shape)
        (2, 10, 32)
    """

    def __init__(self, vocabulary_size, sequence_length, hidden_dim,
                 embeddings_initializer="random_normal", **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = int(vocabulary_size)
        self.sequence_length = int(sequence_length)
        self.hidden_dim = int(hidden_dim)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        # Keras's ReversibleEmbedding: the tied output projection stays right when quantized.
        self.token_embedding = keras.layers.ReversibleEmbedding(
            self.vocabulary_size, self.hidden_dim, tie_weights=True,
            embeddings_initializer=self.embeddings_initializer,
            dtype=self.dtype_policy, name="token_embedding")
        self.position_embedding = keras.layers.Embedding(
            self.sequence_length, self.hidden_dim,
            embeddings_initializer=self.embeddings_initializer,
            dtype=self.dtype_policy, name="position_embedding")

    def build(self, input_shape=None):
        self.token_embedding.build()
        self.position_embedding.build()
        self.built = True

    def call(self, token_ids, start_index=0):
        positions = ops.arange(ops.shape(token_ids)[1], dtype="int32") + start_index
        return self.token_embedding(token_ids) + self.position_embedding(positions)[None]

    def project_to_vocabulary(self, hidden):
        """Logits from hidden states with the (tied) token table: `hidden @ embeddings.T`
        (int8/int4 kernels of a quantized model included)."""
        return self.token_embedding(hidden, reverse=True)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.hidden_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocabulary_size=self.vocabulary_size,
            sequence_length=self.sequence_length,
            hidden_dim=self.hidden_dim,
            embeddings_initializer=_serialize(self.embeddings_initializer),
        )
        return config


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

    Example:
        >>> attention = CausalSelfAttention(num_heads=4, hidden_dim=32)
        >>> tuple(attention(ops.zeros((2, 10, 32))).shape)
        (2, 10, 32)
    """

    def __init__(self, num_heads, hidden_dim, dropout=0.0, use_bias=False,
                 kernel_initializer="glorot_uniform", output_kernel_initializer="glorot_uniform",
                 **kwargs):
        super().__init__(**kwargs)
        if hidden_dim % num_heads:
            raise ValueError(
                f"`hidden_dim` must be divisible by `num_heads`; got hidden_dim={hidden_dim}, "
                f"num_heads={num_heads}.")
        self.num_heads = int(num_heads)
        self.hidden_dim = int(hidden_dim)
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

    def build(self, input_shape):
        self.qkv_dense.build(input_shape)
        self.output_dense.build(tuple(input_shape[:-1]) + (self.hidden_dim,))
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
        qkv = self.qkv_dense(inputs)  # (batch, time, 3 * hidden_dim)
        qkv = ops.reshape(qkv, (batch, time, 3, self.num_heads, self.head_dim))
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (batch, time, heads, head_dim)
        if cache is None:
            attended = ops.dot_product_attention(query, key, value, is_causal=True)
        else:
            attended, cache = self._attend_with_cache(query, key, value, cache, cache_index)
        attended = ops.reshape(attended, (batch, time, self.hidden_dim))
        outputs = self.output_dropout(self.output_dense(attended), training=training)
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
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            hidden_dim=self.hidden_dim,
            dropout=self.dropout,
            use_bias=self.use_bias,
            kernel_initializer=_serialize(self.kernel_initializer),
            output_kernel_initializer=_serialize(self.output_kernel_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package="keras_nanogpt")
class TransformerBlock(keras.layers.Layer):
    """Pre-LayerNorm GPT block: `x + attention(norm(x))`, then `x + mlp(norm(x))`.

    Args:
        num_heads: number of attention heads; must divide `hidden_dim`.
        hidden_dim: width of the input and output.
        intermediate_dim: width of the MLP's hidden layer (default `4 * hidden_dim`).
        dropout: dropout rate after attention and after the MLP.
        use_bias: whether projections and LayerNorms have biases.
        activation: the MLP's activation ("gelu" exact, "gelu_approximate" as in GPT-2, or any Keras name).
        layer_norm_epsilon: LayerNorm epsilon.
        kernel_initializer: initializer of the QKV and MLP input projections.
        output_kernel_initializer: initializer of the two residual output projections.

    Example:
        >>> block = TransformerBlock(num_heads=4, hidden_dim=32)
        >>> tuple(block(ops.zeros((2, 10, 32))).shape)
        (2, 10, 32)
    """

    def __init__(self, num_heads, hidden_dim, intermediate_dim=None, dropout=0.0, use_bias=False,
                 activation="gelu", layer_norm_epsilon=1e-5, kernel_initializer="glorot_uniform",
                 output_kernel_initializer="glorot_uniform", **kwargs):
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
        self._activation_fn = _activation(activation)
        policy = self.dtype_policy
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, center=self.use_bias, dtype=policy, name="attention_norm")
        self.attention = CausalSelfAttention(
            self.num_heads, self.hidden_dim, dropout=self.dropout, use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            output_kernel_initializer=self.output_kernel_initializer, dtype=policy, name="attention")
        self.mlp_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, center=self.use_bias, dtype=policy, name="mlp_norm")
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
        hidden = self._activation_fn(self.mlp_dense(self.mlp_norm(x)))  # (batch, time, intermediate_dim)
        x = x + self.mlp_dropout(self.mlp_output_dense(hidden), training=training)
        return x if cache is None else (x, cache)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            hidden_dim=self.hidden_dim,
            intermediate_dim=self.intermediate_dim,
            dropout=self.dropout,
            use_bias=self.use_bias,
            activation=self.activation,
            layer_norm_epsilon=self.layer_norm_epsilon,
            kernel_initializer=_serialize(self.kernel_initializer),
            output_kernel_initializer=_serialize(self.output_kernel_initializer),
        )
        return config


ACTIVATIONS = ("gelu", "gelu_approximate", "relu", "silu")


def _activation(name):
    """The MLP activation for `name`: exact GELU, tanh-approximate GELU (GPT-2), or a Keras name."""
    if name == "gelu":
        return lambda x: keras.activations.gelu(x, approximate=False)
    if name == "gelu_approximate":
        return lambda x: keras.activations.gelu(x, approximate=True)
    if name in ACTIVATIONS:
        return keras.activations.get(name)
    raise ValueError(f"`activation` must be one of {ACTIVATIONS}; got {name!r}.")
