"""NanoGPT: construction, initialisation, compile defaults, training, save/load, generate."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_nanogpt as kn


def test_logits_shape_and_parameter_count(tiny_model, char_vectorizer):
    vocab = char_vectorizer.vocabulary_size()
    ids = np.zeros((3, 11), "int32")
    assert to_numpy(tiny_model(ids)).shape == (3, 11, vocab)
    embed = vocab * 32 + 32 * 32
    block = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32 + 2 * 32
    assert tiny_model.count_params() == embed + 2 * block + 32


def test_model_is_causal(tiny_model):
    ids = np.random.default_rng(0).integers(2, 20, size=(2, 16)).astype("int32")
    changed = ids.copy()
    changed[:, 10:] = 3
    np.testing.assert_allclose(to_numpy(tiny_model(ids))[:, :10], to_numpy(tiny_model(changed))[:, :10],
                               atol=1e-5)


def test_nanogpt_initialisation():
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(vocabulary_size=200, sequence_length=64, num_layers=8, num_heads=4, hidden_dim=128)
    qkv = to_numpy(model.blocks[0].attention.qkv_dense.kernel)
    residual = to_numpy(model.blocks[0].mlp_output_dense.kernel)
    assert abs(qkv.std() - 0.02) < 0.002
    assert abs(residual.std() - 0.02 / np.sqrt(16)) < 0.001
    assert not model.blocks[0].attention.qkv_dense.use_bias
    assert abs(to_numpy(model.embedding.token_embedding.embeddings).std() - 0.02) < 0.002


def test_named_configurations():
    nano = kn.NanoGPT.from_config_name("nano", vocabulary_size=65)
    assert (nano.num_layers, nano.num_heads, nano.hidden_dim, nano.sequence_length) == (4, 4, 128, 64)
    assert 0.79e6 < nano.count_params() < 0.82e6  # nanoGPT reports 0.80M for this recipe
    baby = kn.NanoGPT.from_config_name("baby", vocabulary_size=65, num_layers=1)
    assert (baby.num_layers, baby.hidden_dim, baby.sequence_length, baby.dropout) == (1, 384, 256, 0.2)
    assert kn.CONFIGS["gpt2"]["hidden_dim"] == 768
    with pytest.raises(ValueError, match="name"):
        kn.NanoGPT.from_config_name("huge", vocabulary_size=65)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(vocabulary_size=0), "vocabulary_size"),
    (dict(num_layers=0), "num_layers"),
    (dict(sequence_length=-1), "sequence_length"),
    (dict(hidden_dim=30), "hidden_dim"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(activation="tanh"), "activation"),
    (dict(vocabulary_size=5), "vectorizer"),
])
def test_bad_arguments_name_the_argument(kwargs, argument, char_vectorizer):
    arguments = dict(vocabulary_size=100, sequence_length=16, num_layers=1, num_heads=4, hidden_dim=32,
                     vectorizer=char_vectorizer)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        kn.NanoGPT(**arguments)


def test_compile_defaults_and_overrides(tiny_model):
    tiny_model.compile()
    assert isinstance(tiny_model.optimizer, keras.optimizers.Adam)
    assert isinstance(tiny_model.loss, keras.losses.SparseCategoricalCrossentropy)
    # XLA on TensorFlow even on CPU (Keras's "auto" would leave it off there); torch stays eager.
    assert tiny_model.jit_compile is {"tensorflow": True, "jax": True, "torch": False}[keras.backend.backend()]
    tiny_model.compile(jit_compile=False)
    assert tiny_model.jit_compile is False
    tiny_model.compile(run_eagerly=True)
    assert tiny_model.jit_compile is False and tiny_model.run_eagerly
    tiny_model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    assert isinstance(tiny_model.optimizer, keras.optimizers.SGD)
    assert tiny_model.loss == "sparse_categorical_crossentropy"


def test_validation_loss_falls(small_text, char_vectorizer):
    keras.utils.set_random_seed(0)
    train, val = kn.data.make_datasets(small_text, char_vectorizer, sequence_length=32, batch_size=16, seed=0)
    model = kn.NanoGPT(char_vectorizer.vocabulary_size(), 32, 2, 2, 32)
    model.compile()
    before = model.evaluate(val, verbose=0)[0]
    model.fit(train.repeat(), steps_per_epoch=300, epochs=1, verbose=0)
    after = model.evaluate(val, verbose=0)[0]
    assert before > 4.0  # about log(vocabulary size) at initialisation
    assert after < 3.0 and after < before - 1.2


def test_generate_shapes_prompt_and_seed(tiny_model):
    ids = np.array([[5, 6, 7], [8, 9, 10]], "int32")
    out = tiny_model.generate(ids, max_new_tokens=6, seed=1)
    assert out.shape == (2, 9)
    np.testing.assert_array_equal(out[:, :3], ids)
    assert ((out >= 0) & (out < tiny_model.vocabulary_size)).all()
    np.testing.assert_array_equal(out, tiny_model.generate(ids, max_new_tokens=6, seed=1))
    text = tiny_model.generate("It is a truth", max_new_tokens=12, seed=3)
    assert isinstance(text, str) and text.startswith("It is a truth") and len(text) == 13 + 12
    assert text == tiny_model.generate("It is a truth", max_new_tokens=12, seed=3)


def test_keras_file_round_trip_in_a_fresh_process(tmp_path, tiny_model):
    path = str(tmp_path / "tiny.keras")
    tiny_model.compile()
    tiny_model.save(path)
    ids = np.arange(2, 18, dtype="int32").reshape(2, 8)
    np.save(tmp_path / "logits.npy", to_numpy(tiny_model(ids)))
    expected = tiny_model.generate("It is a truth", max_new_tokens=15, temperature=0)
    script = textwrap.dedent(f"""
        import keras, numpy as np
        import keras_nanogpt as kn
        model = keras.models.load_model({path!r})
        assert isinstance(model, kn.NanoGPT) and model.vectorizer is not None
        assert isinstance(model.optimizer, keras.optimizers.Adam)
        ids = np.arange(2, 18, dtype="int32").reshape(2, 8)
        diff = np.abs(keras.ops.convert_to_numpy(model(ids)) - np.load({str(tmp_path / "logits.npy")!r})).max()
        print("DIFF", diff)
        print("TEXT", repr(model.generate("It is a truth", max_new_tokens=15, temperature=0)))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line[:4] in ("DIFF", "TEXT"))
    assert float(lines["DIFF"]) <= 1e-6
    assert lines["TEXT"] == repr(expected)


def test_config_round_trip_keeps_the_vocabulary(tiny_model, char_vectorizer):
    clone = kn.NanoGPT.from_config(tiny_model.get_config())
    assert clone.get_config() == tiny_model.get_config()
    assert clone.vectorizer.get_vocabulary() == char_vectorizer.get_vocabulary()


def test_in_memory_weights_file_equals_keras_own(tmp_path, tiny_model):
    """`save_weights` builds the HDF5 file in memory with Keras's private saving_lib (the one wrapper of
    it, `saving._weights_h5_bytes`): its datasets must be those `keras.Model.save_weights` writes."""
    import h5py

    assert kn.saving._weights_h5_bytes(tiny_model) is not None  # not the fallback: Keras still has the parts
    ours, keras_own = tmp_path / "ours.weights.h5", tmp_path / "keras.weights.h5"
    tiny_model.save_weights(ours)
    keras.Model.save_weights(tiny_model, keras_own)

    def datasets(path):
        found = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, item: found.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
        return found

    expected = datasets(keras_own)
    got = datasets(ours)
    assert expected and sorted(got) == sorted(expected)
    assert all(np.array_equal(got[name], expected[name]) for name in expected)
