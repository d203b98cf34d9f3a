"""Subword, byte and BPE tokenizers: round trips, reserved ids, saving with the model, errors."""

import json
import os
import warnings

import keras
import numpy as np
import pytest
from conftest import SHAKESPEARE_SAMPLE, to_numpy

import keras_nanogpt as kn

SAMPLE = "It is a truth universally acknowledged, that a single man\nin possession of a good fortune."


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory, small_text):
    """A tiny GPT-2 style vocab.json + merges.txt (all 256 byte symbols, ~150 merges) learned here."""
    import tokenizers

    directory = tmp_path_factory.mktemp("bpe")
    trainer = tokenizers.ByteLevelBPETokenizer()
    trainer.train_from_iterator([small_text], vocab_size=420, min_frequency=2,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    trainer.save_model(str(directory))
    return str(directory / "vocab.json"), str(directory / "merges.txt")


@pytest.fixture(scope="module")
def vectorizers(small_text, bpe_files):
    """One vectorizer of every level, learned from the same 20k characters."""
    made = {level: kn.data.make_vectorizer(small_text, level=level)
            for level in ("char", "word", "wordpiece", "sentencepiece", "byte")}
    made["bpe"] = kn.data.make_vectorizer(level="bpe", vocabulary=bpe_files[0], merges=bpe_files[1])
    return made


@pytest.mark.parametrize("level", ["char", "sentencepiece", "byte", "bpe"])
def test_lossless_levels_round_trip_exactly(vectorizers, small_text, level):
    vectorizer = vectorizers[level]
    unseen = "Unseen: 中文 😀 ﬁ\t  two  spaces\n\n"  # beyond a char vocabulary learned from the text
    for text in (small_text,) if level == "char" else (small_text, unseen):
        ids = kn.data.encode(vectorizer, text)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert kn.data.decode(vectorizer, ids) == text
    assert len(kn.data.encode(vectorizer, small_text)) <= len(small_text.encode("utf-8"))


def test_subwords_are_shorter_than_characters(vectorizers, small_text):
    lengths = {level: len(kn.data.encode(v, small_text)) for level, v in vectorizers.items()}
    assert lengths["byte"] > lengths["char"] > lengths["wordpiece"] > lengths["word"]
    assert lengths["char"] > 2 * lengths["sentencepiece"]
    assert lengths["char"] > 1.5 * lengths["bpe"]  # a 420-token vocabulary


def test_wordpiece_keeps_case_and_splits_punctuation(vectorizers):
    vectorizer = vectorizers["wordpiece"]
    vocabulary = vectorizer.get_vocabulary()
    assert vocabulary[:2] == ["[PAD]", "[UNK]"] and any(t.startswith("##") for t in vocabulary)
    ids = kn.data.encode(vectorizer, SAMPLE)
    text = kn.data.decode(vectorizer, ids)
    assert text == " ".join(SAMPLE.replace(",", " ,").replace(".", " .").split())
    np.testing.assert_array_equal(kn.data.encode(vectorizer, text), ids)
    assert kn.data.decode(vectorizer, np.concatenate([[0, 0], ids])) == text  # padding dropped


def test_wordpiece_unknown_characters_warn(vectorizers):
    vectorizer = vectorizers["wordpiece"]
    ids = kn.data.encode(vectorizer, "It is 中")
    assert ids[-1] == 1
    with pytest.warns(UserWarning, match="out-of-vocabulary id 1"):
        kn.data.warn_unknown(vectorizer, "It is 中", ids)


def test_sentencepiece_reserves_padding_and_falls_back_to_bytes(vectorizers):
    vectorizer = vectorizers["sentencepiece"]
    vocabulary = vectorizer.get_vocabulary()
    assert vocabulary[:3] == ["<pad>", "<unk>", "\n"] and "<0xE4>" in vocabulary
    ids = kn.data.encode(vectorizer, "中")
    assert 1 not in ids and len(ids) == 3  # three UTF-8 bytes, nothing out of vocabulary
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kn.data.warn_unknown(vectorizer, "中", ids)


def test_default_and_chosen_vocabulary_sizes(vectorizers, small_text):
    assert kn.data.DEFAULT_MAX_TOKENS == {"wordpiece": 2048, "sentencepiece": 2048}
    for level in ("wordpiece", "sentencepiece"):
        assert 100 < kn.data.vocabulary_size(vectorizers[level]) <= 2048
    assert kn.data.vocabulary_size(kn.data.make_vectorizer(
        small_text, level="sentencepiece", max_tokens=400)) == 400
    assert kn.data.vocabulary_size(kn.data.make_vectorizer(
        small_text, level="wordpiece", max_tokens=120)) <= 120


def test_byte_level_needs_no_text(small_text):
    vectorizer = kn.data.make_vectorizer(level="byte")
    assert kn.data.vocabulary_size(vectorizer) == 256
    np.testing.assert_array_equal(kn.data.encode(vectorizer, "é!"), [195, 169, 33])
    assert kn.data.decode(vectorizer, [195]) == "\ufffd"  # a cut multi-byte character
    assert kn.data.decode(vectorizer, [0, 104, 105]) == "hi"  # keras-hub reads byte 0 as padding
    assert kn.data.make_vectorizer(small_text, level="byte").vocabulary_size() == 256


def test_bpe_matches_the_gpt2_tokenizer(vectorizers, bpe_files):
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    directory = os.path.dirname(bpe_files[0])
    reference = transformers.GPT2Tokenizer.from_pretrained(directory)
    text = SHAKESPEARE_SAMPLE + " I'm 1234 can't  two  spaces\n<|endoftext|>é中😀 's"
    ids = kn.data.encode(vectorizers["bpe"], text)
    np.testing.assert_array_equal(ids, reference(text)["input_ids"])
    end_of_text = json.load(open(bpe_files[0], encoding="utf-8"))["<|endoftext|>"]
    assert list(ids).count(end_of_text) == 1
    assert kn.data.decode(vectorizers["bpe"], ids) == text


def test_bpe_vocabulary_missing_bytes_warns(bpe_files):
    vocabulary = json.load(open(bpe_files[0], encoding="utf-8"))
    merges = [m for m in open(bpe_files[1], encoding="utf-8").read().splitlines()[1:] if "~" not in m]
    vocabulary = {token: i for i, token in enumerate(t for t in vocabulary if "~" not in t)}
    vectorizer = kn.data.make_vectorizer(level="bpe", vocabulary=vocabulary, merges=merges)
    ids = kn.data.encode(vectorizer, "a~b")
    assert kn.data.decode(vectorizer, ids) == "ab"
    with pytest.warns(UserWarning, match="cannot spell"):
        kn.data.warn_unknown(vectorizer, "a~b", ids)


def test_nanogpt_char_vocabulary_keeps_its_ids():
    chars = sorted(set(SHAKESPEARE_SAMPLE))  # nanoGPT's meta.pkl order
    vectorizer = kn.data.make_vectorizer(level="char", vocabulary=chars)
    assert kn.data.vocabulary_size(vectorizer) == len(chars)
    ids = kn.data.encode(vectorizer, SHAKESPEARE_SAMPLE)
    np.testing.assert_array_equal(ids, [chars.index(c) for c in SHAKESPEARE_SAMPLE])
    assert kn.data.decode(vectorizer, ids) == SHAKESPEARE_SAMPLE  # id 0 ("\n") is not padding
    with pytest.raises(ValueError, match="no out-of-vocabulary id.*'q'"):
        kn.data.encode(vectorizer, "quiet")
    config = kn.data.vectorizer_to_config(vectorizer)
    assert config == {"level": "char", "vocabulary": chars}
    assert kn.data.decode(kn.data.vectorizer_from_config(config), ids) == SHAKESPEARE_SAMPLE


@pytest.mark.parametrize("level", ["char", "word", "wordpiece", "sentencepiece", "byte", "bpe"])
def test_every_level_feeds_saves_and_generates_text(vectorizers, small_text, tmp_path, level):
    vectorizer = vectorizers[level]
    size = kn.data.vocabulary_size(vectorizer)
    train, _ = kn.data.make_datasets(small_text, vectorizer, sequence_length=16, batch_size=8, seed=0)
    x, y = (np.asarray(t) for t in next(iter(train)))
    assert x.shape == (8, 16) and x.max() < size
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(size, 16, num_layers=1, num_heads=2, hidden_dim=16, vectorizer=vectorizer)
    config = json.loads(json.dumps(model.get_config()))  # plain JSON, proto bytes as base64
    assert config["vectorizer"]["level"] == level
    path = str(tmp_path / f"{level}.keras")
    model.save(path)
    loaded = kn.load_model(path)
    assert type(loaded.vectorizer) is type(vectorizer)
    np.testing.assert_array_equal(kn.data.encode(loaded.vectorizer, SAMPLE), kn.data.encode(vectorizer, SAMPLE))
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-6)
    prompt = "It is a truth"
    text = loaded.generate(prompt, max_new_tokens=3, temperature=0)
    assert isinstance(text, str) and text.startswith(prompt) and len(text) > len(prompt)
    assert text == model.generate(prompt, max_new_tokens=3, temperature=0)


def test_a_subword_model_trains(vectorizers, small_text):
    vectorizer = vectorizers["sentencepiece"]
    train, val = kn.data.make_datasets(small_text, vectorizer, sequence_length=16, batch_size=8, seed=0)
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(kn.data.vocabulary_size(vectorizer), 16, num_layers=1, num_heads=2, hidden_dim=16)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(train.take(20), validation_data=val.take(2), epochs=2, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(level="bpe"), ValueError, "needs `vocabulary`"),
    (dict(text="abc", level="char", merges=["a b"]), ValueError, "merges"),
    (dict(level="byte", max_tokens=10), ValueError, "max_tokens"),
    (dict(level="char", vocabulary=["a", "b"], max_tokens=10), ValueError, "max_tokens"),
    (dict(text="abc", level="sentencepiece", max_tokens=2.5), TypeError, "max_tokens"),
    (dict(level="wordpiece"), TypeError, "text"),
    (dict(level="char", vocabulary="abc"), TypeError, "list of strings"),
    (dict(level="char", vocabulary=["ab", "c"]), ValueError, "single characters"),
    (dict(level="char", vocabulary=["a", "a"]), ValueError, "repeats"),
    (dict(level="word", vocabulary=["it", "is"]), ValueError, "must begin with"),
    (dict(level="wordpiece", vocabulary=["[PAD]", "a"]), ValueError, r"\[UNK\]"),
    (dict(level="sentencepiece", vocabulary=b"not a proto"), ValueError, "sentencepiece"),
    (dict(level="bpe", vocabulary="/no/such/vocab.json", merges=["a b"]), FileNotFoundError, "vocab.json"),
    (dict(level="bpe", vocabulary={"a": 0, "b": 1, "ab": 2}, merges=["a b c"]), ValueError, "merges"),
    (dict(text="abc" * 100, level="sentencepiece", max_tokens=5), ValueError, "max_tokens=5"),
])
def test_bad_vectorizer_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        kn.data.make_vectorizer(**kwargs)


def test_bad_vocabulary_file_is_named(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="vocab.json.*not valid JSON"):
        kn.data.make_vectorizer(level="bpe", vocabulary=str(path), merges=["a b"])


@pytest.mark.parametrize("config", [
    {"level": "bpe", "vocabulary": "/etc/passwd", "merges": "/etc/passwd"},  # never a path from a file
    {"level": "wordpiece", "vocabulary": "vocab.txt"},
    {"level": "sentencepiece", "vocabulary": ["a"]},
    {"level": "byte", "vocabulary": []},
    {"level": "syllable", "vocabulary": []},
    ["char"],
])
def test_vectorizer_config_holds_data_not_paths(config):
    with pytest.raises(ValueError, match="`vectorizer` config"):
        kn.data.vectorizer_from_config(config)


def test_other_layers_are_not_vectorizers():
    with pytest.raises(TypeError, match="make_vectorizer"):
        kn.data.encode(keras.layers.Dense(3), "abc")
