"""Presets (keras-hub's layout, across backends) and the ONNX / LiteRT decoders with their reference loops."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import BACKEND, to_numpy

import keras_nanogpt as kn
from keras_nanogpt import cli

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXAMPLES = {"onnx": os.path.join(ROOT, "examples", "onnx_generate.py"),
            "litert": os.path.join(ROOT, "examples", "litert_generate.py")}
RUNTIMES = {"onnx": "onnxruntime", "litert": "ai_edge_litert"}
CONTEXT = 32
PROMPT = "It is a truth"
IDS = np.array([[5, 9, 2, 14, 7, 3, 11, 4]], "int32")
# Loads a preset under another backend with the export packages made unimportable, and saves its logits.
LOAD_ELSEWHERE = """
import sys
for name in ("onnx", "onnxruntime", "tf2onnx", "ai_edge_litert", "onnxscript"):
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
import numpy as np, keras, keras_nanogpt as kn
model = kn.NanoGPT.from_preset(sys.argv[1])
np.save(sys.argv[2], keras.ops.convert_to_numpy(model(np.array(%r, "int32"))))
print(model.generate(%r, max_new_tokens=5, temperature=0))
""" % (IDS.tolist(), PROMPT)


def sharp_model(vectorizer, seed=1, **options):
    """A small char model with every matrix drawn from N(0, 0.4) on its own (the initializer gives each
    block the same draws), which keeps greedy choices away from near-ties."""
    keras.utils.set_random_seed(seed)
    model = kn.NanoGPT(vectorizer.vocabulary_size(), CONTEXT, 2, 2, 32, vectorizer=vectorizer, **options)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.4, w.shape).astype("float32") if w.ndim == 2 else w
                       for w in model.get_weights()])
    return model


@pytest.fixture(scope="module")
def gpt2_model(char_vectorizer):
    return sharp_model(char_vectorizer)


@pytest.fixture(scope="module")
def preset(gpt2_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("presets") / "nano"
    gpt2_model.save_to_preset(path)
    return path


def test_preset_has_keras_hubs_layout_and_loads_back(gpt2_model, preset):
    assert sorted(os.listdir(preset)) == ["assets", "config.json", "metadata.json", "model.weights.h5",
                                          "tokenizer.json"]
    assert os.path.isfile(preset / kn.saving.VOCABULARY_ASSET)
    metadata = json.loads((preset / "metadata.json").read_text())
    assert metadata["keras_nanogpt_version"] == kn.__version__ and metadata["backend"] == BACKEND
    from keras_hub.src.utils import preset_utils

    preset_utils._validate_backbone(str(preset))  # what keras_hub.upload_preset checks first
    loaded = kn.NanoGPT.from_preset(str(preset))
    np.testing.assert_array_equal(to_numpy(loaded(IDS)), to_numpy(gpt2_model(IDS)))
    assert loaded.generate(PROMPT, max_new_tokens=5, temperature=0) == gpt2_model.generate(
        PROMPT, max_new_tokens=5, temperature=0)


def test_preset_loads_on_the_other_backends_with_equal_logits(gpt2_model, preset, tmp_path):
    others = [b for b in ("tensorflow", "jax", "torch") if b != BACKEND]
    runs = {}
    for backend in others:
        env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=os.path.abspath(ROOT))
        runs[backend] = subprocess.Popen(
            [sys.executable, "-c", LOAD_ELSEWHERE, str(preset), str(tmp_path / f"{backend}.npy")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    expected = to_numpy(gpt2_model(IDS))
    text = gpt2_model.generate(PROMPT, max_new_tokens=5, temperature=0)
    for backend, process in runs.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        np.testing.assert_allclose(np.load(tmp_path / f"{backend}.npy"), expected, atol=1e-4)
        assert out.splitlines()[-1] == text.splitlines()[-1], backend


def test_remote_preset_handles_go_through_keras_hub(preset, monkeypatch):
    from keras_hub.src.utils import preset_utils

    asked = []

    def get_file(handle, name):  # what keras-hub would download, served from the local folder
        asked.append((handle, name))
        path = os.path.join(preset, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(name)
        return path

    monkeypatch.setattr(preset_utils, "get_file", get_file)
    model = kn.NanoGPT.from_preset("hf://someone/nano")
    assert model.vectorizer is not None
    assert ("hf://someone/nano", "model.weights.h5") in asked


def test_from_preset_refuses_missing_damaged_and_foreign_presets(preset, tmp_path):
    import shutil

    with pytest.raises(FileNotFoundError, match="missing_preset"):
        kn.NanoGPT.from_preset(str(tmp_path / "missing_preset"))
    cases = {}
    for case in ("truncated_weights", "bad_json", "foreign", "no_weights"):
        cases[case] = tmp_path / case
        shutil.copytree(preset, cases[case])
    weights = cases["truncated_weights"] / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:1000])
    (cases["bad_json"] / "config.json").write_text("{not json")
    config = json.loads((cases["foreign"] / "config.json").read_text())
    (cases["foreign"] / "config.json").write_text(json.dumps(dict(config, registered_name="keras_hub>GPT2Backbone")))
    os.remove(cases["no_weights"] / "model.weights.h5")
    for case, (kind, named) in {"truncated_weights": (ValueError, "model.weights.h5"),
                                "bad_json": (ValueError, "config.json"),
                                "foreign": (ValueError, "config.json"),
                                "no_weights": (FileNotFoundError, "model.weights.h5")}.items():
        with pytest.raises(kind, match=named):
            kn.NanoGPT.from_preset(str(cases[case]))


def test_cli_writes_a_preset(gpt2_model, tmp_path, capsys):
    gpt2_model.save(tmp_path / "m.keras")
    assert cli.main(["export", "--format", "preset", str(tmp_path / "m.keras"), str(tmp_path / "p")]) == 0
    np.testing.assert_array_equal(to_numpy(kn.NanoGPT.from_preset(str(tmp_path / "p"))(IDS)),
                                  to_numpy(gpt2_model(IDS)))


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorFlow writes ONNX and LiteRT")
@pytest.mark.parametrize("format", ["onnx", "litert"])
def test_graph_exports_name_the_backend_to_use(gpt2_model, format, tmp_path, capsys):
    with pytest.raises(ValueError, match="KERAS_BACKEND=tensorflow"):
        kn.export.export(gpt2_model, tmp_path / "out", format=format)
    gpt2_model.save(tmp_path / "m.keras")
    assert cli.main(["export", "--format", format, str(tmp_path / "m.keras"), str(tmp_path / "out")]) == 2
    assert "KERAS_BACKEND=tensorflow" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_graph_exports_refuse_tokenizers_the_loops_cannot_run(gpt2_model, tmp_path):
    byte_model = kn.NanoGPT(256, CONTEXT, 1, 2, 16, vectorizer=kn.data.make_vectorizer(level="byte"))
    if BACKEND == "tensorflow":
        with pytest.raises(ValueError, match="level='byte'"):
            kn.export.export(byte_model, tmp_path / "out", format="onnx")
        with pytest.raises(ValueError, match="no vectorizer"):
            kn.export.export(kn.NanoGPT(40, CONTEXT, 1, 2, 16), tmp_path / "out", format="litert")
    with pytest.raises(ValueError, match="`quantize` applies to format='litert'"):
        kn.export.export(gpt2_model, tmp_path / "out", format="onnx", quantize="int8")
    with pytest.raises(ValueError, match="format"):
        kn.export.export(gpt2_model, tmp_path / "out", format="gguf")
    assert not (tmp_path / "out").exists()


def run_example(format, directory, new_tokens):
    done = subprocess.run([sys.executable, EXAMPLES[format], str(directory), "--prompt", PROMPT,
                           "--max-new-tokens", str(new_tokens), "--temperature", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout[:-1]  # print's newline


def runtime_steps(format, directory):
    """The example's prefill and decode functions, imported from examples/ (they import no Keras)."""
    sys.path.insert(0, os.path.dirname(EXAMPLES[format]))
    try:
        module = __import__(os.path.basename(EXAMPLES[format])[:-3])
    finally:
        sys.path.pop(0)
    return module.prefill(str(directory)), module.decode(str(directory))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="ONNX and LiteRT are written on TensorFlow")
@pytest.mark.parametrize("layout", ["gpt2", "modern"])
@pytest.mark.parametrize("format", ["onnx", "litert"])
def test_graphs_match_our_logits_and_greedy_decoding(char_vectorizer, format, layout, tmp_path):
    pytest.importorskip(RUNTIMES[format])
    options = kn.model.MODERN if layout == "modern" else {}  # rotary, QK-norm, RMSNorm, ReLU², untied head
    model = sharp_model(char_vectorizer, seed=2 if layout == "modern" else 1, **options)
    kn.export.export(model, tmp_path / "out", format=format)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [f"decode{'.onnx' if format == 'onnx' else '.tflite'}", f"prefill{'.onnx' if format == 'onnx' else '.tflite'}",
         "vocabulary.json"])
    prefill, decode = runtime_steps(format, tmp_path / "out")
    ids = np.zeros((1, CONTEXT), "int32")
    ids[0, :IDS.shape[1]] = IDS[0]
    logits, *cache = prefill(ids)
    np.testing.assert_allclose(logits, to_numpy(model(ids)), atol=1e-4)
    longer = np.concatenate([IDS, [[6]]], axis=1).astype("int32")  # one more token, at position 8
    step, *cache = decode(np.array([[6]], "int32"), np.array(IDS.shape[1], "int32"), cache)
    np.testing.assert_allclose(step[:, 0], to_numpy(model(longer))[:, -1], atol=1e-4)
    if format == "onnx":  # the cache stays in onnxruntime's buffers: each step writes the set it did not read
        import onnxruntime

        assert all(isinstance(c, onnxruntime.OrtValue) for c in cache)
        again, *other = decode(np.array([[6]], "int32"), np.array(IDS.shape[1], "int32"), cache)
        np.testing.assert_array_equal(again, step)
        assert not any(a is b for a, b in zip(cache, other))
    # 200 tokens with a context of 32: the window slides, as in `generate`.
    assert run_example(format, tmp_path / "out", 200) == model.generate(PROMPT, max_new_tokens=200, temperature=0)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="LiteRT is written on TensorFlow")
def test_litert_int8_weights_are_smaller_and_still_decode(gpt2_model, tmp_path):
    pytest.importorskip("ai_edge_litert")
    kn.export.export(gpt2_model, tmp_path / "float", format="litert")
    gpt2_model.save(tmp_path / "m.keras")
    assert cli.main(["export", "--format", "litert", "--quantize", "int8", str(tmp_path / "m.keras"),
                     str(tmp_path / "int8")]) == 0
    for step in ("prefill", "decode"):
        size = {kind: os.path.getsize(tmp_path / kind / f"{step}.tflite") for kind in ("float", "int8")}
        assert size["int8"] < 0.5 * size["float"], size
    assert run_example("litert", tmp_path / "int8", 10).startswith(PROMPT)
