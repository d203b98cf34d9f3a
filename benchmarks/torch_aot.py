"""PyTorch generation with the decode step's AOTInductor package (issue 37) against the traced graph, the eager
step and nanoGPT's `generate`, printing JSON.

Model: generate_speed.py's (4 layers, 4 heads, 128 wide, context 256, random weights), a 16-token prompt and 200
new greedy tokens. All in a fresh package folder (a temporary one unless `--aot-dir`), each part a process of its own:

1. `while_building`, the issue's "no call while the package builds above 1.5x today's traced path", each side a
   fresh process: `traced`, today's traced path (KERAS_NANOGPT_AOT=0, KERAS_NANOGPT_TORCH_COMPILE=trace), its
   first and second calls; `no_package`, the default with no package on disk (the traced graph serves and a
   background builder starts), call after call until one runs the package (at most `--building-calls` calls;
   then the builder is waited for and one more call made), with `ratio` per call: its seconds over the traced
   path's first call (for the first call) or second call (for the later ones); `background_build_s`, how long
   the builder took to leave the package, from the first call's start.
2. `compile_s`: `kn.generation.compile_packages` for the other batch sizes in one process (the in-process
   build time of each package it builds, and its whole run).
3. `first_call_with_package` and nanoGPT's first call, each in a fresh process (the best of `--fresh` each).
4. `prefill`: the prefill alone (one prompt bucket after another, `--prefill-buckets`), eagerly (today's path
   without a package, and on "trace") against its package (built in the process first): medians of 30 calls.
5. Steady state, after one warm-up call each, side by side in one process with rounds alternating:
   `package` (the default "auto" with the package on disk), `traced` (KERAS_NANOGPT_TORCH_COMPILE=trace),
   `eager` (=never) and `nanogpt`; batch 1 and 8. Ratios compare medians.

    python benchmarks/torch_aot.py --nanogpt ../nanoGPT
    python benchmarks/torch_aot.py --nanogpt ../nanoGPT --batch-sizes 1 --rounds 5
    python benchmarks/torch_aot.py --parts while_building

`--threads` sets torch's threads on both sides (ours and nanoGPT's).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import _common

LAYERS, HEADS, WIDTH, CONTEXT, VOCABULARY = 4, 4, 128, 256, 96


def parse_args(argv=None):
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each method, alternating")
    parser.add_argument("--fresh", type=int, default=2, help="fresh processes per first-call figure (best of)")
    parser.add_argument("--building-calls", type=int, default=100,
                        help="while_building: at most this many calls while the builder runs")
    parser.add_argument("--prefill-buckets", default="16,128", help="prefill: prompt lengths (powers of two)")
    parser.add_argument("--parts", default="while_building,compile,first,prefill,steady",
                        help="which of the parts below to run (first: the fresh-process first calls)")
    parser.add_argument("--aot-dir", default=None, help="the package folder (default: a new temporary one)")
    _common.add_nanogpt_arguments(parser)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    folder = args.aot_dir or tempfile.mkdtemp(prefix="keras_nanogpt_aot_")
    os.environ.update(KERAS_NANOGPT_AOT_DIR=folder, KERAS_NANOGPT_AOT="1")
    os.environ.pop("KERAS_NANOGPT_TORCH_COMPILE", None)
    results = {"model": dict(layers=LAYERS, heads=HEADS, width=WIDTH, context=CONTEXT, vocabulary=VOCABULARY),
               "prompt_length": args.prompt_length, "new_tokens": args.new_tokens, "sampling": "greedy",
               **_common.machine()}
    parts = args.parts.split(",")
    try:
        if "while_building" in parts:
            results["while_building"] = while_building()
        if "compile" in parts:
            results["compile"] = worker("compile")
        if "first" in parts:
            results["first_call_fresh_process_s"] = {
                name: min(worker(name)["seconds"] for _ in range(args.fresh))
                for name in ("first_with", "first_nanogpt" if args.nanogpt else None) if name}
        if "prefill" in parts:
            results["prefill"] = worker("prefill")
        if "steady" in parts:
            results["steady"] = worker("steady")
        results["packages"] = sorted(n for n in os.listdir(folder) if n.endswith(".pt2"))
    finally:
        if not args.aot_dir:
            shutil.rmtree(folder, ignore_errors=True)
    results["load_average_at_end"] = _common.load_average()
    print(json.dumps(results, indent=2))


def worker(name):
    done = _common.run_worker(__file__, "torch", name, error_lines=8)
    if "error" in done:
        raise RuntimeError(f"the {name} worker failed: {done['error']}")
    return done


def _model(args):
    import keras
    import torch

    import keras_nanogpt as kn

    torch.set_num_threads(args.threads)
    keras.utils.set_random_seed(0)
    return kn.NanoGPT(VOCABULARY, CONTEXT, LAYERS, HEADS, WIDTH)


def _prompt(args, batch):
    import numpy as np

    return np.random.default_rng(0).integers(1, VOCABULARY, (batch, args.prompt_length)).astype("int32")


def while_building():
    """Today's traced path against the path without a package while its builder runs, call by call."""
    traced, building = worker("traced_fresh"), worker("no_package")
    for call in building["calls"]:
        call["ratio"] = round(call["seconds"] / traced["seconds"][min(call["call"], 1)], 2)
    during = [call["ratio"] for call in building["calls"] if call["builder_running"]]
    return {"traced": traced, "no_package": building, "max_ratio_while_building": max(during, default=None)}


def traced_fresh(args):
    """A fresh process's first two calls on today's traced path (no packages)."""
    os.environ.update(KERAS_NANOGPT_AOT="0", KERAS_NANOGPT_TORCH_COMPILE="trace")
    model, prompt = _model(args), _prompt(args, 1)
    return {"seconds": [round(_seconds(model.generate, prompt, args.new_tokens, temperature=0), 3)
                        for _ in range(2)], "load_average": _common.load_average()}


def no_package(args):
    """A fresh process with no package on disk: call after call until one runs the package, the builder's time."""
    from keras_nanogpt import _torch_aot

    model, prompt = _model(args), _prompt(args, 1)
    start, calls = time.time(), []
    while True:
        running = any(process.poll() is None for process, _ in _torch_aot._builders)
        if len(calls) >= args.building_calls and running:
            _torch_aot.wait_for_builders(timeout=1800)
            running = False
        seconds = _seconds(model.generate, prompt, args.new_tokens, temperature=0)
        (level,) = {step.level() for step in model._kn_compiled.steps.values()}
        calls.append({"call": len(calls), "seconds": round(seconds, 3), "builder_running": running, "level": level})
        if level == "package" or (len(calls) > 1 and not running):  # loaded, or it will not come
            break
    codes = _torch_aot.wait_for_builders(timeout=1800)
    folder = _torch_aot.directory()
    packages = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".pt2")]
    return {"calls": calls, "builder_exit_codes": codes, "counters": _torch_aot.counters,
            "background_build_s": round(os.path.getmtime(packages[0]) - start, 1) if packages else None,
            "load_average": _common.load_average()}


def _seconds(method, *args, **kwargs):
    start = time.perf_counter()
    method(*args, **kwargs)
    return time.perf_counter() - start


def compile_packages(args):
    """`compile_packages` for every batch size (the first one's package is there already)."""
    import keras_nanogpt as kn
    from keras_nanogpt import _torch_aot

    batches = [int(b) for b in args.batch_sizes.split(",")]
    start = time.perf_counter()
    report = kn.generation.compile_packages(_model(args), batch_sizes=batches, sampling=["greedy"])
    folder = _torch_aot.directory()
    builds = [json.load(open(os.path.join(folder, name)))["seconds"] for name in sorted(os.listdir(folder))
              if name.endswith(".json")]
    return {**report, "seconds": round(time.perf_counter() - start, 1), "package_build_s": builds,
            "package_mb": [round(os.path.getsize(os.path.join(folder, n)) / 2**20, 2)
                           for n in sorted(os.listdir(folder)) if n.endswith(".pt2")],
            "load_average": _common.load_average()}


def first_with(args):
    from keras_nanogpt import _torch_aot

    model, prompt = _model(args), _prompt(args, 1)
    start = time.perf_counter()
    model.generate(prompt, args.new_tokens, temperature=0)
    seconds = time.perf_counter() - start
    levels = sorted({step.level() for step in model._kn_compiled.steps.values()})
    return {"seconds": round(seconds, 3), "levels": levels, "counters": _torch_aot.counters}


def first_nanogpt(args):
    method = _nanogpt(args, _prompt(args, 1))
    start = time.perf_counter()
    method()
    return {"seconds": round(time.perf_counter() - start, 3)}


def _nanogpt(args, prompt):
    return _common.nanogpt_generator(args.nanogpt, prompt, args.new_tokens, top_k=1, threads=args.threads,
                                     sequence_length=CONTEXT, vocabulary_size=VOCABULARY, num_layers=LAYERS,
                                     num_heads=HEADS, hidden_dim=WIDTH)


def prefill(args):
    """The prefill alone, eagerly and from its package, bucket by bucket."""
    import statistics

    import keras
    import numpy as np
    import torch

    from keras_nanogpt import _torch_aot, _torch_compile, decoding

    model, runs = _model(args), []
    for length in (int(b) for b in args.prefill_buckets.split(",")):
        tokens = keras.ops.convert_to_tensor(_prompt(args, 1)[:, :1].repeat(length, axis=1))  # the model's device
        cache = model.empty_cache(1)
        eager, packaged = decoding.prefill(model), _torch_compile.Prefill(model)
        with _torch_aot.building_now():
            start = time.perf_counter()
            packaged(tokens, cache)  # builds its package in the process (or loads it)
            build = time.perf_counter() - start
        times = {}
        with torch.no_grad():
            for name, method in (("eager", eager), ("package", packaged)):
                method(tokens, cache)
                times[name] = statistics.median([_seconds(method, tokens, cache) for _ in range(30)]) * 1000
            same = all(np.allclose(a.cpu().numpy(), b.cpu().numpy(), atol=1e-5) for a, b in zip(
                sum(eager(tokens, cache), ()), sum(packaged(tokens, cache), ())))
        runs.append({"prompt_bucket": length, "ms": {k: round(v, 2) for k, v in times.items()},
                     "speedup_of_package": round(times["eager"] / times["package"], 1),
                     "package_build_s": round(build, 1), "same_cache": same})
    return {"runs": runs, "counters": _torch_aot.counters, "load_average": _common.load_average()}


def _in_mode(mode, method):
    def run():
        os.environ["KERAS_NANOGPT_TORCH_COMPILE"] = mode
        try:
            return method()
        finally:
            del os.environ["KERAS_NANOGPT_TORCH_COMPILE"]

    return run


def steady(args):
    """Each path after one warm-up call, rounds alternating, batch by batch."""
    import numpy as np

    from keras_nanogpt import _torch_aot

    base = _model(args)
    models = {}
    for name in ("package", "traced", "eager"):
        models[name] = _model(args)
        models[name].set_weights(base.get_weights())
    run = {"load_average_at_start": _common.load_average(), "batches": []}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompt = _prompt(args, batch)
        methods = {
            "package": _in_mode("auto", lambda p=prompt: models["package"].generate(p, args.new_tokens, temperature=0)),
            "traced": _in_mode("trace", lambda p=prompt: models["traced"].generate(p, args.new_tokens, temperature=0)),
            "eager": _in_mode("never", lambda p=prompt: models["eager"].generate(p, args.new_tokens, temperature=0)),
        }
        if args.nanogpt:
            methods["nanogpt"] = _nanogpt(args, prompt)
        first, median, outputs = _common.time_methods(methods, args.rounds, label=f"batch {batch}")
        same = all(np.array_equal(outputs["package"], outputs[name]) for name in ("traced", "eager"))
        levels = sorted({step.level() for step in models["package"]._kn_compiled.steps.values()})
        run["batches"].append({
            "batch_size": batch, "package_levels": levels, "package_tokens_equal_traced_and_eager": same,
            "first_call_s": {k: round(v, 3) for k, v in first.items()},
            "ms": {k: round(v * 1000, 1) for k, v in median.items()},
            "tokens_per_s": {k: round(batch * args.new_tokens / v, 1) for k, v in median.items()},
            "speedup_of_package": {k: round(v / median["package"], 2) for k, v in median.items() if k != "package"}})
    run["counters"] = _torch_aot.counters
    run["load_average_at_end"] = _common.load_average()
    return run


WORKERS = {"traced_fresh": traced_fresh, "no_package": no_package, "compile": compile_packages,
           "first_with": first_with, "first_nanogpt": first_nanogpt, "prefill": prefill, "steady": steady}

if __name__ == "__main__":
    sys.exit(main())
