"""How to train: `RECIPES` names each recipe's architecture, optimizer, schedule and reference run, and
`train(TrainingJob(...))` runs a whole training job (the `keras-nanogpt train` command) from Python.

The optimizers and their schedule live in `keras_nanogpt.optimizers`; their names are here too
(`kn.training.nanogpt_optimizer`, `kn.training.muon_optimizer`, ...)."""

import dataclasses
import glob
import inspect
import math
import os
import typing

import keras

from keras_nanogpt import (_validation, backends, backup, callbacks, configs, convert, data, distribute, shards,
                           tokenizers)
from keras_nanogpt.model import NanoGPT, load_model
from keras_nanogpt.optimizers import (  # noqa: F401 (kn.training's names)
    DECAY_SHAPES, MatrixDecayAdamW, MatrixDecayMuon, WarmupDecay, muon_optimizer, nanogpt_optimizer)


def _muon_recipe(**settings):
    """A recipe's `make_optimizer` for `muon_optimizer` with `settings` over its defaults; a learning rate
    given is Muon's, and AdamW's keeps its ratio to it unless given too."""
    defaults = inspect.signature(muon_optimizer).parameters
    muon, adam = (settings.get(name, defaults[name].default) for name in ("learning_rate", "adam_learning_rate"))

    def make_optimizer(total_steps, learning_rate, warmup_steps, **overrides):
        scaled = {} if learning_rate is None else dict(learning_rate=learning_rate,
                                                        adam_learning_rate=adam * learning_rate / muon)
        return muon_optimizer(total_steps, warmup_steps=warmup_steps, **{**settings, **scaled, **overrides})

    return make_optimizer


def _nanogpt_optimizer(total_steps, learning_rate, warmup_steps, **settings):
    peak = 1e-3 if learning_rate is None else learning_rate
    return nanogpt_optimizer(total_steps, warmup_steps=warmup_steps,
                             **{"learning_rate": peak, "min_learning_rate": peak / 10, **settings})


def _adam(total_steps, learning_rate, warmup_steps, **settings):
    return keras.optimizers.Adam(1e-3 if learning_rate is None else learning_rate, **settings)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named way to train: the architecture, the optimizer with its schedule, and the reference run
    (batch, sequence length, steps) its figures in benchmarks/RESULTS.md were measured with.

    Args:
        name: the recipe's name in `RECIPES` and on the command line (`--recipe`).
        description: one line on what it is.
        size: the model size in `kn.model.CONFIGS` its reference run trains ("nano").
        architecture: `NanoGPT` arguments over that size (`kn.model.MODERN`, or none: GPT-2's layout).
        make_optimizer: `make_optimizer(total_steps, learning_rate, warmup_steps, **settings)`; None
            values mean the recipe's own, `settings` are other arguments of its optimizer function.
        batch_size: windows per step of the reference run.
        steps: optimizer steps of the reference run.
        warmup_steps: warmup of the reference run (None: `default_warmup(steps)`).

    Example:
        >>> recipe = RECIPES["modern"]
        >>> recipe.batch_size, recipe.sequence_length, recipe.steps
        (32, 64, 150)
        >>> model = recipe.build(vocabulary_size=65)  # the architecture, compiled with Muon for 150 steps
    """

    name: str
    description: str
    size: str
    architecture: dict
    make_optimizer: typing.Callable
    batch_size: int
    steps: int
    warmup_steps: typing.Optional[int] = None

    @property
    def sequence_length(self):
        """The reference run's window length: its size's context."""
        return configs.CONFIGS[self.size]["sequence_length"]

    def optimizer(self, total_steps=None, learning_rate=None, warmup_steps=None, **settings):
        """The recipe's optimizer and schedule for a run of `total_steps` (None: the reference run's).

        Args:
            total_steps: optimizer steps of the whole run.
            learning_rate: the peak learning rate (None: the recipe's; for "modern" and "speedrun",
                Muon's, AdamW's keeping its ratio to it).
            warmup_steps: steps of warmup (None: the reference run's for its own length, else
                `default_warmup(total_steps)`).
            **settings: other arguments of the recipe's optimizer function (`muon_optimizer`'s
                `adam_beta_2`, ...) over the recipe's.

        Example:
            >>> optimizer = RECIPES["nanogpt"].optimizer(total_steps=2000)
            >>> optimizer = RECIPES["speedrun"].optimizer(ns_steps=3)
        """
        total_steps = self.steps if total_steps is None else _validation.check_int("total_steps", total_steps)
        if warmup_steps is None:
            warmup_steps = (self.warmup_steps if total_steps == self.steps and self.warmup_steps is not None
                            else default_warmup(total_steps))
        return self.make_optimizer(total_steps, learning_rate, warmup_steps, **settings)

    def build(self, vocabulary_size, total_steps=None, learning_rate=None, warmup_steps=None, size=None,
              **overrides):
        """A built `NanoGPT` of the recipe's size and architecture, compiled with its optimizer.

        Args:
            vocabulary_size: number of token ids.
            total_steps, learning_rate, warmup_steps: as `optimizer`.
            size: another size of `kn.model.CONFIGS` (None: the recipe's).
            **overrides: any other `NanoGPT` argument (a `vectorizer`, `num_layers`, ...).

        Example:
            >>> model = RECIPES["modern"].build(vocabulary_size=65, total_steps=750)
        """
        model = NanoGPT.from_config_name(size or self.size, vocabulary_size, **{**self.architecture, **overrides})
        model.compile(optimizer=self.optimizer(total_steps, learning_rate, warmup_steps))
        return model


def default_warmup(total_steps):
    """Warmup steps for a run of `total_steps`: 100, or a tenth of a shorter run (nanoGPT's 100 of 2000)."""
    return min(100, total_steps // 10)


VALIDATION_BATCHES = 20  # batches of a shards' "val" split that a `data` job validates on after each report

RECIPES = {recipe.name: recipe for recipe in (
    Recipe("modern", "the modern architecture with Muon on the blocks' matrices and AdamW on the rest",
           "nano", configs.MODERN, _muon_recipe(), batch_size=32, steps=150, warmup_steps=40),
    # Swept on this CPU for the whole run's time to nanoGPT's 2000-step loss (benchmarks/RESULTS.md).
    Recipe("speedrun", "nanoGPT's 2000-step loss soonest on a CPU: the modern layout in 2 blocks, logits capped "
           "at 15, AdamW at 0.04 with betas (0.8, 0.95) beside Muon at 0.015",
           "nano", dict(configs.MODERN, num_layers=2, logit_softcap=15.0),
           _muon_recipe(learning_rate=0.015, adam_learning_rate=0.04, adam_beta_1=0.8, adam_beta_2=0.95),
           batch_size=32, steps=150, warmup_steps=10),
    Recipe("nanogpt", "GPT-2's layout with nanoGPT's AdamW (decay on matrices), warmup + cosine and clipping",
           "nano", {}, _nanogpt_optimizer, batch_size=12, steps=2000),
    Recipe("adam", "GPT-2's layout with plain Adam at a constant learning rate",
           "nano", {}, _adam, batch_size=12, steps=2000),
)}


def optimizer_for(recipe, total_steps, learning_rate=None, warmup_steps=None):
    """The optimizer of a named recipe, for a run of `total_steps` (`RECIPES[recipe].optimizer`).

    Args:
        recipe: one of `RECIPES`: "modern" or "speedrun" (`muon_optimizer`), "nanogpt"
            (`nanogpt_optimizer`, the floor a tenth of the peak) or "adam" (`keras.optimizers.Adam`).
        total_steps: optimizer steps of the whole run.
        learning_rate: the peak learning rate (None: the recipe's). For "modern" it is Muon's, and
            AdamW's keeps its default ratio to it.
        warmup_steps: steps of warmup (None: as `Recipe.optimizer`: the reference run's at its length,
            else 100 or a tenth of a shorter run).

    Example:
        >>> optimizer = optimizer_for("modern", total_steps=2000)
    """
    _validation.check_choice("recipe", recipe, RECIPES)
    total_steps = _validation.check_int("total_steps", total_steps)
    return RECIPES[recipe].optimizer(total_steps, learning_rate, warmup_steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingJob:
    """A whole training run, as `keras-nanogpt train` runs it: each field is the flag of the same name
    (`hidden_dim` is `--hidden-dim`), with the same default; all keyword arguments. Checked when made
    (`dataclasses.replace(job, steps=...)` makes a checked variant); run it with `train(job)`.

    Args:
        text: what to train on: a known corpus name ("pride_and_prejudice", "tinyshakespeare") or a
            text file's path (`kn.data.load_text`). Give `text` or `data`.
        data: or token shards on disk (`kn.data.prepare`'s folder, llm.c / modded-nanogpt shards, nanoGPT's
            `train.bin` / `val.bin`), streamed through memory maps (`kn.data.token_dataset`, random windows
            seeded by `seed`): a corpus of any size. Its tokenizer (the manifest's, or nanoGPT's `meta.pkl`)
            becomes the new model's; a model given as `init` must have the same one. Validation: the first
            `VALIDATION_BATCHES` batches of the shards' "val" split.
        out: the `.keras` file written when training completes.
        level: the tokenizer's level, one of `kn.data.LEVELS` (None: "char").
        config: a size of `kn.CONFIGS` (None: "nano").
        layers, heads, hidden_dim, sequence_length, dropout: overrides of the size (None: its own).
            With `init`, `sequence_length` may shorten the windows to at most the model's context.
        batch_size: windows per step.
        steps: optimizer steps in all, rounded up to a multiple of `checkpoint_every` (None: 2000, unless
            `epochs` is given).
        epochs: passes over the training windows instead of `steps`.
        learning_rate: the peak learning rate (None: the recipe's; "modern" and "speedrun": Muon's).
        recipe: one of `RECIPES`: the architecture (for a new model) and the optimizer with its schedule.
        validation_split: the share of the text at its end held out for validation, in [0, 1).
        mixed_precision: train in "mixed_bfloat16" (sets Keras's global dtype policy).
        strategy: one of `kn.distribute.STRATEGIES` (see `kn.distribute.scope`).
        seed: seeds Keras's random generators and the order of the training windows.
        checkpoint_dir: back up there every `checkpoint_every` steps and on SIGTERM/SIGINT (then exit with
            143/130), and resume from the newest backup there (`kn.backup.PreemptibleBackup`).
        checkpoint_every: steps between backups, and between progress reports (Keras's "epochs").
        tensorboard: a log directory for TensorBoard scalars and text samples.
        compilation_cache: JAX only: keep the compiled steps in this folder (`kn.backends.cache_compilations`).
        plot: a PNG of the train and validation loss (`kn.callbacks.LossPlotCallback`).
        prompt: print a sample from this prompt after every report.
        peak_flops: the hardware's peak FLOP/s, to report the model FLOPs utilisation.
        verbose: `fit`'s verbosity: 0, 1 or 2.
        init: fine-tune this model (a `.keras` file or a Hugging Face GPT-2 folder) instead of training a
            new one; it brings its architecture and tokenizer.
        lora_rank: with `init`: train rank-`lora_rank` LoRA adapters only (`NanoGPT.enable_lora`).

    Example:
        >>> job = TrainingJob(text="tinyshakespeare", out="shakespeare.keras", steps=200)
        >>> result = train(job)  # doctest: +SKIP
    """

    out: str
    text: typing.Optional[str] = None
    data: typing.Optional[str] = None
    level: typing.Optional[str] = None
    config: typing.Optional[str] = None
    layers: typing.Optional[int] = None
    heads: typing.Optional[int] = None
    hidden_dim: typing.Optional[int] = None
    sequence_length: typing.Optional[int] = None
    dropout: typing.Optional[float] = None
    batch_size: int = 32
    steps: typing.Optional[int] = None
    epochs: typing.Optional[int] = None
    learning_rate: typing.Optional[float] = None
    recipe: str = "modern"
    validation_split: float = 0.1
    mixed_precision: bool = False
    strategy: str = "none"
    seed: int = 1337
    checkpoint_dir: typing.Optional[str] = None
    checkpoint_every: int = 100
    tensorboard: typing.Optional[str] = None
    compilation_cache: typing.Optional[str] = None
    plot: typing.Optional[str] = None
    prompt: typing.Optional[str] = None
    peak_flops: typing.Optional[float] = None
    verbose: int = 1
    init: typing.Optional[str] = None
    lora_rank: typing.Optional[int] = None

    def __post_init__(self):
        """Every field that can be checked before reading the text or building the model."""
        check = _validation
        for name in ("batch_size", "steps", "epochs", "checkpoint_every", "layers", "heads", "hidden_dim",
                     "sequence_length", "lora_rank"):
            if getattr(self, name) is not None:
                check.check_int(name, getattr(self, name))
        if (self.text is None) == (self.data is None):
            raise ValueError(f"Give `text` (a corpus name or a text file) or `data` (a folder of token shards), "
                             f"one of them; got text={self.text!r}, data={self.data!r}.")
        if self.data is not None:
            if self.epochs is not None or self.level is not None:
                raise ValueError("`epochs` and `level` are for `text`; token shards in `data` stream without end "
                                 "(give `steps`) and bring their own tokenizer.")
            if not os.path.exists(os.fspath(self.data)) and not glob.glob(os.fspath(self.data)):
                raise FileNotFoundError(f"`data` {self.data!r} does not exist: give a folder of token shards "
                                        f"(keras-nanogpt prepare ... --out DIR).")
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"Give `steps` or `epochs`, not both; got steps={self.steps}, epochs={self.epochs}.")
        if self.config is not None:
            check.check_choice("config", self.config, tuple(configs.CONFIGS))
        if self.lora_rank is not None and not self.init:
            raise ValueError("`lora_rank` fine-tunes an existing model: give `init` (a .keras file or a GPT-2 folder).")
        if self.init:
            given = [f"`{name}`" for name in ("config", "level", "layers", "heads", "hidden_dim", "mixed_precision")
                     if getattr(self, name) not in (None, False)]
            if given:
                raise ValueError(f"{', '.join(given)} cannot be combined with `init`: the model brings its "
                                 "architecture, tokenizer and dtype.")
        if self.level is not None:
            check.check_choice("level", self.level, data.LEVELS)
        check.check_choice("recipe", self.recipe, RECIPES)
        check.check_choice("strategy", self.strategy, distribute.STRATEGIES + ("multi-worker-mirrored",))
        if self.compilation_cache and backends.name() != "jax":
            raise ValueError(f"`compilation_cache` is for the JAX backend; this run uses {backends.name()} "
                             f"(set KERAS_BACKEND=jax).")
        if self.learning_rate is not None:
            check.check_float("learning_rate", self.learning_rate, 0.0, math.inf, low_inclusive=False)
        check.check_float("validation_split", self.validation_split, 0.0, 1.0, high_inclusive=False)
        if self.dropout is not None:
            check.check_float("dropout", self.dropout, 0.0, 1.0, high_inclusive=False)
        check.check_flag("mixed_precision", self.mixed_precision)
        check.check_choice("verbose", self.verbose, (0, 1, 2))
        if not os.fspath(self.out).endswith(".keras"):
            raise ValueError(f"`out` must end in .keras; got {self.out!r}.")

    @property
    def total_steps(self):
        """The optimizer steps of a `steps` run (rounded up to `checkpoint_every`); None for an `epochs` run."""
        if self.epochs is not None:
            return None
        steps = 2000 if self.steps is None else self.steps
        return math.ceil(steps / self.checkpoint_every) * self.checkpoint_every


@dataclasses.dataclass(frozen=True)
class TrainingResult:
    """What `train` did: the trained `model` (also saved at `out`), its `history`, the optimizer `steps` of
    the whole run and the step it `resumed` from (0: a fresh start)."""

    model: NanoGPT
    history: keras.callbacks.History
    out: str
    steps: int
    resumed: int


def train(job, log=print):
    """Run a `TrainingJob`: read the text, build (or load) the model, fit it and save it to `job.out`.

    The same run as `keras-nanogpt train` with the job's flags. It sets Keras's random seed (and with
    `mixed_precision` its global dtype policy). With `checkpoint_dir`, SIGTERM and SIGINT back up the step
    they end on and exit with status 143 or 130 (`SystemExit`); the same job resumes there.

    Args:
        job: a `TrainingJob`.
        log: called with each line of news while the job runs ("resuming from step N", the weights a
            fine-tuning trains); None: silent.

    Returns:
        A `TrainingResult`: the model, its history, `out`, the steps of the run and the step resumed from.

    Example:
        >>> job = TrainingJob(text="tinyshakespeare", out="tiny.keras", layers=1, heads=2, hidden_dim=16,
        ...                   sequence_length=16, steps=20, checkpoint_every=10, verbose=0)
        >>> train(job).model.generate("ROMEO:", max_new_tokens=20)  # doctest: +SKIP
    """
    if not isinstance(job, TrainingJob):
        raise TypeError(f"`job` must be a kn.training.TrainingJob; got {type(job).__name__}.")
    log = log or (lambda line: None)
    if job.mixed_precision:
        keras.config.set_dtype_policy("mixed_bfloat16")
    if job.compilation_cache:
        backends.cache_compilations(job.compilation_cache)
    keras.utils.set_random_seed(job.seed)
    strategy = distribute.scope(job.strategy)  # before any JAX work: "multi-host" starts JAX's runtime
    source = _Source(job)
    recipe = RECIPES[job.recipe]
    with strategy:
        model = _initial_model(job, source, log) if job.init else _new_model(job, source, recipe)
        sequence_length = job.sequence_length or model.sequence_length
        if job.epochs is not None:
            steps_per_epoch = source.epoch_batches(model.tokenizer, sequence_length)
            total_steps = job.epochs * steps_per_epoch
        else:
            steps_per_epoch, total_steps = job.checkpoint_every, job.total_steps
        model.compile(optimizer=recipe.optimizer(total_steps, job.learning_rate))
        fit_callbacks = [callbacks.ThroughputCallback(job.batch_size * sequence_length, job.peak_flops)]
        backups, resumed = None, 0
        if job.checkpoint_dir:
            # Every `checkpoint_every` steps and on SIGTERM/SIGINT (then at that step, exiting 143/130).
            backups = backup.PreemptibleBackup(job.checkpoint_dir, save_every=job.checkpoint_every)
            resumed = backups.restore(model)
            if resumed:
                log(f"resuming from step {resumed}")
        # The same batches as a run never stopped: the stream goes on after the `resumed` batches trained.
        train_ds, val_ds = source.datasets(model.tokenizer, sequence_length, start=resumed)
        if job.tensorboard:
            fit_callbacks.append(keras.callbacks.TensorBoard(job.tensorboard))
        if job.prompt or job.tensorboard:
            fit_callbacks.append(callbacks.TextGenerationCallback(
                job.prompt or source.sample_prompt(), max_new_tokens=200, log_dir=job.tensorboard,
                temperature=0.8, top_k=40, seed=job.seed))
        if job.plot:
            fit_callbacks.append(callbacks.LossPlotCallback(job.plot))
        if backups is not None:
            fit_callbacks.append(backups)  # last: on a signal it stops after the other callbacks saw the step
        history = model.fit(train_ds, steps_per_epoch=steps_per_epoch,
                            epochs=total_steps // steps_per_epoch, validation_data=val_ds,
                            callbacks=fit_callbacks, verbose=job.verbose)
    model.save(job.out)
    if backups is not None:
        backups.delete()  # only now: a failed save leaves the backup of the final step
    return TrainingResult(model, history, job.out, total_steps, resumed)


def _new_model(job, source, recipe):
    """A new `NanoGPT` of the job's size and the recipe's architecture, with the source's tokenizer."""
    vectorizer = source.tokenizer() or data.make_vectorizer(source.text, level=job.level or "char")
    overrides = {key: value for key, value in (
        ("num_layers", job.layers), ("num_heads", job.heads), ("hidden_dim", job.hidden_dim),
        ("sequence_length", job.sequence_length), ("dropout", job.dropout)) if value is not None}
    return NanoGPT.from_config_name(job.config or "nano", vectorizer=vectorizer,
                                    vocabulary_size=tokenizers.Tokenizer(vectorizer).size,
                                    **{**recipe.architecture, **overrides})


def _initial_model(job, source, log):
    """The model `job.init` names, with `job.lora_rank` adapters enabled; checked before training starts."""
    path = os.fspath(job.init)
    if os.path.isdir(path):
        model = convert.from_huggingface_gpt2(path, dropout=job.dropout)
    elif path.endswith(".keras"):
        if job.dropout is not None:
            raise ValueError("`dropout` cannot change a saved .keras model; it applies to a GPT-2 folder.")
        model = load_model(path)
    else:
        raise ValueError(f"`init` must be a .keras file or a Hugging Face GPT-2 folder; got {path!r}.")
    if model.tokenizer is None and source.text is not None:
        raise ValueError(f"`init` {path!r} has no tokenizer, so it cannot read `text`; save the model with "
                         "a vectorizer (a GPT-2 folder needs vocab.json and merges.txt).")
    if source.data is not None:
        source.datasets(model.tokenizer, job.sequence_length or model.sequence_length)  # refuses other tokenizers
    if job.sequence_length is not None and job.sequence_length > model.sequence_length:
        raise ValueError(f"`sequence_length` must be at most the model's context ({model.sequence_length}) "
                         f"with `init`; got {job.sequence_length}.")
    if job.lora_rank is not None:
        model.enable_lora(job.lora_rank)
    trainable = sum(math.prod(v.shape) for v in model.trainable_variables)
    total = sum(math.prod(v.shape) for v in model.weights)
    log(f"fine-tuning {path}: {trainable:,} of {total:,} weights trainable"
        + (f" (LoRA rank {job.lora_rank})" if job.lora_rank is not None else ""))
    return model


class _Source:
    """Where a job's batches come from: a text (`job.text`) or token shards on disk (`job.data`)."""

    def __init__(self, job):
        self.job, self.data = job, job.data
        self.text = data.load_text(job.text) if job.text is not None else None
        self.info = shards.token_info(job.data) if job.data is not None else None
        self._windows = None  # a text's (train, validation) windows, encoded once

    def _text_windows(self, tokenizer, sequence_length):
        if self._windows is None:
            job = self.job
            self._windows = data.make_datasets(self.text, tokenizer, sequence_length, job.batch_size,
                                               validation_split=job.validation_split, sampling="random",
                                               seed=job.seed)
        return self._windows

    def epoch_batches(self, tokenizer, sequence_length):
        """Batches in one pass over a text's training windows (an `epochs` job's steps per epoch)."""
        return int(self._text_windows(tokenizer, sequence_length)[0].cardinality())

    def tokenizer(self):
        """The shards' tokenizer (a `Tokenizer`), or None: a text's is learned; llm.c shards record none."""
        if self.info is None:
            return None
        if self.info["tokenizer"]:
            return tokenizers.Tokenizer.from_config(self.info["tokenizer"]["config"])
        if self.info["meta"] and "itos" in self.info["meta"]:  # nanoGPT's char vocabulary
            itos = self.info["meta"]["itos"]
            return tokenizers.Tokenizer(data.make_vectorizer(level="char",
                                                             vocabulary=[itos[i] for i in range(len(itos))]))
        if not self.job.init:
            raise ValueError(f"The token shards in `data` {self.data!r} record no tokenizer (no manifest.json or "
                             f"meta.pkl): give `init`, the model whose tokenizer made them.")
        return None

    def datasets(self, tokenizer, sequence_length, start=0):
        """`(train, validation)` batches of `(ids, next ids)`: the one place that turns the job's source into
        batches. A text's random windows skip the `start` batches trained already; shards start there."""
        job = self.job
        if self.text is not None:
            train, val = self._text_windows(tokenizer, sequence_length)
            return train.repeat().skip(start), val
        train = data.token_dataset(self.data, sequence_length, job.batch_size, sampling="random", seed=job.seed,
                                   start=start, tokenizer=tokenizer)
        val = None
        if self.info["tokens"].get("val"):
            val = data.token_dataset(self.data, sequence_length, job.batch_size, split="val",
                                     sampling="shuffled", seed=job.seed, tokenizer=tokenizer).take(VALIDATION_BATCHES)
        return train, val

    def sample_prompt(self):
        """The default prompt of text samples: the text's start, or the start of a line."""
        return self.text[:20] if self.text is not None else "\n"
