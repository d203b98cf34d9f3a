"""PyTorch backend only: the background builder of one AOTInductor package (`python -m
keras_nanogpt._torch_aot_build SPEC`), started by `_torch_aot.spawn` at the lowest priority.

For a decode step or the prefill it rebuilds the model (and for a decode step the sampler) from their
configs in the spec file (the model's own Keras code: no copy of it; its variables on the spec's device,
so a model on a GPU gets a CUDA package), traces the step for the spec's inputs with the model's fresh
weights (the package takes weights as inputs, so their values do not matter) and compiles it
(`_torch_compile.build_package`); a train step's spec holds its traced graph itself
(`_torch_training._write_spec`), compiled for zeros of its inputs' shapes. Then it removes its lock and
spec. A failure leaves `KEY.failed` with the error, so no process tries again until that file is removed;
the builder's output is kept in `KEY.log`.

Example:
    >>> main(["/home/me/.keras/keras_nanogpt/aot/0123abcd.spec"])  # doctest: +SKIP
"""

import contextlib
import os
import signal
import sys
import traceback

import keras
import keras_hub
import torch

from keras_nanogpt import _torch_aot, _torch_compile, decoding
from keras_nanogpt import model as _model  # noqa: F401  (registers NanoGPT and its layers for deserializing)


def build_from_spec(spec_path):
    """Build the package that the spec file `spec_path` (`_torch_compile`'s or `_torch_training._write_spec`'s)
    describes; returns its path."""
    key = os.path.basename(spec_path)[:-len(".spec")]
    spec = torch.load(spec_path, weights_only=False)
    if "graph" in spec:  # a train step's (`_torch_training._write_spec`): the traced graph itself
        example = [torch.zeros(shape, dtype=dtype) for shape, dtype in spec["inputs"]]
        return _torch_aot.build(key, spec["graph"], example, spec.get("options"))
    with keras.device(spec["device"]):
        model = keras.saving.deserialize_keras_object(spec["model"])
    weights = [variable.value.detach() for variable in model.variables]
    found = [(tuple(t.shape), str(t.dtype)) for t in weights]
    if found != [tuple(w) for w in spec["weights"]]:
        raise ValueError(f"the model rebuilt from its config has other weights than the spec's: {found} "
                         f"against {spec['weights']}")
    if spec["kind"] == "prefill":
        function = _torch_compile._flat_prefill(model, len(weights))
    else:
        parts = decoding.token_step(model, keras_hub.samplers.deserialize(spec["sampler"]))
        function = _torch_compile._flat_step(model, parts.step, _torch_compile._Layout(*spec["layout"]))
    with torch.no_grad():
        return _torch_compile.build_package(key, function, weights + list(spec["inputs"]), len(weights))


def main(argv):
    """Run the builder for the spec file `argv[0]`; returns the exit status. A hang-up (its terminal
    closed) does not end it: it runs on for the next program."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    spec_path = argv[0]
    key = os.path.basename(spec_path)[:-len(".spec")]
    _, _, lock, failure = _torch_aot.paths(key)
    try:
        print(build_from_spec(spec_path), flush=True)
        status = 0
    except Exception:
        traceback.print_exc()
        with open(failure, "w") as f:
            f.write(traceback.format_exc())
        status = 1
    finally:
        for path in (spec_path, lock):
            with contextlib.suppress(OSError):
                os.remove(path)
    if status == 0:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(_torch_aot.directory(), f"{key}.log"))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
