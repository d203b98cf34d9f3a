"""Generate text from an ONNX export with onnxruntime and numpy (no Keras, no keras_nanogpt).

    keras-nanogpt export --format onnx pride.keras pride_onnx
    python examples/onnx_generate.py pride_onnx --prompt "It is a truth" --max-new-tokens 200 --temperature 0
"""

import os

import onnxruntime

from export_decoding import main


def session(directory, name):
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep
    return onnxruntime.InferenceSession(os.path.join(directory, name), options,
                                        providers=["CPUExecutionProvider"])


def prefill(directory):
    graph = session(directory, "prefill.onnx")
    name = graph.get_inputs()[0].name
    return lambda ids: graph.run(None, {name: ids})


def decode(directory):
    graph = session(directory, "decode.onnx")
    names = [i.name for i in graph.get_inputs()]  # token_ids, cache_index, key_0, value_0, ...
    return lambda token, index, cache: graph.run(None, dict(zip(names, [token, index, *cache])))


if __name__ == "__main__":
    main(__doc__, prefill, decode)
