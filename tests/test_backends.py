"""One code base, three backends: .keras files move between backends; mixed precision trains everywhere."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import BACKEND, to_numpy

import keras_nanogpt as kn

BACKENDS = ("tensorflow", "jax", "torch")
IDS = np.arange(2, 26, dtype="int32").reshape(2, 12) % 30


def _installed(backend):
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


# Each backend's pytest process saves under its own backend and loads under the other two, so the
# three runs of `make test` cover every ordered pair.
@pytest.mark.parametrize("other", [b for b in BACKENDS if b != BACKEND])
def test_keras_file_loads_under_another_backend(tmp_path, tiny_model, other):
    if not _installed(other):
        pytest.skip(f"the {other} backend is not installed (pip install keras_nanogpt[{other}])")
    path = str(tmp_path / "model.keras")
    tiny_model.save(path)
    expected = {
        "logits": to_numpy(tiny_model(IDS)).tolist(),
        "text": tiny_model.generate("It is a truth", max_new_tokens=20, temperature=0),
    }
    script = textwrap.dedent(f"""
        import json, keras, numpy as np
        import keras_nanogpt as kn
        model = kn.load_model({path!r})
        ids = np.array({IDS.tolist()}, dtype="int32")
        print(json.dumps({{"backend": keras.backend.backend(),
                          "logits": keras.ops.convert_to_numpy(model(ids)).tolist(),
                          "text": model.generate("It is a truth", max_new_tokens=20, temperature=0)}}))
    """)
    env = dict(os.environ, KERAS_BACKEND=other)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["backend"] == other
    np.testing.assert_allclose(np.array(loaded["logits"]), np.array(expected["logits"]), atol=1e-5)
    assert loaded["text"] == expected["text"]


def test_mixed_bfloat16_trains_with_float32_loss(small_text, char_vectorizer):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        model = kn.NanoGPT(char_vectorizer.vocabulary_size(), 32, 2, 2, 32)
        assert model.compute_dtype == "bfloat16" and model.variable_dtype == "float32"
        model.compile(optimizer=keras.optimizers.Adam(3e-3))
        train, val = kn.data.make_datasets(small_text, char_vectorizer, 32, 16, seed=0)
        logits = model(np.zeros((1, 8), "int32"))
        assert keras.backend.standardize_dtype(logits.dtype) == "float32"
        before = model.evaluate(val, verbose=0)[0]
        history = model.fit(train.repeat(), steps_per_epoch=100, epochs=1, verbose=0)
        after = model.evaluate(val, verbose=0)[0]
        assert isinstance(history.history["loss"][0], float) and np.isfinite(history.history["loss"][0])
        assert after < before - 0.8
        assert model.generate([[3, 4, 5]], max_new_tokens=4, seed=0).shape == (1, 7)
    finally:
        keras.config.set_dtype_policy(previous)


_PAGE_FAULTS = textwrap.dedent("""
    import resource, sys
    import keras, numpy as np
    import keras_nanogpt as kn
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT(65, 64, 2, 2, 128)
    model.compile(optimizer=kn.training.nanogpt_optimizer(100, warmup_steps=1))
    x = np.random.RandomState(0).randint(0, 65, (240, 64))
    model.fit(x, x, batch_size=12, epochs=1, verbose=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model.fit(x, x, batch_size=12, epochs=1, verbose=0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(BACKEND != "jax" or not sys.platform.startswith("linux"), reason="JAX under glibc only")
def test_jax_steps_do_not_page_fault_their_buffers_again():
    """`import keras_nanogpt` keeps the malloc heaps' tops (backends.keep_heap_padding); with glibc's
    default pad (the user's MALLOC_TOP_PAD_ wins) every step page-faults its buffers afresh."""
    faults = {}
    for name, pad in (("ours", None), ("glibc default", "131072")):
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_TOP_PAD_"}
        if pad:
            env["MALLOC_TOP_PAD_"] = pad
        done = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        faults[name] = int(done.stdout.split()[-1])
    assert faults["ours"] * 4 < faults["glibc default"], faults  # 20 steps
