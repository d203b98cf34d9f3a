"""Weight import and export: Hugging Face GPT-2 directories and nanoGPT checkpoints.

Both are the same network as `NanoGPT`: GPT-2 with biases and tanh-approximate GELU, nanoGPT with
exact GELU and optionally no biases. Weights are mapped by name onto the model's layers
(`embedding.token_embedding` = `wte`, `blocks[i].attention.qkv_dense` = `h.i.attn.c_attn`, ...).
GPT-2 stores its projections as `Conv1D` weights `(in, out)`, which is a Keras kernel already;
nanoGPT's `nn.Linear` weights are `(out, in)` and are transposed.

Reading needs `safetensors` (Hugging Face) or `torch` (`pytorch_model.bin`, nanoGPT's `ckpt.pt`):
`pip install keras_nanogpt[convert]`.
"""

import json
import os
import pickle
import re

import keras
import numpy as np

from keras_nanogpt import _files, data
from keras_nanogpt.model import NanoGPT

# Hugging Face `activation_function` -> NanoGPT `activation`, and back.
_FROM_HF_ACTIVATIONS = {"gelu_new": "gelu_approximate", "gelu_pytorch_tanh": "gelu_approximate",
                        "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
_TO_HF_ACTIVATIONS = {"gelu_approximate": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
# Causal-mask buffers that older GPT-2 and non-flash nanoGPT state dicts carry; not weights.
_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_BPE_FILES = ("vocab.json", "merges.txt")


def from_huggingface_gpt2(directory, vectorizer=None, dropout=None):
    """A `NanoGPT` holding the weights of a Hugging Face GPT-2 `save_pretrained` directory.

    Reads `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`, or
    `pytorch_model.bin`). When the directory also holds `vocab.json` and `merges.txt` (as
    `tokenizer.save_pretrained` writes them), the model gets GPT-2's BPE tokenizer, so `generate`
    takes text.

    Args:
        directory: the folder, e.g. a local copy of `openai-community/gpt2`.
        vectorizer: a tokenizer to attach instead of the directory's BPE files.
        dropout: dropout for fine-tuning; None takes the config's `resid_pdrop`.

    Returns:
        A `NanoGPT` with `use_bias=True`, `activation="gelu_approximate"`, GPT-2's LayerNorm
        epsilon and tied embeddings.

    Example:
        >>> model = from_huggingface_gpt2("gpt2")  # doctest: +SKIP
        >>> model.generate("It is a truth", max_new_tokens=20)  # doctest: +SKIP
    """
    directory = _check_directory(directory)
    config = _read_huggingface_config(os.path.join(directory, "config.json"))
    if vectorizer is None and all(os.path.isfile(os.path.join(directory, f)) for f in _BPE_FILES):
        vectorizer = data.make_vectorizer(level="bpe", vocabulary=os.path.join(directory, "vocab.json"),
                                          merges=os.path.join(directory, "merges.txt"))
    model = NanoGPT(
        vocabulary_size=config["vocab_size"], sequence_length=config["n_positions"],
        num_layers=config["n_layer"], num_heads=config["n_head"], hidden_dim=config["n_embd"],
        dropout=config.get("resid_pdrop", 0.1) if dropout is None else dropout, use_bias=True,
        tie_embeddings=config.get("tie_word_embeddings", True),
        activation=_FROM_HF_ACTIVATIONS[config.get("activation_function", "gelu_new")],
        layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-5), vectorizer=vectorizer)
    tensors = {_strip(name, "transformer."): value
               for name, value in _read_huggingface_weights(directory).items()}
    _assign(model, tensors, transposed=False, source=directory)
    return model


def to_huggingface_gpt2(model, directory):
    """Write `model` as a Hugging Face GPT-2 directory that `GPT2LMHeadModel.from_pretrained` reads.

    Writes `model.safetensors` and `config.json` (each to a temporary file, then renamed), and
    GPT-2's `vocab.json` / `merges.txt` when the model's tokenizer is BPE. A model without biases
    gets zero biases, which computes the same function.

    Args:
        model: a `NanoGPT`.
        directory: the folder to write (created if missing; these files are replaced).

    Example:
        >>> to_huggingface_gpt2(model, "my_gpt2")  # doctest: +SKIP
        >>> transformers.GPT2LMHeadModel.from_pretrained("my_gpt2")  # doctest: +SKIP
    """
    if not isinstance(model, NanoGPT):
        raise TypeError(f"`model` must be a kn.NanoGPT; got {type(model).__name__}.")
    _check_gpt2_layout(model)
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"`directory` must be a folder path; got {directory!r}.")
    quantized = {layer.quantization_mode for layer in model._flatten_layers()} - {None}
    if quantized:
        raise ValueError(f"`model` is quantized ({', '.join(sorted(quantized))}); GPT-2 files hold float "
                         "weights: export the model from before `quantize`.")
    from safetensors.numpy import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, variable, projection in _weights(model):
        value = np.asarray(keras.ops.convert_to_numpy(variable), dtype="float32")
        tensors[name] = value.T if projection and name == "lm_head.weight" else value
    for name in [n for n in tensors if n.startswith(("h.", "ln_f.")) and n.endswith(".weight")]:
        bias = name[:-len("weight")] + "bias"
        tensors.setdefault(bias, np.zeros(tensors[name].shape[-1], dtype="float32"))
    tensors = {("" if name == "lm_head.weight" else "transformer.") + name: np.ascontiguousarray(value)
               for name, value in tensors.items()}
    with _files.atomic_path(os.path.join(directory, "model.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})

    end_of_text = None
    bpe = model.tokenizer.get_config() if model.tokenizer is not None else {}
    if bpe.get("level") == "bpe":
        end_of_text = bpe["vocabulary"].get("<|endoftext|>")
        _write_text(os.path.join(directory, "vocab.json"), json.dumps(bpe["vocabulary"], ensure_ascii=False))
        _write_text(os.path.join(directory, "merges.txt"),
                    "".join(f"{merge}\n" for merge in ["#version: 0.2", *bpe["merges"]]))
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": model.vocabulary_size, "n_positions": model.sequence_length,
        "n_embd": model.hidden_dim, "n_layer": model.num_layers, "n_head": model.num_heads,
        "n_inner": None, "activation_function": _TO_HF_ACTIVATIONS[model.activation],
        "layer_norm_epsilon": model.layer_norm_epsilon, "tie_word_embeddings": model.tie_embeddings,
        "resid_pdrop": model.dropout, "embd_pdrop": model.dropout, "attn_pdrop": 0.0,
        "bos_token_id": end_of_text, "eos_token_id": end_of_text, "dtype": "float32",
    }
    _write_text(os.path.join(directory, "config.json"), json.dumps(config, indent=2) + "\n")


def from_nanogpt_checkpoint(path, meta=None, vectorizer=None, dropout=None):
    """A `NanoGPT` holding a nanoGPT `ckpt.pt` (as nanoGPT's train.py saves it), ids unchanged.

    Reads `model_args` and the `model` state dict (a `torch.compile` `_orig_mod.` prefix is
    dropped) with `torch.load(weights_only=True)`. A char vocabulary `meta.pkl` (nanoGPT's
    `stoi`/`itos`) beside the checkpoint, or at `meta`, becomes a char vectorizer whose ids are
    nanoGPT's: no padding or out-of-vocabulary ids, so an unknown character in a prompt is an
    error. It is read with an unpickler that builds nothing but dicts, strings and ints.

    Args:
        path: `ckpt.pt`, or the folder (nanoGPT's `out_dir`) that holds it.
        meta: path of `meta.pkl` (nanoGPT keeps it in `data/<dataset>/`); None looks beside `path`.
        vectorizer: a tokenizer to attach instead (e.g. `make_vectorizer(level="bpe", ...)` for a
            checkpoint fine-tuned from GPT-2).
        dropout: dropout for further training; None takes the checkpoint's.

    Returns:
        A `NanoGPT` with nanoGPT's settings: exact GELU, LayerNorm epsilon 1e-5, tied embeddings,
        biases as `model_args["bias"]` says.

    Example:
        >>> model = from_nanogpt_checkpoint("out-shakespeare-char/ckpt.pt",
        ...                                 meta="data/shakespeare_char/meta.pkl")  # doctest: +SKIP
        >>> model.generate("ROMEO:", max_new_tokens=100)  # doctest: +SKIP
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be the path of a nanoGPT ckpt.pt (or its folder); got {path!r}.")
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such nanoGPT checkpoint: {path!r}.")
    if meta is None and os.path.isfile(os.path.join(os.path.dirname(path), "meta.pkl")):
        meta = os.path.join(os.path.dirname(path), "meta.pkl")
    if meta is not None and vectorizer is None:
        vectorizer = data.make_vectorizer(level="char", vocabulary=read_nanogpt_meta(meta))
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict) or not {"model_args", "model"} <= set(checkpoint):
        raise ValueError(f"{path!r} is not a nanoGPT checkpoint: it needs `model_args` and `model`.")
    args = checkpoint["model_args"]
    missing = {"n_layer", "n_head", "n_embd", "block_size", "vocab_size"} - set(args)
    if missing:
        raise ValueError(f"{path!r}: `model_args` lacks {sorted(missing)}.")
    model = NanoGPT(
        vocabulary_size=args["vocab_size"], sequence_length=args["block_size"],
        num_layers=args["n_layer"], num_heads=args["n_head"], hidden_dim=args["n_embd"],
        dropout=args.get("dropout", 0.0) if dropout is None else dropout,
        use_bias=args.get("bias", True), tie_embeddings=True, activation="gelu",
        layer_norm_epsilon=1e-5, vectorizer=vectorizer)
    tensors = {_strip(_strip(name, "_orig_mod."), "transformer."): value
               for name, value in checkpoint["model"].items()}
    _assign(model, tensors, transposed=True, source=path)
    return model


def read_nanogpt_meta(path):
    """The characters of a nanoGPT `meta.pkl` in id order, read without running any pickled code.

    Only dicts, strings and ints are accepted; anything else (a class, a function) is refused.

    Args:
        path: the `meta.pkl` that nanoGPT's `data/shakespeare_char/prepare.py` writes.

    Example:
        >>> read_nanogpt_meta("data/shakespeare_char/meta.pkl")[:3]  # doctest: +SKIP
        ['\\n', ' ', '!']
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such meta.pkl: {path!r}.")
    with open(path, "rb") as f:
        try:
            meta = _PlainUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as error:
            raise ValueError(f"{path!r} is not a plain nanoGPT meta.pkl: {error}") from None
    if not _is_plain(meta) or not isinstance(meta, dict) or not ("itos" in meta or "stoi" in meta):
        raise ValueError(f"{path!r} must hold a dict of dicts, strings and ints with `itos` or `stoi`.")
    itos = meta["itos"] if "itos" in meta else {i: ch for ch, i in meta["stoi"].items()}
    if sorted(itos) != list(range(len(itos))) or not all(isinstance(c, str) for c in itos.values()):
        raise ValueError(f"{path!r}: `itos` must map ids 0..n-1 to characters.")
    return [itos[i] for i in range(len(itos))]


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle encodes natively (dicts, strings, ints...); never imports a name."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only dicts, strings and ints "
                                     f"are allowed")


def _is_plain(value):
    if isinstance(value, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return isinstance(value, (str, int))


def _check_gpt2_layout(model):
    """Refuse a model whose layout GPT-2 and nanoGPT cannot hold (rotary positions, RMSNorm, ...)."""
    differences = [f"{name}={value!r}" for name, value, gpt2 in (
        ("position_embedding", model.position_embedding, "learned"), ("norm", model.norm, "layer"),
        ("qk_norm", model.qk_norm, False), ("logit_softcap", model.logit_softcap, None)) if value != gpt2]
    if model.activation not in _TO_HF_ACTIVATIONS:
        differences.append(f"activation={model.activation!r}")
    if differences:
        raise ValueError(
            f"GPT-2 and nanoGPT weights need the GPT-2 layout (position_embedding='learned', norm='layer', "
            f"qk_norm=False, logit_softcap=None, activation one of {sorted(_TO_HF_ACTIVATIONS)}); this model has "
            f"{', '.join(differences)} (a modern configuration such as 'nano-modern').")


def _weights(model):
    """`(GPT-2 name, variable, is_projection)` for every weight of `model`, GPT-2's names without prefix."""
    entries = [("wte.weight", model.embedding.token_embedding.embeddings, False),
               ("wpe.weight", model.embedding.position_embedding.embeddings, False)]
    for i, block in enumerate(model.blocks):
        for name, layer in (("ln_1", block.attention_norm), ("attn.c_attn", block.attention.qkv_dense),
                            ("attn.c_proj", block.attention.output_dense), ("ln_2", block.mlp_norm),
                            ("mlp.c_fc", block.mlp_dense), ("mlp.c_proj", block.mlp_output_dense)):
            entries += _layer_weights(f"h.{i}.{name}", layer)
    entries += _layer_weights("ln_f", model.final_norm)
    if model.head is not None:
        entries.append(("lm_head.weight", model.head.kernel, True))
    return entries


def _layer_weights(name, layer):
    if isinstance(layer, keras.layers.LayerNormalization):
        return [(f"{name}.weight", layer.gamma, False)] + (
            [(f"{name}.bias", layer.beta, False)] if layer.center else [])
    return [(f"{name}.weight", layer.kernel, True)] + (
        [(f"{name}.bias", layer.bias, False)] if layer.use_bias else [])


def _assign(model, tensors, transposed, source):
    """Copy `tensors` (GPT-2 names) into `model`; `transposed`: projections are `(out, in)` (nn.Linear)."""
    tensors = {name: value for name, value in tensors.items() if not _MASK_BUFFER.match(name)}
    if model.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # the same matrix as wte.weight
    for name, variable, projection in _weights(model):
        if name not in tensors:
            raise ValueError(f"{source!r} lacks the weight {name!r}.")
        value = np.asarray(tensors.pop(name), dtype="float32")
        if projection and (transposed or name == "lm_head.weight"):
            value = value.T
        if value.shape != tuple(variable.shape):
            raise ValueError(f"{source!r}: {name!r} has shape {value.shape}; the model expects "
                             f"{tuple(variable.shape)}.")
        variable.assign(value)
    if tensors:
        raise ValueError(f"{source!r} holds weights this model has no place for: {sorted(tensors)[:5]}.")


def _strip(name, prefix):
    return name[len(prefix):] if name.startswith(prefix) else name


def _check_directory(directory):
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"`directory` must be a folder path; got {directory!r}.")
    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{directory!r} is not a Hugging Face model folder: no config.json in it.")
    return directory


def _read_huggingface_config(path):
    config = _files.read_json(path)
    if config.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{path!r} describes a {config['model_type']!r} model; only 'gpt2' converts.")
    missing = {"vocab_size", "n_positions", "n_layer", "n_head", "n_embd"} - set(config)
    if missing:
        raise ValueError(f"{path!r} lacks {sorted(missing)}.")
    activation = config.get("activation_function", "gelu_new")
    unsupported = {
        "activation_function": activation not in _FROM_HF_ACTIVATIONS,
        "n_inner": config.get("n_inner") not in (None, 4 * config["n_embd"]),
        "scale_attn_weights": not config.get("scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx": config.get("scale_attn_by_inverse_layer_idx", False),
        "add_cross_attention": config.get("add_cross_attention", False),
    }
    for key, bad in unsupported.items():
        if bad:
            raise ValueError(f"{path!r}: {key}={config.get(key)!r} has no NanoGPT equivalent "
                             f"(activations: {sorted(_FROM_HF_ACTIVATIONS)}; MLP width 4 * n_embd).")
    return config


def _read_huggingface_weights(directory):
    single = os.path.join(directory, "model.safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        return _load_safetensors(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        if any(os.path.basename(shard) != shard for shard in shards):
            raise ValueError(f"{index!r} names shard files outside its folder: {shards}.")
        tensors = {}
        for shard in shards:
            tensors.update(_load_safetensors(os.path.join(directory, shard)))
        return tensors
    binary = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(binary):
        return {name: _torch_to_numpy(value) for name, value in _torch_load(binary).items()}
    raise FileNotFoundError(f"{directory!r} holds no model.safetensors, model.safetensors.index.json "
                            f"or pytorch_model.bin.")


def _load_safetensors(path):
    from safetensors import SafetensorError, numpy as safetensors_numpy

    try:
        return safetensors_numpy.load_file(path)
    except TypeError:  # bfloat16 has no numpy dtype: read through torch
        from safetensors import torch as safetensors_torch

        return {name: _torch_to_numpy(value) for name, value in safetensors_torch.load_file(path).items()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path!r} is not a readable safetensors file: {error}") from None


def _torch_load(path):
    try:
        import torch
    except ImportError:
        raise ImportError(f"Reading {path!r} needs PyTorch: pip install keras_nanogpt[torch].") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(f"{path!r} could not be read as PyTorch weights (corrupt, or it holds more "
                         f"than tensors and plain data): {error}") from None


def _torch_to_numpy(tensor):
    import torch

    return tensor.detach().to(torch.float32).numpy()


def _write_text(path, text):
    with _files.atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
