"""Subword, byte and BPE tokenizers: round trips, reserved ids, saving with the model, errors."""

import json
import os
import warnings

import keras
import numpy as np
import pytest
from conftest import SHAKESPEARE_SAMPLE, tiktoken_ranks, to_numpy

import keras_nanogpt as kn
from keras_nanogpt.tokenizers import END_OF_TEXT, Tokenizer

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
        ids = Tokenizer(vectorizer).encode(text)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert Tokenizer(vectorizer).decode(ids) == text
    assert len(Tokenizer(vectorizer).encode(small_text)) <= len(small_text.encode("utf-8"))


def test_subwords_are_shorter_than_characters(vectorizers, small_text):
    lengths = {level: len(Tokenizer(v).encode(small_text)) for level, v in vectorizers.items()}
    assert lengths["byte"] > lengths["char"] > lengths["wordpiece"] > lengths["word"]
    assert lengths["char"] > 2 * lengths["sentencepiece"]
    assert lengths["char"] > 1.5 * lengths["bpe"]  # a 420-token vocabulary


def test_wordpiece_keeps_case_and_splits_punctuation(vectorizers):
    vectorizer = vectorizers["wordpiece"]
    vocabulary = vectorizer.get_vocabulary()
    assert vocabulary[:2] == ["[PAD]", "[UNK]"] and any(t.startswith("##") for t in vocabulary)
    ids = Tokenizer(vectorizer).encode(SAMPLE)
    text = Tokenizer(vectorizer).decode(ids)
    assert text == " ".join(SAMPLE.replace(",", " ,").replace(".", " .").split())
    np.testing.assert_array_equal(Tokenizer(vectorizer).encode(text), ids)
    assert Tokenizer(vectorizer).decode(np.concatenate([[0, 0], ids])) == text  # padding dropped


def test_wordpiece_unknown_characters_warn(vectorizers):
    vectorizer = vectorizers["wordpiece"]
    ids = Tokenizer(vectorizer).encode("It is 中")
    assert ids[-1] == 1
    with pytest.warns(UserWarning, match="out-of-vocabulary id 1"):
        Tokenizer(vectorizer).warn_unknown("It is 中", ids)


def test_sentencepiece_reserves_padding_and_falls_back_to_bytes(vectorizers):
    vectorizer = vectorizers["sentencepiece"]
    vocabulary = vectorizer.get_vocabulary()
    assert vocabulary[:3] == ["<pad>", "<unk>", "\n"] and "<0xE4>" in vocabulary
    ids = Tokenizer(vectorizer).encode("中")
    assert 1 not in ids and len(ids) == 3  # three UTF-8 bytes, nothing out of vocabulary
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Tokenizer(vectorizer).warn_unknown("中", ids)


def test_default_and_chosen_vocabulary_sizes(vectorizers, small_text):
    assert kn.data.DEFAULT_MAX_TOKENS == {"wordpiece": 2048, "sentencepiece": 2048}
    for level in ("wordpiece", "sentencepiece"):
        assert 100 < Tokenizer(vectorizers[level]).size <= 2048
    assert Tokenizer(kn.data.make_vectorizer(small_text, level="sentencepiece", max_tokens=400)).size == 400
    assert Tokenizer(kn.data.make_vectorizer(small_text, level="wordpiece", max_tokens=120)).size <= 120


def test_byte_level_needs_no_text(small_text):
    vectorizer = kn.data.make_vectorizer(level="byte")
    assert Tokenizer(vectorizer).size == 256
    np.testing.assert_array_equal(Tokenizer(vectorizer).encode("é!"), [195, 169, 33])
    assert Tokenizer(vectorizer).decode([195]) == "\ufffd"  # a cut multi-byte character
    assert Tokenizer(vectorizer).decode([0, 104, 105]) == "hi"  # keras-hub reads byte 0 as padding
    assert kn.data.make_vectorizer(small_text, level="byte").vocabulary_size() == 256


def test_bpe_matches_the_gpt2_tokenizer(vectorizers, bpe_files):
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    directory = os.path.dirname(bpe_files[0])
    reference = transformers.GPT2Tokenizer.from_pretrained(directory)
    text = SHAKESPEARE_SAMPLE + " I'm 1234 can't  two  spaces\n\n\n\nNext é中😀 's"
    tokenizer = Tokenizer(vectorizers["bpe"])
    ids = tokenizer.encode(text)
    np.testing.assert_array_equal(ids, reference(text)["input_ids"])
    assert tokenizer.decode(ids) == text
    end_of_text = json.load(open(bpe_files[0], encoding="utf-8"))[END_OF_TEXT]
    assert tokenizer.end_of_text_id == end_of_text and tokenizer.size == Tokenizer(vectorizers["bpe"]).size
    marked = tokenizer.encode("a<|endoftext|>b")  # plain text never yields a special id
    assert end_of_text not in marked.tolist() and tokenizer.decode(marked) == "a<|endoftext|>b"
    assert tokenizer.decode([end_of_text]) == END_OF_TEXT


def test_bpe_vocabulary_missing_bytes_warns(bpe_files):
    vocabulary = json.load(open(bpe_files[0], encoding="utf-8"))
    merges = [m for m in open(bpe_files[1], encoding="utf-8").read().splitlines()[1:] if "~" not in m]
    vocabulary = {token: i for i, token in enumerate(t for t in vocabulary if "~" not in t)}
    vectorizer = kn.data.make_vectorizer(level="bpe", vocabulary=vocabulary, merges=merges)
    ids = Tokenizer(vectorizer).encode("a~b")
    assert Tokenizer(vectorizer).decode(ids) == "ab"
    with pytest.warns(UserWarning, match="cannot spell"):
        Tokenizer(vectorizer).warn_unknown("a~b", ids)


def test_nanogpt_char_vocabulary_keeps_its_ids():
    chars = sorted(set(SHAKESPEARE_SAMPLE))  # nanoGPT's meta.pkl order
    vectorizer = kn.data.make_vectorizer(level="char", vocabulary=chars)
    assert Tokenizer(vectorizer).size == len(chars)
    ids = Tokenizer(vectorizer).encode(SHAKESPEARE_SAMPLE)
    np.testing.assert_array_equal(ids, [chars.index(c) for c in SHAKESPEARE_SAMPLE])
    assert Tokenizer(vectorizer).decode(ids) == SHAKESPEARE_SAMPLE  # id 0 ("\n") is not padding
    with pytest.raises(ValueError, match="no out-of-vocabulary id.*'q'"):
        Tokenizer(vectorizer).encode("quiet")
    config = Tokenizer(vectorizer).get_config()
    assert config == {"level": "char", "vocabulary": chars}
    assert Tokenizer.from_config(config).decode(ids) == SHAKESPEARE_SAMPLE


@pytest.mark.parametrize("level", ["char", "word", "wordpiece", "sentencepiece", "byte", "bpe"])
def test_every_level_feeds_saves_and_generates_text(vectorizers, small_text, tmp_path, level):
    vectorizer = vectorizers[level]
    size = Tokenizer(vectorizer).size
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
    np.testing.assert_array_equal(Tokenizer(loaded.vectorizer).encode(SAMPLE), Tokenizer(vectorizer).encode(SAMPLE))
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-6)
    prompt = "It is a truth"
    text = loaded.generate(prompt, max_new_tokens=3, temperature=0)
    assert isinstance(text, str) and text.startswith(prompt) and len(text) > len(prompt)
    assert text == model.generate(prompt, max_new_tokens=3, temperature=0)


def test_a_subword_model_trains(vectorizers, small_text):
    vectorizer = vectorizers["sentencepiece"]
    train, val = kn.data.make_datasets(small_text, vectorizer, sequence_length=16, batch_size=8, seed=0)
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(Tokenizer(vectorizer).size, 16, num_layers=1, num_heads=2, hidden_dim=16)
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
        Tokenizer.from_config(config).layer


def test_other_layers_are_not_vectorizers():
    with pytest.raises(TypeError, match="make_vectorizer"):
        Tokenizer(keras.layers.Dense(3)).encode("abc")


# The one Tokenizer type: fast encoding equal to the layers', special tokens, corpora, tiktoken.

def test_char_fast_encoding_equals_the_layer(vectorizers, small_text, monkeypatch):
    text = small_text[:5000] + " unseen: 中😀\x00Z§\t"
    tokenizer = Tokenizer(vectorizers["char"])
    expected = to_numpy(vectorizers["char"]([text]))[0]
    np.testing.assert_array_equal(tokenizer.encode(text), expected)
    assert (expected == 1).sum() >= 3  # the out-of-vocabulary id
    monkeypatch.setattr(kn._tokenizer_encoders, "_DENSE_TABLE_LIMIT", 0)  # the sorted-search path
    layer = kn.data.make_vectorizer(level="char", vocabulary=vectorizers["char"].get_vocabulary())
    np.testing.assert_array_equal(Tokenizer(layer).encode(text), expected)
    chars = sorted(set(SHAKESPEARE_SAMPLE))  # no out-of-vocabulary id: an error names the character
    with pytest.raises(ValueError, match="'q'"):
        Tokenizer(kn.data.make_vectorizer(level="char", vocabulary=chars)).encode("quiet")


def test_byte_encoding_equals_keras_hub(vectorizers, small_text):
    text = small_text[:3000] + "é中😀\t"
    np.testing.assert_array_equal(Tokenizer(vectorizers["byte"]).encode(text),
                                  to_numpy(vectorizers["byte"](text)))


@pytest.mark.parametrize("level", ["char", "word", "wordpiece", "sentencepiece", "byte", "bpe"])
def test_special_tokens_are_appended_and_never_encoded(vectorizers, level):
    base = Tokenizer(vectorizers[level])
    tokenizer = base.with_special_tokens([END_OF_TEXT, "<|user|>"])
    if level == "bpe":  # GPT-2's vocabulary holds <|endoftext|>
        assert tokenizer.end_of_text_id == base.end_of_text_id < base.size
        assert tokenizer.special_tokens["<|user|>"] == base.size == tokenizer.size - 1
    else:
        assert base.end_of_text_id is None and base.special_tokens == {}
        assert tokenizer.special_tokens == {END_OF_TEXT: base.size, "<|user|>": base.size + 1}
        assert tokenizer.size == base.size + 2
    special = set(tokenizer.special_tokens.values())
    text = "It is a truth <|endoftext|> and <|user|> too"
    ids = tokenizer.encode(text)
    assert not special & set(ids.tolist())
    np.testing.assert_array_equal(ids, base.encode(text))
    decoded = tokenizer.decode([*base.encode("It is"), tokenizer.end_of_text_id, *base.encode("a truth")])
    assert END_OF_TEXT in decoded and decoded.lower().replace(END_OF_TEXT, " ").split() == ["it", "is", "a", "truth"]
    config = json.loads(json.dumps(tokenizer.get_config()))
    again = Tokenizer.from_config(config)
    assert again == tokenizer and again.special_tokens == tokenizer.special_tokens
    assert again.fingerprint() == tokenizer.fingerprint() != base.fingerprint()
    assert tokenizer.with_special_tokens([END_OF_TEXT]) == tokenizer  # already there: unchanged


def test_model_carries_its_special_tokens(small_text, tmp_path):
    tokenizer = Tokenizer.for_corpus("char", [small_text]).with_special_tokens(["<|user|>"])
    with pytest.raises(ValueError, match="vocabulary_size"):
        kn.NanoGPT(tokenizer.size - 1, 8, num_layers=1, num_heads=1, hidden_dim=8, vectorizer=tokenizer)
    model = kn.NanoGPT(tokenizer.size, 8, num_layers=1, num_heads=1, hidden_dim=8, vectorizer=tokenizer)
    assert model.tokenizer == tokenizer and model.vectorizer is tokenizer.layer
    model.save(str(tmp_path / "m.keras"))
    loaded = kn.load_model(str(tmp_path / "m.keras"))
    assert loaded.tokenizer == tokenizer and loaded.tokenizer.special_tokens == tokenizer.special_tokens
    model.save_to_preset(str(tmp_path / "preset"))
    assert kn.NanoGPT.from_preset(str(tmp_path / "preset")).tokenizer == tokenizer
    assert Tokenizer.for_corpus(str(tmp_path / "m.keras")) == tokenizer  # `--tokenizer MODEL.keras`


def test_learn_char_vocabulary_streams_chunks(small_text):
    chunks = (small_text[i:i + 1000] for i in range(0, len(small_text), 1000))  # a generator: one pass
    characters = kn.tokenizers.learn_char_vocabulary(chunks)
    assert sorted(characters) == sorted(set(small_text))
    counts = [small_text.count(c) for c in characters]
    assert counts == sorted(counts, reverse=True)
    assert kn.tokenizers.learn_char_vocabulary([small_text], max_tokens=12) == characters[:10]
    tokenizer = Tokenizer.for_corpus("char", iter([small_text[:10000], small_text[10000:]]))
    assert tokenizer.size == len(characters) + 3 and tokenizer.end_of_text_id == len(characters) + 2
    assert tokenizer.decode(tokenizer.encode(small_text)) == small_text
    assert Tokenizer.for_corpus("char", vocabulary=characters) == tokenizer  # a given vocabulary
    with pytest.raises(ValueError, match="single characters"):
        Tokenizer.for_corpus("char", vocabulary=["ab"])


def test_corpus_tokenizer_names(small_text, learned_bpe, monkeypatch):
    byte = Tokenizer.for_corpus("byte")
    assert byte.size == 257 and byte.end_of_text_id == 256 and byte.decode([104, 256, 105]) == "h<|endoftext|>i"
    word = Tokenizer.for_corpus("word", [small_text], sample_characters=5000)
    assert word.level == "word" and word.end_of_text_id == word.size - 1
    with pytest.raises(ValueError, match="must be one of"):
        Tokenizer.for_corpus("syllable")
    with pytest.raises(ValueError, match="chunks"):
        Tokenizer.for_corpus("char")
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken_ext import openai_public

    ranks = tiktoken_ranks(learned_bpe)
    encoding = tiktoken.Encoding("learned", pat_str=kn.tokenizers.GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={END_OF_TEXT: learned_bpe.end_of_text_id})
    assert Tokenizer.for_corpus(encoding) == learned_bpe  # merges recovered from the ranks
    monkeypatch.setattr(openai_public, "gpt2", lambda: {  # GPT-2's file cannot be downloaded here
        "pat_str": kn.tokenizers.GPT2_PATTERN, "mergeable_ranks": ranks,
        "special_tokens": {END_OF_TEXT: learned_bpe.end_of_text_id}})
    gpt2 = Tokenizer.for_corpus("gpt2")
    assert gpt2 == learned_bpe and gpt2.end_of_text_id == 599
    np.testing.assert_array_equal(gpt2.encode(small_text), encoding.encode_ordinary(small_text))
    with pytest.raises(ValueError, match="pattern"):
        Tokenizer.from_ranks(ranks, pattern=r"\w+")


def test_bpe_keras_hub_agrees_with_tiktoken_except_on_whitespace_runs(learned_bpe, small_text):
    """The equality finding (docs/tokenizers.md): keras-hub's BytePairTokenizer and tiktoken agree on
    digits, spaces, punctuation and non-ASCII text, but split runs of newlines differently."""
    tiktoken = pytest.importorskip("tiktoken")
    encoding = tiktoken.Encoding("learned", pat_str=kn.tokenizers.GPT2_PATTERN,
                                 mergeable_ranks=tiktoken_ranks(learned_bpe), special_tokens={})
    config = learned_bpe.get_config()
    layer = kn.data.make_vectorizer(level="bpe", vocabulary=config["vocabulary"], merges=config["merges"])
    agreeing = ["12345 2024", "a 1999-2024 b 123456789 3.14159", "It's  two  spaces,  (x)--y!",
                "naïve café — 東京 😀", "don't DON'T 'tis", "x \t y", small_text[:2000].replace("\n", " ")]
    for text in agreeing:
        expected = encoding.encode_ordinary(text)
        assert to_numpy(layer(text)).tolist() == expected, text
        assert learned_bpe.encode(text).tolist() == expected, text
    assert len(encoding.encode_ordinary("12345")) < 5  # the digits did merge
    text = "It is.\n\n\n\nChapter 2"
    assert to_numpy(layer(text)).tolist() != encoding.encode_ordinary(text)  # "\n\n"+"\n\n" vs "\n\n\n"+"\n"
    assert Tokenizer(layer).encode(text).tolist() == encoding.encode_ordinary(text)  # the package's BPE
    np.testing.assert_array_equal(learned_bpe.encode(small_text), encoding.encode_ordinary(small_text))


def test_python_bpe_equals_tiktoken(learned_bpe, small_text, monkeypatch):
    text = small_text + " 12345 2024 naïve café — 東京 😀\n\n\n\nx  y \t"
    expected = learned_bpe.encode(text)
    python = Tokenizer(learned_bpe.get_config())
    monkeypatch.setattr(python._base, "_encoder", False)  # as without tiktoken
    np.testing.assert_array_equal(python.encode(text), expected)
    assert python.decode(expected) == text


def test_tiktoken_bpe_model_saves_and_loads(learned_bpe, small_text, tmp_path):
    tiktoken = pytest.importorskip("tiktoken")  # noqa: F841
    tokenizer = Tokenizer.from_ranks(tiktoken_ranks(learned_bpe), {END_OF_TEXT: learned_bpe.end_of_text_id})
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(tokenizer.size, 16, num_layers=1, num_heads=2, hidden_dim=16, vectorizer=tokenizer)
    model.save(str(tmp_path / "bpe.keras"))
    loaded = kn.load_model(str(tmp_path / "bpe.keras"))
    assert loaded.tokenizer == tokenizer == learned_bpe and loaded.tokenizer.end_of_text_id == 599
    np.testing.assert_array_equal(loaded.tokenizer.encode(small_text), tokenizer.encode(small_text))
    text = loaded.generate("It is a truth", max_new_tokens=3, temperature=0)
    assert text == model.generate("It is a truth", max_new_tokens=3, temperature=0)


def test_tokenizers_compare_by_fingerprint(small_text):
    one, other = Tokenizer.for_corpus("char", [small_text]), Tokenizer.for_corpus("char", [small_text[:500]])
    assert one == Tokenizer(one.get_config()) and one != other and len(one.fingerprint()) == 16
    one.check_same(Tokenizer(one.get_config()))
    with pytest.raises(ValueError, match=f"{other.fingerprint()}.*{one.fingerprint()}"):
        one.check_same(other, what="The shards")


@pytest.mark.parametrize("name", ["encode", "decode", "vocabulary_size", "warn_unknown", "vectorizer_to_config",
                                  "vectorizer_from_config"])
def test_old_tokenizer_functions_are_deprecated_shims(name, vectorizers):
    for module in (kn.data, kn.tokenizers):
        with pytest.warns(DeprecationWarning, match=f"{name} is deprecated.*0.3.0.*Tokenizer"):
            function = getattr(module, name)
        assert callable(function)
    with pytest.warns(DeprecationWarning):
        assert kn.data.decode(vectorizers["char"], kn.data.encode(vectorizers["char"], "It is")) == "It is"


@pytest.mark.parametrize("level", ["char", "word", "byte", "bpe"])
def test_encode_batch_equals_encode(vectorizers, learned_bpe, small_text, level):
    tokenizer = learned_bpe if level == "bpe" else Tokenizer(vectorizers[level])
    texts = [small_text[:700], "", "It is 中 12345\n\n\n\nx", small_text[700:1500]]
    batch = tokenizer.encode_batch(texts)
    assert [ids.dtype for ids in batch] == [np.int32] * 4
    for ids, text in zip(batch, texts):
        np.testing.assert_array_equal(ids, tokenizer.encode(text))


def test_a_model_file_without_a_tokenizer_is_refused(tmp_path):
    model = kn.NanoGPT(10, 8, num_layers=1, num_heads=1, hidden_dim=8)
    model.save(str(tmp_path / "bare.keras"))
    with pytest.raises(ValueError, match="has no tokenizer"):
        Tokenizer.for_corpus(str(tmp_path / "bare.keras"))
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        Tokenizer.for_corpus(str(tmp_path / "missing.keras"))
