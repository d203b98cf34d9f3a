"""What the benchmark scripts share: this checkout's package on the path, the machine's state, worker processes,
side-by-side timing, and nanoGPT's model from a `--nanogpt DIR` checkout.

Each script is run as `python benchmarks/NAME.py`, so this folder is on `sys.path` and `import _common` finds
this file (`keras-nanogpt bench` runs train_speed.py with runpy, so that script adds this folder itself);
importing it puts the checkout first on the path, ahead of any installed keras_nanogpt.

Example:
    >>> report = {**_common.machine(), "runs": []}  # doctest: +SKIP
    >>> report["load_average_at_end"] = _common.load_average()
"""

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def argument_parser(doc):
    """A parser whose `--help` prints the script's docstring `doc` as written (its example commands)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_nanogpt_arguments(parser):
    """Add `--threads` (torch threads, 2) and `--nanogpt DIR` (a karpathy/nanoGPT checkout, or None) to `parser`."""
    parser.add_argument("--threads", type=int, default=2, help="torch threads for nanoGPT")
    parser.add_argument("--nanogpt", default=None, help="path of a karpathy/nanoGPT checkout")


def load_average():
    """The 1-minute load average, rounded: the machine may be shared, and a busy one slows every run."""
    return round(os.getloadavg()[0], 2)


def load_averages():
    """The 1-, 5- and 15-minute load averages, rounded, for the reports that give all three."""
    return [round(x, 2) for x in os.getloadavg()]


def machine():
    """The head of every report: the date, the CPU count and the load average at the start."""
    return {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "load_average_at_start": load_average()}


def peak_rss_mb(digits=None):
    """This process's peak resident memory in MB (Linux's `ru_maxrss` is in KiB), rounded to `digits`."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, digits)


def run_worker(script, backend, *worker, flag="--worker", error_lines=3):
    """Run `script` again with this command line and `flag *worker` under `backend`; its JSON last line.

    Args:
        script: the script's path (its `__file__`).
        backend: the worker's KERAS_BACKEND.
        *worker: the values that follow `flag`.
        flag: the (hidden) option that makes the script a worker.
        error_lines: how many of a failed worker's last stderr lines to report.

    Returns:
        The worker's last stdout line as JSON, or `{"error": [its last stderr lines]}` when it failed.
    """
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, script, *sys.argv[1:], flag, *worker]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-error_lines:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_address():
    """`127.0.0.1:PORT` with a port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def time_methods(methods, rounds, label=None):
    """Time each method's first call, then `rounds` rounds calling each in turn, so a busy machine slows all alike.

    Args:
        methods: name -> a callable of no arguments.
        rounds: timed rounds after the first calls.
        label: with it, each time is printed to stderr as `LABEL: NAME [first call] SECONDS s`.

    Returns:
        `(first, median, outputs)`: name -> the first call's seconds, the median seconds of its rounds, and
        what its first call returned.

    Example:
        >>> first, median, _ = _common.time_methods({"a": f, "b": g}, rounds=3)  # doctest: +SKIP
    """
    first, outputs = {}, {}
    for name, method in methods.items():
        start = time.perf_counter()
        outputs[name] = method()
        first[name] = time.perf_counter() - start
        if label is not None:
            print(f"{label}: {name} first call {first[name]:.2f} s", file=sys.stderr, flush=True)
    times = {name: [] for name in methods}
    for _ in range(rounds):
        for name, method in methods.items():
            start = time.perf_counter()
            method()
            times[name].append(time.perf_counter() - start)
            if label is not None:
                print(f"{label}: {name} {times[name][-1]:.3f} s", file=sys.stderr, flush=True)
    return first, {name: statistics.median(values) for name, values in times.items()}, outputs


def nanogpt_gpt(nanogpt_dir, sequence_length, vocabulary_size, num_layers, num_heads, hidden_dim,
                threads=2, seed=0, dropout=0.0):
    """nanoGPT's GPT (from `nanogpt_dir/model.py`, imported, never copied) at this size, without biases.

    Returns:
        `(torch, model)`; its parameter count goes to stderr, leaving stdout to the JSON.
    """
    directory = os.path.abspath(nanogpt_dir)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    import torch
    from model import GPT, GPTConfig  # nanoGPT's model.py

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    config = GPTConfig(block_size=sequence_length, vocab_size=vocabulary_size, n_layer=num_layers,
                       n_head=num_heads, n_embd=hidden_dim, dropout=dropout, bias=False)
    with contextlib.redirect_stdout(sys.stderr):  # its reports would spoil the JSON on stdout
        return torch, GPT(config)


def nanogpt_model(nanogpt_dir, sequence_length, vocabulary_size, num_layers, num_heads, hidden_dim,
                  threads=2, seed=0, dropout=0.0):
    """nanoGPT's GPT (`nanogpt_gpt`) at the recipe's settings and its AdamW
    (`configure_optimizers`: decay 0.1 on 2-D weights, lr 1e-3, betas (0.9, 0.99)).

    Returns:
        `(torch, model, optimizer)`.
    """
    torch, model = nanogpt_gpt(nanogpt_dir, sequence_length, vocabulary_size, num_layers, num_heads, hidden_dim,
                               threads=threads, seed=seed, dropout=dropout)
    with contextlib.redirect_stdout(sys.stderr):
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    return torch, model, optimizer


def nanogpt_generator(nanogpt_dir, prompt, new_tokens, top_k=1, threads=2, **size):
    """nanoGPT's `GPT.generate` of `new_tokens` tokens after `prompt`, on a fresh model in eval mode.

    Args:
        nanogpt_dir: a karpathy/nanoGPT checkout.
        prompt: integer ids, shape `(batch, length)`.
        top_k: 1 for greedy decoding.
        **size: `nanogpt_gpt`'s sequence_length, vocabulary_size, num_layers, num_heads, hidden_dim.

    Returns:
        A callable of no arguments that runs the generation (no gradients) and returns its ids.
    """
    torch, model = nanogpt_gpt(nanogpt_dir, threads=threads, **size)
    model.eval()
    ids = torch.from_numpy(prompt.astype("int64"))

    def run():
        with torch.no_grad():
            return model.generate(ids, new_tokens, temperature=1.0, top_k=top_k)

    return run
