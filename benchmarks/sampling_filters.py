"""Sampled generation's cost per sampling path, side by side in one process per backend (JSON on stdout).

generate_speed.py's model (4 layers, 4 heads, 128 wide, context 256, vocabulary 96), a 16-token prompt,
200 new tokens, at batch 1 and 8; timed rounds alternate (after one untimed call each) between:

- `greedy`: `temperature=0`;
- `topk_sampler`: keras-hub's `TopKSampler(k=40)` passed as `sampler=`: the loop that `top_k=40` ran
  before sampling values became loop inputs (one compiled loop per k value);
- `full_sort`: `decoding.Filter(vocabulary, nucleus=True)` as the sampler: every token ranks and sums the
  whole vocabulary, as the loop-input filter did for any top_k/top_p before the buckets;
- `top_k`: `top_k=40` today (`decoding.filter_plan`: a bucket of 64 ranked, no nucleus);
- `top_p`: `top_p=0.9` today (the whole vocabulary ranked, with the nucleus);
- `random`: temperature 1 alone (nothing ranked).

On PyTorch, KERAS_NANOGPT_TORCH_COMPILE=trace unless set (the traced step and draw: no TorchInductor
compilation inside a timed round).

    python benchmarks/sampling_filters.py --backends tensorflow,jax,torch --rounds 5
"""

import json
import os

import _common

LAYERS, HEADS, WIDTH, CONTEXT, VOCABULARY = 4, 4, 128, 256, 96


def parse_args(argv=None):
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", default=None)
    return parser.parse_args(argv)


def worker(args, backend):
    os.environ.setdefault("KERAS_NANOGPT_TORCH_COMPILE", "trace")
    import keras
    import keras_hub
    import numpy as np

    import keras_nanogpt as kn
    from keras_nanogpt import decoding

    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(VOCABULARY, CONTEXT, LAYERS, HEADS, WIDTH)
    run = {"backend": backend, "load_average_at_start": _common.load_average(), "batches": []}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompt = np.random.default_rng(0).integers(1, VOCABULARY, (batch, 16)).astype("int32")
        top_k_sampler = keras_hub.samplers.TopKSampler(k=40, seed=0)
        full_sort = decoding.filtered_sampler(decoding.Filter(VOCABULARY, True))
        generate = lambda **kw: (lambda: model.generate(prompt, args.new_tokens, **kw))  # noqa: E731
        methods = {"greedy": generate(temperature=0), "topk_sampler": generate(sampler=top_k_sampler),
                   "full_sort": generate(sampler=full_sort), "top_k": generate(top_k=40, seed=0),
                   "top_p": generate(top_p=0.9, seed=0), "random": generate(seed=0)}
        first, median, _ = _common.time_methods(methods, args.rounds, label=f"batch {batch}")
        run["batches"].append({"batch_size": batch,
                               "tokens_per_s": {k: round(batch * args.new_tokens / v, 1) for k, v in median.items()},
                               "top_k_against_topk_sampler": round(median["topk_sampler"] / median["top_k"], 3),
                               "top_k_against_full_sort": round(median["full_sort"] / median["top_k"], 3),
                               "full_sort_against_topk_sampler": round(median["topk_sampler"] / median["full_sort"], 3)})
    run["load_average_at_end"] = _common.load_average()
    return run


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args, args.worker)))
        return
    results = {"new_tokens": args.new_tokens, **_common.machine(), "runs": []}
    for backend in args.backends.split(","):
        run = _common.run_worker(__file__, backend, backend)
        results["runs"].append({"backend": backend, **run} if "error" in run else run)
    results["load_average_at_end"] = _common.load_average()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
