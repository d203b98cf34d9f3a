"""Saving and loading: atomic `.keras` and `.weights.h5` files, `load_model` with errors that name the
file, and presets in keras-hub's layout (`save_to_preset(model, dir)`, `from_preset(dir | "hf://..." |
"kaggle://...")`).

A preset folder holds `config.json` (the model, as `keras.saving.serialize_keras_object` writes it),
`model.weights.h5`, `tokenizer.json` with the tokenizer's vocabulary in `assets/tokenizer/vocabulary.json`
(when the model has one) and `metadata.json` (versions, parameter count, backend). Remote handles go
through keras-hub's own file resolution, which `keras_hub.upload_preset` pairs with; the folder is
written atomically (a crash leaves the old preset or the new one).
"""

import datetime
import io
import json
import os
import zipfile
import zlib

import keras

from keras_nanogpt import __version__, _files, backends, tokenizers

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.json"
VOCABULARY_ASSET = "assets/tokenizer/vocabulary.json"
_CLASS = "keras_nanogpt>NanoGPT"


def save_model(model, filepath, overwrite=True, **kwargs):
    """`keras.Model.save` to a `.keras` file, atomically: a crash leaves the old file or the new one.

    A write that fails (disk full, permission denied, read-only folder) raises an `OSError` naming
    `filepath` and the cause, and leaves the old file as it was.

    Args:
        model: a Keras model.
        filepath: a path ending in ".keras".
        overwrite: replace a file that is there.
        **kwargs: passed to `keras.Model.save`.

    Example:
        >>> save_model(model, "model.keras")  # doctest: +SKIP
    """
    _check_target(filepath, ".keras", overwrite)
    with _files.atomic_path(filepath) as tmp:
        keras.Model.save(model, tmp, **kwargs)


def save_weights(model, filepath, overwrite=True, **kwargs):
    """`keras.Model.save_weights` to a `.weights.h5` file, atomically (checkpoint callbacks use it too).

    The HDF5 file is made in memory, then written: HDF5 writing straight to a full disk can crash the
    process (measured: a segmentation fault), while this raises an `OSError` naming `filepath` and
    the cause and leaves the old file as it was.

    Args:
        model, filepath, overwrite: as `save_model`, `filepath` ending in ".weights.h5".
        **kwargs: passed to `keras.Model.save_weights` (`max_shard_size` writes the shards directly).

    Example:
        >>> save_weights(model, "model.weights.h5")  # doctest: +SKIP
    """
    _check_target(filepath, ".weights.h5", overwrite)
    data = None if kwargs.get("max_shard_size") else _weights_h5_bytes(model)
    if data is not None:
        _files.write_bytes(filepath, data)
        return
    with _files.atomic_path(filepath) as tmp:
        keras.Model.save_weights(model, tmp, **kwargs)


def load_model(filepath, **kwargs):
    """`keras.models.load_model` with errors that name the file when it is missing, truncated, corrupt
    or refused by `safe_mode` (a lambda, or a class that is not registered).

    Args:
        filepath: a `.keras` file saved by `NanoGPT.save`.
        **kwargs: passed to `keras.models.load_model` (`safe_mode` stays on unless you turn it off).

    Example:
        >>> model = load_model("pride.keras")  # doctest: +SKIP
    """
    if not isinstance(filepath, (str, os.PathLike)):
        raise TypeError(f"`filepath` must be the path of a .keras file; got {filepath!r}.")
    path = os.fspath(filepath)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such model file: {path!r}.")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path!r} is not a readable .keras file (truncated or not a zip archive).")
    try:
        return keras.models.load_model(path, **kwargs)
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{path!r} is corrupted: its zip archive cannot be read ({error}).") from error
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{path!r} could not be loaded as a .keras model: {error}") from error


def _weights_h5_bytes(model):
    """The `.weights.h5` file Keras's `save_weights` writes, made in memory (None where Keras lacks the
    parts). Keras has no public API for an in-memory weights file: this is the one use of its private
    `saving_lib`, tested against `keras.Model.save_weights` by tests/test_model.py."""
    try:
        from keras.src.saving import saving_lib

        store = saving_lib.H5IOStore(io.BytesIO(), mode="w")
        save_state = saving_lib._save_state
    except (ImportError, AttributeError, TypeError):
        return None
    save_state(model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set())
    buffer = store.path_or_io
    store.close()
    return buffer.getvalue()


def _check_target(filepath, suffix, overwrite):
    """Refuse a file name Keras would refuse (before the temporary name hides it) or may not replace."""
    if not isinstance(filepath, (str, os.PathLike)):
        raise TypeError(f"`filepath` must be a path ending in {suffix!r}; got {filepath!r}.")
    path = os.fspath(filepath)
    if not path.endswith(suffix):
        raise ValueError(f"`filepath` must end in {suffix!r}; got {path!r}.")
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it.")


def save_to_preset(model, preset_dir):
    """Write `model` as a keras-hub preset folder (replacing one that is there).

    Args:
        model: a `NanoGPT`.
        preset_dir: the folder to write; `keras_hub.upload_preset(uri, preset_dir)` can upload it.

    Example:
        >>> save_to_preset(NanoGPT(65, 64, 2, 2, 32), "my_preset")  # doctest: +SKIP
    """
    if not isinstance(preset_dir, (str, os.PathLike)):
        raise TypeError(f"`preset_dir` must be a folder path; got {preset_dir!r}.")
    config = keras.saving.serialize_keras_object(model)
    for key in ("compile_config", "build_config"):
        config.pop(key, None)
    config["config"] = dict(config["config"], vectorizer=None)
    import keras_hub

    metadata = {"keras_version": keras.version(), "keras_hub_version": keras_hub.__version__,
                "keras_nanogpt_version": __version__, "backend": backends.name(),
                "parameter_count": model.count_params(),
                "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"), "tasks": []}
    with _files.atomic_directory(preset_dir) as tmp:
        _write_json(os.path.join(tmp, CONFIG_FILE), config)
        _write_json(os.path.join(tmp, METADATA_FILE), metadata)
        model.save_weights(os.path.join(tmp, WEIGHTS_FILE))
        if model.tokenizer is not None:
            tokenizer = model.tokenizer.get_config()
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
    if not isinstance(preset, (str, os.PathLike)):
        raise TypeError(f"`preset` must be a folder path or a hf:// / kaggle:// handle; got {preset!r}.")
    preset = os.fspath(preset)
    if "://" not in preset and not os.path.isdir(preset):
        raise FileNotFoundError(f"No such preset folder: {preset!r}.")
    config_path = _file(preset, CONFIG_FILE)
    config = _files.read_json(config_path)
    name = config.get("registered_name") if isinstance(config, dict) else None
    if name != _CLASS or not isinstance(config.get("config"), dict):
        raise ValueError(f"{config_path!r} is not a keras_nanogpt preset (registered_name "
                         f"{name!r}, expected {_CLASS!r}); load it with keras_hub instead.")
    arguments = dict(config["config"])
    tokenizer_path = _file(preset, TOKENIZER_FILE, optional=True)
    if tokenizer_path is not None:
        tokenizer = _files.read_json(tokenizer_path)
        vocabulary_path = _file(preset, VOCABULARY_ASSET)
        try:
            arguments["vectorizer"] = tokenizers.Tokenizer.from_config(
                {"level": tokenizer.get("level"), **_files.read_json(vocabulary_path)})
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"{vocabulary_path!r} and {tokenizer_path!r} do not describe a tokenizer: "
                             f"{error}") from error
    try:
        model = keras.saving.get_registered_object(_CLASS).from_config(arguments)
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


def _write_json(path, value):
    _files.write_bytes(path, json.dumps(value, indent=2).encode("utf-8"))
