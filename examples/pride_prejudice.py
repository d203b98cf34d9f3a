"""Train a character-level GPT on Pride and Prejudice, show samples while it learns, then generate.

Runs end to end with no arguments and saves `pride_and_prejudice.keras`: on a 2-core CPU (TensorFlow, the
modern recipe, 1000 steps of 16 windows of 128 characters) it trained in 137 s and ended at validation
loss 1.180 (2026-12-04, benchmarks/RESULTS.md).

    python examples/pride_prejudice.py
    KERAS_BACKEND=jax python examples/pride_prejudice.py --steps 50
    python examples/pride_prejudice.py --text my_novel.txt --level word --out novel.keras
"""

import argparse
import time

import keras

import keras_nanogpt as kn


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default="pride_and_prejudice", help="corpus name or path of a text file")
    parser.add_argument("--level", default="char", help="tokenizer level (char, word, ...)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps in all")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between validation and samples")
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--recipe", default="modern", choices=tuple(kn.training.RECIPES),
                        help="modern: rotary, QK-norm, RMSNorm, ReLU², Muon; speedrun: the same with capped "
                             "logits and a tuned Muon/AdamW (at --layers here); nanogpt: GPT-2's layout, AdamW")
    parser.add_argument("--learning-rate", type=float, default=None, help="peak (default: the recipe's)")
    parser.add_argument("--strategy", default="none",
                        help="none, mirrored, tpu, data-parallel, model-parallel or multi-host")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", default="pride_and_prejudice.keras", help="where to save the model")
    return parser.parse_args()


def main():
    args = parse_args()
    keras.utils.set_random_seed(args.seed)
    start = time.time()
    strategy = kn.distribute.scope(args.strategy)  # before any JAX work: "multi-host" starts JAX's runtime
    text = kn.data.load_text(args.text)
    vectorizer = kn.data.make_vectorizer(text, level=args.level)
    train, val = kn.data.make_datasets(text, vectorizer, sequence_length=args.sequence_length,
                                       batch_size=args.batch_size, validation_split=0.1,
                                       sampling="random", seed=args.seed)
    print(f"{len(text):,} characters, vocabulary of {vectorizer.vocabulary_size()} tokens")

    eval_every = min(args.eval_every, args.steps)
    with strategy:  # build, compile and fit inside: each process reads its own shard of every batch
        # The recipe's architecture at this size, compiled with its optimizer and schedule for args.steps.
        model = kn.training.RECIPES[args.recipe].build(
            vectorizer.vocabulary_size(), total_steps=args.steps, learning_rate=args.learning_rate,
            sequence_length=args.sequence_length, num_layers=args.layers, num_heads=args.heads,
            hidden_dim=args.hidden_dim, dropout=args.dropout, vectorizer=vectorizer)
        model.summary()
        sampler = kn.callbacks.TextGenerationCallback("It is a truth", max_new_tokens=120,
                                                      temperature=0.8, top_k=40, seed=args.seed)
        model.fit(train.repeat(), steps_per_epoch=eval_every, epochs=max(1, args.steps // eval_every),
                  validation_data=val, callbacks=[sampler], verbose=2)

    val_loss = model.evaluate(val, verbose=0)[0]
    print(f"\nvalidation loss {val_loss:.3f} after {args.steps} steps, {time.time() - start:.0f} s in all")
    model.save(args.out)
    print(f"saved {args.out}\n")
    print(model.generate("It is a truth", max_new_tokens=400, temperature=0.8, top_k=40, seed=args.seed))


if __name__ == "__main__":
    main()
