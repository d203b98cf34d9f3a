"""Chat fine-tuning (SFT) against plain training of the same model: tokens/s side by side, and the loss on the
assistant's tokens before and after (JSON on stdout).

    python benchmarks/sft_speed.py                        # TensorFlow, 4 layers x 128, context 128
    KERAS_BACKEND=jax python benchmarks/sft_speed.py --rounds 2 --steps 20

The model is examples/chat_sft.py's (char-level, Pride and Prejudice) grown by nanochat's turn tokens
(`kn.chat.add_chat_template`); the conversations are that example's ("Who says: “<line>”?", answered with the
speaker). One process fits the same model alternately on plain text windows (`kn.data.make_datasets`) and on
SFT windows (`kn.data.chat_dataset`: `sample_weight` on the assistant's tokens), `--steps` steps a round, in
the order plain, SFT, SFT, plain, ... after one warm-up round of each (compilation), batch 16 either way.
Tokens/s counts every position of a window (the model reads them all); the SFT figure also gives the
assistant's tokens/s. The loss on the held-out conversations' assistant tokens is measured before the first
SFT round and after the last. The load average at the start and the end is in the JSON.
"""

import json
import os
import random
import statistics
import sys
import time

import _common
import keras
import numpy as np

sys.path.insert(0, os.path.join(_common.ROOT, "examples"))
import chat_sft  # noqa: E402  (the example's conversations)

import keras_nanogpt as kn  # noqa: E402


def parse_arguments(argv=None):
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=50, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds of each kind")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1337)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    report = {**_common.machine(), "backend": kn.backends.name(), "steps": args.steps, "rounds": args.rounds,
              "batch_size": args.batch_size}
    keras.utils.set_random_seed(args.seed)
    text = kn.data.load_text("pride_and_prejudice")
    vectorizer = kn.data.make_vectorizer(text, level="char")
    base = kn.NanoGPT(vectorizer.vocabulary_size(), 128, 4, 4, 128, vectorizer=vectorizer)
    model = kn.chat.add_chat_template(base)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    plain, _ = kn.data.make_datasets(text, vectorizer, sequence_length=128, batch_size=args.batch_size,
                                     validation_split=0.05, sampling="random", seed=args.seed)
    chats = chat_sft.conversations(text, 100)
    random.Random(args.seed).shuffle(chats)
    held_out, chats = chats[:20], chats[20:]
    sft = kn.data.chat_dataset(chats, model, 128, args.batch_size, seed=args.seed, repeat=True)
    evaluation = kn.data.chat_dataset(held_out, model, 128, 20, shuffle=False)
    _, _, weights = kn.chat.chat_windows(chats, model, 128)
    assistant_share = float(np.mean(np.asarray(weights) > 0))
    streams = {"plain": iter(plain.repeat()), "sft": iter(sft)}

    def run(kind):
        start = time.perf_counter()
        model.fit(_take(streams[kind], args.steps), epochs=1, steps_per_epoch=args.steps, shuffle=False,
                  verbose=0)
        return args.steps * args.batch_size * 128 / (time.perf_counter() - start)

    report["sft_loss_before"] = round(model.evaluate(evaluation, verbose=0, return_dict=True)["loss"], 4)
    run("plain"), run("sft")  # compile both
    speeds = {"plain": [], "sft": []}
    for i in range(args.rounds):
        for kind in (("plain", "sft") if i % 2 == 0 else ("sft", "plain")):
            speeds[kind].append(run(kind))
    report["sft_loss_after"] = round(model.evaluate(evaluation, verbose=0, return_dict=True)["loss"], 4)
    report["sft_steps_trained"] = args.steps * (args.rounds + 1)
    for kind, values in speeds.items():
        report[f"{kind}_tokens_per_second"] = round(statistics.median(values), 1)
        report[f"{kind}_rounds"] = [round(v, 1) for v in values]
    report["sft_over_plain"] = round(report["sft_tokens_per_second"] / report["plain_tokens_per_second"], 3)
    report["assistant_token_share"] = round(assistant_share, 4)
    report["sft_assistant_tokens_per_second"] = round(report["sft_tokens_per_second"] * assistant_share, 1)
    report["load_average_at_end"] = _common.load_average()
    print(json.dumps(report))


def _take(iterator, count):
    """A generator of the next `count` batches of `iterator` (each fit round continues the stream)."""
    for _ in range(count):
        yield next(iterator)


if __name__ == "__main__":
    main()
