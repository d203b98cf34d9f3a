"""The decode loop shared by onnx_generate.py and litert_generate.py: numpy only (no Keras).

An export folder (`keras-nanogpt export --format onnx|litert MODEL.keras DIR`) holds `prefill.*`,
`decode.*` and `vocabulary.json`; a runtime supplies two functions:
`prefill(ids (1, context) int32) -> [logits, key_0, value_0, ...]` and
`decode(token (1, 1) int32, index () int32, cache list) -> [logits, key_0, value_0, ...]`.
The logits are numpy arrays; the loop never looks into the cache, only passes the latest one back, so a
runtime keeps it in its own buffers (onnx_generate.py: onnxruntime `OrtValue`s; litert_generate.py: numpy).
The loop keeps a window of at most `context` tokens; when it overflows, the window's last half is
prefilled again, as `NanoGPT.generate` does, so greedy decoding gives the same tokens.
"""

import argparse
import json
import os

import numpy as np


def parse_args(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("directory", help="the export folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args()


def load_vocabulary(directory):
    with open(os.path.join(directory, "vocabulary.json"), encoding="utf-8") as f:
        return json.load(f)


def encode(vocabulary, text):
    ids = {token: i for i, token in enumerate(vocabulary["tokens"]) if token}
    unknown = vocabulary["unknown_id"]
    if unknown is None and any(c not in ids for c in text):
        raise SystemExit(f"error: the prompt holds characters outside the vocabulary: {sorted(set(text) - set(ids))}")
    return [ids.get(c, unknown) for c in text]


def decode_text(vocabulary, ids):
    tokens = list(vocabulary["tokens"])
    for name, i in sorted(vocabulary.get("special_tokens", {}).items(), key=lambda item: item[1]):
        tokens += [""] * (i - len(tokens)) + [name] if i >= len(tokens) else []  # ids after the tokens
    if vocabulary["unknown_id"] is not None:
        tokens[vocabulary["unknown_id"]] = "\ufffd"
    return "".join(tokens[i] for i in ids if i != vocabulary["padding_id"])


def generate(prefill, decode, vocabulary, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, seed=None):
    """The new token ids after `prompt_ids` (greedy when `temperature` is 0; never the padding id)."""
    context, rng = vocabulary["context"], np.random.default_rng(seed)
    window, new = list(prompt_ids[-context:]), []

    def run_prefill(window):
        ids = np.zeros((1, context), np.int32)
        ids[0, :len(window)] = window
        logits, *cache = prefill(ids)
        return logits[0, len(window) - 1], cache

    logits, cache = run_prefill(window)
    for _ in range(max_new_tokens):
        logits = logits.astype(np.float64)
        if vocabulary["padding_id"] is not None:
            logits[vocabulary["padding_id"]] = -np.inf  # it decodes to nothing
        if temperature == 0:
            token = int(np.argmax(logits))
        else:
            logits /= temperature
            if top_k:
                logits[logits < np.sort(logits)[-top_k]] = -np.inf
            p = np.exp(logits - logits.max())
            token = int(rng.choice(len(p), p=p / p.sum()))
        new.append(token)
        window.append(token)
        if len(window) > context:  # the cache is full: keep the last half and prefill it again
            window = window[-max(1, context // 2):]
            logits, cache = run_prefill(window)
        else:
            out, *cache = decode(np.array([[token]], np.int32), np.array(len(window) - 1, np.int32), cache)
            logits = out[0, 0]
    return new


def main(description, prefill, decode):
    """Parse the arguments, run the loop with the runtime's `prefill`/`decode`, print prompt + new text."""
    args = parse_args(description)
    vocabulary = load_vocabulary(args.directory)
    prefill_fn, decode_fn = prefill(args.directory), decode(args.directory)
    new = generate(prefill_fn, decode_fn, vocabulary, encode(vocabulary, args.prompt), args.max_new_tokens,
                   args.temperature, args.top_k, args.seed)
    print(args.prompt + decode_text(vocabulary, new))
