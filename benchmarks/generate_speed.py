"""Generation speed per backend: cached decoding vs. full recompute vs. keras-hub vs. nanoGPT, printing JSON.

Model: 4 layers, 4 heads, 128 wide, context 256 (random weights; speed does not depend on them); a 16-token
prompt and 200 new tokens, at batch 1 and 8. For each backend (a subprocess each) it reports the first
call's time (compile + run), then alternates timed rounds of:

- `cached`: `model.generate` (KV cache, compiled decode loop);
- `recompute`: the plain loop that runs the whole context for every token (what nanoGPT's sampling does),
  calling the model eagerly (a compiled forward pass would retrace for every context length);
- `keras_hub`: `keras_hub.models.GPT2CausalLM.generate` on a `GPT2Backbone` of the same size built from
  scratch (cached, compiled; it pads to its `max_length`, here 16 + 200);
- `nanogpt` (with `--nanogpt DIR`, a checkout of karpathy/nanoGPT whose `model.py` is imported, never
  copied): `GPT.generate` at the same configuration, in torch, same process.

On PyTorch `cached` is what a user gets (the default "auto": eager, a traced ATen graph or a
TorchInductor compilation, whichever the call's length pays for, keras_nanogpt/_torch_compile.py);
`cached_eager` runs the step eagerly, `cached_traced` as the traced graph (never compiled), and
`cached_compiled` compiles at once, its first call including the compilation; each on its own model,
so no path reuses another's step. With `--first-call-tokens N,M` a fresh process's first call of N
(and M) tokens is timed by itself, the default choice against the eager path and nanoGPT's first call
(`first_call_fresh_process_s`, the best of 2 processes each; import time excluded).

Greedy decoding by default; `--top-k K` samples from the K most likely tokens on every side instead.
Ratios compare medians measured side by side in the same process.

    python benchmarks/generate_speed.py --nanogpt ../nanoGPT
    python benchmarks/generate_speed.py --backends jax --batch-sizes 1 --rounds 5
    python benchmarks/generate_speed.py --backends torch --top-k 40 --first-call-tokens 50,200 --nanogpt ../nanoGPT
"""

import argparse
import json
import os
import time

import _common

LAYERS, HEADS, WIDTH, CONTEXT, VOCABULARY = 4, 4, 128, 256, 96


def parse_args(argv=None):
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each method, alternating")
    _common.add_nanogpt_arguments(parser)
    parser.add_argument("--skip", default="", help="methods to leave out, e.g. keras_hub,recompute (and on "
                        "PyTorch cached_eager,cached_traced,cached_compiled)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k sampling (default: greedy)")
    parser.add_argument("--first-call-tokens", default=None,
                        help="comma-separated: also time a fresh process's first call of this many tokens")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--first-call-worker", nargs=2, metavar=("TOKENS", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.first_call_worker:
        print(json.dumps(first_call(args, int(args.first_call_worker[0]), args.first_call_worker[1])))
        return
    if args.worker:
        print(json.dumps(worker(args, args.worker)))
        return
    results = {"model": dict(layers=LAYERS, heads=HEADS, width=WIDTH, context=CONTEXT, vocabulary=VOCABULARY),
               "prompt_length": args.prompt_length, "new_tokens": args.new_tokens,
               "sampling": f"top_k={args.top_k}" if args.top_k else "greedy",
               **_common.machine(), "runs": []}
    for backend in args.backends.split(","):
        run = _common.run_worker(__file__, backend, backend)
        results["runs"].append({"backend": backend, **run} if "error" in run else run)
    results["load_average_at_end"] = _common.load_average()  # a busy machine slows every run
    print(json.dumps(results, indent=2))


def worker(args, backend):
    import keras
    import numpy as np

    import keras_nanogpt as kn

    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(VOCABULARY, CONTEXT, LAYERS, HEADS, WIDTH)
    skip = set(filter(None, args.skip.split(",")))
    run = {"backend": backend, "load_average_at_start": _common.load_average(), "batches": []}
    sampling = dict(top_k=args.top_k, seed=0) if args.top_k else dict(temperature=0)
    if args.first_call_tokens and backend == "torch":
        run["first_call_fresh_process_s"] = first_calls_in_fresh_processes(args)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompt = np.random.default_rng(0).integers(1, VOCABULARY, (batch, args.prompt_length)).astype("int32")
        methods = {"cached": lambda p=prompt: model.generate(p, args.new_tokens, **sampling)}
        if backend == "torch":
            for name, mode in (("cached_eager", "never"), ("cached_traced", "trace"),
                               ("cached_compiled", "always")):
                if name in skip:
                    continue
                other = kn.NanoGPT(VOCABULARY, CONTEXT, LAYERS, HEADS, WIDTH)  # its own steps
                other.set_weights(model.get_weights())
                methods[name] = torch_mode(mode, lambda p=prompt, m=other: m.generate(
                    p, args.new_tokens, **sampling))
        if "recompute" not in skip:
            methods["recompute"] = recompute_loop(model, prompt, args.new_tokens)
        if "keras_hub" not in skip:
            methods["keras_hub"] = keras_hub_generate(prompt, args.new_tokens, args.top_k)
        if args.nanogpt and "nanogpt" not in skip:
            methods["nanogpt"] = nanogpt_generate(args, prompt, args.new_tokens)
        first, median, _ = _common.time_methods(methods, args.rounds, label=f"batch {batch}")
        entry = {"batch_size": batch,
                 "first_call_s": {k: round(v, 3) for k, v in first.items()},
                 "ms": {k: round(v * 1000, 1) for k, v in median.items()},
                 "tokens_per_s": {k: round(batch * args.new_tokens / v, 1) for k, v in median.items()}}
        for name in ("cached", "cached_traced", "cached_compiled"):
            if name in median:
                entry[f"speedup_of_{name}"] = {k: round(v / median[name], 2) for k, v in median.items()
                                               if not k.startswith("cached")}
        if backend == "torch":
            from keras_nanogpt import _torch_compile

            entry["compilations"] = list(_torch_compile.compile_log)
            entry["trace_seconds"] = [round(t, 3) for t in _torch_compile._trace_seconds]
        run["batches"].append(entry)
    run["load_average_at_end"] = _common.load_average()
    return run


def torch_mode(mode, method):
    """`method` run with KERAS_NANOGPT_TORCH_COMPILE set to `mode` (PyTorch's compile choice)."""
    def run():
        previous = os.environ.get("KERAS_NANOGPT_TORCH_COMPILE")
        os.environ["KERAS_NANOGPT_TORCH_COMPILE"] = mode
        try:
            return method()
        finally:
            if previous is None:
                del os.environ["KERAS_NANOGPT_TORCH_COMPILE"]
            else:
                os.environ["KERAS_NANOGPT_TORCH_COMPILE"] = previous

    return run


def first_calls_in_fresh_processes(args):
    """Seconds of a fresh process's first call of each `--first-call-tokens` count at batch 1: the default
    choice ("auto"), the eager step ("never") and nanoGPT's `generate`, the best of 2 processes each."""
    results = {}
    for tokens in (int(t) for t in args.first_call_tokens.split(",")):
        times = {"auto": [], "eager": [], "nanogpt": []}
        for _ in range(2):
            for name, mode in (("auto", "auto"), ("eager", "never"), ("nanogpt", "nanogpt")):
                if mode == "nanogpt" and not args.nanogpt:
                    continue
                done = _common.run_worker(__file__, "torch", str(tokens), mode, flag="--first-call-worker")
                if "error" in done:
                    raise RuntimeError(f"the first-call worker ({tokens} tokens, {mode}) failed: {done['error']}")
                times[name].append(done["seconds"])
        results[str(tokens)] = {k: round(min(v), 3) for k, v in times.items() if v}
    return results


def first_call(args, tokens, mode):
    """The first `tokens`-token call of this process (a fresh model) under `mode`, or of nanoGPT."""
    import numpy as np

    prompt = np.random.default_rng(0).integers(1, VOCABULARY, (1, args.prompt_length)).astype("int32")
    sampling = dict(top_k=args.top_k, seed=0) if args.top_k else dict(temperature=0)
    if mode == "nanogpt":
        method = nanogpt_generate(args, prompt, tokens)
    else:
        import keras_nanogpt as kn

        model = kn.NanoGPT(VOCABULARY, CONTEXT, LAYERS, HEADS, WIDTH)
        method = torch_mode(mode, lambda: model.generate(prompt, tokens, **sampling))
    start = time.perf_counter()
    method()
    return {"seconds": time.perf_counter() - start}


def recompute_loop(model, prompt, new_tokens):
    """Greedy decoding that runs the whole (cropped) context through the model for each token."""
    import keras
    import numpy as np

    def run():
        tokens = prompt
        for _ in range(new_tokens):
            context = tokens[:, -model.sequence_length:]
            logits = model(context, training=False)
            nxt = np.argmax(np.asarray(keras.ops.convert_to_numpy(logits))[:, -1], axis=-1)
            tokens = np.concatenate([tokens, nxt[:, None].astype("int32")], axis=1)
        return tokens

    return run


def keras_hub_generate(prompt, new_tokens, top_k=None):
    import keras_hub
    import numpy as np

    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=VOCABULARY, num_layers=LAYERS, num_heads=HEADS,
                                             hidden_dim=WIDTH, intermediate_dim=4 * WIDTH,
                                             max_sequence_length=CONTEXT)
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    causal_lm.compile(sampler=keras_hub.samplers.TopKSampler(k=top_k, seed=0) if top_k else "greedy")
    length = prompt.shape[1] + new_tokens
    padded = {"token_ids": np.pad(prompt, ((0, 0), (0, new_tokens))),
              "padding_mask": np.arange(length)[None, :].repeat(prompt.shape[0], 0) < prompt.shape[1]}
    return lambda: causal_lm.generate(padded, stop_token_ids=None)


def nanogpt_generate(args, prompt, new_tokens):
    """nanoGPT's `GPT.generate` at this model's size (`_common.nanogpt_generator`), greedy unless --top-k."""
    return _common.nanogpt_generator(args.nanogpt, prompt, new_tokens, top_k=args.top_k or 1, threads=args.threads,
                                     sequence_length=CONTEXT, vocabulary_size=VOCABULARY, num_layers=LAYERS,
                                     num_heads=HEADS, hidden_dim=WIDTH)


if __name__ == "__main__":
    main()
