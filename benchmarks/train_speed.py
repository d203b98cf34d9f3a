"""Training speed at nanoGPT's shakespeare_char CPU config, per backend and precision, printing JSON.

For each backend (a subprocess each) and precision (fp32, bf16) it reports ms/step, tokens/s, MFU
(nanoGPT's estimate, 6N + 12*layers*time*width FLOPs per token, against the measured fp32 matmul
peak), peak RSS and the first step's compile time. With `--nanogpt DIR` (a checkout of
karpathy/nanoGPT; its `model.py` is imported, never copied) each worker also trains nanoGPT at the same
config in the same process, alternating bursts with ours, and reports the ratio.

    python benchmarks/train_speed.py --nanogpt ../nanoGPT
    python benchmarks/train_speed.py --backends jax --precisions bf16 --config baby --bursts 2
    python benchmarks/train_speed.py --backends tensorflow --precisions fp32 --jit-compile auto,off
    python benchmarks/train_speed.py --backends torch --precisions fp32 --jit-compile auto,off --nanogpt ../nanoGPT

PyTorch's train step at three levels (issue 37), side by side with nanoGPT in one process, bursts
alternating: `--torch-levels package,graph,eager` trains one model per level (`package`: the traced step's
AOTInductor package, built in the process first unless on disk, its build time reported; `graph`: the
traced ATen graph, packages off; `eager`: Keras's eager step). `--whole-run STEPS` then times whole runs
as fresh processes, start-up included (imports, data, model, tracing, loading): nanoGPT's training loop
(its model.py and AdamW, train.py's schedule and clipping, random windows of the text; no evaluations or
checkpoints), ours with no package on disk (`first`, which starts a builder as it exits; its build time
is reported as `background_build_s`), ours again with the package (`second`), and nanoGPT again:

    python benchmarks/train_speed.py --backends torch --precisions fp32 --torch-levels package,graph,eager \
        --whole-run 2000 --nanogpt ../nanoGPT
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # `keras-nanogpt bench` runs this file with runpy, which leaves its folder off the path
    sys.path.insert(0, HERE)
import _common  # noqa: E402

JIT_COMPILE = {"auto": "auto", "on": True, "off": False}  # --jit-compile value -> compile(jit_compile=)
# --torch-levels value -> (jit_compile, environment while its first step runs)
LEVELS = {"package": ("auto", {"KERAS_NANOGPT_AOT": "1", "KERAS_NANOGPT_TORCH_COMPILE": "always"}),
          "graph": ("auto", {"KERAS_NANOGPT_AOT": "0"}), "eager": (False, {})}


def parse_args(argv=None):
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--config", default="nano", help="nano, baby or gpt2")
    parser.add_argument("--sequence-length", type=int, default=None, help="override the config's context")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--steps", type=int, default=50, help="steps per timed burst")
    parser.add_argument("--bursts", type=int, default=3, help="timed bursts (alternating with nanoGPT)")
    parser.add_argument("--steps-per-execution", type=int, default=10, help="1 on torch (Keras's limit)")
    parser.add_argument("--jit-compile", default="auto",
                        help="comma-separated: auto (the package default), on, off; a run for each")
    parser.add_argument("--torch-levels", default=None,
                        help="torch: comma-separated package, graph, eager; one model each, side by side")
    parser.add_argument("--whole-run", type=int, default=0, metavar="STEPS",
                        help="torch: time whole runs of STEPS steps as fresh processes (needs --nanogpt)")
    parser.add_argument("--aot-dir", default=None, help="the package folder for --whole-run (default: a fresh one)")
    _common.add_nanogpt_arguments(parser)
    parser.add_argument("--worker", nargs=3, metavar=("BACKEND", "PRECISION", "JIT"), help=argparse.SUPPRESS)
    parser.add_argument("--whole-worker", choices=("ours", "nanogpt"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    levels = set((args.torch_levels or "package").split(",")) - set(LEVELS)
    if levels:
        parser.error(f"--torch-levels takes {', '.join(LEVELS)}; got {', '.join(sorted(levels))}")
    if args.whole_run and not args.nanogpt:
        parser.error("--whole-run needs --nanogpt DIR")
    unknown = set(args.jit_compile.split(",")) - set(JIT_COMPILE)
    if unknown:
        parser.error(f"--jit-compile takes {', '.join(JIT_COMPILE)}; got {', '.join(sorted(unknown))}")
    return args


def main():
    args = parse_args()
    if args.whole_worker:
        print(json.dumps(whole_worker(args, args.whole_worker)))
        return
    if args.worker:
        print(json.dumps(levels_worker(args) if args.torch_levels and args.worker[0] == "torch"
                         else worker(args, *args.worker)))
        return
    results = {"config": args.config, "batch_size": args.batch_size, **_common.machine(),
               "peak_fp32_gflops": round(matmul_peak() / 1e9, 1), "runs": []}
    for backend in filter(None, args.backends.split(",")):  # "" for --whole-run alone
        for precision in args.precisions.split(","):
            for jit in args.jit_compile.split(","):
                run = _common.run_worker(__file__, backend, backend, precision, jit, error_lines=1)
                if "error" in run:
                    run = {"backend": backend, "precision": precision, "jit_compile": jit, **run}
                elif "flops_per_second" in run:  # not in --torch-levels' report
                    run["mfu"] = round(run["flops_per_second"] / (results["peak_fp32_gflops"] * 1e9), 3)
                results["runs"].append(run)
    if args.whole_run:
        results["whole_run"] = whole_runs(args)
    results["load_average_at_end"] = _common.load_average()  # a busy machine slows every run
    print(json.dumps(results, indent=2))


def matmul_peak(size=1024, repeats=5, trials=5):
    """fp32 matrix-multiply FLOP/s of this machine (numpy, all threads): the best of `trials`, since a
    shared machine only ever slows a trial down."""
    import numpy as np

    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    a @ a
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best


def worker(args, backend, precision, jit):
    import keras

    import keras_nanogpt as kn

    if precision == "bf16":
        keras.config.set_dtype_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    text = kn.data.load_text("tinyshakespeare")
    vectorizer = kn.data.make_vectorizer(text)
    overrides = {"sequence_length": args.sequence_length} if args.sequence_length else {}
    model = kn.NanoGPT.from_config_name(args.config, vocabulary_size=vectorizer.vocabulary_size(),
                                        dropout=0.0, **overrides)
    train, _ = kn.data.make_datasets(text, vectorizer, model.sequence_length, args.batch_size,
                                     sampling="random", seed=0)
    train = train.repeat()
    total_steps = args.steps * (args.bursts + 1)
    model.compile(optimizer=kn.training.nanogpt_optimizer(total_steps, warmup_steps=min(10, total_steps - 1)),
                  steps_per_execution=1 if backend == "torch" else args.steps_per_execution,
                  jit_compile=JIT_COMPILE[jit])
    start = time.perf_counter()
    model.fit(train, steps_per_epoch=args.steps_per_execution, epochs=1, verbose=0)
    compile_seconds = time.perf_counter() - start
    nanogpt = NanoGPTRunner(args, model, vectorizer.vocabulary_size()) if args.nanogpt else None
    ours, theirs = [], []
    for _ in range(args.bursts):
        start = time.perf_counter()
        model.fit(train, steps_per_epoch=args.steps, epochs=1, verbose=0)
        ours.append((time.perf_counter() - start) / args.steps)
        if nanogpt:
            theirs.append(nanogpt.burst(args.steps))
    step = min(ours)
    tokens_per_step = args.batch_size * model.sequence_length
    flops_per_token = kn.callbacks.flops_per_token(model)
    run = {"backend": backend, "precision": precision, "jit_compile": model.jit_compile,
           "train_step": type(model.train_function).__name__,  # TracedStep: PyTorch's traced graph
           "sequence_length": model.sequence_length,
           "parameters": model.count_params(), "ms_per_step": round(step * 1000, 2),
           "tokens_per_second": round(tokens_per_step / step),
           "flops_per_second": flops_per_token * tokens_per_step / step,
           "first_step_compile_seconds": round(compile_seconds, 2),
           "peak_rss_mb": _common.peak_rss_mb()}
    if nanogpt:
        run["nanogpt_ms_per_step"] = round(min(theirs) * 1000, 2)
        run["speed_vs_nanogpt"] = round(min(theirs) / step, 3)
        run["peak_rss_mb_note"] = "includes nanoGPT (torch) in the same process"
    return run


def levels_worker(args):
    """PyTorch: one model per `--torch-levels` level, each trained in bursts alternating with nanoGPT's."""
    import keras
    import torch

    import keras_nanogpt as kn
    from keras_nanogpt import _torch_aot

    text = kn.data.load_text("tinyshakespeare")
    vectorizer = kn.data.make_vectorizer(text)
    total_steps = args.steps * (args.bursts + 1)
    runs, models, train = {}, {}, None
    for level in args.torch_levels.split(","):
        jit_compile, environment = LEVELS[level]
        keras.utils.set_random_seed(0)
        model = kn.NanoGPT.from_config_name(args.config, vocabulary_size=vectorizer.vocabulary_size(), dropout=0.0)
        if train is None:
            train, _ = kn.data.make_datasets(text, vectorizer, model.sequence_length, args.batch_size,
                                             sampling="random", seed=0)
            train = train.repeat()
        model.compile(optimizer=kn.training.nanogpt_optimizer(total_steps, warmup_steps=10), jit_compile=jit_compile)
        saved = {k: os.environ.get(k) for k in environment}
        os.environ.update(environment)
        built = _torch_aot.counters["built"]
        start = time.perf_counter()
        try:
            model.fit(train, steps_per_epoch=5, epochs=1, verbose=0)
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        runs[level] = {"first_steps_s": round(time.perf_counter() - start, 2),
                       "built_package": _torch_aot.counters["built"] > built,
                       "level": getattr(model.train_function, "level", "eager")}
        models[level] = model
    nanogpt = NanoGPTRunner(args, model, vectorizer.vocabulary_size())
    times = {level: [] for level in models}
    theirs = []
    for _ in range(args.bursts):
        for level, model in models.items():
            start = time.perf_counter()
            model.fit(train, steps_per_epoch=args.steps, epochs=1, verbose=0)
            times[level].append((time.perf_counter() - start) / args.steps)
        theirs.append(nanogpt.burst(args.steps))
    tokens_per_step = args.batch_size * model.sequence_length
    nanogpt_step = min(theirs)
    for level in models:
        step = min(times[level])
        runs[level].update(ms_per_step=round(step * 1000, 2), tokens_per_second=round(tokens_per_step / step),
                           speed_vs_nanogpt=round(nanogpt_step / step, 3),
                           median_speed_vs_nanogpt=round(_median(theirs) / _median(times[level]), 3))
    return {"backend": "torch", "precision": "fp32", "levels": runs, "torch_threads": torch.get_num_threads(),
            "nanogpt_ms_per_step": round(nanogpt_step * 1000, 2),
            "nanogpt_tokens_per_second": round(tokens_per_step / nanogpt_step),
            "sequence_length": model.sequence_length, "steps_per_burst": args.steps, "bursts": args.bursts}


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def whole_runs(args):
    """`--whole-run`: nanoGPT, ours without the package, ours with it, nanoGPT again; each a fresh process
    timed from its start to its end."""
    folder = args.aot_dir or tempfile.mkdtemp(prefix="train_aot_")
    report = {"steps": args.whole_run, "aot_dir": folder}
    try:
        report["nanogpt"] = _whole(args, "nanogpt", folder)
        report["first"] = _whole(args, "ours", folder)
        start = time.perf_counter()
        while not glob.glob(os.path.join(folder, "*.json")) and glob.glob(os.path.join(folder, "*.building")):
            time.sleep(1)  # the builder the first run started as it exited
        report["background_build_s_after_first_run"] = round(time.perf_counter() - start, 1)
        report["packages"] = [json.load(open(path)) for path in glob.glob(os.path.join(folder, "*.json"))]
        report["second"] = _whole(args, "ours", folder)
        report["nanogpt_again"] = _whole(args, "nanogpt", folder)
        runs = [report[k] for k in ("nanogpt", "nanogpt_again", "second")]
        if all("wall_s" in run for run in runs):
            best = min(runs[0]["wall_s"], runs[1]["wall_s"])
            report["second_vs_nanogpt"] = round(best / runs[2]["wall_s"], 3)
    finally:
        if not args.aot_dir:
            shutil.rmtree(folder, ignore_errors=True)
    return report


def _whole(args, who, folder):
    env = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="3", KERAS_NANOGPT_AOT="1",
               KERAS_NANOGPT_AOT_DIR=folder)
    command = [sys.executable, __file__, *sys.argv[1:], "--whole-worker", who]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-3:]}
    return {"wall_s": round(wall, 2), **json.loads(done.stdout.strip().splitlines()[-1]),
            "load_average": _common.load_average()}


def whole_worker(args, who):
    """One whole run of `--whole-run` steps at the nano recipe (batch 12, context 64, tinyshakespeare's
    characters, dropout 0, warmup 100 (`_warmup`) then cosine to 1e-4, clipping 1.0): ours through `fit`, or nanoGPT's."""
    started = time.perf_counter()
    steps = args.whole_run
    if who == "nanogpt":
        return _nanogpt_whole(args, steps, started)
    import keras_nanogpt as kn
    from keras_nanogpt import _torch_aot

    imported = time.perf_counter() - started
    text = kn.data.load_text("tinyshakespeare")
    vectorizer = kn.data.make_vectorizer(text)
    model = kn.NanoGPT.from_config_name(args.config, vocabulary_size=vectorizer.vocabulary_size(), dropout=0.0)
    train, _ = kn.data.make_datasets(text, vectorizer, model.sequence_length, args.batch_size,
                                     sampling="random", seed=0)
    model.compile(optimizer=kn.training.nanogpt_optimizer(steps, warmup_steps=_warmup(steps)))
    history = model.fit(train.repeat(), steps_per_epoch=steps, epochs=1, verbose=0)
    function = model.train_function
    return {"import_s": round(imported, 2), "in_process_s": round(time.perf_counter() - started, 2),
            "mean_loss": round(history.history["loss"][-1], 4),  # Keras's: the run's mean, not its last step's
            "level": getattr(function, "level", "eager"),
            "trace_s": [round(t, 2) for t in getattr(function, "trace_seconds", [])],
            "counters": dict(_torch_aot.counters)}


def _nanogpt_whole(args, steps, started):
    """nanoGPT's loop: its model and `configure_optimizers`, train.py's learning-rate schedule, clipping at 1.0,
    batches of random windows of the first 90% of the text."""
    import math

    import numpy as np

    torch, model, optimizer = _common.nanogpt_model(args.nanogpt, 64, 65, 4, 4, 128, threads=args.threads)
    imported = time.perf_counter() - started
    path = os.path.join(os.environ.get("KERAS_HOME") or os.path.expanduser("~/.keras"), "datasets",
                        "tinyshakespeare.txt")
    with open(path) as f:
        text = f.read()
    ids = {c: i for i, c in enumerate(sorted(set(text)))}
    data = np.array([ids[c] for c in text], "int64")
    data = torch.from_numpy(data[:int(0.9 * len(data))])
    context, batch, warmup = 64, args.batch_size, _warmup(steps)

    def learning_rate(step):
        if step < warmup:
            return 1e-3 * (step + 1) / (warmup + 1)
        ratio = (step - warmup) / (steps - warmup)
        return 1e-4 + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        offsets = torch.randint(len(data) - context, (batch,))
        x = torch.stack([data[i:i + context] for i in offsets])
        y = torch.stack([data[i + 1:i + 1 + context] for i in offsets])
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"import_s": round(imported, 2), "in_process_s": round(time.perf_counter() - started, 2),
            "final_loss": round(loss.item(), 4)}


def _warmup(steps):
    """The recipe's 100 warm-up steps, or half of a shorter run's."""
    return min(100, steps // 2)


class NanoGPTRunner:
    """nanoGPT's own model and training step (from `DIR/model.py`) at our model's configuration."""

    def __init__(self, args, model, vocabulary_size):
        self.torch, self.model, self.optimizer = _common.nanogpt_model(
            args.nanogpt, model.sequence_length, vocabulary_size, model.num_layers, model.num_heads,
            model.hidden_dim, threads=args.threads)
        self.shape = (args.batch_size, model.sequence_length)
        self.vocabulary_size = vocabulary_size
        self.burst(2)

    def burst(self, steps):
        """Seconds per step over `steps` training steps (forward, backward, clip, AdamW)."""
        torch = self.torch
        x = torch.randint(self.vocabulary_size, self.shape)
        y = torch.randint(self.vocabulary_size, self.shape)
        start = time.perf_counter()
        for _ in range(steps):
            _, loss = self.model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / steps


if __name__ == "__main__":
    main()
