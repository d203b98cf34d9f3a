"""Token shards: `kn.data.prepare` (text, .jsonl, .parquet into llm.c-format shards, resumable) and
`kn.data.token_dataset` (memory-mapped windows into `fit`): formats, orders, per-process rows, errors.

Tokenizers: bytes, a learned char vocabulary, and a BPE built from a few ranks (GPT-2's own file would
need the network).
"""

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
from conftest import BACKEND, QUICK_COMPILE, free_port

import keras_nanogpt as kn
from keras_nanogpt import corpus, shards, sources

BYTES = kn.tokenizers.Tokenizer.for_corpus("byte")  # 257 ids: the 256 bytes, then <|endoftext|>


def bpe_tokenizer():
    """GPT-2's pattern with a few merges ("\n\n" among them), <|endoftext|> after them (no download)."""
    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"\n\n", b"th", b"the", b" t", b" the", b"e ", b"in", b"er"):
        ranks[merge] = len(ranks)
    return kn.tokenizers.Tokenizer.from_ranks(ranks, {"<|endoftext|>": len(ranks)})


@pytest.fixture(scope="module")
def pride_path():
    return os.path.join(os.environ["KERAS_HOME"], "datasets", "pride_and_prejudice.txt")


def _tokens(folder, split):
    manifest = shards.read_manifest(folder)
    parts = [shards.open_shard(os.path.join(folder, s["file"])) for s in manifest["shards"][split]]
    return np.concatenate(parts) if parts else np.zeros(0)


def _write_llmc(path, tokens, magic=20240520):
    version, dtype = shards.FORMATS[magic]
    head = np.zeros(256, "<i4")
    head[:3] = magic, version, len(tokens)
    with open(path, "wb") as f:
        f.write(head.tobytes() + np.asarray(tokens, dtype).tobytes())


# -- prepare ---------------------------------------------------------------------------------------------

def test_a_novel_in_pieces_gives_the_cleaned_text_with_its_last_tenth_for_validation(tmp_path, pride_path,
                                                                                       monkeypatch, capsys):
    monkeypatch.setattr(sources, "PIECE_BYTES", 60_000)  # about 12 pieces, several shards, 2 workers
    manifest = kn.data.prepare(pride_path, tmp_path / "out", BYTES, workers=2, shard_tokens=150_000)
    assert re.search(r"prepare: 100\.0% of 0\.7 MB, 691,844 tokens, [\d,]+ tokens/s, 0:00 left\n$",
                     capsys.readouterr().err)
    with open(pride_path, encoding="utf-8") as f:
        expected = BYTES.encode(kn.data.clean_text(f.read()))
    train, val = _tokens(tmp_path / "out", "train"), _tokens(tmp_path / "out", "val")
    assert np.array_equal(np.concatenate([train, val]), np.append(expected, 256))
    assert manifest["val_by"] == "text tail" and 0.09 < len(val) / (len(train) + len(val)) < 0.11
    assert len(manifest["shards"]["train"]) > 2 and manifest["tokens"] == {"train": len(train), "val": len(val)}
    assert manifest["documents"] == {"train": 0, "val": 1}  # one document: it ends in validation
    with open(pride_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert manifest["sources"] == [{"path": os.path.abspath(pride_path), "kind": "text",
                                    "bytes": os.path.getsize(pride_path), "sha256": digest}]
    assert manifest["tokenizer"] == {"level": "byte", "size": 257, "end_of_text_id": 256,
                                     "fingerprint": BYTES.fingerprint(), "config": BYTES.get_config()}
    assert kn.tokenizers.Tokenizer.from_config(manifest["tokenizer"]["config"]) == BYTES
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    head = np.fromfile(tmp_path / "out" / "train_000000.bin", "<i4", 256)
    assert head[:3].tolist() == [20240520, 1, manifest["shards"]["train"][0]["tokens"]]


def test_pieces_cut_at_paragraphs_tokenize_as_the_whole_text_does(tmp_path, pride_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 20_000)
    with open(pride_path, encoding="utf-8") as f:
        text = kn.data.clean_text(f.read())[:200_000] + "\n\n\n  The end.\n"
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    tokenizer = bpe_tokenizer()
    kn.data.prepare(tmp_path / "book.txt", tmp_path / "out", tokenizer, val_fraction=0, workers=1, progress=False)
    whole = tokenizer.encode(text)
    assert np.array_equal(_tokens(tmp_path / "out", "train"), np.append(whole, tokenizer.end_of_text_id))
    assert np.sum(whole == 256) > 10  # the "\n\n" merge is in play: a cut after a blank line would use it


def test_jsonl_parquet_and_folders_hold_out_every_tenth_document(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"document {i} " + "x" * (i % 7) for i in range(40)]
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                                                      for i, d in enumerate(docs[:20])))
    pq.write_table(pa.table({"text": docs[20:35]}), tmp_path / "src" / "b.parquet", row_group_size=4)
    for i, d in enumerate(docs[35:]):
        (tmp_path / "src" / "sub" / f"c{i}.txt").write_text(d)
    (tmp_path / "src" / "ignored.csv").write_text("not read")
    manifest = kn.data.prepare(tmp_path / "src", tmp_path / "out", BYTES, workers=2, progress=False)
    held = [d for i, d in enumerate(docs) if i % 10 == 9]
    kept = [d for i, d in enumerate(docs) if i % 10 != 9]
    for split, expected in (("train", kept), ("val", held)):
        tokens = _tokens(tmp_path / "out", split)
        texts = bytes(tokens.astype(np.uint8)[tokens != 256]).decode()
        assert np.sum(tokens == 256) == len(expected) and texts == "".join(expected)
    assert manifest["documents"] == {"train": 36, "val": 4} and manifest["val_by"] == "documents"
    assert [s["kind"] for s in manifest["sources"]] == ["jsonl", "parquet"] + ["text"] * 5


def test_a_char_vocabulary_is_learned_from_the_whole_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("abc\n" * 10)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "xyz é"}) + "\n")
    manifest = kn.data.prepare(tmp_path, tmp_path / "out", "char", val_fraction=0, workers=2, progress=False)
    tokenizer = kn.tokenizers.Tokenizer.from_config(manifest["tokenizer"]["config"])
    assert tokenizer.size == 2 + 9 + 1 and manifest["tokenizer"]["end_of_text_id"] == 11
    tokens = _tokens(tmp_path / "out", "train")
    assert tokenizer.decode(tokens) == "abc\n" * 10 + "<|endoftext|>xyz é<|endoftext|>"


WITH_A_SIGTERM_HANDLER = textwrap.dedent("""
    import signal, sys
    import keras_nanogpt as kn
    signal.signal(signal.SIGTERM, lambda *args: None)  # a program's own handler (a server, a training script)
    for i in range(3):
        kn.data.prepare(sys.argv[1], f"{sys.argv[2]}/out{i}", "char", val_fraction=0, workers=2, progress=False)
    print("prepared 3")
""")


def test_prepare_ends_its_forked_workers_under_a_programs_own_sigterm_handler(tmp_path):
    # Forked workers inherited the handler, so `Pool.terminate`'s SIGTERM left one waiting for a task: the
    # second `prepare` hung (reproduced before the fix in `corpus._start_worker`).
    (tmp_path / "src").mkdir()
    for i in range(3):
        (tmp_path / "src" / f"a{i}.txt").write_text("abc def\n" * 50)
    done = subprocess.run([sys.executable, "-c", WITH_A_SIGTERM_HANDLER, str(tmp_path / "src"), str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "prepared 3" in done.stdout, done.stderr[-3000:]


def test_a_large_vocabulary_gets_llmc_uint32_shards(tmp_path):
    characters = [chr(0x10000 + i) for i in range(66_000)]  # 66,003 ids with padding, unknown, end of text
    (tmp_path / "a.txt").write_text(characters[-1] * 7 + "\n", encoding="utf-8")
    large = kn.tokenizers.Tokenizer.for_corpus("char", characters)
    manifest = kn.data.prepare(tmp_path / "a.txt", tmp_path / "out", large, val_fraction=0, workers=1,
                               progress=False)
    head = np.fromfile(tmp_path / "out" / "train_000000.bin", "<i4", 256)
    assert manifest["dtype"] == "uint32" and head[:3].tolist() == [20240801, 7, 9]
    assert _tokens(tmp_path / "out", "train").tolist() == [66_001] * 7 + [1, 66_002]


def test_a_rerun_after_a_kill_keeps_finished_shards_and_leaves_no_half_written_one(tmp_path, pride_path,
                                                                                   monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 60_000)
    out = tmp_path / "out"
    settings = dict(tokenizer=BYTES, workers=1, shard_tokens=150_000, progress=False)
    closed = []
    original = corpus._ShardWriter.close

    def close_then_die(self, number):
        original(self, number)
        closed.append(number)
        if len(closed) == 2:
            raise KeyboardInterrupt  # stands for the kill: the next shard is under way

    monkeypatch.setattr(corpus._ShardWriter, "close", close_then_die)
    with pytest.raises(KeyboardInterrupt):
        kn.data.prepare(pride_path, out, **settings)
    finished = sorted(p.name for p in out.glob("*.bin"))
    assert finished == ["train_000000.bin", "train_000001.bin"] and not (out / "manifest.json").exists()
    for name in finished:
        shards.open_shard(out / name)  # whole: header and size agree
    stamps = {name: os.stat(out / name).st_mtime_ns for name in finished}
    (out / ".train_000002.bin.partial").write_bytes(b"half")  # what a kill -9 mid-shard leaves

    monkeypatch.setattr(corpus._ShardWriter, "close", original)
    manifest = kn.data.prepare(pride_path, out, **settings)
    assert {name: os.stat(out / name).st_mtime_ns for name in finished} == stamps  # not rewritten
    assert not list(out.glob(".*partial"))
    reference = kn.data.prepare(pride_path, tmp_path / "reference", **settings)
    assert manifest["shards"] == reference["shards"]
    for split in shards.SPLITS:
        assert np.array_equal(_tokens(out, split), _tokens(tmp_path / "reference", split))
    with pytest.raises(ValueError, match=r"holds shards of a different prepare \(its val_fraction differ"):
        kn.data.prepare(pride_path, out, val_fraction=0.2, **settings)


@pytest.mark.parametrize("make, message", [
    (lambda p: ([p / "missing.txt"], BYTES), r"No such source file or folder: '.*missing\.txt'"),
    (lambda p: ([str(p / "*.nothing")], BYTES), r"source glob '.*\*\.nothing' matches no file"),
    (lambda p: ([p / "empty.txt"], BYTES), r"corpus is empty: '.*empty\.txt' hold"),
    (lambda p: ([p / "ok.txt"], "nonsense"), r"`tokenizer` must be one of \('char', .*got 'nonsense'"),
    (lambda p: ([p / "ok.txt"], 42), r"`tokenizer` must be a tokenizer name .*got int"),
    (lambda p: ([p / "bad.jsonl"], BYTES), r"'.*bad\.jsonl' line 1 has no string field 'text'"),
    (lambda p: ([p / "bad.parquet"], BYTES), r"'.*bad\.parquet' is not a readable parquet file"),
])
def test_bad_sources_are_named_before_any_work(tmp_path, make, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "ok.txt").write_text("some text")
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    sources, tokenizer = make(tmp_path)
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=message):
        kn.data.prepare(sources, tmp_path / "out", tokenizer, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_model_tokenizer_without_end_of_text_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("abc\n")
    plain = kn.tokenizers.Tokenizer(kn.data.make_vectorizer("abc\n"))
    with pytest.raises(ValueError, match=r"`tokenizer` \(char tokenizer, .*\) has no <\|endoftext\|> token"):
        kn.data.prepare(tmp_path / "a.txt", tmp_path / "out", plain, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_empty_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("text\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match=r"`out` folder '.*out' is not empty"):
        kn.data.prepare(tmp_path / "a.txt", tmp_path / "out", BYTES, progress=False)


# -- reading ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    for i in range(3):
        letters = rng.integers(97, 123, 3000 + 700 * i).astype(np.uint8)
        letters[::50] = ord("\n")
        (folder / f"doc{i}.txt").write_bytes(bytes(letters))
    kn.data.prepare(folder, folder / "out", BYTES, val_fraction=0.2, workers=1, shard_tokens=2000,
                    progress=False)
    return folder / "out"


def _batches(dataset, count):
    return [np.concatenate([np.asarray(x), np.asarray(y)[:, -1:]], axis=1) for x, y in dataset.take(count)]


def test_random_windows_are_seeded_and_start_continues_the_stream(prepared):
    tokens = _tokens(prepared, "train")
    files = [shards.open_shard(prepared / s["file"]) for s in shards.read_manifest(prepared)["shards"]["train"]]
    first = _batches(kn.data.token_dataset(prepared, 16, 4, seed=3), 6)
    assert all(b.shape == (4, 17) and b.dtype == np.int32 for b in first)
    text = tokens.tobytes()
    for window in np.concatenate(first):  # each window lies within one shard
        assert any(window.astype(f.dtype).tobytes() in f.tobytes() for f in files)
    assert len(text) > 0
    assert all(np.array_equal(a, b) for a, b in zip(first, _batches(kn.data.token_dataset(prepared, 16, 4, seed=3), 6)))
    assert not np.array_equal(first[0], _batches(kn.data.token_dataset(prepared, 16, 4, seed=4), 1)[0])
    resumed = _batches(kn.data.token_dataset(prepared, 16, 4, seed=3, start=4), 2)
    assert all(np.array_equal(a, b) for a, b in zip(first[4:], resumed))


def test_shuffled_gives_every_window_once_per_epoch_in_a_new_order(prepared):
    windows = shards.TokenWindows(shards.shard_files(prepared)[0], 16, 4, "shuffled", 0)
    per_epoch = windows.batches_per_epoch
    dataset = kn.data.token_dataset(prepared, 16, 4, sampling="shuffled", seed=0)
    batches = _batches(dataset, 2 * per_epoch)
    epochs = [np.concatenate(batches[:per_epoch]), np.concatenate(batches[per_epoch:])]
    expected = {window.tobytes() for f in windows.files
                for tokens in [shards.open_shard(f).astype(np.int32)]
                for window in (tokens[i:i + 17] for i in range(0, len(tokens) - 16, 16))}
    assert len(expected) == windows.window_count
    for epoch in epochs:
        seen = [w.tobytes() for w in epoch]
        assert len(set(seen)) == len(seen) == per_epoch * 4 and set(seen) <= expected
    assert [w.tobytes() for w in epochs[0]] != [w.tobytes() for w in epochs[1]]


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_the_feistel_permutation_is_a_bijection(n):
    values = shards.feistel_permutation(np.arange(n, dtype=np.uint64), n, (7, 2))
    assert sorted(values.tolist()) == list(range(n))
    if n > 100:
        assert np.mean(values == np.arange(n)) < 0.05  # it moves nearly everything


def test_each_process_reads_its_rows_and_the_union_is_the_one_process_batch(prepared):
    whole = _batches(kn.data.token_dataset(prepared, 16, 4, sampling="shuffled", seed=1), 3)
    parts = [_batches(kn.data.token_dataset(prepared, 16, 4, sampling="shuffled", seed=1, process_index=i,
                                            process_count=2), 3) for i in range(2)]
    for k in range(3):
        assert np.array_equal(parts[0][k][:2], whole[k][:2]) and not parts[0][k][2:].any()
        assert np.array_equal(parts[1][k][2:], whole[k][2:]) and not parts[1][k][:2].any()


def test_nanogpt_bin_files_and_meta_pkl_load_as_they_are(tmp_path):
    data = np.arange(1000, dtype=np.uint16) % 65
    data.tofile(tmp_path / "train.bin")
    data[:300].tofile(tmp_path / "val.bin")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "itos": {i: chr(40 + i) for i in range(65)},
                     "stoi": {chr(40 + i): i for i in range(65)}}, f)
    x, y = next(iter(kn.data.token_dataset(tmp_path, 8, 3, seed=0)))
    x, y = np.asarray(x), np.asarray(y)
    for row, next_row in zip(x, y):  # get_batch: x = data[i:i+8], y = data[i+1:i+9]
        assert np.array_equal(row, data[row[0]:row[0] + 8]) and np.array_equal(next_row, data[row[0] + 1:row[0] + 9])
    assert np.asarray(next(iter(kn.data.token_dataset(tmp_path, 8, 3, split="val", seed=0)))[0]).max() < 65
    assert shards.token_info(tmp_path) == {"vocabulary_size": 65, "tokens": {"train": 1000, "val": 300},
                                           "tokenizer": None, "meta": shards.read_meta(tmp_path / "meta.pkl")}


def test_a_meta_pkl_that_asks_for_a_class_is_refused(tmp_path):
    class Sneaky:
        def __reduce__(self):
            return (os.system, ("echo never",))

    np.zeros(100, np.uint16).tofile(tmp_path / "train.bin")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": Sneaky()}, f)
    with pytest.raises(ValueError, match=r"'.*meta\.pkl' is not a plain nanoGPT meta\.pkl: it asks for "
                                         r"(posix|os)\.system"):
        kn.data.token_dataset(tmp_path, 8, 2, seed=0)


@pytest.mark.parametrize("magic", [20240520, 20240801])
def test_llmc_shards_load_as_they_are(tmp_path, magic):
    tokens = [np.arange(i * 500, i * 500 + 500) for i in range(3)]
    for i, t in enumerate(tokens[:2]):
        _write_llmc(tmp_path / f"fineweb_train_{i + 1:06d}.bin", t, magic)
    _write_llmc(tmp_path / "fineweb_val_000000.bin", tokens[2], magic)
    for split, first in (("train", set(range(0, 1000))), ("val", set(range(1000, 1500)))):
        x, y = next(iter(kn.data.token_dataset(tmp_path, 10, 4, split=split, sampling="shuffled", seed=0)))
        x, y = np.asarray(x), np.asarray(y)
        assert set(x[:, 0].tolist()) <= first and np.array_equal(x[:, 1:], y[:, :-1])
        assert np.array_equal(y[:, -1], x[:, 0] + 10) and np.all(x[:, 0] % 10 == 0)
    x, _ = next(iter(kn.data.token_dataset(str(tmp_path / "fineweb_train_*.bin"), 10, 4, seed=0)))
    assert np.asarray(x).max() < 1000


def test_the_first_batch_of_a_2_gb_corpus_comes_at_once(tmp_path):
    for i in range(10):  # sparse files: 1e9 uint16 tokens that take no disk and would take long to read
        with open(tmp_path / f"big_train_{i:06d}.bin", "wb") as f:
            f.write(shards.header(100_000_000, np.uint16).tobytes())
            f.truncate(shards.HEADER_BYTES + 2 * 100_000_000)
    start = time.monotonic()
    x, _ = next(iter(kn.data.token_dataset(tmp_path, 1024, 8, sampling="shuffled", seed=0)))
    assert time.monotonic() - start < 5 and np.asarray(x).shape == (8, 1024)


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"Token shard '.*train_000000\.bin' is truncated or damaged: its header says \d+ uint16 tokens"),
    ("foreign", r"'.*train_000000\.bin' is not a token shard: its magic number is 12345"),
    ("version", r"Token shard '.*train_000000\.bin' has magic 20240520 with version 3"),
    ("short", r"Token shard '.*train_000000\.bin' is truncated: 100 bytes"),
])
def test_damaged_shards_are_named_before_any_batch(tmp_path, prepared, damage, message):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(prepared, folder)
    path = folder / "train_000000.bin"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-10]
    elif damage == "foreign":
        raw[:4] = np.int32(12345).tobytes()
    elif damage == "version":
        raw[4:8] = np.int32(3).tobytes()
    else:
        raw = raw[:100]
    path.write_bytes(bytes(raw))
    with pytest.raises(shards.ShardError, match=message):
        kn.data.token_dataset(folder, 16, 4, seed=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "test"}, r"`split` must be one of \('train', 'val'\); got 'test'"),
    ({"sampling": "sequential"}, r"`sampling` must be one of \('random', 'shuffled'\)"),
    ({"start": 5}, r"`start`=5 continues a seeded stream: pass the `seed`"),
    ({"batch_size": 3, "process_count": 2, "process_index": 0, "seed": 0}, r"`batch_size`=3 must be a multiple"),
    ({"sequence_length": 5000, "seed": 0}, r"fewer than batch_size=4"),
])
def test_bad_reading_arguments_are_named(prepared, kwargs, message):
    arguments = dict(sequence_length=16, batch_size=4) | kwargs
    with pytest.raises(ValueError, match=message):
        kn.data.token_dataset(prepared, **arguments)


def test_a_folder_without_shards_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No train token shards in the folder '.*': expected a "
                                                r"manifest\.json"):
        kn.data.token_dataset(tmp_path, 16, 4, seed=0)


def test_fit_trains_from_shards(prepared):
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(257, 16, 1, 2, 16)
    model.compile(**QUICK_COMPILE)
    train = kn.data.token_dataset(prepared, 16, 4, seed=0)
    val = kn.data.token_dataset(prepared, 16, 4, split="val", sampling="shuffled", seed=0).take(2)
    history = model.fit(train, steps_per_epoch=3, epochs=2, validation_data=val, verbose=0)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["val_loss"]).all()


# -- several hosts ---------------------------------------------------------------------------------------

# One of two JAX processes (gloo on 127.0.0.1): its rows of 3 global batches through Keras's own data
# sharding (DataParallel.distribute_dataset: rebatch, then shard by process), saved for the parent.
MULTI_HOST = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras, numpy as np
    import keras_nanogpt as kn
    port, index, folder, out = sys.argv[1:]
    keras.distribution.initialize(f"127.0.0.1:{port}", 2, int(index))
    distribution = keras.distribution.DataParallel()
    dataset = kn.data.token_dataset(folder, 16, 4, sampling="shuffled", seed=1)
    local = distribution.distribute_dataset(dataset)
    np.save(out, np.stack([np.asarray(x) for x, _ in local.take(3)]))
""")


@pytest.mark.skipif(BACKEND != "jax", reason="several hosts are JAX's keras.distribution")
def test_two_jax_processes_read_disjoint_rows_whose_union_is_the_global_batch(tmp_path, prepared):
    port = free_port()
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    workers = [subprocess.Popen([sys.executable, "-c", MULTI_HOST, str(port), str(i), str(prepared),
                                 str(tmp_path / f"rows{i}.npy")], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for worker in workers:
        output, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, output[-3000:]
    rows = [np.load(tmp_path / f"rows{i}.npy") for i in range(2)]  # (3 batches, 2 rows, 16)
    whole = np.stack([np.asarray(x) for x, _ in
                      kn.data.token_dataset(prepared, 16, 4, sampling="shuffled", seed=1).take(3)])
    assert rows[0].shape == (3, 2, 16)
    assert np.array_equal(np.concatenate(rows, axis=1), whole)


def test_the_gpt2_example_trains_a_tiny_model_from_shards(tmp_path, small_text, capsys):
    """examples/train_gpt2.py (nanoGPT's train_gpt2 config, here `--tiny`): prepared shards in, a saved model
    out."""
    import runpy

    (tmp_path / "corpus.txt").write_text(small_text, encoding="utf-8")
    kn.data.prepare(str(tmp_path / "corpus.txt"), str(tmp_path / "shards"), tokenizer="byte", workers=1,
                    progress=False)
    example = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "examples", "train_gpt2.py"))
    out = tmp_path / "gpt2.keras"
    example["main"](["--data", str(tmp_path / "shards"), "--tiny", "--steps", "20", "--out", str(out),
                     "--checkpoint-dir", str(tmp_path / "ckpt")])
    printed = capsys.readouterr().out
    assert "step 20: train loss" in printed and "val loss" in printed and out.exists()
    model = keras.models.load_model(out)
    assert model.tokenizer.level == "byte" and model.num_layers == 2
    assert model.generate("The", max_new_tokens=5, temperature=0).startswith("The")
