"""Presets in keras-hub's layout: `save_to_preset(model, dir)` and `from_preset(dir | "hf://..." | "kaggle://...")`.

A preset folder holds `config.json` (the model, as `keras.saving.serialize_keras_object` writes it),
`model.weights.h5`, `tokenizer.json` with the tokenizer's vocabulary in `assets/tokenizer/vocabulary.json`
(when the model has one) and `metadata.json` (versions, parameter count, backend). Remote handles go
through keras-hub's own file resolution, which `keras_hub.upload_preset` pairs with; the folder is
written atomically (a crash leaves the old preset or the new one).
"""

import datetime
import json
import os

import keras

from keras_nanogpt import _files

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.json"
VOCABULARY_ASSET = "assets/tokenizer/vocabulary.json"
_CLASS = "keras_nanogpt>NanoGPT"


def save_to_preset(model, preset_dir):
    """Write `model` as a keras-hub preset folder (replacing one that is there).

    Args:
        model: a `NanoGPT`.
        preset_dir: the folder to write; `keras_hub.upload_preset(uri, preset_dir)` can upload it.

    Example:
        >>> save_to_preset(NanoGPT(65, 64, 2, 2, 32), "my_preset")  # doctest: +SKIP
    """
    from keras_nanogpt import __version__, data

    if not isinstance(preset_dir, (str, os.PathLike)):
        raise TypeError(f"`preset_dir` must be a folder path; got {preset_dir!r}.")
    config = keras.saving.serialize_keras_object(model)
    for key in ("compile_config", "build_config"):
        config.pop(key, None)
    config["config"] = dict(config["config"], vectorizer=None)
    import keras_hub

    metadata = {"keras_version": keras.version(), "keras_hub_version": keras_hub.__version__,
                "keras_nanogpt_version": __version__, "backend": keras.backend.backend(),
                "parameter_count": model.count_params(),
                "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"), "tasks": []}
    with _files.atomic_directory(preset_dir) as tmp:
        _write_json(os.path.join(tmp, CONFIG_FILE), config)
        _write_json(os.path.join(tmp, METADATA_FILE), metadata)
        model.save_weights(os.path.join(tmp, WEIGHTS_FILE))
        if model.vectorizer is not None:
            tokenizer = data.vectorizer_to_config(model.vectorizer)
            _write_json(os.path.join(tmp, TOKENIZER_FILE), {"level": tokenizer.pop("level"),
                                                            "assets": [VOCABULARY_ASSET]})
            os.makedirs(os.path.join(tmp, os.path.dirname(VOCABULARY_ASSET)))
            _write_json(os.path.join(tmp, VOCABULARY_ASSET), tokenizer)


def from_preset(preset):
    """The `NanoGPT` of a preset folder or remote handle, weights and tokenizer included.

    Args:
        preset: a local folder from `save_to_preset`, or a handle keras-hub resolves
            ("hf://user/name", "kaggle://user/model/keras/variant").

    Example:
        >>> model = from_preset("my_preset")  # doctest: +SKIP
    """
    from keras_nanogpt import data
    from keras_nanogpt.model import NanoGPT

    if not isinstance(preset, (str, os.PathLike)):
        raise TypeError(f"`preset` must be a folder path or a hf:// / kaggle:// handle; got {preset!r}.")
    preset = os.fspath(preset)
    if "://" not in preset and not os.path.isdir(preset):
        raise FileNotFoundError(f"No such preset folder: {preset!r}.")
    config_path = _file(preset, CONFIG_FILE)
    config = _read_json(config_path)
    name = config.get("registered_name") if isinstance(config, dict) else None
    if name != _CLASS or not isinstance(config.get("config"), dict):
        raise ValueError(f"{config_path!r} is not a keras_nanogpt preset (registered_name "
                         f"{name!r}, expected {_CLASS!r}); load it with keras_hub instead.")
    arguments = dict(config["config"])
    tokenizer_path = _file(preset, TOKENIZER_FILE, optional=True)
    if tokenizer_path is not None:
        tokenizer = _read_json(tokenizer_path)
        vocabulary_path = _file(preset, VOCABULARY_ASSET)
        try:
            arguments["vectorizer"] = data.vectorizer_from_config(
                {"level": tokenizer.get("level"), **_read_json(vocabulary_path)})
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"{vocabulary_path!r} and {tokenizer_path!r} do not describe a tokenizer: "
                             f"{error}") from error
    try:
        model = NanoGPT.from_config(arguments)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{config_path!r} holds an invalid NanoGPT config: {error}") from error
    weights_path = _file(preset, WEIGHTS_FILE)
    try:
        model.load_weights(weights_path)
    except Exception as error:  # h5py and Keras raise many kinds for a damaged or mismatched file
        raise ValueError(f"{weights_path!r} could not be loaded into the model of {config_path!r} "
                         f"(damaged, or saved from another configuration): {error}") from error
    return model


def _file(preset, name, optional=False):
    """The local path of `name` in `preset` (downloaded by keras-hub for a remote handle), or None."""
    if "://" in preset:
        from keras_hub.src.utils import preset_utils

        if optional and not preset_utils.check_file_exists(preset, name):
            return None
        return preset_utils.get_file(preset, name)
    path = os.path.join(preset, name)
    if not os.path.isfile(path):
        if optional:
            return None
        raise FileNotFoundError(f"The preset {preset!r} has no {name!r} ({path!r} is missing).")
    return path


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path!r} is not valid JSON: {error}") from error


def _write_json(path, value):
    _files.write_bytes(path, json.dumps(value, indent=2).encode("utf-8"))
