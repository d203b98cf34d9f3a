"""LoRA fine-tuning: Keras's `Dense.enable_lora` on NanoGPT's projections, through plain `fit`.

Only the adapters change while the loss falls; a saved model loads in a fresh process with the same
logits and adapters and trains on; merged and unmerged logits agree; an imported GPT-2 and the
command line (`train --init ... --lora-rank R`) fine-tune the same way.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import BACKEND, QUICK_COMPILE, SHAKESPEARE_SAMPLE, to_numpy

import keras_nanogpt as kn
from keras_nanogpt import cli

WORKTREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def windows(vectorizer, text, count=16, length=16):
    ids = kn.data.encode(vectorizer, text)
    rows = np.stack([ids[i:i + length + 1] for i in range(0, count * length, length)]).astype("int32")
    return rows[:, :-1], rows[:, 1:]


def values(model):
    return {variable.path: to_numpy(variable) for variable in model.weights}


def fit(model, x, y, epochs=4):
    model.compile(optimizer=keras.optimizers.Adam(1e-2), **QUICK_COMPILE)
    return model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False).history["loss"]


def perturb_adapters(model, seed=0):
    """Non-zero adapters without training (a fresh adapter adds nothing: its `b` is zero)."""
    rng = np.random.default_rng(seed)
    for layer in kn.adapters.lora_layers(model):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            variable.assign(0.05 * rng.standard_normal(variable.shape).astype("float32"))


@pytest.fixture()
def small_model(char_vectorizer):
    keras.utils.set_random_seed(0)
    return kn.NanoGPT(char_vectorizer.vocabulary_size(), 16, 1, 2, 32, vectorizer=char_vectorizer)


@pytest.fixture(scope="module")
def tuned(char_vectorizer, small_text):
    """A model with biases and an untied head (every target and every kind of frozen weight), after
    `enable_lora(4, every target, alpha=8)` and 4 epochs of `fit`: `(model, x, y, values before, losses)`."""
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(char_vectorizer.vocabulary_size(), 16, 1, 2, 32, use_bias=True, tie_embeddings=False,
                       vectorizer=char_vectorizer)
    model.enable_lora(4, target=kn.adapters.LORA_TARGETS, alpha=8)
    x, y = windows(char_vectorizer, small_text)
    before = values(model)
    return model, x, y, before, fit(model, x, y)


def test_fit_trains_only_the_adapters(tuned):
    model, _, _, before, losses = tuned
    layers = [layer for _, layer in kn.adapters.role_layers(model)]
    assert len(layers) == 5 and all(layer.lora_enabled for layer in layers)
    expected = sum(4 * (layer.kernel.shape[0] + layer.kernel.shape[1]) for layer in layers)
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == expected
    changed = {path for path, value in values(model).items() if not np.array_equal(before[path], value)}
    adapters = {path for path in before if "/lora_kernel_" in path}
    assert changed == adapters and len(adapters) == 10  # kernels, biases, norms, embeddings unchanged
    assert losses[-1] < losses[0] - 0.05, losses


def test_saved_adapters_load_in_a_fresh_process_and_train_on(tuned, tmp_path):
    model, x, y, _, _ = tuned
    path = tmp_path / "lora.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x[:2])
    script = (
        "import sys, json, numpy as np, keras, keras_nanogpt as kn\n"
        "model = keras.models.load_model(sys.argv[1])\n"
        "np.save(sys.argv[2], keras.ops.convert_to_numpy(model(np.load(sys.argv[3]))))\n"
        "print(json.dumps({'lora': model.get_config()['lora'],\n"
        "                  'trainable': sorted(v.path for v in model.trainable_variables)}))\n")
    environment = dict(os.environ, KERAS_BACKEND=BACKEND, PYTHONPATH=WORKTREE)
    fresh = subprocess.Popen([sys.executable, "-c", script, str(path), str(tmp_path / "logits.npy"),
                              str(tmp_path / "x.npy")], env=environment, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)

    loaded = kn.load_model(path)  # meanwhile here: the adapters themselves come back, and training goes on
    for ours, theirs in zip(kn.adapters.lora_layers(model), kn.adapters.lora_layers(loaded)):
        np.testing.assert_array_equal(to_numpy(ours.lora_kernel_b), to_numpy(theirs.lora_kernel_b))
        np.testing.assert_allclose(to_numpy(ours._kernel), to_numpy(theirs._kernel), atol=1e-7)
    assert int(to_numpy(loaded.optimizer.iterations)) == 8
    before = values(loaded)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(to_numpy(loaded.optimizer.iterations)) == 10
    changed = {p for p, v in values(loaded).items() if not np.array_equal(v, before[p])}
    assert changed == {p for p in before if "/lora_kernel_" in p}

    out, err = fresh.communicate(timeout=600)
    assert fresh.returncode == 0, err[-2000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["lora"] == {"rank": 4, "alpha": 8.0, "target": list(kn.adapters.LORA_TARGETS)}
    assert report["trainable"] == sorted(v.path for v in model.trainable_variables)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), to_numpy(model(x[:2])), rtol=0, atol=1e-5)


def test_merged_logits_equal_unmerged(small_model, char_vectorizer, small_text):
    model = small_model
    x, _ = windows(char_vectorizer, small_text, count=2)
    base = to_numpy(model(x))
    model.enable_lora(4)
    perturb_adapters(model)
    prompt = x[:1, :5]
    unmerged, generated = to_numpy(model(x)), model.generate(prompt, max_new_tokens=6, temperature=0)
    assert np.abs(unmerged - base).max() > 1e-2  # the adapters matter
    model.merge_lora()
    np.testing.assert_allclose(to_numpy(model(x)), unmerged, rtol=0, atol=1e-5)
    # Generation compiled before the merge is made again for the merged weights.
    np.testing.assert_array_equal(model.generate(prompt, max_new_tokens=6, temperature=0), generated)
    assert not any("lora" in v.path for v in model.weights) and "lora" not in model.get_config()
    assert len(model.trainable_variables) == len(model.weights)  # everything trainable again
    model.enable_lora(2)  # and a new round of adapters can start
    assert len(model.trainable_variables) == 8


def test_mixed_precision_adapters_round_trip_exactly(char_vectorizer, small_text, tmp_path):
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(char_vectorizer.vocabulary_size(), 16, 1, 2, 32, dtype="mixed_bfloat16")
    model.enable_lora(2)
    perturb_adapters(model)
    x, _ = windows(char_vectorizer, small_text, count=2)
    model.save(tmp_path / "mixed.keras")
    loaded = kn.load_model(tmp_path / "mixed.keras")
    assert loaded.blocks[0].mlp_dense.compute_dtype == "bfloat16"
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))
    for ours, theirs in zip(kn.adapters.lora_layers(model), kn.adapters.lora_layers(loaded)):
        # Keras saves the merged kernel in bfloat16 here; the float32 kernel comes back all the same.
        np.testing.assert_array_equal(to_numpy(ours._kernel), to_numpy(theirs._kernel))


def test_imported_gpt2_fine_tunes_with_lora(tmp_path):
    torch = pytest.importorskip("torch", reason="the GPT-2 reference runs in PyTorch (a test dependency)")
    transformers = pytest.importorskip("transformers", reason="GPT-2 references (a test dependency)")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=None, eos_token_id=None)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    model = kn.convert.from_huggingface_gpt2(tmp_path, dropout=0.0)
    model.enable_lora(4)
    ids = np.tile(np.arange(17) * 3 % 64, (16, 1)).astype("int32")  # one repeated sequence to learn
    before = values(model)
    losses = fit(model, ids[:, :-1], ids[:, 1:], epochs=4)
    assert losses[-1] < losses[0] - 0.05, losses
    changed = {p for p, v in values(model).items() if not np.array_equal(v, before[p])}
    assert changed == {p for p in before if "/lora_kernel_" in p}  # GPT-2's biases stay frozen too


def test_command_line_fine_tunes_a_saved_model(small_model, small_text, tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(small_text[:3000], encoding="utf-8")
    small_model.save(tmp_path / "base.keras")
    arguments = ["train", "--init", str(tmp_path / "base.keras"), "--lora-rank", "2", "--text",
                 str(tmp_path / "corpus.txt"), "--steps", "6", "--checkpoint-every", "3", "--batch-size", "4", "--validation-split", "0", "--verbose", "0", "--out", str(tmp_path / "tuned.keras")]
    assert cli.main(arguments) == 0
    assert "fine-tuning" in capsys.readouterr().out
    tuned = kn.load_model(tmp_path / "tuned.keras")
    assert kn.adapters.lora_config(tuned) == {"rank": 2, "alpha": 2.0, "target": list(kn.adapters.DEFAULT_LORA_TARGETS)}
    assert int(to_numpy(tuned.optimizer.iterations)) == 6
    base = values(small_model)
    for path, value in values(tuned).items():
        if "lora_kernel" not in path:  # the frozen weights are the saved model's
            np.testing.assert_allclose(value, base[path], atol=1e-6, err_msg=path)


def test_command_line_reads_a_gpt2_folder(tmp_path):
    torch = pytest.importorskip("torch", reason="the GPT-2 reference runs in PyTorch (a test dependency)")
    transformers = pytest.importorskip("transformers", reason="GPT-2 references (a test dependency)")
    import tokenizers

    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([SHAKESPEARE_SAMPLE * 3], vocab_size=300, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    bpe.save_model(str(tmp_path))
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=16, n_embd=32, n_layer=1,
                                     n_head=2, bos_token_id=None, eos_token_id=None)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    (tmp_path / "corpus.txt").write_text(SHAKESPEARE_SAMPLE, encoding="utf-8")
    arguments = ["train", "--init", str(tmp_path), "--lora-rank", "2", "--text", str(tmp_path / "corpus.txt"),
                 "--dropout", "0", "--out", "unused.keras"]
    args = cli.build_parser().parse_args(arguments)
    job = kn.training.TrainingJob(text=args.text, out=args.out, init=args.init, lora_rank=args.lora_rank,
                                  dropout=args.dropout)
    model = kn.training._initial_model(job, kn.training._Source(job), log=print)  # what `train` then fits
    assert kn.adapters.lora_config(model)["rank"] == 2 and model.use_bias and model.dropout == 0
    assert model.vectorizer is not None and model.vocabulary_size == bpe.get_vocab_size()


@pytest.mark.parametrize("arguments, message", [
    ((0,), "`rank`"),
    ((2, "attention"), "`target`"),
    ((2, ()), "`target`"),
    ((2, "head"), "tie_embeddings=True"),
    ((2, "qkv", -1.0), "`alpha`"),
])
def test_bad_lora_arguments_are_refused(small_model, arguments, message):
    with pytest.raises((ValueError, TypeError), match=message):
        small_model.enable_lora(*arguments)
    assert not kn.adapters.lora_layers(small_model)  # nothing was changed


def test_lora_states_that_cannot_combine_are_refused(small_model):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        small_model.merge_lora()
    small_model.enable_lora(2)
    with pytest.raises(ValueError, match="already enabled"):
        small_model.enable_lora(2)
    with pytest.raises(ValueError, match="merge_lora"):
        small_model.quantize("int8")
    small_model.merge_lora()
    small_model.quantize("int8")
    with pytest.raises(ValueError, match="quantized"):
        small_model.enable_lora(2)


@pytest.mark.parametrize("extra, message", [
    (["--lora-rank", "2"], "--init"),
    (["--init", "base.keras", "--layers", "2"], "--layers"),
    (["--init", "base.keras", "--lora-rank", "0"], "--lora-rank"),
    (["--init", "model.bin"], "`--init`"),
])
def test_bad_fine_tune_options_are_refused(extra, message, tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("abc" * 100)
    code = cli.main(["train", "--text", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "o.keras"), *extra])
    assert code == 2 and message in capsys.readouterr().err
