"""The `keras-nanogpt` console script: train, generate, evaluate, export, quantize, bench, serve.

    keras-nanogpt train --text pride_and_prejudice --steps 2000 --out pride.keras --checkpoint-dir ckpt
    keras-nanogpt train --init gpt2/ --lora-rank 8 --text letters.txt --steps 200 --out letters.keras
    keras-nanogpt generate pride.keras --prompt "It is a truth" --max-new-tokens 200 --top-k 40
    keras-nanogpt evaluate pride.keras --text pride_and_prejudice
    keras-nanogpt export pride.keras serving/
    keras-nanogpt export --format onnx pride.keras pride_onnx/
    keras-nanogpt bench --backends tensorflow --precisions fp32
    keras-nanogpt serve pride.keras --port 8000

Errors print one line `error: ...` on stderr and exit with code 2 (`--debug` shows the traceback), warnings
one line `warning: ...`. SIGTERM or SIGINT during `train --checkpoint-dir` backs up the step it ends on and
exits with 143 or 130 (128 + the signal number); the same command resumes there.
"""

import argparse
import json
import math
import os
import sys
import warnings

# `bench`'s script: in a source checkout, beside the package; an installed package has no benchmarks/.
BENCHMARK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                         "train_speed.py")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def build_parser():
    """The argument parser of every subcommand."""
    parser = _Parser(prog="keras-nanogpt", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model on a text and save it")
    train.add_argument("--text", required=True, help="corpus name (pride_and_prejudice, tinyshakespeare) or path")
    train.add_argument("--level", help="tokens: char (the default), word, bpe, ... (kn.data.LEVELS)")
    train.add_argument("--config", help="named size: nano (the default), baby or gpt2")
    train.add_argument("--layers", type=int)
    train.add_argument("--heads", type=int)
    train.add_argument("--hidden-dim", type=int)
    train.add_argument("--sequence-length", type=int)
    train.add_argument("--dropout", type=float)
    train.add_argument("--batch-size", type=int, default=32)
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps in all (rounded up to --checkpoint-every)")
    length.add_argument("--epochs", type=int, help="passes over the training windows")
    train.add_argument("--learning-rate", type=float,
                       help="peak learning rate (default: the recipe's; modern: Muon's)")
    train.add_argument("--recipe", default="modern", choices=("modern", "speedrun", "nanogpt", "adam"),
                       help="modern: rotary, QK-norm, RMSNorm, ReLU², Muon (the default); speedrun: the modern "
                            "layout in 2 blocks, capped logits, tuned Muon/AdamW (nanoGPT's loss soonest); "
                            "nanogpt: GPT-2's layout, AdamW, warmup + cosine, clipping; adam: plain Adam")
    train.add_argument("--validation-split", type=float, default=0.1)
    train.add_argument("--mixed-precision", action="store_true", help="mixed_bfloat16")
    train.add_argument("--strategy", default="none",
                       help="none, mirrored, tpu, data-parallel, model-parallel or multi-host")
    train.add_argument("--seed", type=int, default=1337)
    train.add_argument("--out", required=True, help="the .keras file to write when training completes")
    train.add_argument("--checkpoint-dir",
                       help="back up here (also on SIGTERM/SIGINT) and resume from it after a crash")
    train.add_argument("--checkpoint-every", type=int, default=100, help="steps between backups / reports")
    train.add_argument("--tensorboard", help="log directory for TensorBoard scalars and samples")
    train.add_argument("--compilation-cache", help="JAX: keep compiled steps in this folder; a later run "
                       "of the same shapes starts without compiling")
    train.add_argument("--plot", help="PNG of train and validation loss")
    train.add_argument("--prompt", help="print a sample from this prompt after every report")
    train.add_argument("--peak-flops", type=float, help="hardware peak FLOP/s, for MFU")
    train.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    train.add_argument("--init", help="fine-tune this model (a .keras file or a Hugging Face GPT-2 folder) "
                                      "instead of training a new one; it brings its architecture and tokenizer")
    train.add_argument("--lora-rank", type=int, help="with --init: train rank-R LoRA adapters only "
                                                     "(kn.NanoGPT.enable_lora), saved in --out")

    generate = commands.add_parser("generate", help="continue a prompt with a saved model")
    generate.add_argument("model")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", help="stop at this string (repeatable)")
    generate.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                          help="print tokens as they come (default: when writing to a terminal)")

    evaluate = commands.add_parser("evaluate", help="validation loss, perplexity and accuracy")
    evaluate.add_argument("model")
    evaluate.add_argument("--text", required=True)
    evaluate.add_argument("--validation-split", type=float, default=0.1)
    evaluate.add_argument("--batch-size", type=int, default=32)

    export = commands.add_parser("export", help="write a serving artefact: SavedModel, preset, ONNX or LiteRT")
    export.add_argument("model")
    export.add_argument("directory")
    export.add_argument("--format", default="tf_saved_model",
                        choices=("tf_saved_model", "preset", "onnx", "litert"),
                        help="onnx/litert: prefill and decode graphs and vocabulary.json, for "
                             "examples/onnx_generate.py and examples/litert_generate.py")
    export.add_argument("--quantize", choices=("int8",), help="litert: int8 weights")

    quantize = commands.add_parser("quantize", help="write a quantized copy of a saved model (for generate, serve)")
    quantize.add_argument("model")
    quantize.add_argument("out", help="the quantized .keras file (weights and config; no optimizer state)")
    quantize.add_argument("--mode", default="int8", help="int8 (default), int4 or float8")

    commands.add_parser("bench", help="training speed JSON (benchmarks/train_speed.py: needs a source checkout)",
                        add_help=False)

    serve = commands.add_parser("serve", help="serve a saved model: OpenAI completions API and a playground")
    serve.add_argument("model")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one)")
    serve.add_argument("--api-key", help="require this key (default: $KERAS_NANOGPT_API_KEY, else none)")
    serve.add_argument("--name", help="the model's name in the API (default: the file name)")
    serve.add_argument("--max-batch", type=int, default=32, help="rows in one decode batch")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting; more get 429")
    serve.add_argument("--max-tokens", type=int, default=512, help="the largest max_tokens a request may ask")
    serve.add_argument("--max-prompt-tokens", type=int, help="tokens in a prompt (default: the model's context)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size; more get 413")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0,
                       help="a free decoder starts a batch once no request came for this long")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def main(argv=None):
    """Run one subcommand; return its exit status (2 with one `error: ...` line on bad input).

    Args:
        argv: the arguments after the program name (default: `sys.argv[1:]`).

    Example:
        >>> main(["evaluate", "pride.keras", "--text", "pride_and_prejudice"])  # doctest: +SKIP
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    formatwarning = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _one_line_warning
    try:
        if argv[:1] == ["bench"]:
            return bench(argv[1:])
        args = build_parser().parse_args(argv)
        return {"train": train, "generate": generate, "evaluate": evaluate, "export": export,
                "quantize": quantize, "serve": serve}[args.command](args)
    except _UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, ImportError, FloatingPointError) as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"warning: {' '.join(str(message).split())}\n"


def train(args):
    import keras

    import keras_nanogpt as kn

    _check_train_arguments(args)
    if args.mixed_precision:
        keras.config.set_dtype_policy("mixed_bfloat16")
    if args.compilation_cache:
        kn.backends.cache_compilations(args.compilation_cache)
    keras.utils.set_random_seed(args.seed)
    strategy = kn.distribute.scope(args.strategy)  # before any JAX work: "multi-host" starts JAX's runtime
    text = kn.data.load_text(args.text)
    every = args.checkpoint_every
    recipe = kn.training.RECIPES[args.recipe]
    with strategy:
        if args.init:
            model, sequence_length = _initial_model(args), args.sequence_length
        else:
            vectorizer = kn.data.make_vectorizer(text, level=args.level or "char")
            overrides = {key: value for key, value in (
                ("num_layers", args.layers), ("num_heads", args.heads), ("hidden_dim", args.hidden_dim),
                ("sequence_length", args.sequence_length), ("dropout", args.dropout)) if value is not None}
            model = kn.NanoGPT.from_config_name(args.config or "nano", vectorizer=vectorizer,
                                                vocabulary_size=vectorizer.vocabulary_size(),
                                                **{**recipe.architecture, **overrides})
            sequence_length = None
        sequence_length = sequence_length or model.sequence_length
        train_ds, val_ds = kn.data.make_datasets(
            text, model.vectorizer, sequence_length, args.batch_size, validation_split=args.validation_split,
            sampling="random", seed=args.seed)
        if args.epochs is not None:
            steps_per_epoch = int(train_ds.cardinality())
            total_steps = args.epochs * steps_per_epoch
        else:
            steps_per_epoch = every
            total_steps = math.ceil(args.steps / every) * every
        model.compile(optimizer=kn.training.optimizer_for(recipe.name, total_steps, args.learning_rate))
        callbacks = [kn.callbacks.ThroughputCallback(args.batch_size * sequence_length, args.peak_flops)]
        backup, resumed = None, 0
        if args.checkpoint_dir:
            # Every --checkpoint-every steps and on SIGTERM/SIGINT (then at that step, exiting 143/130).
            backup = kn.backup.PreemptibleBackup(args.checkpoint_dir, save_every=every)
            resumed = backup.restore(model)
            if resumed:
                print(f"resuming from step {resumed}", flush=True)
        if args.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(args.tensorboard))
        if args.prompt or args.tensorboard:
            callbacks.append(kn.callbacks.TextGenerationCallback(
                args.prompt or text[:20], max_new_tokens=200, log_dir=args.tensorboard, temperature=0.8,
                top_k=40, seed=args.seed))
        if args.plot:
            callbacks.append(kn.callbacks.LossPlotCallback(args.plot))
        if backup is not None:
            callbacks.append(backup)  # last: on a signal it stops after the other callbacks saw the step
        # The same batches as a run never stopped: the random windows continue after the `resumed` trained.
        model.fit(train_ds.repeat().skip(resumed), steps_per_epoch=steps_per_epoch,
                  epochs=total_steps // steps_per_epoch, validation_data=val_ds, callbacks=callbacks,
                  verbose=args.verbose)
    model.save(args.out)
    if backup is not None:
        backup.delete()  # only now: a failed save leaves the backup of the final step
    print(f"saved {args.out} after {total_steps} steps", flush=True)
    return 0


def _initial_model(args):
    """The model `--init` names, with `--lora-rank` adapters enabled; checked before training starts."""
    import keras_nanogpt as kn

    path = args.init
    if os.path.isdir(path):
        model = kn.convert.from_huggingface_gpt2(path, dropout=args.dropout)
    elif path.endswith(".keras"):
        if args.dropout is not None:
            raise ValueError("`--dropout` cannot change a saved .keras model; it applies to a GPT-2 folder.")
        model = kn.load_model(path)
    else:
        raise ValueError(f"`--init` must be a .keras file or a Hugging Face GPT-2 folder; got {path!r}.")
    if model.vectorizer is None:
        raise ValueError(f"`--init` {path!r} has no tokenizer, so it cannot read --text; save the model with "
                         "a vectorizer (a GPT-2 folder needs vocab.json and merges.txt).")
    if args.sequence_length is not None and args.sequence_length > model.sequence_length:
        raise ValueError(f"`--sequence-length` must be at most the model's context ({model.sequence_length}) "
                         f"with --init; got {args.sequence_length}.")
    if args.lora_rank is not None:
        model.enable_lora(args.lora_rank)
    trainable = sum(math.prod(v.shape) for v in model.trainable_variables)
    total = sum(math.prod(v.shape) for v in model.weights)
    print(f"fine-tuning {path}: {trainable:,} of {total:,} weights trainable"
          + (f" (LoRA rank {args.lora_rank})" if args.lora_rank is not None else ""), flush=True)
    return model


def _check_train_arguments(args):
    """Every `train` option that can be checked before reading the text or building the model."""
    import keras_nanogpt as kn

    check = kn._validation
    if args.steps is None and args.epochs is None:
        args.steps = 2000
    for name in ("steps", "epochs", "checkpoint_every", "batch_size", "layers", "heads", "hidden_dim",
                 "sequence_length"):
        if getattr(args, name) is not None:
            check.check_int("--" + name.replace("_", "-"), getattr(args, name))
    if args.config is not None:
        check.check_choice("--config", args.config, tuple(kn.CONFIGS))
    if args.lora_rank is not None:
        check.check_int("--lora-rank", args.lora_rank)
        if not args.init:
            raise ValueError("`--lora-rank` fine-tunes an existing model: give --init MODEL.keras or a GPT-2 folder.")
    if args.init:
        given = [flag for flag, value in (("--config", args.config), ("--level", args.level),
                                          ("--layers", args.layers), ("--heads", args.heads),
                                          ("--hidden-dim", args.hidden_dim),
                                          ("--mixed-precision", args.mixed_precision or None)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be combined with `--init`: the model brings its "
                             "architecture, tokenizer and dtype.")
    if args.level is not None:
        check.check_choice("--level", args.level, kn.data.LEVELS)
    check.check_choice("--strategy", args.strategy, kn.distribute.STRATEGIES + ("multi-worker-mirrored",))
    if args.compilation_cache and kn.backends.name() != "jax":
        raise ValueError(f"`--compilation-cache` is for the JAX backend; this run uses {kn.backends.name()} "
                         f"(set KERAS_BACKEND=jax).")
    if args.learning_rate is not None:
        check.check_float("--learning-rate", args.learning_rate, 0.0, math.inf, low_inclusive=False)
    check.check_float("--validation-split", args.validation_split, 0.0, 1.0, high_inclusive=False)
    if args.dropout is not None:
        check.check_float("--dropout", args.dropout, 0.0, 1.0, high_inclusive=False)
    if not args.out.endswith(".keras"):
        raise ValueError(f"`--out` must end in .keras; got {args.out!r}.")


def generate(args):
    import keras_nanogpt as kn

    model = kn.load_model(args.model)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop=args.stop)
    stream = sys.stdout.isatty() if args.stream is None else args.stream
    if not stream:
        print(model.generate(args.prompt, **options))
        return 0
    print(args.prompt, end="", flush=True)
    for piece in model.stream(args.prompt, **options):
        print(piece, end="", flush=True)
    print()
    return 0


def evaluate(args):
    import numpy as np

    import keras_nanogpt as kn

    kn._validation.check_float("--validation-split", args.validation_split, 0.0, 1.0, low_inclusive=False)
    model = kn.load_model(args.model)
    if model.vectorizer is None:
        raise ValueError(f"{args.model!r} has no vectorizer, so it cannot read text.")
    text = kn.data.load_text(args.text)
    _, val = kn.data.make_datasets(text, model.vectorizer, model.sequence_length, args.batch_size,
                                   validation_split=args.validation_split)
    if not model.compiled:
        model.compile()
    results = model.evaluate(val, verbose=0, return_dict=True)
    loss = float(results["loss"])
    targets = np.concatenate([y.reshape(-1) for _, y in val.as_numpy_iterator()])  # every scored token
    context = np.concatenate([x[:1, 0] for x, _ in val.take(1).as_numpy_iterator()])  # the one before them
    characters = kn.scoring.count_characters(model.vectorizer, np.concatenate([context, targets]))
    bits = kn.scoring.bits_per_character(loss * len(targets), characters)
    print(json.dumps({"validation_loss": round(loss, 4), "perplexity": round(math.exp(loss), 3),
                      "bits_per_character": None if bits is None else round(bits, 4),
                      "accuracy": round(float(results.get("accuracy", math.nan)), 4)}))
    return 0


def export(args):
    import keras_nanogpt as kn

    kn._validation.check_choice("--format", args.format, kn.export.FORMATS)
    kn.export.check_backend(args.format)  # before loading the model
    model = kn.load_model(args.model)
    kn.export.export(model, args.directory, format=args.format, quantize=args.quantize)
    target = os.path.abspath(args.directory)
    usage = {"tf_saved_model": "serve() maps int32 ids (batch, time) to logits",
             "preset": "kn.NanoGPT.from_preset loads it; keras_hub.upload_preset uploads it",
             "onnx": "run examples/onnx_generate.py on it", "litert": "run examples/litert_generate.py on it"}
    print(f"exported {args.model} to {target} ({args.format}); {usage[args.format]}")
    return 0


def quantize(args):
    import keras_nanogpt as kn

    kn._validation.check_choice("--mode", args.mode, kn.adapters.QUANTIZATION_MODES)
    if not args.out.endswith(".keras"):
        raise ValueError(f"`out` must be a .keras file; got {args.out!r}.")
    if os.path.abspath(args.out) == os.path.abspath(args.model):
        raise ValueError("`out` must differ from `model`: the float model stays as it is.")
    model = kn.load_model(args.model, compile=False)  # uncompiled: no optimizer state in the copy
    model.quantize(args.mode)
    model.save(args.out)
    before, after = (os.path.getsize(path) / 1e6 for path in (args.model, args.out))
    print(f"quantized {args.model} ({before:.2f} MB) to {args.mode}: {args.out} ({after:.2f} MB)")
    return 0


def serve(args):
    from keras_nanogpt.serve import run

    return run(args.model, host=args.host, port=args.port, name=args.name,
               api_key=args.api_key or os.environ.get("KERAS_NANOGPT_API_KEY") or None,
               log_level=args.log_level, max_batch=args.max_batch, max_queue=args.max_queue,
               max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
               max_body_bytes=args.max_body_bytes, batch_wait_ms=args.batch_wait_ms)


def bench(argv):
    """Run benchmarks/train_speed.py of this source checkout with `argv` (an installed package has none)."""
    import runpy

    if not os.path.isfile(BENCHMARK):
        raise FileNotFoundError(
            f"`keras-nanogpt bench` runs benchmarks/train_speed.py, which comes with a source checkout of "
            f"keras_nanogpt, not with an installed package (no {BENCHMARK!r}): clone the repository, "
            f"`pip install -e .` there, and run `keras-nanogpt bench` again.")
    sys.argv = [BENCHMARK, *argv]
    runpy.run_path(BENCHMARK, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
