"""GPT-2 (124M) from token shards, the way nanoGPT's `config/train_gpt2.py` trains it on OpenWebText.

nanoGPT's run: 12 layers, 12 heads, 768 wide, context 1024, dropout 0; 12 sequences x 40 accumulated
micro-batches = 491,520 tokens (about 0.5M) a step; AdamW (0.9, 0.95), weight decay 0.1 on matrices,
clipping 1.0; 6e-4 after 2,000 warmup steps, cosine to 6e-5 at step 600,000. Here one `fit` step is one
micro-batch and Keras's optimizer applies the summed gradients every `--accumulate` of them. `--recipe modern`
trains the modern architecture with Muon instead. The shards stream from disk in constant memory; with
`--checkpoint-dir` a killed run resumes on exactly the batches it would have had.

    # once: the corpus into token shards (GPT-2's BPE through tiktoken: pip install "keras_nanogpt[bpe]")
    keras-nanogpt prepare openwebtext/ --out owt --tokenizer gpt2 --val-fraction 0.0005
    # a GPU (KERAS_BACKEND=jax; several GPUs: --strategy data-parallel, see docs/corpora.md)
    python examples/train_gpt2.py --data owt --checkpoint-dir ckpt --out gpt2.keras
    # this laptop, in a minute: a tiny model on a small prepared corpus
    keras-nanogpt prepare ../shared/data/tinyshakespeare.txt --out tiny --tokenizer byte
    python examples/train_gpt2.py --data tiny --tiny --steps 20
"""

import argparse
import os
import time

import keras

import keras_nanogpt as kn
from keras_nanogpt import shards


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a folder of token shards (keras-nanogpt prepare)")
    parser.add_argument("--recipe", default="nanogpt", choices=("nanogpt", "modern"))
    parser.add_argument("--steps", type=int, default=600_000, help="optimizer steps (each --accumulate batches)")
    parser.add_argument("--warmup-steps", type=int, default=2000)
    parser.add_argument("--learning-rate", type=float, default=6e-4)
    parser.add_argument("--min-learning-rate", type=float, default=6e-5)
    parser.add_argument("--batch-size", type=int, default=12, help="sequences per micro-batch")
    parser.add_argument("--accumulate", type=int, default=40, help="micro-batches per optimizer step")
    parser.add_argument("--eval-every", type=int, default=1000, help="optimizer steps between evaluations")
    parser.add_argument("--eval-batches", type=int, default=200)
    parser.add_argument("--strategy", default="none", help="none, data-parallel, multi-host, ... (kn.distribute)")
    parser.add_argument("--checkpoint-dir", help="back up here and resume from it")
    parser.add_argument("--out", default="gpt2.keras")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--tiny", action="store_true",
                        help="2 layers, 64 wide, context 64, 4 x 2 micro-batches: runs on a CPU in a minute")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        args.batch_size, args.accumulate = 4, 2
        args.warmup_steps, args.eval_every, args.eval_batches = min(args.warmup_steps, args.steps // 10), 10, 4
    keras.utils.set_random_seed(args.seed)
    info = shards.token_info(args.data)
    tokenizer = kn.tokenizers.Tokenizer.from_config(info["tokenizer"]["config"])
    with kn.distribute.scope(args.strategy):
        size = dict(num_layers=2, num_heads=2, hidden_dim=64, sequence_length=64) if args.tiny else {}
        architecture = kn.training.RECIPES[args.recipe].architecture
        model = kn.NanoGPT.from_config_name("gpt2", vocabulary_size=tokenizer.size, vectorizer=tokenizer,
                                            dropout=0.0, **{**architecture, **size})
        if args.recipe == "nanogpt":
            optimizer = kn.training.nanogpt_optimizer(
                args.steps, learning_rate=args.learning_rate, min_learning_rate=args.min_learning_rate,
                warmup_steps=args.warmup_steps, weight_decay=0.1, beta_1=0.9, beta_2=0.95, clipnorm=1.0,
                gradient_accumulation_steps=args.accumulate)
        else:
            optimizer = kn.training.muon_optimizer(args.steps, warmup_steps=args.warmup_steps,
                                                   gradient_accumulation_steps=args.accumulate)
        model.compile(optimizer=optimizer)
        micro_steps = args.eval_every * args.accumulate  # fit steps between evaluations
        backups, resumed = [], 0
        if args.checkpoint_dir:
            backup = kn.backup.PreemptibleBackup(args.checkpoint_dir, save_every=micro_steps)
            resumed = backup.restore(model)  # a micro-batch count: the data position too
            backups.append(backup)
        train = kn.data.token_dataset(args.data, model.sequence_length, args.batch_size, seed=args.seed,
                                      start=resumed, tokenizer=tokenizer)
        val = None
        if info["tokens"].get("val"):
            val = kn.data.token_dataset(args.data, model.sequence_length, args.batch_size, split="val",
                                        sampling="shuffled", seed=0, tokenizer=tokenizer).take(args.eval_batches)
        tokens = micro_steps * args.batch_size * model.sequence_length

        class Report(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.start = time.time()

            def on_epoch_end(self, epoch, logs=None):
                val_loss = f", val loss {logs['val_loss']:.4f}" if "val_loss" in logs else ""
                print(f"step {(epoch + 1) * args.eval_every}: train loss {logs['loss']:.4f}{val_loss}, "
                      f"{tokens / (time.time() - self.start):,.0f} tokens/s", flush=True)

        # The backup (last among the callbacks) makes a resumed fit start at its epoch.
        model.fit(train, steps_per_epoch=micro_steps, epochs=max(1, args.steps // args.eval_every),
                  validation_data=val, callbacks=[Report(), *backups], verbose=0)
    model.save(args.out)
    for backup in backups:
        backup.delete()
    print(f"saved {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
