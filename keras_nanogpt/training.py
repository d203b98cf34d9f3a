"""Training recipes: `RECIPES` names each one's architecture, optimizer, schedule and reference run.

The optimizers and their schedule live in `keras_nanogpt.optimizers`; their names are here too
(`kn.training.nanogpt_optimizer`, `kn.training.muon_optimizer`, ...)."""

import dataclasses
import inspect
import typing

import keras

from keras_nanogpt import _validation, configs
from keras_nanogpt.model import NanoGPT
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

