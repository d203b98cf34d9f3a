"""The modern recipe: rotary positions, QK-norm, RMSNorm, ReLU², zero-initialised residuals, Muon."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import CONTEXT, make_sharp_model, reference_greedy, to_numpy

import keras_nanogpt as kn

MODERN = kn.model.MODERN


def make_sharp_modern(char_vectorizer, **overrides):
    """A small modern model with large random weights, so greedy choices are never near-ties."""
    return make_sharp_model(char_vectorizer, seed=2, **{**MODERN, **overrides})


@pytest.fixture(scope="module")
def sharp_modern(char_vectorizer):
    return make_sharp_modern(char_vectorizer)


def test_modern_configurations_hold_the_modern_layout():
    model = kn.NanoGPT.from_config_name("nano-modern", vocabulary_size=65)
    assert (model.num_layers, model.hidden_dim, model.sequence_length) == (4, 128, 64)
    assert model.embedding.position_embedding is None and model.head is not None
    assert isinstance(model.final_norm, keras.layers.RMSNormalization)
    attention = model.blocks[0].attention
    assert attention.rotary is not None and attention.qk_norm
    for kernel in (attention.output_dense.kernel, model.blocks[0].mlp_output_dense.kernel):
        assert not np.any(to_numpy(kernel))  # zero-initialised residual projections
    assert np.std(to_numpy(attention.qkv_dense.kernel)) == pytest.approx(0.02, rel=0.05)
    hidden = np.linspace(-2, 2, 9, dtype="float32")
    np.testing.assert_allclose(to_numpy(model.blocks[0]._activation_fn(hidden)), np.maximum(hidden, 0) ** 2)
    baby = kn.NanoGPT.from_config_name("baby-modern", vocabulary_size=65)
    assert (baby.num_layers, baby.hidden_dim, baby.position_embedding) == (6, 384, "rotary")
    config = model.get_config()
    assert {key: config[key] for key in MODERN} == MODERN
    assert kn.NanoGPT.from_config(config).get_config() == config


@pytest.mark.parametrize("prompt_length, steps", [(3, 10), (3, 3 * CONTEXT), (CONTEXT + 5, 20)])
def test_rotary_cached_greedy_equals_full_recompute(sharp_modern, prompt_length, steps):
    prompt = list(np.random.default_rng(prompt_length).integers(1, sharp_modern.vocabulary_size, prompt_length))
    generated = sharp_modern.generate([prompt], max_new_tokens=steps, temperature=0)
    assert generated[0].tolist() == reference_greedy(sharp_modern, prompt, steps)


def test_rotary_scores_depend_on_relative_positions_only(sharp_modern):
    """Rotated queries and keys give the same attention scores wherever the window starts (what lets
    the cache restart at position 0 when the window slides), though the vectors themselves differ."""
    rotary = sharp_modern.blocks[0].attention.rotary
    vectors = np.random.default_rng(0).normal(size=(1, 6, 2, 16)).astype("float32")  # (batch, time, heads, dim)
    at_0, at_5 = (to_numpy(rotary(vectors, start_index=start)) for start in (0, 5))
    np.testing.assert_allclose(np.einsum("bihd,bjhd->bhij", at_0, at_0),
                               np.einsum("bihd,bjhd->bhij", at_5, at_5), atol=1e-4)
    assert np.abs(at_0 - at_5).max() > 0.1


def test_modern_samplers_and_streaming(sharp_modern):
    for options in (dict(top_k=5, seed=1), dict(top_p=0.9, seed=1), dict(sampler="beam")):
        text = sharp_modern.generate("It is a", max_new_tokens=20, **options)
        assert text.startswith("It is a") and len(text) == len("It is a") + 20
    arguments = dict(max_new_tokens=20, temperature=0.8, top_k=10, seed=5)
    assert "It" + "".join(sharp_modern.stream("It", **arguments)) == sharp_modern.generate("It", **arguments)


def test_modern_model_round_trips_with_muon_state_in_a_fresh_process(tmp_path, small_text, char_vectorizer):
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(char_vectorizer.vocabulary_size(), 32, 2, 2, 32, vectorizer=char_vectorizer, **MODERN)
    model.compile(optimizer=kn.training.muon_optimizer(total_steps=100, warmup_steps=5))
    train, _ = kn.data.make_datasets(small_text, char_vectorizer, 32, 8, seed=0)
    model.fit(train.take(6), verbose=0)
    path = str(tmp_path / "modern.keras")
    model.save(path)
    ids = np.arange(2, 18, dtype="int32").reshape(2, 8)
    np.save(tmp_path / "logits.npy", to_numpy(model(ids)))
    state = float(sum(np.abs(to_numpy(v)).sum() for v in model.optimizer.variables))
    expected = model.generate("It is a truth", max_new_tokens=15, temperature=0)
    script = textwrap.dedent(f"""
        import keras, numpy as np
        import keras_nanogpt as kn
        model = keras.models.load_model({path!r})
        assert isinstance(model.optimizer, kn.training.MatrixDecayMuon), type(model.optimizer)
        assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 6
        state = float(sum(np.abs(keras.ops.convert_to_numpy(v)).sum() for v in model.optimizer.variables))
        ids = np.arange(2, 18, dtype="int32").reshape(2, 8)
        diff = np.abs(keras.ops.convert_to_numpy(model(ids)) - np.load({str(tmp_path / "logits.npy")!r})).max()
        print("DIFF", diff)
        print("STATE", state)
        print("TEXT", repr(model.generate("It is a truth", max_new_tokens=15, temperature=0)))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line[:4] in ("DIFF", "STAT", "TEXT"))
    assert float(lines["DIFF"]) <= 1e-6
    assert float(lines["STATE"]) == pytest.approx(state, rel=1e-6) and state > 0
    assert lines["TEXT"] == repr(expected)


def test_logit_softcap_bounds_every_path_and_round_trips(tmp_path, char_vectorizer):
    """Capped logits in the full pass, the cached pass (prefill and one step), sampling and a `.keras` file."""
    cap = 3.0
    capped, plain = (make_sharp_modern(char_vectorizer, logit_softcap=softcap) for softcap in (cap, None))
    ids = np.array([[5, 9, 2, 7, 11, 3]], "int32")
    full, uncapped = to_numpy(capped(ids)), to_numpy(plain(ids))
    assert np.abs(uncapped).max() > 2 * cap  # the sharp weights' logits would pass the cap
    np.testing.assert_allclose(full, cap * np.tanh(uncapped / cap), rtol=1e-4, atol=1e-4)
    cache = capped.empty_cache(1)
    prefill, _, cache = capped.call_with_cache(ids[:, :5], cache, 0)
    step, _, _ = capped.call_with_cache(ids[:, 5:], cache, 5)
    np.testing.assert_allclose(np.concatenate([to_numpy(prefill), to_numpy(step)], axis=1), full,
                               rtol=1e-4, atol=1e-4)
    prompt = [5, 9, 2]
    assert capped.generate([prompt], max_new_tokens=40, temperature=0)[0].tolist() == reference_greedy(
        capped, prompt, 40)
    scores = capped.score(ids[0])
    expected = full[0, :-1] - np.log(np.exp(full[0, :-1]).sum(-1, keepdims=True))
    np.testing.assert_allclose(scores.log_probs, expected[np.arange(5), ids[0, 1:]], rtol=1e-4, atol=1e-4)
    path = str(tmp_path / "capped.keras")
    capped.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.logit_softcap == cap and loaded.get_config()["logit_softcap"] == cap
    np.testing.assert_allclose(to_numpy(loaded(ids)), full, rtol=1e-6, atol=1e-6)
    assert plain.get_config()["logit_softcap"] is None


def test_modern_recipe_learns_faster_than_the_gpt2_recipe(small_text, char_vectorizer):
    """The same small model, data and steps: the modern layout with Muon against GPT-2's with AdamW."""
    losses = {}
    for name in ("nanogpt", "modern"):
        keras.utils.set_random_seed(0)
        train, val = kn.data.make_datasets(small_text, char_vectorizer, 32, 16, seed=0)
        model = kn.training.RECIPES[name].build(char_vectorizer.vocabulary_size(), total_steps=80,
                                                warmup_steps=8, sequence_length=32, num_layers=2,
                                                num_heads=2, hidden_dim=32)
        assert (model.position_embedding == "rotary") == (name == "modern")
        model.fit(train.repeat(), steps_per_epoch=80, epochs=1, verbose=0)
        losses[name] = model.evaluate(val, verbose=0)[0]
    assert losses["modern"] < losses["nanogpt"] - 0.1, losses


def test_mixed_bfloat16_modern_model_trains(small_text, char_vectorizer):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        model = kn.NanoGPT(char_vectorizer.vocabulary_size(), 32, 2, 2, 32, **MODERN)
        assert model.blocks[0].attention.query_norm.compute_dtype == "bfloat16"
        model.compile(optimizer=kn.training.muon_optimizer(40, warmup_steps=4))
        train, val = kn.data.make_datasets(small_text, char_vectorizer, 32, 16, seed=0)
        before = model.evaluate(val, verbose=0)[0]
        model.fit(train.repeat(), steps_per_epoch=40, epochs=1, verbose=0)
        assert model.evaluate(val, verbose=0)[0] < before - 0.8
        assert model.generate([[3, 4, 5]], max_new_tokens=20, seed=0).shape == (1, 23)
    finally:
        keras.config.set_dtype_policy(previous)


def test_gpt2_export_refuses_a_modern_model(tmp_path):
    model = kn.NanoGPT(50, 16, 1, 2, 16, **MODERN)
    with pytest.raises(ValueError, match="position_embedding='rotary'.*norm='rms'.*qk_norm=True"):
        kn.convert.to_huggingface_gpt2(model, tmp_path / "gpt2")
    assert not (tmp_path / "gpt2").exists()
    with pytest.raises(ValueError, match="logit_softcap=15.0"):
        kn.convert.to_huggingface_gpt2(kn.NanoGPT(50, 16, 1, 2, 16, logit_softcap=15.0), tmp_path / "gpt2")


@pytest.mark.parametrize("kwargs, argument", [
    (dict(position_embedding="alibi"), "position_embedding"),
    (dict(norm="batch"), "norm"),
    (dict(qk_norm="yes"), "qk_norm"),
    (dict(zero_init_residual=1), "zero_init_residual"),
    (dict(activation="relu2"), "activation"),
    (dict(logit_softcap=0), "logit_softcap"),
    (dict(logit_softcap=-15.0), "logit_softcap"),
    (dict(logit_softcap="15"), "logit_softcap"),
])
def test_bad_architecture_arguments(kwargs, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        kn.NanoGPT(50, 16, 1, 2, 16, **kwargs)


def test_muon_trains_block_matrices_and_adamw_the_rest():
    model = kn.NanoGPT(50, 16, 2, 2, 16, **MODERN)
    optimizer = kn.training.muon_optimizer(100, learning_rate=0.02, adam_learning_rate=4e-3, warmup_steps=10,
                                           weight_decay=0.0, adam_weight_decay=0.1)
    optimizer.build(model.trainable_variables)
    muon = {v.path.split("/", 1)[1] for v in model.trainable_variables if not optimizer._should_use_adamw(v)}
    assert muon == {f"block_{i}/{name}/kernel" for i in range(2)
                    for name in ("attention/qkv", "attention/output", "mlp", "mlp_output")}
    decayed = {v.path.split("/", 1)[1] for v in model.trainable_variables if optimizer._use_weight_decay(v)}
    assert decayed == {"embedding/token_embedding/embeddings", "head/kernel"} | muon  # never the norm scales
    assert optimizer.adam_lr_ratio == pytest.approx(0.2)
    norm = model.blocks[0].mlp_norm.scale
    head = model.head.kernel
    before_norm, before_head = to_numpy(norm).copy(), to_numpy(head).copy()
    optimizer.iterations.assign(10)  # at the peak learning rates
    optimizer.apply_gradients([(keras.ops.zeros(v.shape), v) for v in model.trainable_variables])
    np.testing.assert_allclose(to_numpy(norm), before_norm)
    np.testing.assert_allclose(to_numpy(head), before_head * (1 - 4e-3 * 0.1), rtol=1e-5)


def test_warmup_decay_schedules():
    cosine = kn.training.WarmupDecay(1e-3, total_steps=2000, warmup_steps=100, final=1e-4)
    values = [float(to_numpy(cosine(step))) for step in (0, 50, 100, 1050, 2000, 5000)]
    # nanoGPT's get_lr: (step + 1) / (warmup + 1) of the peak while warming up, then cosine to the floor.
    np.testing.assert_allclose(values, [1e-3 / 101, 51e-3 / 101, 1e-3, 5.5e-4, 1e-4, 1e-4], rtol=1e-5)
    stable_decay = kn.training.WarmupDecay(1.0, total_steps=100, warmup_steps=10, decay_steps=40,
                                           shape="linear")
    values = [float(to_numpy(stable_decay(step))) for step in (10, 59, 60, 80, 100)]
    np.testing.assert_allclose(values, [1.0, 1.0, 1.0, 0.5, 0.0], atol=1e-6)
    clone = kn.training.WarmupDecay.from_config(stable_decay.get_config())
    assert float(to_numpy(clone(80))) == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(total_steps=0), "total_steps"),
    (dict(warmup_steps=1000), "warmup_steps"),
    (dict(learning_rate=0), "learning_rate"),
    (dict(adam_learning_rate=-1), "adam_learning_rate"),
    (dict(decay_fraction=0), "decay_fraction"),
    (dict(final_ratio=2), "final_ratio"),
    (dict(decay_shape="step"), "shape"),
    (dict(momentum=1.0), "momentum"),
    (dict(ns_steps=0), "ns_steps"),
    (dict(clipnorm=0), "clipnorm"),
])
def test_bad_muon_arguments(kwargs, argument):
    arguments = dict(total_steps=1000)
    arguments.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=argument):
        kn.training.muon_optimizer(**arguments)
