"""Generate text from a LiteRT export with ai_edge_litert's interpreter and numpy (no Keras, no TensorFlow).

    keras-nanogpt export --format litert pride.keras pride_litert
    python examples/litert_generate.py pride_litert --prompt "It is a truth" --max-new-tokens 200 --temperature 0
"""

import os
import re

from ai_edge_litert.interpreter import Interpreter

from export_decoding import main


def runner(directory, name):
    """The graph's signature runner, its inputs in the exported order (token_ids, cache_index, key_0,
    value_0, ...; the signature lists them alphabetically) and its outputs (output_0, output_1, ...)."""
    interpreter = Interpreter(os.path.join(directory, name))
    signature = next(iter(interpreter.get_signature_list().values()))
    layers = sum(n.startswith("key_") for n in signature["inputs"])
    inputs = [n for n in ("token_ids", "cache_index") if n in signature["inputs"]]
    inputs += [f"{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    outputs = sorted(signature["outputs"], key=lambda n: int(re.findall(r"\d+", n)[-1]))
    return interpreter.get_signature_runner(), inputs, outputs


def prefill(directory):
    run, inputs, outputs = runner(directory, "prefill.tflite")
    return lambda ids: [run(**{inputs[0]: ids})[name] for name in outputs]


def decode(directory):
    run, inputs, outputs = runner(directory, "decode.tflite")

    def step(token, index, cache):
        results = run(**dict(zip(inputs, [token, index, *cache])))
        return [results[name] for name in outputs]

    return step


if __name__ == "__main__":
    main(__doc__, prefill, decode)
