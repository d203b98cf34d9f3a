"""nanoGPT's `shakespeare_char` recipe on CPU, in Keras: the reference run to compare against nanoGPT.

4 layers, 4 heads, 128 wide, context 64, batch 12, dropout 0, 2000 steps, AdamW (0.9, 0.99), weight
decay 0.1 on matrices, clipping 1.0, learning rate 1e-3 with 100 warmup steps then cosine to 1e-4,
first 90% of tiny Shakespeare for training and the last 10% for validation. nanoGPT reaches a
validation loss of 1.886 at step 2000 on a 2-core CPU.

    python examples/shakespeare_char.py
    KERAS_BACKEND=jax python examples/shakespeare_char.py --steps 500 --mixed-precision
"""

import argparse
import time

import keras

import keras_nanogpt as kn


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--steps-per-execution", type=int, default=10,
                        help="training steps per compiled call (fewer Python round trips)")
    parser.add_argument("--mixed-precision", action="store_true", help="train in mixed_bfloat16")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", default=None, help="save the model here (.keras)")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.mixed_precision:
        keras.config.set_dtype_policy("mixed_bfloat16")
    keras.utils.set_random_seed(args.seed)
    text = kn.data.load_text("tinyshakespeare")
    vectorizer = kn.data.make_vectorizer(text, level="char")
    model = kn.NanoGPT.from_config_name("nano", vocabulary_size=vectorizer.vocabulary_size(),
                                        vectorizer=vectorizer)
    train, val = kn.data.make_datasets(text, vectorizer, sequence_length=model.sequence_length,
                                       batch_size=args.batch_size, validation_split=0.1,
                                       sampling="random", seed=args.seed)
    model.compile(optimizer=kn.training.nanogpt_optimizer(total_steps=args.steps),
                  steps_per_execution=args.steps_per_execution)
    eval_every = min(args.eval_every, args.steps)
    start = time.time()

    class Report(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            print(f"step {(epoch + 1) * eval_every}: train loss {logs['loss']:.4f}, "
                  f"val loss {logs['val_loss']:.4f}, {time.time() - start:.0f} s", flush=True)

    model.fit(train.repeat(), steps_per_epoch=eval_every, epochs=args.steps // eval_every,
              validation_data=val, callbacks=[Report()], verbose=0)
    val_loss = model.evaluate(val, verbose=0)[0]
    tokens = args.steps * args.batch_size * model.sequence_length
    print(f"final val loss {val_loss:.4f} after {args.steps} steps in {time.time() - start:.0f} s "
          f"({tokens / (time.time() - start):,.0f} tokens/s including evaluation)")
    if args.out:
        model.save(args.out)
    print(model.generate("ROMEO:", max_new_tokens=300, temperature=0.8, top_k=40, seed=args.seed))


if __name__ == "__main__":
    main()
