"""Validation loss against wall time: our recipes and nanoGPT's, side by side on the same batches, printing JSON.

For each seed, nanoGPT's own `model.py` (imported from `--nanogpt DIR`, never copied; trained by a loop
written here to match its `train.py`: AdamW from `configure_optimizers`, warmup + cosine, clipping 1.0) and
each of our `--recipes` train on shakespeare_char at nanoGPT's `--size` (nano: its CPU recipe, 4 layers,
128 wide, context 64, batch 12, 2000 steps; baby: its GPU recipe, 6 layers, 384 wide, context 256,
dropout 0.2, batch 64, 5000 steps) in the same process, taking turns in chunks of
`--eval-every` steps so that a busy machine slows every side alike. Each of our recipes
(`kn.training.RECIPES`: "speedrun", "modern", "nanogpt", "adam") runs its own reference run (batch,
steps, warmup) at nanoGPT's CPU size unless overridden, and `--batch-size` and `--steps` at its other
sizes. Every side with the same batch size trains on the *same* windows in the same order (random offsets into the first 90% of the text, drawn from
the seed), and all are scored before training and after every chunk on the same random validation batches
from the last 10% (nanoGPT's `estimate_loss`: 200 batches of 12 windows). A side's training seconds are its
whole run's: from the start of its first step to the end of its last, our first call's compilation
included (no compilation cache is on), scoring excluded; the first step's seconds are also kept apart.

A recipe is a name, optionally with overrides after a colon (NanoGPT arguments, arguments of the recipe's
optimizer function, `batch_size`, `jit_compile`, or `steps`: a run of that length, its schedule ending
there), so one command runs a sweep:

    python benchmarks/train_quality.py --nanogpt ../nanoGPT --seeds 1337,1,2 --eval-every 50 --recipes speedrun
    python benchmarks/train_quality.py --nanogpt ../nanoGPT --seeds 1,2,3,4,5 --eval-every 500 --recipes nanogpt
    python benchmarks/train_quality.py --no-nanogpt --target 1.905 --eval-every 50 \\
        --recipes "modern" "modern:learning_rate=0.03" "modern:qk_norm=False,batch_size=24" "speedrun:steps=100"

On a GPU (`benchmarks/gpu.sh`), nanoGPT trains on CUDA, in bfloat16 autocast with `--mixed-precision`
(as its train.py does there), and `--stop-at-target` ends each side once it reaches the target.

The JSON has every curve (step, training seconds, validation loss), each side's loss after `--steps`,
and each recipe's steps and seconds to the target: nanoGPT's loss after `--steps` on the same seed (or
`--target`), linear between scoring points.
"""

import ast
import inspect
import json
import math
import sys
import time

import _common
import numpy as np

WARMUP_STEPS, LEARNING_RATE, MIN_LEARNING_RATE = 100, 1e-3, 1e-4  # nanoGPT's recipes
RUN_KEYS = {"batch_size", "steps", "jit_compile"}  # recipe overrides that are neither model nor optimizer arguments
# nanoGPT's shakespeare_char recipes: on CPU (its README's command) and on GPU (the "baby GPT").
SIZES = {"nano": dict(batch_size=12, steps=2000), "baby": dict(batch_size=64, steps=5000)}
RECIPES = ("speedrun", "modern", "nanogpt", "adam")  # kn.training.RECIPES (checked in main)


def parse_args(argv=None):
    parser = _common.argument_parser(__doc__)
    _common.add_nanogpt_arguments(parser)
    parser.add_argument("--no-nanogpt", action="store_true", help="ours only (give --target)")
    parser.add_argument("--target", type=float, help="the loss to time (default: nanoGPT's after --steps)")
    parser.add_argument("--recipes", nargs="+", default=["speedrun"],
                        help="NAME[:key=value,...]; names: " + ", ".join(RECIPES))
    parser.add_argument("--size", default="nano", choices=tuple(SIZES), help="nanoGPT's CPU or GPU recipe")
    parser.add_argument("--seeds", default="1337", help="comma-separated; one run of each side per seed")
    parser.add_argument("--steps", type=int, help="default: the size's (2000 nano, 5000 baby)")
    parser.add_argument("--eval-every", type=int, default=50, help="steps per turn; all are scored after each")
    parser.add_argument("--eval-batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, help="default: the size's (12 nano, 64 baby)")
    parser.add_argument("--steps-per-execution", type=int, default=1,
                        help="Keras's default; 10 took 1.2 s more to compile on TensorFlow (RESULTS.md)")
    parser.add_argument("--mixed-precision", action="store_true", help="ours in mixed_bfloat16, nanoGPT in autocast")
    parser.add_argument("--stop-at-target", action="store_true", help="a side stops once it reaches the target")
    args = parser.parse_args(argv)
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps <= WARMUP_STEPS or args.steps % args.eval_every:
        parser.error(f"--steps ({args.steps}) must exceed the {WARMUP_STEPS} warmup steps and be a multiple "
                     f"of --eval-every ({args.eval_every})")
    if args.no_nanogpt == bool(args.nanogpt):
        parser.error("give either --nanogpt DIR or --no-nanogpt")
    if args.no_nanogpt and args.target is None:
        parser.error("--no-nanogpt needs --target")
    if args.stop_at_target and args.target is None:
        parser.error("--stop-at-target needs --target")
    args.recipes = [parse_recipe(spec, parser) for spec in args.recipes]
    return args


def check_recipes(args, kn):
    """Give each recipe its run (the reference run's batch and steps at the nano size, else --batch-size and
    --steps) and check its steps, before any work."""
    reference = args.size == "nano"
    for spec, name, overrides in args.recipes:
        recipe = kn.training.RECIPES[name]
        overrides.setdefault("batch_size", recipe.batch_size if reference else args.batch_size)
        steps = overrides.setdefault("steps", recipe.steps if reference else args.steps)
        if not isinstance(steps, int) or not 0 < steps <= args.steps or steps % args.eval_every:
            raise SystemExit(f"recipe {spec}: steps must be a multiple of --eval-every ({args.eval_every}), "
                             f"at most --steps ({args.steps}); got {steps!r}")


def parse_recipe(spec, parser):
    """`(spec, name, overrides)` from "NAME[:key=value,...]"; values are read as Python literals."""
    name, _, rest = spec.partition(":")
    if name not in RECIPES:
        parser.error(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return spec, name, overrides


def main():
    args = parse_args()
    import keras

    import keras_nanogpt as kn

    assert set(RECIPES) == set(kn.training.RECIPES), "RECIPES here must name kn.training.RECIPES"
    check_recipes(args, kn)
    machine = _common.machine()
    if args.mixed_precision:
        keras.config.set_dtype_policy("mixed_bfloat16")
    text = kn.data.load_text("tinyshakespeare")
    runs = [run_seed(args, kn, text, int(seed)) for seed in args.seeds.split(",")]
    sides = list(runs[0]["final_val_loss"])
    results = {
        "backend": keras.backend.backend(), **machine, "load_average_at_end": _common.load_average(),
        "size": args.size, "steps": args.steps, "eval_batches": args.eval_batches, "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision,
        "command": " ".join(sys.argv),
        "peak_rss_mb_all_sides": _common.peak_rss_mb(),
        "mean": {key: {side: mean([run[key][side] for run in runs]) for side in sides}
                 for key in ("final_val_loss", "train_seconds", "first_step_seconds", "seconds_to_target",
                             "steps_to_target")},
        "runs": runs}
    if "nanogpt (theirs)" in sides:  # each recipe's time to the target against nanoGPT's time for --steps
        theirs = results["mean"]["train_seconds"]["nanogpt (theirs)"]
        results["mean"]["time_to_target_vs_nanogpt"] = {
            side: None if seconds is None else round(seconds / theirs, 3)
            for side, seconds in results["mean"]["seconds_to_target"].items()}
        # The measure: each side's whole run against nanoGPT's 2000 steps, and whether every
        # seed's run ended at or below nanoGPT's loss on that seed.
        results["mean"]["whole_run_vs_nanogpt"] = {
            side: round(seconds / theirs, 3) for side, seconds in results["mean"]["train_seconds"].items()}
        results["every_seed_at_or_below_target"] = {
            side: all(run["final_val_loss"][side] <= run["target"] for run in runs) for side in sides}
    print(json.dumps(results, indent=2))


def mean(values):
    return None if any(v is None for v in values) else round(float(np.mean(values)), 4)


def run_seed(args, kn, text, seed):
    """Every side's curve for one seed, taking turns chunk by chunk."""
    context = kn.CONFIGS[args.size]["sequence_length"]
    split = int(len(text) * 0.9)  # nanoGPT's prepare.py split, in characters
    index = {char: i for i, char in enumerate(sorted(set(text)))}  # nanoGPT's char vocabulary
    ids = np.array([index[char] for char in text], dtype=np.int64)
    train_ids, val_ids = ids[:split], ids[split:]
    rng = np.random.default_rng(seed)
    scoring = windows(val_ids, rng.integers(0, len(val_ids) - context, size=args.eval_batches * 12), context)

    def batches(batch_size):  # the same windows for every side with this batch size
        starts = np.random.default_rng([seed, batch_size]).integers(
            0, len(train_ids) - context, size=args.steps * batch_size)
        return windows(train_ids, starts, context)

    sides = {}
    if args.nanogpt:
        sides["nanogpt (theirs)"] = NanoGPTRecipe(args, len(index), seed, batches(args.batch_size))
    for spec, name, overrides in args.recipes:
        batch_size = overrides["batch_size"]
        sides[spec] = OurRecipe(args, kn, text, name, overrides, seed, batches(batch_size), batch_size)
    curves = {side: [(0, 0.0, round(recipe.score(*scoring), 4))] for side, recipe in sides.items()}
    seconds, first_step = dict.fromkeys(sides, 0.0), {}
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        for side, recipe in sides.items():
            if step > recipe.steps or args.stop_at_target and curves[side][-1][2] <= args.target:
                continue
            start, first = time.perf_counter(), step - args.eval_every
            if first == 0:  # the first step apart: its seconds are the start-up
                recipe.train(0, 1)
                first_step[side], first = round(time.perf_counter() - start, 2), 1
            recipe.train(first, step)
            seconds[side] += time.perf_counter() - start
            curves[side].append((step, round(seconds[side], 2), round(recipe.score(*scoring), 4)))
        print(f"seed {seed} step {step}: " + ", ".join(f"{side} {curve[-1][1:]}" for side, curve in curves.items()),
              file=sys.stderr, flush=True)
    target = args.target if args.target is not None else curves["nanogpt (theirs)"][-1][2]
    crossings = {side: crossing(curve, target) for side, curve in curves.items()}
    return {"seed": seed, "target": target,
            "final_val_loss": {side: curve[-1][2] for side, curve in curves.items()},
            "final_step": {side: curve[-1][0] for side, curve in curves.items()},
            "train_seconds": {side: curve[-1][1] for side, curve in curves.items()},
            "first_step_seconds": first_step,
            "steps_to_target": {side: point and point[0] for side, point in crossings.items()},
            "seconds_to_target": {side: point and point[1] for side, point in crossings.items()},
            "curves": {side: [list(point) for point in curve] for side, curve in curves.items()}}


def crossing(curve, target):
    """`(step, seconds)` where `curve` ((step, seconds, loss) points) first reaches `target`, linear
    between the points around it; None if it never does."""
    for (step0, time0, loss0), (step1, time1, loss1) in zip(curve, curve[1:]):
        if loss1 <= target:
            share = 1.0 if loss0 == loss1 else (loss0 - target) / (loss0 - loss1)
            return round(step0 + share * (step1 - step0), 1), round(time0 + share * (time1 - time0), 2)
    return None


class OurRecipe:
    """One of our recipes (`kn.training.RECIPES`): its model and optimizer, trained on given windows a chunk
    at a time."""

    def __init__(self, args, kn, text, name, overrides, seed, data, batch_size):
        import keras

        recipe = kn.training.RECIPES[name]
        model_keys = set(inspect.signature(kn.NanoGPT).parameters)
        architecture = {key: value for key, value in overrides.items() if key in model_keys}
        settings = {key: value for key, value in overrides.items() if key not in model_keys | RUN_KEYS}
        keras.utils.set_random_seed(seed)
        vectorizer = kn.data.make_vectorizer(text, level="char")
        self.model = kn.NanoGPT.from_config_name(
            args.size, vocabulary_size=vectorizer.vocabulary_size(), vectorizer=vectorizer,
            **{**recipe.architecture, **architecture})
        self.steps = overrides["steps"]
        try:
            optimizer = recipe.optimizer(self.steps, **settings)
        except TypeError as error:  # an override that is no argument of the model or the optimizer
            raise SystemExit(f"recipe {name}: {error}")
        self.model.compile(optimizer=optimizer, steps_per_execution=args.steps_per_execution,
                           jit_compile=overrides.get("jit_compile", "auto"))
        # nanoGPT's id of a character (its rank in sorted order) -> ours (frequency order, after padding
        # and out-of-vocabulary ids).
        self.ours = kn.data.encode(vectorizer, "".join(sorted(set(text)))).astype("int32")
        self.x, self.y = self.ours[data[0]], self.ours[data[1]]
        self.batch_size = batch_size

    def train(self, start, end):
        rows = slice(start * self.batch_size, end * self.batch_size)
        self.model.fit(batched(self.x[rows], self.y[rows], self.batch_size), verbose=0)

    def score(self, x, y):
        return float(self.model.evaluate(batched(self.ours[x], self.ours[y], 12), verbose=0)[0])


def batched(x, y, batch_size):
    """`(x, y)` in order as a tf.data pipeline with autotuning off. Keras turns numpy arrays into an
    autotuned pipeline, and deleting its iterator at the end of `fit` waits for the autotuning thread's
    sleep (doubling periods), so a 50-step `fit` of 11 s took 20.5 s (see `kn.data.make_datasets`)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).prefetch(4).with_options(options)


class NanoGPTRecipe:
    """nanoGPT's model and optimiser under a loop matching its `train.py` for the CPU recipe."""

    def __init__(self, args, vocabulary_size, seed, data):
        import keras_nanogpt as kn

        size = kn.CONFIGS[args.size]
        self.torch, self.model, self.optimizer = _common.nanogpt_model(
            args.nanogpt, size["sequence_length"], vocabulary_size=vocabulary_size,
            num_layers=size["num_layers"], num_heads=size["num_heads"], hidden_dim=size["hidden_dim"],
            threads=args.threads, seed=seed, dropout=size["dropout"])
        torch = self.torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.autocast = torch.autocast(self.device, dtype=torch.bfloat16, enabled=args.mixed_precision)
        self.steps = args.steps
        self.x, self.y = (torch.from_numpy(array).to(self.device) for array in data)
        self.batch_size, self.total_steps = args.batch_size, args.steps

    def learning_rate(self, step):
        """nanoGPT's `get_lr`: linear warmup over the first 100 steps, then cosine down to the floor."""
        if step < WARMUP_STEPS:
            return LEARNING_RATE * (step + 1) / (WARMUP_STEPS + 1)
        progress = (step - WARMUP_STEPS) / (self.total_steps - WARMUP_STEPS)
        return MIN_LEARNING_RATE + 0.5 * (1 + math.cos(math.pi * progress)) * (LEARNING_RATE - MIN_LEARNING_RATE)

    def train(self, start, end):
        torch = self.torch
        for step in range(start, end):
            rows = slice(step * self.batch_size, (step + 1) * self.batch_size)
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(step)
            with self.autocast:
                _, loss = self.model(self.x[rows], self.y[rows])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()

    def score(self, x, y):
        torch = self.torch
        self.model.eval()
        with torch.no_grad(), self.autocast:
            losses = [self.model(torch.from_numpy(xb).to(self.device), torch.from_numpy(yb).to(self.device))[1].item()
                      for xb, yb in zip(np.split(x, len(x) // 12), np.split(y, len(y) // 12))]
        self.model.train()
        return float(np.mean(losses))


def windows(ids, starts, context):
    """`(inputs, targets)` of shape `(len(starts), context)`: the windows starting at `starts`, in order."""
    rows = np.asarray(starts).reshape(-1, 1) + np.arange(context + 1)
    chunks = ids[rows]
    return np.ascontiguousarray(chunks[:, :-1]), np.ascontiguousarray(chunks[:, 1:])


if __name__ == "__main__":
    main()
