"""The `keras-nanogpt` console script: train, generate, evaluate, export, quantize, compile, bench, serve, sft,
chat.

    keras-nanogpt train --text pride_and_prejudice --steps 2000 --out pride.keras --checkpoint-dir ckpt
    keras-nanogpt train --init gpt2/ --lora-rank 8 --text letters.txt --steps 200 --out letters.keras
    keras-nanogpt generate pride.keras --prompt "It is a truth" --max-new-tokens 200 --top-k 40
    keras-nanogpt evaluate pride.keras --text pride_and_prejudice
    keras-nanogpt prepare web/*.jsonl books/ --out shards --tokenizer gpt2
    keras-nanogpt train --data shards --config gpt2 --steps 600000 --out gpt2.keras --checkpoint-dir ckpt
    keras-nanogpt export pride.keras serving/
    keras-nanogpt export --format onnx pride.keras pride_onnx/
    KERAS_BACKEND=torch keras-nanogpt compile pride.keras --batch-sizes 1,8
    keras-nanogpt bench --backends tensorflow --precisions fp32
    keras-nanogpt serve pride.keras --port 8000
    keras-nanogpt sft pride.keras --data chats.jsonl --out pride-chat.keras --epochs 3
    keras-nanogpt chat pride-chat.keras --system "Answer briefly."

Errors print one line `error: ...` on stderr and exit with code 2 (`--debug` shows the traceback), warnings
one line `warning: ...`. SIGTERM or SIGINT during `train --checkpoint-dir` backs up the step it ends on and
exits with 143 or 130 (128 + the signal number); the same command resumes there.

`train` is `kn.training.train(kn.training.TrainingJob(...))`, its flags the job's fields; `evaluate` is
`kn.scoring.evaluate_text`; `sft` is `kn.chat.sft`, `chat` is `kn.chat.interactive`. This module parses and
prints; the package does the work.
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import re
import sys
import warnings

import keras_nanogpt as kn

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

    # `train`'s flags are the fields of kn.training.TrainingJob, with its defaults.
    recipes = kn.training.RECIPES
    train = commands.add_parser("train", help="train a model on a text and save it (kn.training.train)")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="corpus name (pride_and_prejudice, tinyshakespeare) or path")
    source.add_argument("--data", help="a folder of token shards (keras-nanogpt prepare), streamed from disk")
    train.add_argument("--level", help=f"tokens: {', '.join(kn.data.LEVELS)} (default: char)")
    train.add_argument("--config", help=f"named size: {', '.join(kn.CONFIGS)} (default: nano)")
    train.add_argument("--layers", type=int)
    train.add_argument("--heads", type=int)
    train.add_argument("--hidden-dim", type=int)
    train.add_argument("--sequence-length", type=int)
    train.add_argument("--dropout", type=float)
    train.add_argument("--batch-size", type=int)
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps in all (default 2000; rounded up to "
                                                  "--checkpoint-every)")
    length.add_argument("--epochs", type=int, help="passes over the training windows")
    train.add_argument("--learning-rate", type=float,
                       help="peak learning rate (default: the recipe's; modern: Muon's)")
    train.add_argument("--recipe", choices=tuple(recipes), help="; ".join(
        f"{name}: {recipe.description}" for name, recipe in recipes.items())
        + f" (default: {kn.training.TrainingJob.recipe})")
    train.add_argument("--validation-split", type=float)
    train.add_argument("--mixed-precision", action="store_true", help="mixed_bfloat16")
    train.add_argument("--strategy", help="none (the default), mirrored, tpu, data-parallel, model-parallel or "
                                          "multi-host")
    train.add_argument("--seed", type=int)
    train.add_argument("--out", required=True, help="the .keras file to write when training completes")
    train.add_argument("--checkpoint-dir",
                       help="back up here (also on SIGTERM/SIGINT) and resume from it after a crash")
    train.add_argument("--checkpoint-every", type=int, help="steps between backups / reports")
    train.add_argument("--tensorboard", help="log directory for TensorBoard scalars and samples")
    train.add_argument("--compilation-cache", help="JAX: keep compiled steps in this folder; a later run "
                       "of the same shapes starts without compiling")
    train.add_argument("--plot", help="PNG of train and validation loss")
    train.add_argument("--prompt", help="print a sample from this prompt after every report")
    train.add_argument("--peak-flops", type=float, help="hardware peak FLOP/s, for MFU")
    train.add_argument("--verbose", type=int, choices=(0, 1, 2))
    train.add_argument("--init", help="fine-tune this model (a .keras file or a Hugging Face GPT-2 folder) "
                                      "instead of training a new one; it brings its architecture and tokenizer")
    train.add_argument("--lora-rank", type=int, help="with --init: train rank-R LoRA adapters only "
                                                     "(kn.NanoGPT.enable_lora), saved in --out")
    train.set_defaults(**{field.name: field.default for field in dataclasses.fields(kn.training.TrainingJob)
                          if field.default is not dataclasses.MISSING})

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
    scored = evaluate.add_mutually_exclusive_group(required=True)
    scored.add_argument("--text", help="corpus name or path: its held-out end is scored")
    scored.add_argument("--data", help="a folder of token shards: batches of its val split are scored")
    evaluate.add_argument("--validation-split", type=float, default=0.1)
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--batches", type=int, default=100, help="with --data: batches of the val split")

    prepare = commands.add_parser("prepare", help="tokenize text, .jsonl and .parquet files into token shards "
                                                  "(kn.data.prepare)")
    prepare.add_argument("sources", nargs="+", help="text files, folders, globs, .jsonl or .parquet files")
    prepare.add_argument("--out", required=True, help="the folder for the shards and manifest.json")
    prepare.add_argument("--tokenizer", default="gpt2",
                         help="gpt2 (tiktoken), char, byte, word, wordpiece, sentencepiece or a MODEL.keras")
    prepare.add_argument("--val-fraction", type=float, default=0.1, help="the share of documents held out")
    prepare.add_argument("--workers", type=int, help="tokenizing processes (default: every core)")
    prepare.add_argument("--text-field", default="text", help="the text field of .jsonl / .parquet documents")

    export = commands.add_parser("export", help="write a serving artefact: SavedModel, preset, ONNX or LiteRT")
    export.add_argument("model")
    export.add_argument("directory")
    export.add_argument("--format", default="tf_saved_model", choices=kn.export.FORMATS,
                        help="onnx/litert: prefill and decode graphs and vocabulary.json, for "
                             "examples/onnx_generate.py and examples/litert_generate.py")
    export.add_argument("--quantize", choices=("int8",), help="litert: int8 weights")

    quantize = commands.add_parser("quantize", help="write a quantized copy of a saved model (for generate, serve)")
    quantize.add_argument("model")
    quantize.add_argument("out", help="the quantized .keras file (weights and config; no optimizer state)")
    quantize.add_argument("--mode", default="int8", choices=kn.adapters.QUANTIZATION_MODES,
                          help="int8 (the default), int4 or float8")

    compile_ = commands.add_parser("compile", help="PyTorch: build the decode step's AOTInductor packages now "
                                                   "(kn.generation.compile_packages)")
    compile_.add_argument("model")
    compile_.add_argument("--batch-sizes", default="1", help="comma-separated prompt rows per call (default: 1)")
    compile_.add_argument("--windows", help="comma-separated KV-cache lengths, powers of two from 16 "
                                            "(default: the model's context)")
    compile_.add_argument("--sampling", default="greedy,random", help="greedy and/or random (default: both)")

    commands.add_parser("bench", help="training speed JSON (benchmarks/train_speed.py: needs a source checkout)",
                        add_help=False)

    serve = commands.add_parser("serve", help="serve a saved model: OpenAI completions and chat completions, "
                                              "and a playground")
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

    sft = commands.add_parser("sft", help="fine-tune a model on conversations (kn.chat.sft): adds the chat "
                                          "template's turn tokens when it has none")
    sft.add_argument("model", help="the base .keras model")
    sft.add_argument("--data", required=True, help='a .jsonl file of {"messages": [...]} lines')
    sft.add_argument("--out", required=True, help="the .keras file to write")
    length = sft.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps in all")
    length.add_argument("--epochs", type=int, help="passes over the conversations (default 1)")
    sft.add_argument("--learning-rate", type=float, default=3e-4)
    sft.add_argument("--batch-size", type=int, default=8)
    sft.add_argument("--lora-rank", type=int, help="train rank-R LoRA adapters (and the token table) only")
    sft.add_argument("--seed", type=int)

    chat = commands.add_parser("chat", help="chat with a model in the terminal (history, streaming, /clear, "
                                            "Ctrl-D ends); under a pipe, one reply per input line")
    chat.add_argument("model")
    chat.add_argument("--system", help="a system message for every conversation")
    chat.add_argument("--max-new-tokens", type=int, default=200)
    chat.add_argument("--temperature", type=float, default=0.8)
    chat.add_argument("--top-k", type=int)
    chat.add_argument("--top-p", type=float)
    chat.add_argument("--seed", type=int)
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
        return {"train": train, "generate": generate, "evaluate": evaluate, "prepare": prepare, "export": export,
                "quantize": quantize, "compile": compile_packages, "serve": serve, "sft": sft,
                "chat": chat}[args.command](args)
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
    job_fields = [field.name for field in dataclasses.fields(kn.training.TrainingJob)]
    with _named_as_flags(job_fields):
        job = kn.training.TrainingJob(**{name: getattr(args, name) for name in job_fields})
        result = kn.training.train(job, log=functools.partial(print, flush=True))
    print(f"saved {result.out} after {result.steps} steps", flush=True)
    return 0


@contextlib.contextmanager
def _named_as_flags(names):
    """Show a `ValueError`/`TypeError` that names an argument in `names` (`hidden_dim`) with its flag
    (`--hidden-dim`), as the user typed it."""
    try:
        yield
    except (ValueError, TypeError) as error:
        if len(error.args) == 1 and isinstance(error.args[0], str):
            error.args = (re.sub(r"`([a-z_]+)`", lambda match: (f"`--{match[1].replace('_', '-')}`"
                                                               if match[1] in names else match[0]),
                                 error.args[0]),)
        raise


def prepare(args):
    manifest = kn.data.prepare(args.sources, args.out, args.tokenizer, val_fraction=args.val_fraction,
                               workers=args.workers, text_field=args.text_field)
    print(json.dumps({"out": args.out, "tokens": manifest["tokens"], "documents": manifest["documents"]}))
    return 0


def generate(args):
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
    if not 0.0 < args.validation_split < 1.0:  # before loading anything (kn.scoring.evaluate_text checks it too)
        raise ValueError(f"`--validation-split` must be in (0.0, 1.0); got {args.validation_split}.")
    model = kn.load_model(args.model)
    with _named_as_flags(("validation_split", "batch_size", "batches", "data")):
        if args.data is not None:
            report = kn.scoring.evaluate_shards(model, args.data, args.batch_size, args.batches)
        else:
            if model.tokenizer is None:
                raise ValueError(f"{args.model!r} has no tokenizer, so it cannot read text.")
            report = kn.scoring.evaluate_text(model, kn.data.load_text(args.text), args.validation_split,
                                              args.batch_size)
    bits = report["bits_per_character"]
    print(json.dumps({"validation_loss": round(report["validation_loss"], 4),
                      "perplexity": round(report["perplexity"], 3),
                      "bits_per_character": None if bits is None else round(bits, 4),
                      "accuracy": round(report["accuracy"], 4)}))
    return 0


def export(args):
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


def compile_packages(args):
    kn.backends.building_packages()  # refuses other backends and the opt-out before loading the model
    numbers = {}
    for flag in ("batch_sizes", "windows"):
        text = getattr(args, flag)
        try:
            numbers[flag] = None if text is None else [int(n) for n in text.split(",")]
        except ValueError:
            raise ValueError(f"`--{flag.replace('_', '-')}` must be comma-separated integers; got {text!r}.") from None
    model = kn.load_model(args.model, compile=False)
    report = kn.generation.compile_packages(model, numbers["batch_sizes"], numbers["windows"],
                                            args.sampling.split(","))
    print(json.dumps(report))
    return 0


def serve(args):
    from keras_nanogpt.serve import run

    return run(args.model, host=args.host, port=args.port, name=args.name,
               api_key=args.api_key or os.environ.get("KERAS_NANOGPT_API_KEY") or None,
               log_level=args.log_level, max_batch=args.max_batch, max_queue=args.max_queue,
               max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
               max_body_bytes=args.max_body_bytes, batch_wait_ms=args.batch_wait_ms)


def sft(args):
    if os.path.abspath(args.out) == os.path.abspath(args.model):
        raise ValueError("`--out` must differ from the base model: the base model stays as it is.")
    with _named_as_flags(("steps", "epochs", "learning_rate", "batch_size", "lora_rank", "out")):
        _, report = kn.chat.sft(args.model, args.data, out=args.out, steps=args.steps, epochs=args.epochs,
                                learning_rate=args.learning_rate, batch_size=args.batch_size,
                                lora_rank=args.lora_rank, seed=args.seed, log=functools.partial(print, flush=True))
    print(json.dumps({"out": args.out, "steps": report["steps"], "loss_before": round(report["loss_before"], 4),
                      "loss_after": round(report["loss_after"], 4)}))
    return 0


def chat(args):
    with _named_as_flags(("max_new_tokens", "temperature", "top_k", "top_p", "seed")):
        kn.generation.check_arguments(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        model = kn.load_model(args.model, compile=False)
        try:
            kn.chat.interactive(model, system=args.system, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        except KeyboardInterrupt:  # Ctrl-C ends the chat as Ctrl-D does, with the shell's status for SIGINT
            print()
            return 130
    return 0


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
