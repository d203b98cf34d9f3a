"""Quantization: `NanoGPT.quantize` (Keras's int8 / int4 / float8 for Dense and Embedding), the tied head
included, on a small trained model: logits stay close, greedy text mostly unchanged, every sampler runs
on the KV cache, `.keras` files round-trip and shrink, and the command line reads them.
"""

import os
import zipfile

import keras
import numpy as np
import pytest
from conftest import BACKEND, QUICK_COMPILE, to_numpy

import keras_nanogpt as kn
from keras_nanogpt import cli

# Largest |logit difference| from the float32 model allowed per mode, on the trained model below
# (logits span about +-10). Measured on the three backends: int8 0.06-0.09, int4 0.6-0.9, float8 0.4-0.6.
BOUNDS = {"int8": 0.25, "int4": 2.0, "float8": 1.5}


def policies(model):
    """Each layer's (path, quantization mode, compute dtype): what its dtype policy decides."""
    return [(layer.path, layer.quantization_mode, layer.compute_dtype) for layer in model._flatten_layers()]


@pytest.fixture(scope="module")
def trained(char_vectorizer, small_text, tmp_path_factory):
    """A 1-layer, 32-wide char model after 120 steps on Pride and Prejudice, saved uncompiled."""
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(char_vectorizer.vocabulary_size(), 32, 1, 2, 32, vectorizer=char_vectorizer)
    train, _ = kn.data.make_datasets(small_text, char_vectorizer, 32, 16, validation_split=0.0, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), **QUICK_COMPILE)
    model.fit(train.repeat(), steps_per_epoch=120, epochs=1, verbose=0)
    path = tmp_path_factory.mktemp("quantize") / "float.keras"
    serving = kn.NanoGPT.from_config(model.get_config())  # uncompiled: no optimizer state in the file
    serving.set_weights(model.get_weights())
    serving.save(path)
    return path


@pytest.fixture(scope="module")
def ids(char_vectorizer, small_text):
    return kn.data.encode(char_vectorizer, small_text[5000:5000 + 4 * 32]).reshape(4, 32).astype("int32")


@pytest.fixture(scope="module")
def reference(trained, ids):
    """The float32 model's logits on `ids` and its greedy continuation of their first 8 tokens."""
    model = kn.load_model(trained)
    return to_numpy(model(ids)), model.generate(ids[:, :8], max_new_tokens=32, temperature=0)


@pytest.fixture(scope="module")
def int8_model(trained):
    """The trained model quantized to int8 (shared: the tests below only read it)."""
    model = kn.load_model(trained)
    model.quantize("int8")
    return model


def test_int8_logits_stay_close_and_greedy_text_mostly_unchanged(int8_model, reference, ids):
    logits, greedy = reference
    difference = float(np.abs(to_numpy(int8_model(ids)) - logits).max())
    # The tied head reads the int8 token table through its per-token scales (a float cast of the raw
    # int8 table would be off by ~100x).
    assert int8_model.embedding.token_embedding.quantization_mode == "int8"
    same = float(np.mean(int8_model.generate(ids[:, :8], max_new_tokens=32, temperature=0)[:, 8:] == greedy[:, 8:]))
    print(f"\n{BACKEND} int8: max |logit difference| {difference:.3f} (logits {logits.min():.1f}.."
          f"{logits.max():.1f}); {same:.0%} of 4 x 32 greedy tokens unchanged")
    assert 0 < difference < BOUNDS["int8"] and same >= 0.75
    assert 1 < int8_model.score(ids.reshape(-1)).perplexity < 40  # scoring reads quantized models too


@pytest.mark.parametrize("mode", ["int4", "float8"])
def test_other_modes_stay_close_and_round_trip(trained, reference, ids, mode, tmp_path):
    model = kn.load_model(trained)
    model.quantize(mode)
    logits = to_numpy(model(ids))
    difference = float(np.abs(logits - reference[0]).max())
    print(f"\n{BACKEND} {mode}: max |logit difference| {difference:.3f}")
    assert 0 < difference < BOUNDS[mode]
    expected = {"int4": "int4", "float8": None}[mode]  # Keras has no float8 Embedding: the table stays float
    assert model.embedding.token_embedding.quantization_mode == expected
    assert model.blocks[0].attention.qkv_dense.quantization_mode == mode
    model.save(tmp_path / "q.keras")
    loaded = kn.load_model(tmp_path / "q.keras")
    np.testing.assert_array_equal(to_numpy(loaded(ids)), logits)
    assert policies(loaded) == policies(model)


def test_every_sampler_runs_on_the_int8_kv_cache(int8_model, ids):
    model, prompt = int8_model, ids[:1, :6]
    greedy = model.generate(prompt, max_new_tokens=6, temperature=0)
    context = np.zeros((1, 32), "int32")  # the same tokens from full forward passes, without the cache
    context[:, :6] = prompt
    for length in range(6, 12):  # right padding: a causal model's earlier positions never see it
        context[0, length] = np.argmax(to_numpy(model(context))[0, length - 1])
    np.testing.assert_array_equal(greedy, context[:, :12])
    # Top-k and top-p in one keras-hub TopPSampler, then beam search (contrastive search runs the same
    # search loop, `decoding.search_loop`, and costs twice beam's compilation).
    for options in ({"top_p": 0.9, "top_k": 5, "seed": 1}, {"sampler": "beam"}):
        out = model.generate(prompt, max_new_tokens=4, **options)
        assert out.shape == (1, 10) and np.array_equal(out[:, :6], prompt), options
        assert np.all((out >= 0) & (out < model.vocabulary_size))
    text = model.generate("It is a", max_new_tokens=5, temperature=0.8, seed=2)  # random sampling, streamed
    assert text == "It is a" + "".join(model.stream("It is a", max_new_tokens=5, temperature=0.8, seed=2))


def test_int8_file_round_trips_and_is_smaller(int8_model, trained, ids, tmp_path):
    int8_model.save(tmp_path / "q.keras")
    loaded = kn.load_model(tmp_path / "q.keras")
    np.testing.assert_array_equal(to_numpy(loaded(ids)), to_numpy(int8_model(ids)))
    assert policies(loaded) == policies(int8_model)

    def weights_bytes(path):
        with zipfile.ZipFile(path) as archive:
            return archive.getinfo("model.weights.h5").file_size

    ratio = weights_bytes(trained) / weights_bytes(tmp_path / "q.keras")
    print(f"\n{BACKEND} int8: weights {ratio:.2f}x smaller")
    assert ratio > 1.5  # at this tiny size HDF5's per-array headers and the float32 scales weigh (see RESULTS.md)


def test_mixed_precision_model_quantizes(char_vectorizer, ids, tmp_path):
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(char_vectorizer.vocabulary_size(), 32, 1, 2, 32, dtype="mixed_bfloat16")
    reference = to_numpy(model(ids))
    model.quantize("int8")
    dense = model.blocks[0].mlp_dense
    assert (dense.dtype_policy.name, dense.compute_dtype) == ("int8_from_mixed_bfloat16", "bfloat16")
    logits = to_numpy(model(ids))
    assert logits.dtype == np.float32 and float(np.abs(logits - reference).max()) < 0.05
    model.save(tmp_path / "q.keras")
    loaded = kn.load_model(tmp_path / "q.keras")
    assert policies(loaded) == policies(model) and loaded.blocks[0].mlp_dense.quantization_mode == "int8"
    np.testing.assert_array_equal(to_numpy(loaded(ids)), logits)


def test_command_line_reads_quantized_files(int8_model, tmp_path, capsys):
    int8_model.save(tmp_path / "q.keras")
    arguments = ["generate", str(tmp_path / "q.keras"), "--prompt", "It is", "--max-new-tokens", "6",
                 "--temperature", "0", "--no-stream"]
    assert cli.main(arguments) == 0
    assert capsys.readouterr().out == int8_model.generate("It is", max_new_tokens=6, temperature=0) + "\n"
    code = cli.main(["export", str(tmp_path / "q.keras"), str(tmp_path / "serving")])
    if BACKEND == "torch":
        assert code == 2 and "KERAS_BACKEND=tensorflow" in capsys.readouterr().err
        return
    assert code == 0, capsys.readouterr().err
    import tensorflow as tf

    served = tf.saved_model.load(str(tmp_path / "serving"))
    ids = np.array([[3, 4, 5]], "int32")
    np.testing.assert_allclose(served.serve(ids).numpy(), to_numpy(int8_model(ids)), atol=1e-4)


def test_command_line_writes_a_quantized_copy(trained, int8_model, ids, tmp_path, capsys):
    out = tmp_path / "q.keras"
    assert cli.main(["quantize", str(trained), str(out)]) == 0
    assert f"to int8: {out}" in capsys.readouterr().out
    np.testing.assert_array_equal(to_numpy(kn.load_model(out)(ids)), to_numpy(int8_model(ids)))
    assert os.path.getsize(out) < os.path.getsize(trained)
    for arguments, message in ((["--mode", "int3"], "--mode"), ([], "differ")):
        target = str(trained) if not arguments else str(tmp_path / "bad.keras")
        assert cli.main(["quantize", str(trained), target, *arguments]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    ({"mode": "int3"}, "int3"),
    ({"mode": "gptq"}, "GPTQConfig"),
    ({}, "`mode` or `config`"),
])
def test_bad_modes_are_refused(arguments, message):
    model = kn.NanoGPT(10, 16, 1, 2, 16)
    with pytest.raises(ValueError, match=message):
        model.quantize(**arguments)
    assert model.blocks[0].mlp_dense.quantization_mode is None


def test_quantized_models_are_not_quantized_again_or_exported_to_gpt2(tmp_path):
    model = kn.NanoGPT(10, 16, 1, 2, 16)
    model.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize("int4")
    with pytest.raises(ValueError, match="quantized"):
        kn.convert.to_huggingface_gpt2(model, tmp_path / "gpt2")
