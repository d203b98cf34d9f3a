"""Corpora of any size, printing JSON: memory and the first batch when training from prepared shards against
today's in-memory `make_datasets`, `prepare`'s throughput against nanoGPT's own prepare steps, and training
speed from shards against in-memory windows, per backend.

    python benchmarks/corpus_scale.py --parts memory --sizes 200,2000
    python benchmarks/corpus_scale.py --parts prepare --prepare-mb 200
    python benchmarks/corpus_scale.py --parts speed --backends tensorflow,jax,torch

The corpora are shuffled paragraphs of ../shared/data's two texts, written to --workdir (a folder under
/tmp by default, kept between runs so a second run skips building them). Every measured run is a fresh
process: its peak RSS (`ru_maxrss`) and its anonymous memory (`RssAnon`, what the kernel cannot take back;
the mapped shards' pages are page cache) after the run are its own.

- memory: a char-level nano model (4 layers, 128 wide, context 64, batch 12) trained --steps steps
  (500) from a prepared corpus of each --sizes MB, and from the text of the first size through
  load_text -> make_vectorizer -> make_datasets (today's path) for comparison.
- prepare: GPT-2-style byte-level BPE (tiktoken, ranks learned from the benchmark text: no network
  here for GPT-2's own file) over a .jsonl of documents, ours (`kn.data.prepare`, --workers processes)
  against nanoGPT's openwebtext method (its `process`: `encode_ordinary` plus end-of-text per document,
  in as many processes, concatenated into a uint16 `.bin` through `np.memmap`); then char level against
  nanoGPT's shakespeare_char method (read the file, `sorted(set(data))`, a dict per character, one
  uint16 array written with `tofile`) on a --prepare-mb MB text.
- speed: tokens/s of `fit` at the nano recipe from shards against the same model from in-memory
  windows of the same text, alternating bursts in one process per backend; the loader alone is timed
  too (its batches/s against the step's).
"""

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time

import _common

import numpy as np

SHARED = os.path.join(_common.ROOT, "..", "shared", "data")
TEXTS = ("pride_and_prejudice.txt", "tinyshakespeare.txt")
NANO = dict(sequence_length=64, num_layers=4, num_heads=4, hidden_dim=128)
BATCH = 12


def parse_args(argv=None):
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--parts", default="memory,prepare,speed")
    parser.add_argument("--sizes", default="200,2000", help="corpus sizes in MB for the memory part")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--prepare-mb", type=int, default=200, help="MB of text for the prepare part")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--speed-steps", type=int, default=200, help="steps per timed burst (speed part)")
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--skip-baseline", action="store_true", help="memory: leave out make_datasets")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kn_corpus_bench"))
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def paragraphs():
    import keras_nanogpt as kn

    found = []
    for name in TEXTS:
        with open(os.path.join(SHARED, name), encoding="utf-8") as f:
            found += [p for p in kn.data.clean_text(f.read()).split("\n\n") if p.strip()]
    return found


def build_text(path, megabytes, seed=0):
    """A text file of `megabytes` MB of shuffled paragraphs (kept when it is already there)."""
    size = megabytes * 1_000_000
    if os.path.exists(path) and os.path.getsize(path) >= size:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pieces, rng, written = paragraphs(), random.Random(seed), 0
    with open(path + ".part", "w", encoding="utf-8") as f:
        while written < size:
            rng.shuffle(pieces)
            block = "\n\n".join(pieces) + "\n\n"
            f.write(block)
            written += len(block.encode("utf-8"))
    os.replace(path + ".part", path)
    return path


def build_corpus(folder, megabytes, files):
    """`files` text files of `megabytes / files` MB each in `folder`."""
    return [build_text(os.path.join(folder, f"part_{i:03d}.txt"), megabytes // files, seed=i) for i in range(files)]


def build_jsonl(path, megabytes, seed=0):
    """A .jsonl of documents of 1 to 40 paragraphs (about OpenWebText's 4 KB mean) of `megabytes` MB."""
    size = megabytes * 1_000_000
    if os.path.exists(path) and os.path.getsize(path) >= size:
        return path
    pieces, rng, written = paragraphs(), random.Random(seed), 0
    with open(path + ".part", "w", encoding="utf-8") as f:
        while written < size:
            document = "\n\n".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
            line = json.dumps({"text": document}) + "\n"
            f.write(line)
            written += len(line)
    os.replace(path + ".part", path)
    return path


def memory_status():
    """RssAnon and RssFile in MB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                values[key] = round(int(rest.split()[0]) / 1024, 1)
    return values


def fit_steps(model, dataset, steps):
    """Seconds of `fit` over `steps` steps, and the seconds until its first step ended."""
    import keras

    first = {}

    class First(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            first.setdefault("end", time.perf_counter())

    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[First()])
    end = time.perf_counter()
    return end - start, first["end"] - start


def shard_tokenizer(path):
    """The tokenizer a `prepare` folder's manifest records."""
    import keras_nanogpt as kn
    from keras_nanogpt import shards

    return kn.tokenizers.Tokenizer.from_config(shards.token_info(path)["tokenizer"]["config"])


def nano_model(vocabulary_size):
    import keras_nanogpt as kn

    model = kn.NanoGPT(vocabulary_size=vocabulary_size, dropout=0.0, **NANO)
    model.compile(optimizer=kn.training.nanogpt_optimizer(2000))
    return model


def memory_worker(args, mode, path):
    """One memory run: `mode` "text" (load_text -> make_datasets) or "shards" (token_dataset) from `path`."""
    import keras_nanogpt as kn

    start = time.perf_counter()
    if mode == "text":
        text = kn.data.load_text(path)
        vectorizer = kn.data.make_vectorizer(text, level="char")
        dataset, _ = kn.data.make_datasets(text, vectorizer, NANO["sequence_length"], BATCH,
                                           validation_split=0.0, sampling="random", seed=0)
        vocabulary_size = vectorizer.vocabulary_size()
        del text
    else:
        dataset = kn.data.token_dataset(path, NANO["sequence_length"], BATCH, sampling="random", seed=0)
        vocabulary_size = shard_tokenizer(path).size
    next(iter(dataset.take(1)))
    first_batch = time.perf_counter() - start
    model = nano_model(vocabulary_size)
    seconds, first_step = fit_steps(model, dataset.repeat() if mode == "text" else dataset, args.steps)
    return {"mode": mode, "path": path, "seconds_to_first_batch": round(first_batch, 2),
            "fit_first_step_seconds": round(first_step, 2), "fit_seconds": round(seconds, 2),
            "steps": args.steps, "peak_rss_mb": _common.peak_rss_mb(1), **memory_status()}


def memory(args, report):
    import keras_nanogpt as kn

    runs = []
    sizes = [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        folder = os.path.join(args.workdir, f"corpus_{size}MB")
        sources = build_corpus(folder, size, files=max(1, size // 250))
        shards = os.path.join(args.workdir, f"shards_char_{size}MB")
        if not os.path.exists(os.path.join(shards, "manifest.json")):
            start = time.perf_counter()
            kn.data.prepare([folder], shards, tokenizer="char", workers=args.workers, val_fraction=0.0)
            print(f"prepared {size} MB in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        runs.append({"corpus_mb": size, **_common.run_worker(__file__, "tensorflow", "memory", "shards", shards)})
        print(json.dumps(runs[-1]), file=sys.stderr)
        if size == sizes[0] and not args.skip_baseline:
            one_file = build_text(os.path.join(args.workdir, f"text_{size}MB.txt"), size)
            runs.append({"corpus_mb": size, **_common.run_worker(__file__, "tensorflow", "memory", "text",
                                                                  one_file)})
            print(json.dumps(runs[-1]), file=sys.stderr)
    report["memory"] = runs
    shard_runs = [r for r in runs if r.get("mode") == "shards"]
    if len(shard_runs) >= 2:
        report["memory_summary"] = {
            "rss_anon_difference_mb": round(shard_runs[-1]["RssAnon"] - shard_runs[0]["RssAnon"], 1),
            "largest_seconds_to_first_batch": max(r["seconds_to_first_batch"] for r in shard_runs),
            f"peak_rss_mb_shards_{sizes[0]}MB": shard_runs[0]["peak_rss_mb"]}


def nanogpt_bpe_worker(encoding_file, jsonl, out, workers):
    """nanoGPT's openwebtext prepare method on `jsonl`: per document `encode_ordinary` + end-of-text, in
    `workers` processes, then every document's ids concatenated into a uint16 `.bin` through `np.memmap`."""
    import multiprocessing

    import keras_nanogpt as kn

    global _ENCODING
    _ENCODING = bpe_encoding(kn.tokenizers.Tokenizer.load(encoding_file))  # made before the clock, as tiktoken's is
    start = time.perf_counter()
    with open(jsonl, encoding="utf-8") as f:
        documents = [json.loads(line)["text"] for line in f]
    with multiprocessing.get_context("fork").Pool(workers) as pool:  # the workers inherit the encoding
        ids = pool.map(_nanogpt_process, documents, chunksize=256)
    total = sum(len(x) for x in ids)
    array = np.memmap(out, dtype=np.uint16, mode="w+", shape=(total,))
    index = 0
    for batch in range(0, len(ids), 1024):
        chunk = np.concatenate(ids[batch:batch + 1024])
        array[index:index + len(chunk)] = chunk
        index += len(chunk)
    array.flush()
    return {"tokens": int(total), "seconds": round(time.perf_counter() - start, 2)}


_ENCODING = None


def bpe_encoding(tokenizer):
    """A tiktoken `Encoding` of a learned BPE `Tokenizer` (its ranks, GPT-2's pattern, `<|endoftext|>`)."""
    import tiktoken

    import keras_nanogpt as kn

    ranks = tokenizer._base._ranks  # a benchmark may read it: the package's API takes the Encoding made here
    return tiktoken.Encoding("benchmark_bpe", pat_str=kn.tokenizers.GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={kn.tokenizers.END_OF_TEXT: tokenizer.end_of_text_id})


def _nanogpt_process(text):
    ids = _ENCODING.encode_ordinary(text)
    ids.append(_ENCODING.eot_token)
    return np.array(ids, dtype=np.uint16)


def nanogpt_char_worker(path, out):
    """nanoGPT's shakespeare_char method: the whole file read, its sorted characters, a dict lookup per
    character, one uint16 array written with `tofile`."""
    start = time.perf_counter()
    with open(path, encoding="utf-8") as f:
        data = f.read()
    chars = sorted(set(data))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in data], dtype=np.uint16)
    ids.tofile(out)
    return {"tokens": int(ids.size), "seconds": round(time.perf_counter() - start, 2),
            "peak_rss_mb": _common.peak_rss_mb(1)}


def ours_prepare_worker(sources, out, tokenizer, workers):
    """`kn.data.prepare` of `sources`: "char", or the path of a saved learned BPE (given as its tiktoken Encoding)."""
    import keras_nanogpt as kn

    if tokenizer != "char":
        tokenizer = bpe_encoding(kn.tokenizers.Tokenizer.load(tokenizer))
    start = time.perf_counter()
    manifest = kn.data.prepare([sources], out, tokenizer=tokenizer, workers=int(workers), val_fraction=0.0,
                               progress=False)
    return {"tokens": int(sum(manifest["tokens"].values())), "seconds": round(time.perf_counter() - start, 2),
            "peak_rss_mb": _common.peak_rss_mb(1)}


def prepare(args, report):
    import shutil

    import keras_nanogpt as kn

    folder = os.path.join(args.workdir, "prepare")
    os.makedirs(folder, exist_ok=True)
    jsonl = build_jsonl(os.path.join(folder, f"documents_{args.prepare_mb}MB.jsonl"), args.prepare_mb)
    encoding_file = os.path.join(folder, "bpe_tokenizer.json")
    if not os.path.exists(encoding_file):
        sample = "\n\n".join(paragraphs())
        kn.tokenizers.learn_bpe(sample, vocabulary_size=4096).save(encoding_file)
    rows = {}
    for name, run in (("ours", lambda: _common.run_worker(__file__, "tensorflow", "prepare_ours", jsonl,
                                                          os.path.join(folder, "ours_bpe"), encoding_file,
                                                          str(args.workers))),
                      ("nanogpt", lambda: _common.run_worker(__file__, "tensorflow", "prepare_nanogpt_bpe",
                                                             encoding_file, jsonl,
                                                             os.path.join(folder, "nanogpt_train.bin"),
                                                             str(args.workers)))):
        shutil.rmtree(os.path.join(folder, "ours_bpe"), ignore_errors=True)
        rows[name] = run()
        print(name, rows[name], file=sys.stderr)
    bpe = {"text_mb": args.prepare_mb, "workers": args.workers, **rows}
    if "seconds" in rows["ours"] and "seconds" in rows["nanogpt"]:
        for row in rows.values():
            row["tokens_per_second"] = round(row["tokens"] / row["seconds"])
        bpe["ours_vs_nanogpt"] = round(rows["ours"]["tokens_per_second"] / rows["nanogpt"]["tokens_per_second"], 3)
    report["prepare_bpe"] = bpe
    text = build_text(os.path.join(args.workdir, f"text_{args.prepare_mb}MB.txt"), args.prepare_mb)
    rows = {}
    for name, run in (("ours", lambda: _common.run_worker(__file__, "tensorflow", "prepare_ours", text,
                                                          os.path.join(folder, "ours_char"), "char",
                                                          str(args.workers))),
                      ("nanogpt", lambda: _common.run_worker(__file__, "tensorflow", "prepare_nanogpt_char", text,
                                                             os.path.join(folder, "nanogpt_char.bin")))):
        shutil.rmtree(os.path.join(folder, "ours_char"), ignore_errors=True)
        rows[name] = run()
        print(name, rows[name], file=sys.stderr)
    char = {"text_mb": args.prepare_mb, "workers": args.workers, **rows}
    if "seconds" in rows["ours"] and "seconds" in rows["nanogpt"]:
        char["ours_vs_nanogpt_speed"] = round(rows["nanogpt"]["seconds"] / rows["ours"]["seconds"], 3)
    report["prepare_char"] = char


def speed_worker(args, shards, text_path):
    """Tokens/s of `fit` from shards and from in-memory windows of the same text, alternating bursts."""
    import keras_nanogpt as kn

    text = kn.data.load_text(text_path)
    tokenizer = shard_tokenizer(shards)
    memory_ds, _ = kn.data.make_datasets(text, tokenizer.layer, NANO["sequence_length"], BATCH,
                                         validation_split=0.0, sampling="random", seed=0)
    datasets = {"memory": memory_ds.repeat(),
                "shards": kn.data.token_dataset(shards, NANO["sequence_length"], BATCH, sampling="random", seed=0)}
    loader = {}
    for name, dataset in datasets.items():
        iterator = iter(dataset)
        next(iterator)
        start = time.perf_counter()
        for _ in range(args.speed_steps):
            next(iterator)
        loader[name] = round((time.perf_counter() - start) / args.speed_steps * 1000, 3)
    model = nano_model(tokenizer.size)
    for dataset in datasets.values():  # warm-up: compilation, first batches
        fit_steps(model, dataset, 20)
    seconds = {name: [] for name in datasets}
    for _ in range(args.bursts):
        for name, dataset in datasets.items():
            seconds[name].append(fit_steps(model, dataset, args.speed_steps)[0])
    tokens = args.speed_steps * BATCH * NANO["sequence_length"]
    rate = {name: round(tokens / float(np.median(values))) for name, values in seconds.items()}
    return {"tokens_per_second": rate, "shards_vs_memory": round(rate["shards"] / rate["memory"], 3),
            "burst_seconds": {k: [round(v, 2) for v in vs] for k, vs in seconds.items()},
            "loader_alone_ms_per_batch": loader,
            "step_ms": {name: round(float(np.median(v)) / args.speed_steps * 1000, 2) for name, v in seconds.items()}}


def speed(args, report):
    import keras_nanogpt as kn

    text = os.path.join(SHARED, "tinyshakespeare.txt")
    shards = os.path.join(args.workdir, "shards_char_shakespeare")
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        kn.data.prepare([text], shards, tokenizer="char", workers=args.workers, progress=False)
    report["speed"] = {}
    for backend in args.backends.split(","):
        report["speed"][backend] = _common.run_worker(__file__, backend, "speed", shards, text)
        print(backend, report["speed"][backend], file=sys.stderr)


def worker(args):
    kind, *rest = args.worker
    if kind == "memory":
        return memory_worker(args, *rest)
    if kind == "prepare_ours":
        return ours_prepare_worker(*rest)
    if kind == "prepare_nanogpt_bpe":
        return nanogpt_bpe_worker(rest[0], rest[1], rest[2], int(rest[3]))
    if kind == "prepare_nanogpt_char":
        return nanogpt_char_worker(*rest)
    if kind == "speed":
        return speed_worker(args, *rest)
    raise SystemExit(f"unknown worker {kind}")


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    os.makedirs(args.workdir, exist_ok=True)
    report = {**_common.machine(), "workdir": args.workdir, "steps": args.steps}
    for part in args.parts.split(","):
        {"memory": memory, "prepare": prepare, "speed": speed}[part](args, report)
    report["load_average_at_end"] = _common.load_average()
    report["max_rss_of_this_process_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
