"""Token shards: prepare speed, then reading them into training (tf.data against grain against in-memory windows).

Builds a corpus of about `--corpus-mb` MB (Pride and Prejudice and Tiny Shakespeare repeated, one document per
copy) unless `--shards DIR` names prepared shards, prepares it with the byte tokenizer, and reports:
- prepare: tokens/s with `--workers` processes;
- reading: the time to the first batch and the host time per batch, without a model, of
  `kn.data.token_dataset` (tf.data, `numpy_function` over memory maps, prefetched), the same batches through
  a grain `MapDataset` (random-access source -> `to_iter_dataset` with read threads and prefetch), and
  in-memory windows (`kn.data.make_datasets`' random sampling over one `tf.constant`);
- training: `fit` steps/s of nanoGPT's CPU model (4 layers, 128 wide, context 64, batch 12) from shards against
  in-memory windows of the same tokens, on this process's backend (`KERAS_BACKEND`).

    KERAS_BACKEND=jax python benchmarks/shard_reading.py --corpus-mb 50 --steps 200
"""

import os
import shutil
import tempfile
import time

import _common
import numpy as np

import keras
import keras_nanogpt as kn
from keras_nanogpt import shards


def make_corpus(folder, megabytes):
    texts = [kn.data.load_text(name) for name in ("pride_and_prejudice", "tinyshakespeare")]
    written, copy = 0, 0
    os.makedirs(folder, exist_ok=True)
    while written < megabytes * 1e6:
        text = texts[copy % 2]
        with open(os.path.join(folder, f"doc{copy:05d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        written += len(text.encode("utf-8"))
        copy += 1
    return written


def per_batch(iterator, count):
    start = time.perf_counter()
    first = next(iterator)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(count):
        next(iterator)
    return first, first_s, (time.perf_counter() - start) / count


def grain_dataset(folder, sequence_length, batch_size, seed):
    import grain

    windows = shards.TokenWindows(shards.shard_files(folder)[0], sequence_length, batch_size, "random", seed)

    class Batches:  # grain's random-access protocol: __len__ and a deterministic __getitem__
        def __len__(self):
            return 2 ** 40

        def __getitem__(self, k):
            batch = windows.batch(k)
            return batch[:, :-1], batch[:, 1:]

    options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    return grain.MapDataset.source(Batches()).to_iter_dataset(options)


def reading(folder, sequence_length, batch_size, count):
    start = time.perf_counter()
    dataset = kn.data.token_dataset(folder, sequence_length, batch_size, seed=0)
    iterator = dataset.as_numpy_iterator()
    made_s = time.perf_counter() - start
    first, first_s, tf_data_s = per_batch(iterator, count)
    start = time.perf_counter()
    grain_iterator = iter(grain_dataset(folder, sequence_length, batch_size, 0))
    grain_made_s = time.perf_counter() - start
    grain_first, grain_first_s, grain_s = per_batch(grain_iterator, count)
    assert np.array_equal(first[0], grain_first[0])  # the same batch 0 both ways
    tokens = np.asarray(shards.open_shard(shards.shard_files(folder)[0][0])[:2_000_000]).astype(np.int32)
    memory = in_memory(tokens, sequence_length, batch_size).as_numpy_iterator()
    _, memory_first_s, memory_s = per_batch(memory, count)
    return {"sequence_length": sequence_length, "batch_size": batch_size, "batches": count,
            "tf_data": {"first_batch_s": round(made_s + first_s, 4), "ms_per_batch": round(1e3 * tf_data_s, 3)},
            "grain": {"first_batch_s": round(grain_made_s + grain_first_s, 4), "ms_per_batch": round(1e3 * grain_s, 3)},
            "in_memory": {"first_batch_s": round(memory_first_s, 4), "ms_per_batch": round(1e3 * memory_s, 3)}}


def in_memory(tokens, sequence_length, batch_size):
    """`make_datasets`' random sampling over ids already in memory (its tokenizer step left out)."""
    import tensorflow as tf

    window = sequence_length + 1
    ids = tf.constant(tokens)
    starts = tf.data.Dataset.random(seed=0).map(lambda r: tf.cast(r % (len(tokens) - window + 1), tf.int32))
    return (starts.map(lambda s: (ids[s:s + sequence_length], ids[s + 1:s + window]),
                       num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size, drop_remainder=True).prefetch(4))


def training(folder, steps, rounds):
    """fit steps/s from shards and from in-memory windows (same model, same size; the second fit of each timed)."""
    sequence_length, batch_size = 64, 12
    tokens = np.asarray(shards.open_shard(shards.shard_files(folder)[0][0])[:2_000_000]).astype(np.int32)
    sources = {"shards": kn.data.token_dataset(folder, sequence_length, batch_size, seed=0),
               "in_memory": in_memory(tokens, sequence_length, batch_size)}
    rates = {}
    for _ in range(rounds):  # alternate, so that load changes hit both alike
        for name, dataset in sources.items():
            keras.utils.set_random_seed(0)
            model = kn.NanoGPT(257, sequence_length, 4, 4, 128)
            model.compile()
            model.fit(dataset, steps_per_epoch=20, epochs=1, verbose=0)  # compile and warm up
            start = time.perf_counter()
            model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
            rates.setdefault(name, []).append(steps / (time.perf_counter() - start))
    best = {name: round(max(r), 2) for name, r in rates.items()}
    return {"backend": keras.backend.backend(), "steps": steps, "steps_per_s": best,
            "all_steps_per_s": {name: [round(x, 2) for x in r] for name, r in rates.items()},
            "shards_over_in_memory": round(best["shards"] / best["in_memory"], 3)}


def main():
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--corpus-mb", type=float, default=50)
    parser.add_argument("--shards", default=None, help="prepared shards to read (skips making and preparing)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200, help="timed fit steps per run (0: no training)")
    parser.add_argument("--rounds", type=int, default=2, help="timed fits per data source, alternating")
    parser.add_argument("--no-reading", action="store_true", help="skip the reading figures")
    args = parser.parse_args()
    report = _common.machine()
    scratch = tempfile.mkdtemp(prefix="shard_reading_")
    try:
        folder = args.shards
        if folder is None:
            source_bytes = make_corpus(os.path.join(scratch, "corpus"), args.corpus_mb)
            folder = os.path.join(scratch, "shards")
            start = time.perf_counter()
            manifest = kn.data.prepare(os.path.join(scratch, "corpus"), folder, "byte", workers=args.workers,
                                       val_fraction=0.005, progress=False)
            seconds = time.perf_counter() - start
            tokens = sum(manifest["tokens"].values())
            report["prepare"] = {"source_mb": round(source_bytes / 1e6, 1), "tokens": tokens,
                                 "workers": args.workers, "seconds": round(seconds, 2),
                                 "tokens_per_s": round(tokens / seconds)}
        if not args.no_reading:
            report["reading"] = [reading(folder, t, b, args.batches) for t, b in ((64, 12), (256, 32), (1024, 8))]
        if args.steps:
            report["training"] = training(folder, args.steps, args.rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["load_average_at_end"] = _common.load_average()
    print(__import__("json").dumps(report))


if __name__ == "__main__":
    main()
