"""Generate text from an ONNX export with onnxruntime and numpy (no Keras, no keras_nanogpt).

    keras-nanogpt export --format onnx pride.keras pride_onnx
    python examples/onnx_generate.py pride_onnx --prompt "It is a truth" --max-new-tokens 200 --temperature 0

The KV cache stays in onnxruntime's buffers (`OrtValue`s bound through `io_binding`): prefill writes it
into buffers of its own, and each decode step reads one of two buffer sets and writes the other, so no
cache goes through numpy; only the logits are copied out.
"""

import os

import numpy as np
import onnxruntime

from export_decoding import main


def session(directory, name):
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One thread: at batch 1 an operation is microseconds of work, less than handing it to a pool costs (on a
    # shared 2-core machine, nano and baby decoded in 0.85x and 0.92x the time, and less CPU time, than with 2).
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(os.path.join(directory, name), options,
                                        providers=["CPUExecutionProvider"])


def buffers(outputs):
    """One preallocated CPU `OrtValue` per graph output (the shapes are static: batch 1, full context)."""
    return [onnxruntime.OrtValue.ortvalue_from_shape_and_type(o.shape, np.float32) for o in outputs]


def prefill(directory):
    """`ids (1, context) int32 -> [logits (numpy), key_0, value_0, ...]`; the cache entries are `OrtValue`s
    that the next prefill call overwrites."""
    graph = session(directory, "prefill.onnx")
    name = graph.get_inputs()[0].name
    outputs = graph.get_outputs()
    results = buffers(outputs)  # logits, key_0, value_0, ...
    binding = graph.io_binding()
    for output, value in zip(outputs, results):
        binding.bind_ortvalue_output(output.name, value)

    def step(ids):
        binding.bind_cpu_input(name, ids)
        graph.run_with_iobinding(binding)
        return [results[0].numpy(), *results[1:]]

    return step


def decode(directory):
    """`token (1, 1), index (), cache -> [logits (numpy), key_0, value_0, ...]`, the cache as `OrtValue`s.

    Two sets of cache buffers: a step reads the cache it is given and writes the set that is not it, so the
    returned cache is valid until the step after next (the loop only ever passes the latest one back).
    """
    graph = session(directory, "decode.onnx")
    inputs = [i.name for i in graph.get_inputs()]  # token_ids, cache_index, key_0, value_0, ...
    outputs = graph.get_outputs()  # logits, key_0, value_0, ...
    token = onnxruntime.OrtValue.ortvalue_from_numpy(np.zeros((1, 1), np.int32))
    index = onnxruntime.OrtValue.ortvalue_from_numpy(np.zeros((), np.int32))
    logits = buffers(outputs[:1])[0]
    caches = [buffers(outputs[1:]), buffers(outputs[1:])]
    binding = graph.io_binding()
    binding.bind_ortvalue_input(inputs[0], token)
    binding.bind_ortvalue_input(inputs[1], index)
    binding.bind_ortvalue_output(outputs[0].name, logits)

    def step(token_id, position, cache):
        token.update_inplace(np.asarray(token_id, np.int32))
        index.update_inplace(np.asarray(position, np.int32))
        written = caches[1] if cache[0] is caches[0][0] else caches[0]  # never the cache being read
        for name, value in zip(inputs[2:], cache):
            binding.bind_ortvalue_input(name, value)
        for output, value in zip(outputs[1:], written):
            binding.bind_ortvalue_output(output.name, value)
        graph.run_with_iobinding(binding)
        return [logits.numpy(), *written]

    return step


if __name__ == "__main__":
    main(__doc__, prefill, decode)
