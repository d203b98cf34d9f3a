"""Export formats side by side: file sizes, 200-token greedy decoding at batch 1, first-call times; JSON.

For each configuration (default "nano" and "baby", random weights, the 65-character tinyshakespeare
vocabulary) it writes a `.keras` file, a preset, ONNX, LiteRT and int8 LiteRT exports (TensorFlow
backend, one process) and reports their sizes. Then, alternating timed rounds at batch 1 from a
17-character prompt:

- `onnxruntime` / `litert` / `litert_int8`: the reference loops of examples/ (`export_decoding.generate`
  with the runtime's prefill and decode: no Keras in the loop);
- `ours`: `model.generate(..., temperature=0)` on TensorFlow (cached, compiled decode loop);
- `nanogpt` (with `--nanogpt DIR`, a checkout of karpathy/nanoGPT whose `model.py` is imported, never
  copied): `GPT.generate(top_k=1)` at the same configuration, in torch, same process.

`first_call_s` is the first generation's time (session or interpreter creation included for the
runtimes; tracing and compilation for ours). Ratios compare medians measured in the same process.

    python benchmarks/export_speed.py --nanogpt ../nanoGPT
    python benchmarks/export_speed.py --configs nano --rounds 5
"""

import json
import os
import sys
import tempfile
import time

import _common

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.join(_common.ROOT, "examples"))
PROMPT = "First Citizen:\nBe"  # 17 characters


def parse_args(argv=None):
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--configs", default="nano,baby")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each method, alternating")
    _common.add_nanogpt_arguments(parser)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    import keras

    results = {"backend": keras.backend.backend(), "prompt_characters": len(PROMPT),
               "new_tokens": args.new_tokens, "batch_size": 1, "sampling": "greedy",
               **_common.machine(), "load_average_at_start": _common.load_averages(),  # all three here
               "configs": []}
    for name in args.configs.split(","):
        results["configs"].append(run_config(args, name))
        print(json.dumps(results["configs"][-1]), file=sys.stderr, flush=True)
    results["load_average_at_end"] = _common.load_averages()  # a busy machine slows every run
    print(json.dumps(results, indent=2))


def run_config(args, name):
    import keras
    import numpy as np

    import keras_nanogpt as kn

    keras.utils.set_random_seed(0)
    vectorizer = kn.data.make_vectorizer(kn.data.load_text("tinyshakespeare"))
    model = kn.NanoGPT.from_config_name(name, vocabulary_size=vectorizer.vocabulary_size(),
                                        vectorizer=vectorizer, dropout=0.0)
    # Every matrix drawn on its own, as trained weights differ: the initializer gives each block the same
    # draws, which the ONNX and LiteRT converters would store once (files 2-3x too small).
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.02, w.shape).astype("float32") if w.ndim == 2 else w
                       for w in model.get_weights()])
    with tempfile.TemporaryDirectory(prefix="export_speed_") as folder:
        return measure(args, name, model, vectorizer, folder)


def measure(args, name, model, vectorizer, folder):
    import keras_nanogpt as kn

    sizes, export_s = {}, {}
    model.save(os.path.join(folder, "model.keras"))
    sizes["keras"] = os.path.getsize(os.path.join(folder, "model.keras"))
    for kind, format, quantize in (("preset", "preset", None), ("onnx", "onnx", None),
                                   ("litert", "litert", None), ("litert_int8", "litert", "int8")):
        start = time.perf_counter()
        kn.export.export(model, os.path.join(folder, kind), format=format, quantize=quantize)
        export_s[kind] = round(time.perf_counter() - start, 2)
        sizes[kind] = sum(os.path.getsize(os.path.join(folder, kind, f)) for f in _files(os.path.join(folder, kind)))
    methods = {kind: runtime_loop(kind, os.path.join(folder, export), args.new_tokens)
               for kind, export in (("onnxruntime", "onnx"), ("litert", "litert"), ("litert_int8", "litert_int8"))}
    methods["ours"] = lambda: model.generate(PROMPT, max_new_tokens=args.new_tokens, temperature=0)
    if args.nanogpt:
        methods["nanogpt"] = nanogpt_generate(args, model, kn.data.encode(vectorizer, PROMPT))
    first, median, outputs = _common.time_methods(methods, args.rounds)
    ours_text = outputs["ours"]
    return {"config": name, "parameters": model.count_params(), "context": model.sequence_length,
            "bytes": sizes, "megabytes": {k: round(v / 1e6, 2) for k, v in sizes.items()}, "export_s": export_s,
            "first_call_s": {k: round(v, 3) for k, v in first.items()},
            "ms": {k: round(v * 1000, 1) for k, v in median.items()},
            "tokens_per_s": {k: round(args.new_tokens / v, 1) for k, v in median.items()},
            "speedup_over_nanogpt": {k: round(median["nanogpt"] / v, 2) for k, v in median.items()}
            if "nanogpt" in median else None,
            "greedy_equal_to_ours": {k: outputs[k] == ours_text for k in ("onnxruntime", "litert", "litert_int8")},
            "load_average": _common.load_averages()}


def _files(folder):
    return [os.path.join(root, f)[len(folder) + 1:] for root, _, names in os.walk(folder) for f in names]


def runtime_loop(kind, directory, new_tokens):
    """The reference loop of examples/ on `directory`; its sessions are made in the first call."""
    import export_decoding

    module = __import__("onnx_generate" if kind == "onnxruntime" else "litert_generate")  # examples/
    vocabulary = export_decoding.load_vocabulary(directory)
    ids = export_decoding.encode(vocabulary, PROMPT)
    steps = []

    def run():
        if not steps:
            steps.extend([module.prefill(directory), module.decode(directory)])
        new = export_decoding.generate(*steps, vocabulary, ids, new_tokens, temperature=0.0)
        return PROMPT + export_decoding.decode_text(vocabulary, new)

    return run


def nanogpt_generate(args, model, prompt_ids):
    """nanoGPT's greedy `GPT.generate` at `model`'s size (`_common.nanogpt_generator`) after `prompt_ids`."""
    return _common.nanogpt_generator(args.nanogpt, prompt_ids[None], args.new_tokens, threads=args.threads,
                                     sequence_length=model.sequence_length, vocabulary_size=model.vocabulary_size,
                                     num_layers=model.num_layers, num_heads=model.num_heads,
                                     hidden_dim=model.hidden_dim)


if __name__ == "__main__":
    main()
