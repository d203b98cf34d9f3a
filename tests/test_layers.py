"""Layers: shapes, causality, the KV cache, serialisation."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_nanogpt as kn


def test_block_keeps_shape_and_has_residual_path():
    block = kn.TransformerBlock(num_heads=2, hidden_dim=16)
    x = np.random.default_rng(0).normal(size=(3, 7, 16)).astype("float32")
    y = to_numpy(block(x))
    assert y.shape == (3, 7, 16)
    assert not np.allclose(y, x)
    # Zero output projections leave only the residual path: the block is then the identity.
    for dense in (block.attention.output_dense, block.mlp_output_dense):
        dense.kernel.assign(np.zeros(dense.kernel.shape, "float32"))
    np.testing.assert_allclose(to_numpy(block(x)), x, atol=1e-6)


def test_attention_is_causal():
    attention = kn.CausalSelfAttention(num_heads=4, hidden_dim=32)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 10, 32)).astype("float32")
    changed = x.copy()
    changed[:, 6:] = rng.normal(size=(2, 4, 32))
    before, after = to_numpy(attention(x)), to_numpy(attention(changed))
    np.testing.assert_allclose(before[:, :6], after[:, :6], atol=1e-5)
    assert not np.allclose(before[:, 6:], after[:, 6:])


def test_cached_attention_matches_full_attention():
    attention = kn.CausalSelfAttention(num_heads=2, hidden_dim=16)
    x = np.random.default_rng(2).normal(size=(2, 6, 16)).astype("float32")
    full = to_numpy(attention(x))
    cache = (keras.ops.zeros((2 * 2, 8, 8)), keras.ops.zeros((2 * 2, 8, 8)))  # keys, values: 2 rows x 2 heads
    prefix, cache = attention(x[:, :4], cache=cache, cache_index=0)
    step, cache = attention(x[:, 4:5], cache=cache, cache_index=4)
    np.testing.assert_allclose(to_numpy(prefix), full[:, :4], atol=1e-5)
    np.testing.assert_allclose(to_numpy(step), full[:, 4:5], atol=1e-5)


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="hidden_dim.*num_heads"):
        kn.TransformerBlock(num_heads=3, hidden_dim=16)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation"):
        kn.TransformerBlock(num_heads=2, hidden_dim=16, activation="swishy")


@pytest.mark.parametrize("layer", [
    kn.TransformerBlock(num_heads=2, hidden_dim=16, dropout=0.1, use_bias=True,
                        activation="gelu_approximate"),
    kn.CausalSelfAttention(num_heads=2, hidden_dim=16),
    kn.TokenAndPositionEmbedding(vocabulary_size=11, sequence_length=9, hidden_dim=16),
])
def test_layer_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer)


def test_layers_follow_the_dtype_policy():
    block = kn.TransformerBlock(num_heads=2, hidden_dim=16, dtype="mixed_bfloat16")
    y = block(np.ones((1, 4, 16), "float32"))
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(block.attention.qkv_dense.kernel.dtype) == "float32"
