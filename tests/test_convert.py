"""Weight import and export, checked against PyTorch: Hugging Face GPT-2 and nanoGPT checkpoints.

Every reference is a tiny randomly initialised model built here (nothing is downloaded), with every
parameter perturbed so that biases and LayerNorm weights matter.
"""

import importlib.util
import json
import os
import pickle

import keras
import numpy as np
import pytest
from conftest import BACKEND, SHAKESPEARE_SAMPLE, to_numpy

import keras_nanogpt as kn

torch = pytest.importorskip("torch", reason="the references run in PyTorch (a test dependency)")
transformers = pytest.importorskip("transformers", reason="GPT-2 references (a test dependency)")

CONTEXT = 24
CHARS = sorted(set(SHAKESPEARE_SAMPLE))  # a nanoGPT meta.pkl vocabulary
NANOGPT_DIR = os.environ.get("NANOGPT_DIR", "/tmp/nanoGPT")


def gpt2(vocabulary_size, activation="gelu_new", tie=True, seed=0):
    """A perturbed 2-layer, 32-wide transformers.GPT2LMHeadModel in eval mode."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocabulary_size, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=4,
        activation_function=activation, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model


def token_ids(vocabulary_size):
    return np.random.default_rng(0).integers(0, vocabulary_size, (2, CONTEXT))


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def assert_parity(name, model, ids, reference):
    difference = float(np.abs(to_numpy(model(ids)) - reference).max())
    print(f"\nparity {BACKEND} {name}: max |logit difference| {difference:.2e}")
    assert difference <= 1e-4


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    import tokenizers

    directory = tmp_path_factory.mktemp("bpe")
    trainer = tokenizers.ByteLevelBPETokenizer()
    trainer.train_from_iterator([SHAKESPEARE_SAMPLE * 3], vocab_size=300,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    trainer.save_model(str(directory))
    return directory / "vocab.json", directory / "merges.txt"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bpe_files):
    """`(transformers model, its save_pretrained folder with vocab.json/merges.txt, ids)`."""
    vocabulary_size = len(json.loads(bpe_files[0].read_text(encoding="utf-8")))
    model = gpt2(vocabulary_size)
    directory = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(directory)
    for path in bpe_files:
        (directory / path.name).write_bytes(path.read_bytes())
    return model, directory, token_ids(vocabulary_size)


@pytest.fixture(scope="module")
def imported(reference):
    return kn.convert.from_huggingface_gpt2(reference[1])


def test_huggingface_gpt2_imports_with_the_same_logits(reference, imported):
    model, _, ids = reference
    assert (imported.use_bias, imported.activation, imported.tie_embeddings) == (True, "gelu_approximate", True)
    assert imported.count_params() == sum(p.numel() for p in model.parameters())
    assert_parity("huggingface import", imported, ids, torch_logits(model, ids))
    assert kn.data.vectorizer_to_config(imported.vectorizer)["level"] == "bpe"
    text = imported.generate("First Citizen", max_new_tokens=3, temperature=0)
    assert isinstance(text, str) and text.startswith("First Citizen")


def test_pytorch_bin_sharded_and_bfloat16_folders(reference, tmp_path):
    model, directory, ids = reference
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_bytes((directory / "config.json").read_bytes())
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    assert_parity("pytorch_model.bin", kn.convert.from_huggingface_gpt2(binary), ids, torch_logits(model, ids))

    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 1
    assert_parity("sharded", kn.convert.from_huggingface_gpt2(tmp_path / "sharded"), ids,
                  torch_logits(model, ids))

    half = gpt2(model.config.vocab_size).to(torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16")
    assert_parity("bfloat16 weights", kn.convert.from_huggingface_gpt2(tmp_path / "bf16"), ids,
                  torch_logits(half.float(), ids))


def test_imported_model_survives_a_keras_round_trip(reference, imported, tmp_path):
    model, _, ids = reference
    imported.save(tmp_path / "gpt2.keras")
    loaded = kn.load_model(tmp_path / "gpt2.keras")
    assert_parity("after .keras round trip", loaded, ids, torch_logits(model, ids))
    np.testing.assert_array_equal(kn.data.encode(loaded.vectorizer, SHAKESPEARE_SAMPLE),
                                  kn.data.encode(imported.vectorizer, SHAKESPEARE_SAMPLE))


def test_export_to_transformers_gives_the_same_logits(reference, imported, tmp_path):
    model, _, ids = reference
    kn.convert.to_huggingface_gpt2(imported, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "merges.txt", "model.safetensors",
                                                    "vocab.json"]  # no temporary files left
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    difference = np.abs(torch_logits(exported, ids) - torch_logits(model, ids)).max()
    print(f"\nparity {BACKEND} export to transformers: {difference:.2e}")
    assert difference <= 1e-4
    tokenizer = transformers.GPT2Tokenizer.from_pretrained(tmp_path / "out")
    np.testing.assert_array_equal(tokenizer(SHAKESPEARE_SAMPLE)["input_ids"],
                                  kn.data.encode(imported.vectorizer, SHAKESPEARE_SAMPLE))


@pytest.mark.parametrize("tie", [True, False])
def test_nanogpt_recipe_model_exports_to_transformers(tmp_path, tie):
    keras.utils.set_random_seed(1)
    model = kn.NanoGPT(len(CHARS), CONTEXT, num_layers=2, num_heads=4, hidden_dim=32, tie_embeddings=tie)
    rng = np.random.default_rng(2)
    for variable in model.weights:
        variable.assign(variable + rng.normal(0, 0.2, variable.shape))
    kn.convert.to_huggingface_gpt2(model, tmp_path)
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert exported.config.activation_function == "gelu"  # exact, as nanoGPT's
    ids = token_ids(len(CHARS))
    assert_parity(f"nanoGPT recipe (tied={tie}) exported", model, ids, torch_logits(exported, ids))
    assert_parity("... and imported again", kn.convert.from_huggingface_gpt2(tmp_path), ids,
                  torch_logits(exported, ids))


def nanogpt_checkpoint(directory, state_dict, bias, prefix=""):
    """Save `state_dict` as nanoGPT's train.py does, with a char meta.pkl beside it."""
    model_args = dict(n_layer=2, n_head=4, n_embd=32, block_size=CONTEXT, bias=bias,
                      vocab_size=len(CHARS), dropout=0.0)
    checkpoint = {"model": {prefix + name: value for name, value in state_dict.items()},
                  "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
                  "model_args": model_args, "iter_num": 2000, "best_val_loss": torch.tensor(1.47),
                  "config": {"dataset": "shakespeare_char", "learning_rate": 1e-3, "compile": True}}
    torch.save(checkpoint, directory / "ckpt.pt")
    with open(directory / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)),
                     "stoi": {c: i for i, c in enumerate(CHARS)}}, f)
    return directory / "ckpt.pt"


def test_nanogpt_checkpoint_imports_with_the_same_logits_and_ids(tmp_path):
    # nanoGPT names its weights as GPT-2 does, with nn.Linear (out, in) instead of Conv1D (in, out).
    reference = gpt2(len(CHARS), activation="gelu")  # exact GELU, as nanoGPT
    linear = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
    state_dict = {name: value.t() if name.endswith(linear) else value
                  for name, value in reference.state_dict().items()}
    for i in range(2):  # the causal-mask buffers of nanoGPT without flash attention
        state_dict[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(CONTEXT, CONTEXT))[None, None]
    path = nanogpt_checkpoint(tmp_path, state_dict, bias=True, prefix="_orig_mod.")  # torch.compile's
    model = kn.convert.from_nanogpt_checkpoint(tmp_path)
    ids = token_ids(len(CHARS))
    assert_parity("nanoGPT state dict", model, ids, torch_logits(reference, ids))
    assert model.vocabulary_size == len(CHARS) == kn.data.vocabulary_size(model.vectorizer)
    np.testing.assert_array_equal(kn.data.encode(model.vectorizer, "First Citizen"),
                                  [CHARS.index(c) for c in "First Citizen"])
    text = model.generate("First", max_new_tokens=4, temperature=0)
    assert text.startswith("First") and set(text) <= set(CHARS)
    model.save(tmp_path / "nano.keras")
    assert kn.load_model(tmp_path / "nano.keras").generate("First", max_new_tokens=4, temperature=0) == text
    assert kn.convert.from_nanogpt_checkpoint(path, meta=tmp_path / "meta.pkl").vocabulary_size == len(CHARS)


@pytest.mark.skipif(not os.path.isfile(os.path.join(NANOGPT_DIR, "model.py")),
                    reason="nanoGPT's model.py not found; set NANOGPT_DIR to a nanoGPT checkout")
def test_real_nanogpt_model_without_biases(tmp_path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(NANOGPT_DIR, "model.py"))
    nanogpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt)
    torch.manual_seed(0)
    reference = nanogpt.GPT(nanogpt.GPTConfig(block_size=CONTEXT, vocab_size=len(CHARS), n_layer=2,
                                              n_head=4, n_embd=32, dropout=0.0, bias=False)).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    nanogpt_checkpoint(tmp_path, reference.state_dict(), bias=False)
    model = kn.convert.from_nanogpt_checkpoint(tmp_path / "ckpt.pt")
    assert not model.use_bias and model.activation == "gelu"
    ids = token_ids(len(CHARS))
    with torch.no_grad():
        logits, _ = reference(torch.tensor(ids), targets=torch.tensor(ids))  # targets: logits everywhere
    assert_parity("nanoGPT model.py (no biases)", model, ids, logits.numpy())


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = nanogpt_checkpoint(tmp_path, gpt2(len(CHARS), activation="gelu").state_dict(), bias=True)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"itos": _Exploit(marker)}, f)
    with pytest.raises(ValueError, match="evil.pkl.*refusing"):
        kn.convert.from_nanogpt_checkpoint(path, meta=tmp_path / "evil.pkl")
    with open(tmp_path / "list.pkl", "wb") as f:
        pickle.dump({"itos": ["a", "b"]}, f)
    with pytest.raises(ValueError, match="dicts, strings and ints"):
        kn.convert.read_nanogpt_meta(tmp_path / "list.pkl")
    torch.save({"model": {}, "model_args": {}, "payload": _Exploit(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        kn.convert.from_nanogpt_checkpoint(tmp_path / "evil.pt", meta=tmp_path / "meta.pkl")
    assert not marker.exists()


def test_bad_folders_and_configs_are_named(reference, tmp_path):
    model, directory, _ = reference
    with pytest.raises(FileNotFoundError, match="no config.json"):
        kn.convert.from_huggingface_gpt2(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    for change, match in [({"model_type": "bert"}, "'bert'"), ({"n_inner": 100}, "n_inner=100"),
                          ({"activation_function": "gelu_fast"}, "activation_function='gelu_fast'"),
                          ({"n_positions": 32}, "'wpe.weight' has shape"), ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        (tmp_path / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=match):
            kn.convert.from_huggingface_gpt2(tmp_path)
    state_dict = {k: v for k, v in model.state_dict().items() if k != "transformer.h.1.mlp.c_fc.bias"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.remove(tmp_path / "model.safetensors")
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="lacks the weight 'h.1.mlp.c_fc.bias'"):
        kn.convert.from_huggingface_gpt2(tmp_path)
    with pytest.raises(FileNotFoundError, match="nanoGPT checkpoint"):
        kn.convert.from_nanogpt_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="`model`"):
        kn.convert.to_huggingface_gpt2("model.keras", tmp_path)
