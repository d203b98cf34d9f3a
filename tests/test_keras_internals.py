"""The private Keras and keras-hub names the package relies on (keras_nanogpt/_keras_internals.py and, on
PyTorch, _torch_keras_internals.py) still exist and behave as relied upon: one test per item, so that a
Keras upgrade that changes one fails here by name. Also: no other module of the package touches them."""

import ast
import inspect
import io
import pathlib
import re
import threading

import h5py
import keras
import numpy as np
import pytest
from conftest import BACKEND

from keras_nanogpt import _keras_internals

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_nanogpt"
INTERNALS = {"_keras_internals.py", "_torch_keras_internals.py"}
# Private Keras names (attributes, methods) the package relies on: touched only in INTERNALS.
PRIVATE_NAMES = ("_flatten_layers", "_kernel", "_untrack_variable", "_track_variables", "_distribute_strategy",
                 "_symbolic_build", "_compute_loss", "_loss_tracker", "_model", "_initial_epoch", "_save_state",
                 "_clip_gradients", "_use_weight_decay", "_apply_weight_decay", "_should_use_adamw")
torch_only = pytest.mark.skipif(BACKEND != "torch", reason="an item of Keras's PyTorch backend")


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def small_model(compile_args=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    if compile_args is not None:
        model.compile(optimizer="sgd", loss="mse", jit_compile=False, **compile_args)
    return model


def lora_dense():
    keras.utils.set_random_seed(0)
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    layer.enable_lora(2)
    layer.lora_kernel_b.assign(np.full((2, 3), 0.5, "float32"))  # Keras starts it at 0
    return layer


# -- the package's sources ------------------------------------------------------------------------------


def _sources():
    return {str(path.relative_to(PACKAGE)): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_no_keras_src_import_outside_the_internals_modules():
    found = {name for name, text in _sources().items() if re.search(r"keras(_hub)?\.src\b", text)}
    assert found <= INTERNALS, found - INTERNALS


def test_no_private_keras_name_outside_the_internals_modules():
    pattern = re.compile(r"(?:\.|\bdef )(" + "|".join(PRIVATE_NAMES) + r")\b|super\(keras\.layers\.Layer\b")
    found = {}
    for name, text in _sources().items():
        names = {match.group(1) or match.group(0) for match in pattern.finditer(text)}
        if names and name not in INTERNALS:
            found[name] = sorted(names)
    assert not found


def test_every_item_has_a_test_and_a_line_in_the_module_doc():
    tests = {name for name in globals() if name.startswith("test_")}
    for module in INTERNALS:
        tree = ast.parse((PACKAGE / module).read_text())
        items = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                 and not node.name.startswith("_")]
        doc = ast.get_docstring(tree)
        for item in items:
            assert f"`{item}`" in doc, (module, item)
            assert any(item.lower() in test for test in tests), (module, item)


# -- _keras_internals -----------------------------------------------------------------------------------


def test_sublayers_walks_every_nested_layer_once():
    import keras_nanogpt as kn

    model = kn.NanoGPT(vocabulary_size=24, sequence_length=8, num_layers=1, num_heads=2, hidden_dim=8)
    layers = list(_keras_internals.sublayers(model))
    assert layers[0] is model and len({id(layer) for layer in layers}) == len(layers)
    assert model.blocks[0].attention.qkv_dense in layers  # three levels down
    assert list(_keras_internals.sublayers(model, include_self=False)) == layers[1:]
    assert set(map(id, model.layers)) <= set(map(id, layers))


def test_dense_kernel_is_the_variable_under_lora():
    layer = lora_dense()
    kernel = _keras_internals.dense_kernel(layer)
    assert isinstance(kernel, keras.Variable) and not kernel.trainable
    delta = (layer.lora_alpha / layer.lora_rank) * to_numpy(layer.lora_kernel_a) @ to_numpy(layer.lora_kernel_b)
    np.testing.assert_allclose(to_numpy(layer.kernel), to_numpy(kernel) + delta, rtol=1e-6)  # `kernel` is merged
    kernel.assign(np.zeros((4, 3), "float32"))
    np.testing.assert_allclose(to_numpy(layer.kernel), delta, rtol=1e-6)


def test_delete_variable_untracks_and_removes_it():
    layer = lora_dense()
    before = len(layer.variables)
    for name in ("lora_kernel_a", "lora_kernel_b"):
        _keras_internals.delete_variable(layer, name)
    layer.lora_enabled = False
    assert not hasattr(layer, "lora_kernel_a") and len(layer.variables) == before - 2
    assert not any("lora" in variable.path for variable in layer.weights)
    assert layer(np.ones((1, 4), "float32")).shape == (1, 3)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="Keras keeps the creating strategy on TensorFlow only")
def test_created_under_strategy_is_none_outside_one():
    import tensorflow as tf

    assert _keras_internals.created_under_strategy(small_model()) is None
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        inside = small_model()
    assert _keras_internals.created_under_strategy(inside) is strategy


def test_symbolic_build_builds_the_optimizer_and_metrics():
    model = small_model({"metrics": ["mae"]})
    assert not model.optimizer.built
    metric_variables = len([v for metric in model.metrics for v in metric.variables])
    _keras_internals.symbolic_build(model, data_batch=(keras.KerasTensor((None, 4)), keras.KerasTensor((None, 1))))
    assert model.optimizer.built and model.optimizer.variables
    assert len([v for metric in model.metrics for v in metric.variables]) > metric_variables  # "mae" built


def test_compute_loss_and_loss_tracker_are_keras_steps():
    model = small_model({})
    x, y = np.ones((4, 4), "float32"), np.zeros((4, 1), "float32")
    y_pred = model(x)
    loss = _keras_internals.compute_loss(model, x=x, y=y, y_pred=y_pred, sample_weight=None, training=False)
    np.testing.assert_allclose(to_numpy(loss), np.mean(to_numpy(y_pred) ** 2), rtol=1e-6)
    tracker = _keras_internals.loss_tracker(model)
    assert isinstance(tracker, keras.metrics.Mean) and any(tracker is m for m in model.metrics)
    reported = model.evaluate(x, y, verbose=0)  # Keras's own step updates the same tracker
    assert float(tracker.result()) == pytest.approx(reported)


def test_callback_model_is_the_model_set():
    model, callback = small_model(), keras.callbacks.Callback()
    callback.set_model(model)
    assert _keras_internals.callback_model(callback) is model


def test_set_initial_epoch_makes_fit_start_there():
    model = small_model({})
    epochs = []

    class Resume(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            _keras_internals.set_initial_epoch(_keras_internals.callback_model(self), 2)

        def on_epoch_begin(self, epoch, logs=None):
            epochs.append(epoch)

    x, y = np.ones((4, 4), "float32"), np.zeros((4, 1), "float32")
    model.fit(x, y, epochs=3, verbose=0, callbacks=[Resume()])
    assert epochs == [2]
    _keras_internals.set_initial_epoch(model, None)
    assert len(model.fit(x, y, epochs=2, verbose=0).history["loss"]) == 2


def test_weights_h5_bytes_equal_save_weights(tmp_path):
    model = small_model()
    data = _keras_internals.weights_h5_bytes(model)
    assert data is not None  # not the fallback: Keras still has the parts
    model.save_weights(tmp_path / "model.weights.h5")

    def datasets(source):
        found = {}
        with h5py.File(source, "r") as file:
            file.visititems(lambda name, obj: found.setdefault(name, obj[()]) if isinstance(obj, h5py.Dataset)
                            else None)
        return found

    ours, keras_own = datasets(io.BytesIO(data)), datasets(tmp_path / "model.weights.h5")
    assert sorted(ours) == sorted(keras_own) and ours
    for name in ours:
        np.testing.assert_array_equal(ours[name], keras_own[name])


def test_preset_file_and_preset_file_exists(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert _keras_internals.preset_file(str(tmp_path), "config.json") == str(tmp_path / "config.json")
    assert _keras_internals.preset_file_exists(str(tmp_path), "config.json")
    assert not _keras_internals.preset_file_exists(str(tmp_path), "tokenizer.json")
    with pytest.raises(FileNotFoundError):
        _keras_internals.preset_file(str(tmp_path), "tokenizer.json")


def test_draw_seed_gives_keras_seed_words():
    np.testing.assert_array_equal(to_numpy(_keras_internals.draw_seed(7)), [7, 0])
    ours, theirs = keras.random.SeedGenerator(3), keras.random.SeedGenerator(3)
    first = to_numpy(_keras_internals.draw_seed(ours))
    np.testing.assert_array_equal(first, to_numpy(theirs.next()))
    assert not np.array_equal(first, to_numpy(_keras_internals.draw_seed(ours)))  # the state advanced


def test_matrixweightdecay_skips_vectors_through_keras_hook():
    class Decay(_keras_internals.MatrixWeightDecay, keras.optimizers.AdamW):
        pass

    optimizer = Decay(learning_rate=0.1, weight_decay=0.5)
    matrix = keras.Variable(np.ones((2, 2), "float32"), name="kernel")
    vector = keras.Variable(np.ones((2,), "float32"), name="bias")
    assert _keras_internals.uses_weight_decay(optimizer, matrix)
    assert not _keras_internals.uses_weight_decay(optimizer, vector)
    optimizer.build([matrix, vector])
    optimizer.apply([np.zeros((2, 2), "float32"), np.zeros((2,), "float32")], [matrix, vector])
    assert to_numpy(matrix)[0, 0] < 1.0 and to_numpy(vector)[0] == 1.0  # decay reached the matrix only


def test_weightdecaystep_replaces_keras_decay():
    decayed = []

    class Decay(_keras_internals.WeightDecayStep, keras.optimizers.AdamW):
        def decay_weights(self, variables):
            decayed.extend(variables)

    variable = keras.Variable(np.ones((2, 2), "float32"))
    optimizer = Decay(learning_rate=0.1, weight_decay=0.5)
    optimizer.build([variable])
    optimizer.apply([np.zeros((2, 2), "float32")], [variable])
    assert decayed == [variable] and to_numpy(variable)[0, 0] == 1.0  # Keras's own decay did not run


def test_uses_weight_decay_follows_keras_exclusions():
    adamw = keras.optimizers.AdamW(weight_decay=0.1)
    variable = keras.Variable(np.ones((2, 2), "float32"), name="kernel")
    assert _keras_internals.uses_weight_decay(adamw, variable)
    adamw.exclude_from_weight_decay(var_names=["kernel"])
    assert not _keras_internals.uses_weight_decay(adamw, variable)


def test_muon_uses_adamw_on_vectors_and_muon_on_matrices():
    muon = keras.optimizers.Muon()
    assert _keras_internals.muon_uses_adamw(muon, keras.Variable(np.ones((3,), "float32")))  # 1-D: AdamW
    assert not _keras_internals.muon_uses_adamw(muon, keras.Variable(np.ones((3, 3), "float32")))


# -- _torch_keras_internals -----------------------------------------------------------------------------


@torch_only
def test_torchadamw_is_keras_torch_adamw_and_clips_through_the_hook():
    from keras_nanogpt import _torch_keras_internals

    assert isinstance(keras.optimizers.AdamW(), _torch_keras_internals.TorchAdamW.__mro__[1])
    calls = []

    class Recording(_torch_keras_internals.TorchAdamW):
        def _kn_clip_gradients(self, grads):
            calls.append(len(grads))
            return super()._kn_clip_gradients(grads)

    results = []
    for optimizer in (Recording(learning_rate=0.1, global_clipnorm=1.0),
                      keras.optimizers.AdamW(learning_rate=0.1, global_clipnorm=1.0)):
        variable = keras.Variable(np.ones((2, 2), "float32"))
        optimizer.apply([keras.ops.full((2, 2), 10.0)], [variable])
        results.append(to_numpy(variable))
    assert calls == [1]
    np.testing.assert_array_equal(results[0], results[1])


@torch_only
def test_track_variables_drops_deleted_ones_from_the_parameters():
    from keras_nanogpt import _torch_keras_internals

    dense = lora_dense()
    inputs = keras.Input((4,))
    model = keras.Model(inputs, dense(inputs))  # its parameters list the adapters too
    for name in ("lora_kernel_a", "lora_kernel_b"):
        _keras_internals.delete_variable(dense, name)
    assert any("lora" in name for name, _ in model.named_parameters())  # left in the model's list
    for layer in _keras_internals.sublayers(model):
        _torch_keras_internals.track_variables(layer)
    names = [name for name, _ in model.named_parameters()]
    assert names and not any("lora" in name for name in names)


@torch_only
def test_seeded_categorical_and_traceable_categorical_give_keras_tokens():
    from keras_nanogpt import _torch_keras_internals

    logits = keras.random.normal((3, 10), seed=1)
    for seed in (7, 2**31 + 5):
        expected = to_numpy(keras.random.categorical(logits, 4, seed=seed))
        ours = _torch_keras_internals.traceable_categorical(logits, 4, seed=seed)
        assert str(ours.dtype) == "torch.int32"
        np.testing.assert_array_equal(to_numpy(ours), expected)
    generator = keras.random.SeedGenerator(5)
    seed = _keras_internals.draw_seed(keras.random.SeedGenerator(5))
    np.testing.assert_array_equal(to_numpy(_torch_keras_internals.seeded_categorical(logits, seed, 4)),
                                  to_numpy(keras.random.categorical(logits, 4, seed=generator)))


@torch_only
def test_traceable_draws_trace_keras_draws_for_this_thread_only(monkeypatch):
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from keras_nanogpt import _torch_keras_internals

    generator = keras.random.SeedGenerator(0)
    logits = keras.random.normal((2, 6), seed=1)

    def draw(logits, state):
        with keras.StatelessScope(state_mapping=[(generator.state, state)]):
            return keras.random.categorical(logits, 3, seed=generator)

    with _torch_keras_internals.traceable_draws():
        graph = make_fx(draw)(logits, generator.state.value.clone())
    for start in ([0, 0], [11, 3], [123456, 1]):
        state = torch.tensor(start, dtype=generator.state.value.dtype)
        np.testing.assert_array_equal(to_numpy(graph(logits, state)), to_numpy(draw(logits, state)))
    # Keras's own function everywhere else: outside the block, and in other threads while it runs.
    calls = []
    traceable = _torch_keras_internals.traceable_categorical
    monkeypatch.setattr(_torch_keras_internals, "traceable_categorical",
                        lambda *args, **kwargs: calls.append(1) or traceable(*args, **kwargs))
    keras.random.categorical(logits, 1, seed=1)
    with _torch_keras_internals.traceable_draws():
        thread = threading.Thread(target=keras.random.categorical, args=(logits, 1), kwargs={"seed": 1})
        thread.start()
        thread.join()
        assert calls == []
        keras.random.categorical(logits, 1, seed=1)  # `keras.random` reaches the backend's module attribute
    assert calls == [1]
    from keras.src.backend.torch import random as keras_torch_random

    assert keras_torch_random.categorical.__wrapped__.__module__ == "keras.src.backend.torch.random"


@torch_only
def test_conditions_in_the_graph_route_keras_cond_and_numpy_for_this_thread_only():
    import torch

    from keras_nanogpt import _torch_keras_internals

    seen = []

    def in_graph(pred, true_fn, false_fn):
        seen.append(pred)
        return torch.where(pred, true_fn(), false_fn())

    pred, x = torch.tensor(True), torch.ones(2)
    with keras.StatelessScope():
        assert to_numpy(keras.ops.cond(pred, lambda: x, lambda: -x)).tolist() == [1.0, 1.0] and not seen
    with _torch_keras_internals.conditions_in_the_graph(in_graph):
        with keras.StatelessScope():
            keras.ops.cond(pred, lambda: x, lambda: -x)
        assert len(seen) == 1 and seen[0] is pred
        assert keras.ops.convert_to_numpy(x) is not None
        assert isinstance(keras.src.backend.core.convert_to_numpy(x), torch.Tensor)  # the tensor, kept
        other = []
        thread = threading.Thread(target=lambda: other.append(keras.src.backend.core.convert_to_numpy(x)))
        thread.start()
        thread.join()
        assert isinstance(other[0], np.ndarray)  # Keras's own in another thread
    assert isinstance(keras.src.backend.core.convert_to_numpy(x), np.ndarray)  # and after the block


@torch_only
def test_current_stateless_scope_is_the_scope_a_step_runs_in():
    from keras_nanogpt import _torch_keras_internals

    assert _torch_keras_internals.current_stateless_scope() is None
    with keras.StatelessScope() as scope:
        assert _torch_keras_internals.current_stateless_scope() is scope
