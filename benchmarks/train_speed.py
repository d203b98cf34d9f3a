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
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # `keras-nanogpt bench` runs this file with runpy, which leaves its folder off the path
    sys.path.insert(0, HERE)
import _common  # noqa: E402

JIT_COMPILE = {"auto": "auto", "on": True, "off": False}  # --jit-compile value -> compile(jit_compile=)


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
    _common.add_nanogpt_arguments(parser)
    parser.add_argument("--worker", nargs=3, metavar=("BACKEND", "PRECISION", "JIT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.jit_compile.split(",")) - set(JIT_COMPILE)
    if unknown:
        parser.error(f"--jit-compile takes {', '.join(JIT_COMPILE)}; got {', '.join(sorted(unknown))}")
    return args


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args, *args.worker)))
        return
    results = {"config": args.config, "batch_size": args.batch_size, **_common.machine(),
               "peak_fp32_gflops": round(matmul_peak() / 1e9, 1), "runs": []}
    for backend in args.backends.split(","):
        for precision in args.precisions.split(","):
            for jit in args.jit_compile.split(","):
                run = _common.run_worker(__file__, backend, backend, precision, jit, error_lines=1)
                if "error" in run:
                    run = {"backend": backend, "precision": precision, "jit_compile": jit, **run}
                else:
                    run["mfu"] = round(run["flops_per_second"] / (results["peak_fp32_gflops"] * 1e9), 3)
                results["runs"].append(run)
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
