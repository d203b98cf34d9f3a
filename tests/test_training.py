"""nanoGPT's optimiser recipe: schedule, weight-decay groups, save/load, training."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_nanogpt as kn


def test_warmup_then_cosine_to_the_floor():
    schedule = kn.training.nanogpt_optimizer(2000, learning_rate=1e-3, min_learning_rate=1e-4,
                                             warmup_steps=100)._learning_rate
    lr = [float(to_numpy(schedule(step))) for step in (0, 50, 100, 1050, 2000, 5000)]
    # nanoGPT's get_lr: the first step already gets 1/101 of the peak.
    np.testing.assert_allclose(lr, [1e-3 / 101, 51e-3 / 101, 1e-3, 5.5e-4, 1e-4, 1e-4], rtol=1e-5, atol=1e-9)


def test_weight_decay_only_on_matrices():
    model = kn.NanoGPT(20, 8, 1, 2, 8, use_bias=True)
    optimizer = kn.training.nanogpt_optimizer(10, warmup_steps=1)
    decayed = {v.path for v in model.trainable_variables if optimizer._use_weight_decay(v)}
    kept = {v.path for v in model.trainable_variables} - decayed
    assert all(len(v.shape) == 2 for v in model.trainable_variables if v.path in decayed)
    assert any("token_embedding" in p for p in decayed) and any("qkv/kernel" in p for p in decayed)
    assert any("bias" in p for p in kept) and any("gamma" in p for p in kept)
    assert all(len(v.shape) == 1 for v in model.trainable_variables if v.path in kept)


def test_decay_shrinks_matrices_but_not_layer_norms():
    model = kn.NanoGPT(20, 8, 1, 2, 8)
    model.compile(optimizer=kn.training.nanogpt_optimizer(
        10, learning_rate=0.5, min_learning_rate=0.5, warmup_steps=0, weight_decay=1.0))
    kernel = model.blocks[0].mlp_dense.kernel
    gamma = model.blocks[0].mlp_norm.gamma
    before_kernel, before_gamma = to_numpy(kernel).copy(), to_numpy(gamma).copy()
    zeros = [keras.ops.zeros(v.shape) for v in model.trainable_variables]
    model.optimizer.apply_gradients(zip(zeros, model.trainable_variables))
    np.testing.assert_allclose(to_numpy(kernel), before_kernel * 0.5, rtol=1e-5)
    np.testing.assert_allclose(to_numpy(gamma), before_gamma)


def test_compiled_model_saves_and_resumes(tmp_path, small_text, char_vectorizer):
    keras.utils.set_random_seed(0)
    train, val = kn.data.make_datasets(small_text, char_vectorizer, 32, 16, seed=0)
    model = kn.NanoGPT(char_vectorizer.vocabulary_size(), 32, 2, 2, 32, vectorizer=char_vectorizer)
    model.compile(optimizer=kn.training.nanogpt_optimizer(200, learning_rate=3e-3, warmup_steps=10))
    before = model.evaluate(val, verbose=0)[0]
    model.fit(train.repeat(), steps_per_epoch=100, epochs=1, verbose=0)
    after = model.evaluate(val, verbose=0)[0]
    assert after < before - 1.0
    model.save(tmp_path / "m.keras")
    loaded = kn.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, kn.training.MatrixDecayAdamW)
    assert int(to_numpy(loaded.optimizer.iterations)) == 100
    loaded.fit(train.repeat(), steps_per_epoch=5, epochs=1, verbose=0)
    assert int(to_numpy(loaded.optimizer.iterations)) == 105


@pytest.mark.parametrize("kwargs, argument", [
    (dict(total_steps=0), "total_steps"),
    (dict(warmup_steps=500), "warmup_steps"),
    (dict(learning_rate=0), "learning_rate"),
    (dict(min_learning_rate=1.0), "min_learning_rate"),
    (dict(beta_2=1.0), "beta_2"),
    (dict(clipnorm=-1), "clipnorm"),
    (dict(gradient_accumulation_steps=1), "gradient_accumulation_steps"),
])
def test_bad_optimizer_arguments(kwargs, argument):
    arguments = dict(total_steps=100, warmup_steps=10)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        kn.training.nanogpt_optimizer(**arguments)


def test_recipes_name_their_architecture_optimizer_and_reference_run():
    from keras_nanogpt import cli

    recipes = kn.training.RECIPES
    assert set(recipes) == {"modern", "speedrun", "nanogpt", "adam"}
    commands = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    recipe_choices = next(a.choices for a in commands["train"]._actions if a.dest == "recipe")
    assert set(recipe_choices) == set(recipes)  # --recipe offers the same table
    modern = recipes["modern"]
    assert (modern.batch_size, modern.sequence_length, modern.steps) == (32, 64, 150)
    model = modern.build(30, num_layers=1)
    assert model.num_layers == 1 and model.hidden_dim == 128 and model.position_embedding == "rotary"
    assert isinstance(model.optimizer, kn.training.MatrixDecayMuon) and model.optimizer.built
    assert model.optimizer._learning_rate.total_steps == 150
    assert modern.optimizer()._learning_rate.warmup_steps == 40  # the reference run's warmup
    assert modern.optimizer(750)._learning_rate.warmup_steps == 75  # another length: default_warmup
    nanogpt = recipes["nanogpt"].build(30, total_steps=500, num_layers=1)
    assert isinstance(nanogpt.optimizer, kn.training.MatrixDecayAdamW) and nanogpt.position_embedding == "learned"
    assert nanogpt.optimizer._learning_rate.total_steps == 500 and nanogpt.optimizer._learning_rate.final == 1e-4
    optimizer = kn.training.optimizer_for("nanogpt", 2000)
    assert optimizer._learning_rate.warmup_steps == 100 and isinstance(optimizer, kn.training.MatrixDecayAdamW)
    with pytest.raises(ValueError, match="`recipe` must be one of"):
        kn.training.optimizer_for("fast", 10)


def test_speedrun_recipe_fixes_its_architecture_optimizer_and_run():
    speedrun = kn.training.RECIPES["speedrun"]
    assert (speedrun.batch_size, speedrun.sequence_length, speedrun.steps) == (32, 64, 150)
    model = speedrun.build(30)
    assert (model.num_layers, model.hidden_dim, model.logit_softcap, model.position_embedding) == (2, 128, 15.0, "rotary")
    optimizer = model.optimizer
    assert isinstance(optimizer, kn.training.MatrixDecayMuon)
    assert (optimizer.adam_beta_1, optimizer.adam_beta_2) == (0.8, 0.95)
    schedule = optimizer._learning_rate
    assert (schedule.total_steps, schedule.warmup_steps, schedule.peak) == (150, 10, 0.015)
    assert optimizer.adam_lr_ratio == pytest.approx(0.04 / 0.015)
    # A learning rate given is Muon's, AdamW's keeping its ratio; other settings reach muon_optimizer.
    tuned = speedrun.optimizer(300, learning_rate=0.03, ns_steps=3, adam_beta_2=0.99)
    assert tuned._learning_rate.peak == 0.03 and tuned.adam_lr_ratio == pytest.approx(0.04 / 0.015)
    assert (tuned.ns_steps, tuned.adam_beta_2, tuned._learning_rate.warmup_steps) == (3, 0.99, 30)
    given = speedrun.optimizer(learning_rate=0.01, adam_learning_rate=0.003)  # AdamW's rate given: kept
    assert given._learning_rate.peak == 0.01 and given.adam_lr_ratio == pytest.approx(0.3)
    modern = kn.training.RECIPES["modern"].optimizer(learning_rate=0.02)
    assert modern._learning_rate.peak == 0.02 and modern.adam_lr_ratio == pytest.approx(0.3)
    assert kn.training.optimizer_for("speedrun", 150)._learning_rate.warmup_steps == 10  # the reference run's
    with pytest.raises(TypeError, match="beta_3"):
        speedrun.optimizer(beta_3=0.5)


def test_a_training_job_runs_from_python_and_saves_a_model_that_loads(small_text, tmp_path):
    """`kn.training.train(TrainingJob(...))` is `keras-nanogpt train` with the same flags, from Python."""
    (tmp_path / "corpus.txt").write_text(small_text[:6000], encoding="utf-8")
    job = kn.training.TrainingJob(text=str(tmp_path / "corpus.txt"), out=str(tmp_path / "m.keras"), layers=1,
                                  heads=2, hidden_dim=16, sequence_length=16, batch_size=8, steps=3,
                                  checkpoint_every=2, validation_split=0.1, verbose=0)
    assert (job.recipe, job.seed, job.total_steps) == ("modern", 1337, 4)  # the CLI's defaults; steps rounded up
    lines = []
    result = kn.training.train(job, log=lines.append)
    assert (result.out, result.steps, result.resumed, lines) == (job.out, 4, 0, [])
    assert len(result.history.history["loss"]) == 2 and "val_loss" in result.history.history
    loaded = kn.load_model(job.out)
    assert int(to_numpy(loaded.optimizer.iterations)) == 4 and loaded.position_embedding == "rotary"
    assert isinstance(loaded.optimizer, kn.training.MatrixDecayMuon)
    assert loaded.generate("It is", max_new_tokens=3, temperature=0.0).startswith("It is")


def test_an_epochs_job_makes_whole_passes_over_the_text_windows(small_text, tmp_path):
    """`epochs=2`: twice the batches of one pass over the (un-repeated) training windows, one history entry each."""
    (tmp_path / "corpus.txt").write_text(small_text[:3000], encoding="utf-8")
    job = kn.training.TrainingJob(text=str(tmp_path / "corpus.txt"), out=str(tmp_path / "m.keras"), layers=1,
                                  heads=2, hidden_dim=16, sequence_length=16, batch_size=8, epochs=2,
                                  validation_split=0.1, verbose=0)
    assert job.total_steps is None
    result = kn.training.train(job, log=lambda line: None)
    assert len(result.history.history["loss"]) == 2 and result.steps > 0 and result.steps % 2 == 0
    assert int(to_numpy(kn.load_model(job.out).optimizer.iterations)) == result.steps


@pytest.mark.parametrize("arguments, message", [
    (dict(steps=0), "`steps` must be an integer >= 1"),
    (dict(steps=10, epochs=1), "not both"),
    (dict(recipe="fast"), "`recipe` must be one of ('modern', 'speedrun', 'nanogpt', 'adam')"),
    (dict(out="m.h5"), "`out` must end in .keras"),
    (dict(lora_rank=2), "give `init`"),
    (dict(init="base.keras", layers=2), "`layers` cannot be combined with `init`"),
    (dict(text=None), "Give `text` (a corpus name or a text file) or `data`"),
    (dict(data="shards"), "one of them"),
    (dict(text=None, data="/no/such/shards"), "`data` '/no/such/shards' does not exist"),
    (dict(text=None, data=".", epochs=1), "`epochs` and `level` are for `text`"),
])
def test_a_training_job_names_a_bad_field_when_made(arguments, message):
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as caught:
        kn.training.TrainingJob(**{"text": "corpus.txt", "out": "m.keras", **arguments})
    assert message in str(caught.value)
