"""The architecture's settings: the named sizes and the modern layout `NanoGPT.from_config_name` builds,
and the arguments `NanoGPT` checks and `get_config` saves."""

import math

from keras_nanogpt import _validation
from keras_nanogpt.layers import ACTIVATIONS, NORMS, POSITION_EMBEDDINGS

# The modern architecture (the nanoGPT speedrun's choices); see benchmarks/RESULTS.md for the ablation.
MODERN = dict(position_embedding="rotary", qk_norm=True, norm="rms", activation="relu_squared",
              zero_init_residual=True, tie_embeddings=False)

CONFIGS = {
    # nanoGPT's shakespeare_char recipe on CPU.
    "nano": dict(num_layers=4, num_heads=4, hidden_dim=128, sequence_length=64, dropout=0.0),
    # nanoGPT's shakespeare_char recipe on GPU ("baby GPT").
    "baby": dict(num_layers=6, num_heads=6, hidden_dim=384, sequence_length=256, dropout=0.2),
    # GPT-2 small (124M with GPT-2's 50257-token vocabulary).
    "gpt2": dict(num_layers=12, num_heads=12, hidden_dim=768, sequence_length=1024, dropout=0.0),
}
CONFIGS["nano-modern"] = dict(CONFIGS["nano"], **MODERN)
CONFIGS["baby-modern"] = dict(CONFIGS["baby"], **MODERN)
# The architecture's arguments, checked (each error names the argument), as `get_config` saves them.
ARGUMENTS = ("vocabulary_size", "sequence_length", "num_layers", "num_heads", "hidden_dim", "dropout",
             "use_bias", "tie_embeddings", "activation", "layer_norm_epsilon", "position_embedding",
             "qk_norm", "norm", "zero_init_residual", "logit_softcap")


def check_arguments(arguments):
    """The `ARGUMENTS` of `arguments` (a dict holding at least those), each checked: an error names the
    argument, the value and what is allowed.

    Example:
        >>> arguments = check_arguments(locals())  # in NanoGPT.__init__  # doctest: +SKIP
    """
    check = _validation
    checked = {name: check.check_int(name, arguments[name]) for name in ARGUMENTS[:3]}
    checked["num_heads"], checked["hidden_dim"] = check.check_heads(arguments["num_heads"], arguments["hidden_dim"])
    checked["dropout"] = check.check_float("dropout", arguments["dropout"], 0.0, 1.0)
    checked["layer_norm_epsilon"] = check.check_float(
        "layer_norm_epsilon", arguments["layer_norm_epsilon"], 0.0, math.inf, low_inclusive=False)
    for name, choices in (("activation", ACTIVATIONS), ("position_embedding", POSITION_EMBEDDINGS), ("norm", NORMS)):
        checked[name] = check.check_choice(name, arguments[name], choices)
    for name in ("use_bias", "tie_embeddings", "qk_norm", "zero_init_residual"):
        checked[name] = check.check_flag(name, arguments[name])
    softcap = arguments["logit_softcap"]  # None: no cap
    checked["logit_softcap"] = None if softcap is None else check.check_float(
        "logit_softcap", softcap, 0.0, math.inf, low_inclusive=False)
    return {name: checked[name] for name in ARGUMENTS}
