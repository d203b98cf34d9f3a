"""Fine-tune GPT-2 weights you have on disk on Pride and Prejudice, then generate.

Needs a Hugging Face GPT-2 folder: config.json, model.safetensors (or pytorch_model.bin) and the
tokenizer's vocab.json + merges.txt. Make one once, on a machine with internet access, with

    python -c "import transformers as t; [c.from_pretrained('openai-community/gpt2').save_pretrained('gpt2')
               for c in (t.GPT2LMHeadModel, t.GPT2Tokenizer)]"

(or `hf download openai-community/gpt2 --local-dir gpt2`). gpt2-medium/-large/-xl folders work too.
Then, with `pip install keras_nanogpt[convert]`:

    python examples/finetune_gpt2.py gpt2
    KERAS_BACKEND=jax python examples/finetune_gpt2.py gpt2 --steps 300 --out gpt2_pride.keras
    python examples/finetune_gpt2.py gpt2 --text my_novel.txt --export my_gpt2   # also write HF files

GPT-2 small has 124M parameters: on a CPU each step at the defaults takes seconds, so start with
few steps. The script prints a sample before and after fine-tuning, and the validation loss.
"""

import argparse
import time

import keras

import keras_nanogpt as kn


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="Hugging Face GPT-2 folder (config.json, weights, vocab.json, merges.txt)")
    parser.add_argument("--text", default="pride_and_prejudice", help="corpus name or path of a text file")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps in all")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between validation and samples")
    parser.add_argument("--eval-batches", type=int, default=20, help="validation batches per evaluation")
    parser.add_argument("--sequence-length", type=int, default=128, help="tokens per training window")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--dropout", type=float, default=None, help="default: the checkpoint's (0.1)")
    parser.add_argument("--prompt", default="It is a truth universally acknowledged")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", default="gpt2_pride_and_prejudice.keras", help="where to save the model")
    parser.add_argument("--export", default=None, help="also write a Hugging Face GPT-2 folder here")
    return parser.parse_args()


def main():
    args = parse_args()
    keras.utils.set_random_seed(args.seed)
    start = time.time()
    model = kn.convert.from_huggingface_gpt2(args.directory, dropout=args.dropout)
    if model.vectorizer is None:
        raise SystemExit(f"{args.directory} has no vocab.json + merges.txt; save GPT-2's tokenizer there too.")
    print(f"imported {model.count_params():,} parameters, {model.vocabulary_size} tokens, "
          f"context {model.sequence_length} ({time.time() - start:.0f} s)")
    sample = dict(max_new_tokens=60, temperature=0.8, top_k=40, seed=args.seed)
    print(f"\n--- before fine-tuning ---\n{model.generate(args.prompt, **sample)}\n")

    text = kn.data.load_text(args.text)
    train, val = kn.data.make_datasets(text, model.vectorizer, sequence_length=args.sequence_length,
                                       batch_size=args.batch_size, validation_split=0.1,
                                       sampling="random", seed=args.seed)
    val = val.take(args.eval_batches)
    print(f"{len(text):,} characters, {len(model.tokenizer.encode(text)):,} GPT-2 tokens")

    eval_every = min(args.eval_every, args.steps)
    model.compile(optimizer=kn.training.nanogpt_optimizer(
        total_steps=args.steps, learning_rate=args.learning_rate,
        min_learning_rate=args.learning_rate / 10, warmup_steps=min(20, args.steps // 10)))
    print(f"validation loss before: {model.evaluate(val, verbose=0)[0]:.3f}")
    sampler = kn.callbacks.TextGenerationCallback(args.prompt, **sample)
    model.fit(train.repeat(), steps_per_epoch=eval_every, epochs=max(1, args.steps // eval_every),
              validation_data=val, callbacks=[sampler], verbose=2)
    print(f"validation loss after {args.steps} steps: {model.evaluate(val, verbose=0)[0]:.3f} "
          f"({time.time() - start:.0f} s in all)")

    model.save(args.out)
    print(f"saved {args.out} (weights and GPT-2's tokenizer; load with kn.load_model)")
    if args.export:
        kn.convert.to_huggingface_gpt2(model, args.export)
        print(f"wrote {args.export} for transformers.GPT2LMHeadModel.from_pretrained")
    print(f"\n--- after fine-tuning ---\n{model.generate(args.prompt, max_new_tokens=200, temperature=0.8, top_k=40, seed=args.seed)}")


if __name__ == "__main__":
    main()
