"""Chat fine-tuning (SFT) of a small character-level GPT on questions about Pride and Prejudice's dialogue.

1. Trains a base model on the novel (or takes one: `--base pride.keras`).
2. Builds conversations from the dialogue: `Who says: “<line>”?`, answered with the speaker
   (“No more have I,” said Mr. Bennet -> "Mr. Bennet").
3. Grows the model by the chat template's turn tokens (`kn.chat.add_chat_template`) and fine-tunes it
   on `kn.data.chat_dataset`: the loss is on the assistant's tokens only.
4. Prints that loss before and after, answers held-out questions with `model.chat`, and counts how many
   replies end their turn with `<|assistant_end|>`.

    python examples/chat_sft.py
    KERAS_BACKEND=jax python examples/chat_sft.py --tiny   # a few steps, for a test
"""

import argparse
import random
import re
import time

import keras
import numpy as np

import keras_nanogpt as kn

QUOTE = (r"“([^”]{8,%d}?)[,.!?]?”\s+(?:said|cried|replied|answered|continued|added)\s+"
         r"((?:Mr\.|Mrs\.|Miss|Lady|Colonel)\s+[A-Z]\w+|[A-Z][a-z]+)")  # the line, then who spoke it


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and a few steps (a test run)")
    parser.add_argument("--base", help="a base .keras model trained on the novel (default: train one)")
    parser.add_argument("--base-steps", type=int, default=1500)
    parser.add_argument("--sft-steps", type=int, default=400)
    parser.add_argument("--out", default="pride_chat.keras")
    parser.add_argument("--seed", type=int, default=1337)
    return parser.parse_args()


def conversations(text, max_line):
    """`(messages, speaker)` for every line of dialogue that says who spoke it."""
    found = []
    for match in re.finditer(QUOTE % max_line, text):
        line, speaker = " ".join(match[1].split()), " ".join(match[2].split())
        if speaker in ("Elizabeth", "Jane", "Lydia", "Kitty", "Mary", "Charlotte", "Wickham", "Bingley", "Darcy",
                       "Collins") or speaker.startswith(("Mr.", "Mrs.", "Miss", "Lady", "Colonel")):
            found.append([{"role": "user", "content": f"Who says: “{line}”?"},
                          {"role": "assistant", "content": speaker}])
    return found


def main():
    args = parse_args()
    keras.utils.set_random_seed(args.seed)
    start = time.time()
    text = kn.data.load_text("pride_and_prejudice")  # keras.utils.get_file, into the Keras dataset cache
    size = dict(num_layers=1, num_heads=2, hidden_dim=32, sequence_length=96) if args.tiny else dict(
        num_layers=4, num_heads=4, hidden_dim=128, sequence_length=128)
    base_steps, sft_steps = (10, 10) if args.tiny else (args.base_steps, args.sft_steps)
    compile_options = {"jit_compile": False} if args.tiny and kn.backends.name() == "tensorflow" else {}

    if args.base:
        model = kn.load_model(args.base, compile=False)
    else:
        vectorizer = kn.data.make_vectorizer(text, level="char")
        train, _ = kn.data.make_datasets(text[:100_000] if args.tiny else text, vectorizer, sequence_length=size["sequence_length"], batch_size=32,
                                         validation_split=0.05, sampling="random", seed=args.seed)
        model = kn.NanoGPT(vectorizer.vocabulary_size(), vectorizer=vectorizer, **size)
        model.compile(optimizer=keras.optimizers.AdamW(2e-3 if not args.tiny else 1e-3), **compile_options)
        model.fit(train.repeat(), epochs=1, steps_per_epoch=base_steps, verbose=0)
        print(f"base model: {base_steps} steps on the novel ({time.time() - start:.0f} s)")

    chats = conversations(text, 100)
    random.Random(args.seed).shuffle(chats)
    held_out, chats = chats[:4 if args.tiny else 20], chats[20:]
    print(f"{len(chats)} conversations such as {chats[0]}")

    chat_model = kn.chat.add_chat_template(model)  # the turn tokens: new rows, old weights as they were
    data = kn.data.chat_dataset(chats, chat_model, chat_model.sequence_length, batch_size=16, seed=args.seed,
                                repeat=True)
    evaluation = kn.data.chat_dataset(held_out, chat_model, chat_model.sequence_length, batch_size=20,
                                      shuffle=False)
    chat_model.compile(optimizer=keras.optimizers.Adam(1e-3), **compile_options)
    before = chat_model.evaluate(evaluation, verbose=0, return_dict=True)["loss"]
    chat_model.fit(data, epochs=1, steps_per_epoch=sft_steps, verbose=0)
    after = chat_model.evaluate(evaluation, verbose=0, return_dict=True)["loss"]
    print(f"loss on the assistant's tokens (held-out questions): before {before:.3f}, after {after:.3f} "
          f"({sft_steps} SFT steps)")
    chat_model.save(args.out)

    end_id = chat_model.tokenizer.special_tokens["<|assistant_end|>"]
    ended, right = 0, 0
    for i, (question, answer) in enumerate(held_out):
        ids = kn.chat.render(chat_model, [question])
        new = np.asarray(chat_model.generate(ids[None], max_new_tokens=24, temperature=0))[0, len(ids):]
        if end_id in new.tolist():  # the turn, up to and including its end token
            ended, new = ended + 1, new[:new.tolist().index(end_id) + 1]
        reply = chat_model.chat([question], max_new_tokens=24, temperature=0)
        right += int(reply == answer["content"])
        if i < 3:
            print(chat_model.tokenizer.decode(np.concatenate([ids, new])).replace("\n", " "))
    print(f"replies that end their turn with <|assistant_end|>: {ended}/{len(held_out)}; "
          f"right speaker: {right}/{len(held_out)}")
    print(f"saved {args.out} ({time.time() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
