"""PyTorch only: the compiled decode step (keras_nanogpt/_torch_compile.py) equals the eager one,
compiles once per sampler kind and shape, and is chosen per call."""

import json
import warnings

import keras
import numpy as np
import pytest
from conftest import BACKEND

import keras_nanogpt as kn

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="the compiled decode step is PyTorch's")

PROMPTS = [[[3, 1, 4, 1, 5]], [[2, 7, 1, 8]], [[9, 2, 6]]]


@pytest.fixture(autouse=True)
def compile_records(tmp_path, monkeypatch):
    """Compilation times recorded in a test's own file, with no cold compilation measured yet."""
    from keras_nanogpt import _torch_compile

    monkeypatch.setattr(_torch_compile, "_record_path", lambda: str(tmp_path / "compile_seconds.json"))
    monkeypatch.setattr(_torch_compile, "_cold_compile_seconds", [])
    return tmp_path / "compile_seconds.json"


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(3)
    return kn.NanoGPT(vocabulary_size=24, sequence_length=16, num_layers=1, num_heads=2, hidden_dim=16)


def generate_all(model, monkeypatch, mode, **kwargs):
    monkeypatch.setenv("KERAS_NANOGPT_TORCH_COMPILE", mode)
    return [model.generate(prompt, **kwargs).tolist() for prompt in PROMPTS]


def inductor_compilations():
    from torch._dynamo.utils import counters

    return sum(v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache_"))


def test_compiled_steps_equal_eager_ones_and_compile_once(model, monkeypatch, compile_records):
    from keras_nanogpt import _torch_compile

    # One signature for all (batch 1, window 16, one stop sequence of 2), so one compilation.
    greedy = dict(max_new_tokens=20, temperature=0, stop=[[7, 7]])  # past the context: the window slides
    sampled = dict(max_new_tokens=10, top_k=5, seed=4, stop=[[7, 7]])
    eager_greedy = generate_all(model, monkeypatch, "never", **greedy)
    eager_sampled = generate_all(model, monkeypatch, "never", **sampled)
    assert model._kn_generation.traces == 0
    # "auto" with nothing to amortise: the first token runs eagerly (its rate measured), then the
    # step compiles in the middle of the call, which still gives the eager tokens.
    monkeypatch.setattr(_torch_compile, "COMPILE_SECONDS", 0.0)
    assert generate_all(model, monkeypatch, "auto", **greedy) == eager_greedy
    assert model._kn_generation.traces == 1
    assert generate_all(model, monkeypatch, "always", **sampled) == eager_sampled
    assert model._kn_generation.traces == 1  # greedy and sampled tokens share the graph
    compilations = inductor_compilations()
    # The next process expects TorchInductor's disk caches to hold the step: a cheaper compilation.
    (key, entry), = json.loads(compile_records.read_text()).items()
    assert entry["count"] == 1 and _torch_compile.expected_compile_seconds(key) < entry["first"]
    # New prompts, seeds, samplers of the same kind, and trained weights reuse the two graphs.
    generate_all(model, monkeypatch, "always", max_new_tokens=10, top_p=0.8, seed=5, stop=[[1, 2]])
    assert model._kn_generation.traces == 1
    model.compile(optimizer=keras.optimizers.Adam(0.1), jit_compile=False)
    ids = np.random.default_rng(0).integers(0, 24, (8, 17)).astype("int32")
    model.fit(ids[:, :-1], ids[:, 1:], epochs=2, verbose=0)
    trained = generate_all(model, monkeypatch, "always", **greedy)
    assert model._kn_generation.traces == 1 and inductor_compilations() == compilations
    assert trained == generate_all(model, monkeypatch, "never", **greedy)  # the new weights
    assert trained != eager_greedy


def test_short_calls_stay_eager_and_a_failed_compilation_falls_back(model, monkeypatch):
    from keras_nanogpt import _torch_compile

    monkeypatch.setenv("KERAS_NANOGPT_TORCH_COMPILE", "auto")
    traces = model._kn_generation.traces if hasattr(model, "_kn_generation") else 0
    batch = np.array([[1, 2], [3, 4], [5, 6]], "int32")  # a new shape: no compiled step yet
    eager = model.generate(batch, max_new_tokens=6, temperature=0)
    assert model._kn_generation.traces == traces  # 6 eager tokens never pay for a compilation

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(_torch_compile, "_compiled_step", broken)
    monkeypatch.setenv("KERAS_NANOGPT_TORCH_COMPILE", "always")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert (model.generate(batch, max_new_tokens=6, temperature=0) == eager).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # tried once: later calls stay eager without warning again
        assert (model.generate(batch, max_new_tokens=6, temperature=0) == eager).all()
    assert model._kn_generation.traces == traces


def test_compile_mode_variable_is_checked(model, monkeypatch):
    monkeypatch.setenv("KERAS_NANOGPT_TORCH_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="KERAS_NANOGPT_TORCH_COMPILE.*sometimes"):
        model.generate([[1, 2, 3]], max_new_tokens=2)


def test_foreach_adamw_steps_like_keras_adamw():
    from keras_nanogpt._torch_training import ForeachAdamW

    per_variable = type("PerVariableAdamW", (keras.optimizers.AdamW,), {})  # Keras's path for subclasses
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (3,), (5, 2)]
    grads = [[rng.normal(0, 3, s).astype("float32") for s in shapes] for _ in range(3)]  # norms > 1: clipped
    results = []
    for kind in (ForeachAdamW, per_variable):
        variables = [keras.Variable(np.ones(s, "float32")) for s in shapes]
        optimizer = kind(learning_rate=0.1, weight_decay=0.1, global_clipnorm=1.0)
        for step in grads:
            optimizer.apply([keras.ops.convert_to_tensor(g) for g in step], variables)
        results.append([keras.ops.convert_to_numpy(v) for v in variables])
    for ours, keras_own in zip(*results):
        assert np.allclose(ours, keras_own, atol=1e-6) and not np.allclose(ours, 1.0)
    assert isinstance(kn.training.nanogpt_optimizer(10, warmup_steps=1), ForeachAdamW)


def test_sublayers_called_directly_compute_the_same(monkeypatch):
    from keras_nanogpt import _sublayers

    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(vocabulary_size=24, sequence_length=8, num_layers=1, num_heads=2, hidden_dim=16)
    ids = np.arange(16, dtype="int32").reshape(2, 8) % 24
    direct = keras.ops.convert_to_numpy(model(ids))
    monkeypatch.setattr(_sublayers, "_TORCH", False)
    assert np.array_equal(direct, keras.ops.convert_to_numpy(model(ids)))
    with warnings.catch_warnings():  # "Layer Dropout does not have a `quantize` method"
        warnings.simplefilter("ignore", UserWarning)
        model.quantize("int8")  # quantized layers run their `quantized_call` either way
    plain = keras.ops.convert_to_numpy(model(ids))
    monkeypatch.setattr(_sublayers, "_TORCH", True)
    assert np.array_equal(plain, keras.ops.convert_to_numpy(model(ids)))
    assert not np.array_equal(plain, direct)
