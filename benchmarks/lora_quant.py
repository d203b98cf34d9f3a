"""LoRA against full fine-tuning, and int8 against float32, per backend, printing JSON.

Model: nanoGPT's "baby" size (6 layers, 6 heads, 384 wide, context 256; `--config nano`: 4/4/128,
context 64), dropout 0, on tinyshakespeare's 65 characters, or with `--gpt2 DIR` a Hugging Face GPT-2 folder (`kn.convert.from_huggingface_gpt2`,
its BPE tokenizer, windows of `--sequence-length` tokens). Every measurement runs in a process of its
own, so that its peak resident memory (`ru_maxrss`, which includes the framework itself) is its own:

1. `train` (TensorFlow, once; not with --gpt2): the float32 model after `--train-steps` steps
   of nanoGPT's recipe, saved without the optimizer. The int8 part measures this trained model.
2. Per backend, `finetune` for `lora` (rank `--rank` on qkv, attention_output, mlp, mlp_output) and
   `full`: trainable parameters, the median step time of `--steps` steps after `--warmup` steps
   (batch `--batch-size`), peak memory.
3. Per backend, `quantize`: load, `model.quantize("int8")`, save; the two `.keras` sizes.
4. Per backend, `compare`: both files loaded in one process; validation loss on the same
   `--eval-windows` windows of the last 10% of the text, and greedy generation of `--new-tokens` tokens
   from a 16-token prompt at batch 1 (first call, then `--rounds` rounds alternating float32 and
   int8; medians).
5. Per backend, `memory` for each file: load, evaluate, generate once; peak memory.

    python benchmarks/lora_quant.py
    python benchmarks/lora_quant.py --backends tensorflow --train-steps 50 --rounds 1
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import _common

CORPUS = "tinyshakespeare"


def parse_args(argv=None):
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--config", default="baby", choices=("nano", "baby"), help="the model's named size")
    parser.add_argument("--gpt2", help="a Hugging Face GPT-2 folder to fine-tune and quantize instead")
    parser.add_argument("--sequence-length", type=int, default=256, help="window length (GPT-2: <= 1024)")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="fine-tuning steps before timing")
    parser.add_argument("--steps", type=int, default=10, help="timed fine-tuning steps")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker[0]](args, *args.worker[1:])))
        return
    results = {"model": args.gpt2 or f"{args.config} on {CORPUS} characters", **_common.machine(),
               "settings": {k: v for k, v in vars(args).items() if k != "worker"}, "backends": {}}
    folder = tempfile.mkdtemp(prefix="lora_quant_")
    float_path = os.path.join(folder, "float32.keras")
    if args.gpt2:
        results["train"] = run_worker("tensorflow", "convert", float_path)
    else:
        results["train"] = run_worker("tensorflow", "train", float_path)
    for backend in args.backends.split(","):
        int8_path = os.path.join(folder, f"int8_{backend}.keras")
        entry = {"finetune": {method: run_worker(backend, "finetune", method) for method in ("lora", "full")},
                 "quantize": run_worker(backend, "quantize", float_path, int8_path)}
        entry["compare"] = run_worker(backend, "compare", float_path, int8_path)
        entry["memory"] = {name: run_worker(backend, "memory", path)
                           for name, path in (("float32", float_path), ("int8", int8_path))}
        entry["ratios"] = ratios(entry)
        results["backends"][backend] = entry
    results["load_average_at_end"] = _common.load_average()
    print(json.dumps(results, indent=2))


def run_worker(backend, *worker):
    return _common.run_worker(__file__, backend, *worker)


def ratios(entry):
    """The side-by-side ratios, where both sides were measured."""
    try:
        lora, full = entry["finetune"]["lora"], entry["finetune"]["full"]
        compare, memory = entry["compare"], entry["memory"]
        return {
            "lora_over_full_trainable": round(lora["trainable"] / full["trainable"], 4),
            "lora_over_full_step_time": round(lora["step_ms"] / full["step_ms"], 3),
            "lora_over_full_peak_memory": round(lora["peak_mb"] / full["peak_mb"], 3),
            "float32_over_int8_file_size": round(entry["quantize"]["float32_bytes"] / entry["quantize"]["int8_bytes"], 2),
            "int8_over_float32_generate_time": round(compare["generate_ms"]["int8"] / compare["generate_ms"]["float32"], 3),
            "int8_minus_float32_loss": round(compare["loss"]["int8"] - compare["loss"]["float32"], 4),
            "int8_over_float32_peak_memory": round(memory["int8"]["peak_mb"] / memory["float32"]["peak_mb"], 3),
            "int8_over_float32_weight_bytes": round(memory["int8"]["weight_bytes"] / memory["float32"]["weight_bytes"], 3),
        }
    except (KeyError, TypeError):
        return {"error": "a part failed; see its entry"}


# -------------------------------------------------------------------------------------------------
# Workers: each runs in its own process, under the backend its KERAS_BACKEND names.
# -------------------------------------------------------------------------------------------------

def text_and_model(args):
    """The corpus and a fresh model for it (the GPT-2 folder's weights with --gpt2)."""
    import keras

    import keras_nanogpt as kn

    keras.utils.set_random_seed(0)
    text = kn.data.load_text(CORPUS)
    if args.gpt2:
        return text, kn.convert.from_huggingface_gpt2(args.gpt2, dropout=0.0)
    vectorizer = kn.data.make_vectorizer(text, level="char")
    return text, kn.NanoGPT.from_config_name(args.config, vocabulary_size=vectorizer.vocabulary_size(),
                                             vectorizer=vectorizer, dropout=0.0)


def windows(args, model, text):
    import keras_nanogpt as kn

    length = min(args.sequence_length, model.sequence_length)
    return kn.data.make_datasets(text, model.vectorizer, length, args.batch_size, sampling="random", seed=0)


def train(args, path):
    import keras_nanogpt as kn

    text, model = text_and_model(args)
    train_ds, _ = windows(args, model, text)
    model.compile(optimizer=kn.training.nanogpt_optimizer(args.train_steps, warmup_steps=args.train_steps // 10))
    start = time.perf_counter()
    history = model.fit(train_ds.repeat(), steps_per_epoch=args.train_steps, epochs=1, verbose=0)
    save_uncompiled(model, path)
    return {"steps": args.train_steps, "seconds": round(time.perf_counter() - start, 1),
            "final_train_loss": round(history.history["loss"][-1], 4)}


def save_uncompiled(model, path):
    """The weights and config only: Keras 3 saves a compiled model's optimizer state in its .keras file
    (`include_optimizer=False` is ignored for .keras), which would triple a float32 file."""
    import keras_nanogpt as kn

    serving = kn.NanoGPT.from_config(model.get_config())
    serving.set_weights(model.get_weights())
    serving.save(path)


def convert(args, path):
    _, model = text_and_model(args)
    save_uncompiled(model, path)
    return {"converted": args.gpt2}


def finetune(args, method):
    import keras
    import numpy as np

    text, model = text_and_model(args)
    train_ds, _ = windows(args, model, text)
    if method == "lora":
        model.enable_lora(args.rank)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4 if method == "full" else 1e-3))
    times = []

    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)

    history = model.fit(train_ds.repeat(), steps_per_epoch=args.warmup + args.steps, epochs=1, verbose=0,
                        callbacks=[StepTimes()])
    step = statistics.median(times[args.warmup:])
    tokens = args.batch_size * min(args.sequence_length, model.sequence_length)
    return {"method": method, "trainable": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
            "parameters": int(sum(np.prod(v.shape) for v in model.weights)), "step_ms": round(step * 1000, 1),
            "tokens_per_s": round(tokens / step, 1), "first_step_s": round(times[0], 2),
            "peak_mb": _common.peak_rss_mb(1), "loss": round(history.history["loss"][-1], 4)}


def quantize(args, float_path, int8_path):
    import keras_nanogpt as kn

    model = kn.load_model(float_path)
    start = time.perf_counter()
    model.quantize("int8")
    seconds = time.perf_counter() - start
    model.save(int8_path)
    return {"quantize_s": round(seconds, 2), "float32_bytes": os.path.getsize(float_path),
            "int8_bytes": os.path.getsize(int8_path)}


def evaluation(args, model):
    import keras_nanogpt as kn

    text = kn.data.load_text(CORPUS)
    _, val = windows(args, model, text)
    batches = -(-args.eval_windows // args.batch_size)
    model.compile()
    return float(model.evaluate(val.take(batches), verbose=0, return_dict=True)["loss"])


def prompt(model):
    import numpy as np

    return np.random.default_rng(0).integers(1, model.vocabulary_size, (1, 16)).astype("int32")


def compare(args, float_path, int8_path):
    import keras_nanogpt as kn

    models = {"float32": kn.load_model(float_path), "int8": kn.load_model(int8_path)}
    loss = {name: round(evaluation(args, model), 4) for name, model in models.items()}
    first, median, _ = _common.time_methods(
        {name: lambda m=model: m.generate(prompt(m), args.new_tokens, temperature=0) for name, model in models.items()},
        args.rounds)
    return {"loss": loss, "first_call_s": {name: round(s, 2) for name, s in first.items()},
            "generate_ms": {name: round(s * 1000, 1) for name, s in median.items()}}


def memory(args, path):
    import numpy as np

    import keras_nanogpt as kn

    model = kn.load_model(path)
    evaluation(args, model)
    model.generate(prompt(model), args.new_tokens, temperature=0)
    weight_bytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)
    return {"peak_mb": _common.peak_rss_mb(1), "weight_bytes": weight_bytes}


WORKERS = {"train": train, "convert": convert, "finetune": finetune, "quantize": quantize, "compare": compare,
           "memory": memory}

if __name__ == "__main__":
    main()
