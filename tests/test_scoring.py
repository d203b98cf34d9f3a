"""Scoring: per-token log-probabilities, total NLL, perplexity and bits per character (kn.score).

Checked against the model's own cross-entropy on the same windows, against `model.evaluate` on the
validation windows, and against a brute-force loop for overlapping windows.
"""

import json
import math

import keras
import numpy as np
import pytest
from conftest import QUICK_COMPILE, to_numpy

import keras_nanogpt as kn
from keras_nanogpt import cli


@pytest.fixture(scope="module")
def model(char_vectorizer):
    """A 1-layer, 32-wide char model (shared: scoring changes nothing, so its compiled function is reused)."""
    keras.utils.set_random_seed(0)
    return kn.NanoGPT(vocabulary_size=char_vectorizer.vocabulary_size(), sequence_length=32,
                      num_layers=1, num_heads=2, hidden_dim=32, vectorizer=char_vectorizer)


@pytest.fixture()
def text_ids(char_vectorizer, small_text):
    return kn.data.encode(char_vectorizer, small_text[:3 * 32 + 1]).astype("int32")  # 3 windows of 32


def test_score_is_the_models_cross_entropy_on_its_windows(model, text_ids):
    result = kn.score(model, text_ids)  # 3 windows in a batch of 8: padded
    windows = np.stack([text_ids[i:i + 33] for i in range(0, 96, 32)])  # (3, 33), as make_datasets cuts them
    logits = model(windows[:, :-1], training=False)
    nll = to_numpy(keras.losses.sparse_categorical_crossentropy(windows[:, 1:], logits, from_logits=True))
    assert result.num_tokens == 96 and result.log_probs.shape == (96,)
    np.testing.assert_allclose(-result.log_probs, nll.reshape(-1), rtol=1e-5, atol=1e-6)
    assert result.total_nll == pytest.approx(float(nll.sum()), rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(float(nll.mean())), rel=1e-6)
    assert result.bits_per_token == pytest.approx(float(nll.mean()) / math.log(2), rel=1e-6)


def test_total_over_a_text_is_evaluate_loss_times_tokens(model, char_vectorizer, small_text):
    _, validation = kn.data.make_datasets(small_text[:3000], char_vectorizer, model.sequence_length,
                                          batch_size=4, validation_split=0.3)
    model.compile(**QUICK_COMPILE)
    loss = model.evaluate(validation, verbose=0, return_dict=True)["loss"]
    batches = list(validation.as_numpy_iterator())
    ids = np.concatenate([batches[0][0][0, :1]] + [y.reshape(-1) for _, y in batches])  # first id, then targets
    result = model.score(ids)
    assert result.num_tokens == len(ids) - 1 > 800
    assert result.total_nll == pytest.approx(loss * result.num_tokens, rel=1e-5)


def test_a_short_stride_gives_each_token_its_full_context(model, text_ids):
    ids = text_ids[:45]
    context = model.sequence_length  # 32
    result = kn.score(model, ids, stride=1)
    # Token j + 1 after the (up to) `context` tokens before it: one window per token, right-padded
    # (a causal model's earlier positions do not see the padding), all in one forward pass.
    windows = np.zeros((len(ids) - 1, context), "int32")
    ends = []
    for j in range(len(ids) - 1):
        window = ids[max(0, j + 1 - context):j + 1]
        windows[j, :len(window)] = window
        ends.append(len(window) - 1)
    log_probs = to_numpy(keras.ops.log_softmax(model(windows, training=False), axis=-1))
    expected = log_probs[np.arange(len(ids) - 1), ends, ids[1:]]
    np.testing.assert_allclose(result.log_probs, expected, rtol=1e-5, atol=1e-5)
    overlapping = kn.score(model, ids, stride=8)  # each token once, windows 8 apart
    assert overlapping.num_tokens == 44
    np.testing.assert_allclose(overlapping.log_probs[:32], result.log_probs[:32], rtol=1e-5, atol=1e-5)


def test_text_gives_bits_per_character(model, small_text):
    text = small_text[:200]
    result = model.score(text)
    assert result.num_tokens == len(text) - 1 and result.num_characters == len(text) - 1
    assert np.all(result.log_probs <= 0)
    assert result.bits_per_character == pytest.approx(result.mean_nll / math.log(2), rel=1e-6)
    assert kn.score(model, text).total_nll == pytest.approx(result.total_nll, rel=1e-6)
    assert kn.scoring.Score(result.token_ids, result.log_probs).bits_per_character is None  # no vectorizer


@pytest.mark.parametrize("inputs, options, message", [
    ([5], {}, "at least 2 tokens"),
    ([[1, 2, 3]], {}, "1-D integer"),
    ([1, 2, 3], {"stride": 0}, "`stride`"),
    ([1, 2, 3], {"stride": 33}, "at most the model's sequence_length"),
    ([1, 2, 3], {"batch_size": 0}, "`batch_size`"),
    ([1, 2, 999], {}, "`inputs`"),
])
def test_bad_input_is_refused(model, inputs, options, message):
    with pytest.raises(ValueError, match=message):
        kn.score(model, inputs, **options)


def test_text_needs_a_vectorizer():
    with pytest.raises(ValueError, match="vectorizer"):
        kn.score(kn.NanoGPT(10, 16, 1, 2, 16), "some text")


def test_cli_evaluate_reports_bits_per_character(model, small_text, tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(small_text[:4000], encoding="utf-8")
    model.save(tmp_path / "m.keras")
    assert cli.main(["evaluate", str(tmp_path / "m.keras"), "--text", str(tmp_path / "corpus.txt")]) == 0
    report = json.loads(capsys.readouterr().out)
    # A char vocabulary: one token per character, so bits per character is the loss in bits.
    assert report["bits_per_character"] == pytest.approx(report["validation_loss"] / math.log(2), abs=2e-4)


def test_evaluate_text_is_the_cli_report_unrounded(char_vectorizer, small_text):
    model = kn.NanoGPT(char_vectorizer.vocabulary_size(), 32, 1, 2, 32, vectorizer=char_vectorizer)  # compiled here
    report = kn.scoring.evaluate_text(model, small_text[:4000], validation_split=0.1, batch_size=8)
    assert set(report) == {"validation_loss", "perplexity", "bits_per_character", "accuracy"}
    assert report["perplexity"] == pytest.approx(math.exp(report["validation_loss"]))
    assert report["bits_per_character"] == pytest.approx(report["validation_loss"] / math.log(2), abs=2e-4)
    for split in (0, 1.0):
        with pytest.raises(ValueError, match="`validation_split` must be in"):
            kn.scoring.evaluate_text(model, small_text, validation_split=split)
