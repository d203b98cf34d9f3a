"""Validation loss against wall time: our shakespeare_char recipe and nanoGPT's, side by side, printing JSON.

For each seed, both models train nanoGPT's shakespeare_char CPU recipe (see `examples/shakespeare_char.py`)
in the same process, taking turns in chunks of `--eval-every` steps so a busy machine slows both alike.
Before training and after every chunk both are scored on the same random validation batches from the last
10% of the text (nanoGPT's `estimate_loss`: 200 batches of 12 windows, here one draw shared by both).
nanoGPT runs its own `model.py` (imported from `--nanogpt DIR`, never copied) under a loop written here to
match its `train.py`: random windows, AdamW from `configure_optimizers`, warmup + cosine learning rate,
clipping 1.0. Training seconds include our first call's compilation and exclude scoring.

The JSON has every curve (step, training seconds, validation loss), each side's loss after `--steps`, and
each side's loss at the other's finishing time (interpolated along its curve): the equal-wall-time test.

    python benchmarks/train_quality.py --nanogpt ../nanoGPT
    python benchmarks/train_quality.py --nanogpt ../nanoGPT --seeds 1337,1,2
"""

import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np

from train_speed import nanogpt_model

CONTEXT, WARMUP_STEPS, LEARNING_RATE, MIN_LEARNING_RATE = 64, 100, 1e-3, 1e-4  # the recipe


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", required=True, help="path of a karpathy/nanoGPT checkout")
    parser.add_argument("--seeds", default="1337", help="comma-separated; one run of each side per seed")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=250, help="steps per turn; both are scored after each")
    parser.add_argument("--eval-batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--steps-per-execution", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for nanoGPT")
    args = parser.parse_args(argv)
    if args.steps <= WARMUP_STEPS or args.steps % args.eval_every:
        parser.error(f"--steps ({args.steps}) must exceed the {WARMUP_STEPS} warmup steps and be a multiple "
                     f"of --eval-every ({args.eval_every})")
    return args


def main():
    args = parse_args()
    import keras

    import keras_nanogpt as kn

    load_at_start = round(os.getloadavg()[0], 2)
    text = kn.data.load_text("tinyshakespeare")
    runs = [run_seed(args, kn, text, int(seed)) for seed in args.seeds.split(",")]
    results = {
        "backend": keras.backend.backend(), "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
        "load_average_at_start": load_at_start, "load_average_at_end": round(os.getloadavg()[0], 2),
        "steps": args.steps, "eval_batches": args.eval_batches, "batch_size": args.batch_size,
        "peak_rss_mb_both_sides": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "mean": {key: round(float(np.mean([run[key] for run in runs])), 4)
                 for key in ("ours_final_val_loss", "nanogpt_final_val_loss", "ours_at_nanogpt_finish",
                             "nanogpt_at_our_finish", "ours_train_seconds", "nanogpt_train_seconds")},
        "runs": runs}
    print(json.dumps(results, indent=2))


def run_seed(args, kn, text, seed):
    """Both sides' curves for one seed, taking turns chunk by chunk."""
    split = int(len(text) * 0.9)  # nanoGPT's prepare.py split, in characters
    offsets = np.random.default_rng(seed).integers(0, len(text) - split - CONTEXT,
                                                   size=(args.eval_batches, args.batch_size))
    ours = OurRecipe(args, kn, text, split, seed, offsets)
    theirs = NanoGPTRecipe(args, text, split, seed, offsets)
    curves = {"ours": [(0, 0.0, round(ours.score(), 4))], "nanogpt": [(0, 0.0, round(theirs.score(), 4))]}
    seconds = {"ours": 0.0, "nanogpt": 0.0}
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        for name, side in (("ours", ours), ("nanogpt", theirs)):
            start = time.perf_counter()
            side.train(args.eval_every)
            seconds[name] += time.perf_counter() - start
            curves[name].append((step, round(seconds[name], 2), round(side.score(), 4)))
        print(f"seed {seed} step {step}: ours {curves['ours'][-1][1:]}, nanoGPT {curves['nanogpt'][-1][1:]}",
              file=sys.stderr, flush=True)
    return {"seed": seed,
            "ours_final_val_loss": curves["ours"][-1][2], "nanogpt_final_val_loss": curves["nanogpt"][-1][2],
            "ours_train_seconds": curves["ours"][-1][1], "nanogpt_train_seconds": curves["nanogpt"][-1][1],
            "ours_at_nanogpt_finish": loss_at(curves["ours"], curves["nanogpt"][-1][1]),
            "nanogpt_at_our_finish": loss_at(curves["nanogpt"], curves["ours"][-1][1]),
            "curves": {name: [list(point) for point in curve] for name, curve in curves.items()}}


def loss_at(curve, seconds):
    """The loss along `curve` ((step, seconds, loss) points) at `seconds`, linear between points; a run
    that finished earlier keeps its final loss."""
    times, losses = [p[1] for p in curve], [p[2] for p in curve]
    return round(float(np.interp(seconds, times, losses)), 4)


class OurRecipe:
    """`examples/shakespeare_char.py`'s model, data and optimiser, trained a chunk at a time."""

    def __init__(self, args, kn, text, split, seed, offsets):
        import keras

        keras.utils.set_random_seed(seed)
        vectorizer = kn.data.make_vectorizer(text, level="char")
        self.model = kn.NanoGPT.from_config_name("nano", vocabulary_size=vectorizer.vocabulary_size(),
                                                 vectorizer=vectorizer)
        train, _ = kn.data.make_datasets(text, vectorizer, CONTEXT, args.batch_size, validation_split=0.1,
                                         sampling="random", seed=seed)
        self.train_data, self.epoch = train.repeat(), 0
        self.model.compile(optimizer=kn.training.nanogpt_optimizer(total_steps=args.steps),
                           steps_per_execution=args.steps_per_execution)
        validation_text = text[split:]
        ids = kn.data.encode(vectorizer, validation_text)
        assert len(ids) == len(validation_text), "a character vectorizer gives one id per character"
        self.x, self.y, self.batch_size = *windows(ids, offsets), args.batch_size

    def train(self, steps):
        self.model.fit(self.train_data, steps_per_epoch=steps, initial_epoch=self.epoch,
                       epochs=self.epoch + 1, verbose=0)
        self.epoch += 1

    def score(self):
        return float(self.model.evaluate(self.x, self.y, batch_size=self.batch_size, verbose=0)[0])


class NanoGPTRecipe:
    """nanoGPT's model and optimiser under a loop matching its `train.py` for the CPU recipe."""

    def __init__(self, args, text, split, seed, offsets):
        self.torch, self.model, self.optimizer = nanogpt_model(
            args.nanogpt, CONTEXT, vocabulary_size=len(set(text)), num_layers=4, num_heads=4, hidden_dim=128,
            threads=args.threads, seed=seed)
        index = {char: i for i, char in enumerate(sorted(set(text)))}  # nanoGPT's char vocabulary
        ids = np.array([index[char] for char in text], dtype=np.int64)
        self.train_ids, self.batch_size, self.total_steps, self.step = ids[:split], args.batch_size, args.steps, 0
        self.x, self.y = windows(ids[split:], offsets)

    def learning_rate(self):
        """Linear warmup over the first 100 steps, then cosine down to the floor at the last step."""
        if self.step < WARMUP_STEPS:
            return LEARNING_RATE * (self.step + 1) / (WARMUP_STEPS + 1)
        progress = (self.step - WARMUP_STEPS) / (self.total_steps - WARMUP_STEPS)
        return MIN_LEARNING_RATE + 0.5 * (1 + math.cos(math.pi * progress)) * (LEARNING_RATE - MIN_LEARNING_RATE)

    def train(self, steps):
        torch = self.torch
        for _ in range(steps):
            starts = torch.randint(len(self.train_ids) - CONTEXT, (self.batch_size,)).numpy()
            x, y = (torch.from_numpy(array) for array in windows(self.train_ids, starts[None]))
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate()
            _, loss = self.model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1

    def score(self):
        torch = self.torch
        self.model.eval()
        with torch.no_grad():
            losses = [self.model(torch.from_numpy(x), torch.from_numpy(y))[1].item()
                      for x, y in zip(np.split(self.x, len(self.x) // self.batch_size),
                                      np.split(self.y, len(self.y) // self.batch_size))]
        self.model.train()
        return float(np.mean(losses))


def windows(ids, offsets):
    """`(inputs, targets)` of shape `(offsets.size, CONTEXT)`: the windows starting at `offsets`, in order."""
    starts = np.asarray(offsets).reshape(-1, 1) + np.arange(CONTEXT + 1)
    chunks = ids[starts]
    return np.ascontiguousarray(chunks[:, :-1]), np.ascontiguousarray(chunks[:, 1:])


if __name__ == "__main__":
    main()
