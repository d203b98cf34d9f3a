"""Serving speed of `keras-nanogpt serve`: throughput and time to first token at 1, 8 and 32
concurrent streaming clients, the same requests each time, side by side in one run (JSON on stdout).

    python benchmarks/serve_speed.py                     # nano config, TensorFlow, 64 requests
    KERAS_BACKEND=jax python benchmarks/serve_speed.py --requests 128 --max-tokens 64
    python benchmarks/serve_speed.py --chat              # chat against completions of the same prompts

The server is the console script (`keras-nanogpt serve`, a subprocess on a free 127.0.0.1 port) serving
a model made here: the "nano" config (4 layers, 128 wide, context 64) with a char vocabulary of
tinyshakespeare, untrained (speed does not depend on the weights), or `--model FILE`. The clients
are httpx streaming clients in this process, each sending its share of the requests one after
another (a closed loop): at 1 client, the requests go one at a time, which is the baseline. Every
request streams `--max-tokens` tokens (no stop strings, no seed: a seeded request runs alone) from
its own prompt. Before timing, bursts of 1, 2, 4, ... clients compile every batch shape.

Per level: completed requests/s and generated tokens/s over the level's wall time, time to first
token (TTFT) and whole-request latency, p50/p95; `speedup` is tokens/s over the 1-client level's.
The load average at the start and the end is in the JSON: the machine may be shared.

With `--chat`, each level runs both kinds, in turn (completions, chat, chat, completions: a drift in the
machine's load falls on both alike): `/v1/chat/completions` with a one-message
conversation, and `/v1/completions` with the same conversation rendered by the model's chat template
(`keras_nanogpt.chat.render`, decoded back to text), both ending at the template's stop strings, both
counting tokens from `usage` (`stream_options.include_usage`). `chat_over_completions` is chat's
tokens/s over completions' (the target: at least 0.9, the template costing next to nothing).
"""

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import _common
import numpy as np

LEVELS = (1, 8, 32)


def parse_arguments(argv=None):
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--model", help="a .keras file to serve (default: the nano config, made here)")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (a multiple of 32)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent clients per level")
    parser.add_argument("--timeout", type=float, default=600, help="seconds any one level may take")
    parser.add_argument("--chat", action="store_true",
                        help="chat against completions of the same rendered prompts, at every level")
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.levels.split(",")]
    if args.requests < 1 or any(args.requests % level for level in args.levels):
        parser.error(f"--requests must be a positive multiple of every level {args.levels}; got {args.requests}")
    return args


def make_model(path):
    """The nano config with a char vocabulary of tinyshakespeare, saved to `path`."""
    import keras

    import keras_nanogpt as kn

    text = kn.data.load_text("tinyshakespeare")
    vectorizer = kn.data.make_vectorizer(text, level="char")
    keras.utils.set_random_seed(0)
    model = kn.NanoGPT.from_config_name("nano", vocabulary_size=vectorizer.vocabulary_size(),
                                        vectorizer=vectorizer)
    model.save(path)
    return text, {"config": "nano", "parameters": int(model.count_params()),
                  "context_length": model.sequence_length}


def start_server(model_path, max_tokens):
    script = os.path.join(os.path.dirname(sys.executable), "keras-nanogpt")
    environment = dict(os.environ, PYTHONPATH=_common.ROOT)
    process = subprocess.Popen([script, "serve", model_path, "--port", "0", "--log-level", "warning",
                                "--max-tokens", str(max_tokens)],
                               env=environment, text=True, stdout=subprocess.PIPE)
    line = process.stdout.readline()
    if not line.startswith("serving "):
        process.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return process, line.split(" on ", 1)[1].split()[0]


async def one_request(http, url, body):
    """(time to first token, latency, tokens) of one streamed request; tokens from `usage` when it comes."""
    started = time.perf_counter()
    first, tokens, usage = None, 0, None
    url = url + ("/v1/chat/completions" if "messages" in body else "/v1/completions")
    async with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"status {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and (chunk["choices"][0].get("text")
                                     or chunk["choices"][0].get("delta", {}).get("content")):
                tokens += 1
                first = first or time.perf_counter()
    return first - started, time.perf_counter() - started, tokens if usage is None else usage


async def run_level(url, bodies, clients, timeout):
    """Send `bodies` through `clients` concurrent closed-loop clients; per-request results and wall time."""
    import httpx

    shares = [bodies[i::clients] for i in range(clients)]
    results = []

    async def client(share, http):
        for body in share:
            results.append(await one_request(http, url, body))

    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=clients)) as http:
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(share, http) for share in shares)), timeout)
        return results, time.perf_counter() - started


def summary(clients, results, wall, max_tokens, exact=True):
    ttft, latency, tokens = (np.array(column) for column in zip(*results))
    if exact and (tokens != max_tokens).any():
        raise RuntimeError(f"some requests got other than {max_tokens} tokens: {sorted(set(tokens.tolist()))}")
    return {"clients": clients, "requests": len(results), "seconds": round(wall, 3),
            "requests_per_s": round(len(results) / wall, 2), "tokens_per_s": round(float(tokens.sum()) / wall, 1),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 4),
            "ttft_p95_s": round(float(np.percentile(ttft, 95)), 4),
            "latency_p50_s": round(float(np.percentile(latency, 50)), 4),
            "latency_p95_s": round(float(np.percentile(latency, 95)), 4)}


def main(argv=None):
    args = parse_arguments(argv)
    load_start = _common.load_averages()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            import keras_nanogpt as kn

            model_path, text, described = args.model, kn.data.load_text("tinyshakespeare"), {"file": args.model}
        else:
            model_path = os.path.join(tmp, "nano.keras")
            text, described = make_model(model_path)
        process, url = start_server(model_path, args.max_tokens)
        try:
            def body(i):
                start = (7919 * i) % (len(text) - 40)
                return {"prompt": text[start:start + 8 + i % 9], "max_tokens": args.max_tokens, "stream": True,
                        "temperature": args.temperature, "top_k": args.top_k}

            bodies = [body(i) for i in range(args.requests)]
            if args.chat:
                levels = chat_levels(url, bodies, model_path, args)
            else:
                warm_up(url, bodies, args)
                levels = []
                for clients in args.levels:
                    results, wall = asyncio.run(run_level(url, bodies, clients, args.timeout))
                    levels.append(summary(clients, results, wall, args.max_tokens))
                    print(json.dumps(levels[-1]), file=sys.stderr, flush=True)
        finally:
            process.terminate()
            process.wait(60)
    import keras

    if not args.chat:
        base_rate = next(level["tokens_per_s"] for level in levels if level["clients"] == min(args.levels))
        for level in levels:
            level["speedup"] = round(level["tokens_per_s"] / base_rate, 2)
    print(json.dumps({"benchmark": "serve_speed" + ("_chat" if args.chat else ""),
                      "backend": keras.backend.backend(), "model": described,
                      "max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
                      "requests_per_level": args.requests, "levels": levels,
                      "load_average": {"start": load_start, "end": _common.load_averages()}}, indent=1))


def warm_up(url, bodies, args):
    """Send 1, 2, 4, ... of `bodies` at once up to the largest level: every padded batch size compiles before timing."""
    warm = 1
    while warm <= max(args.levels):
        asyncio.run(run_level(url, bodies[:warm], warm, args.timeout))
        warm *= 2


def chat_bodies(bodies, model_path):
    """Each body as a chat (its prompt the user's one message) and as a completion of the rendered chat."""
    import keras_nanogpt as kn

    model = kn.load_model(model_path)
    stop = [s for s in kn.chat.stop_sequences(model) if isinstance(s, str)]
    chats, completions = [], []
    for body in bodies:
        messages = [{"role": "user", "content": body["prompt"]}]
        rendered = model.tokenizer.decode([int(i) for i in kn.chat.render(model, messages)])
        shared = {k: v for k, v in body.items() if k != "prompt"}
        shared.update(stream_options={"include_usage": True})
        chats.append({**shared, "messages": messages})  # the server adds the template's stop sequences
        completions.append({**shared, "prompt": rendered, **({"stop": stop} if stop else {})})
    return chats, completions


def chat_levels(url, bodies, model_path, args):
    """Per level: completions of the rendered prompts and the chats, in turn; tokens/s side by side."""
    chats, completions = chat_bodies(bodies, model_path)
    for kind in (completions, chats):
        warm_up(url, kind, args)
    levels = []
    for clients in args.levels:
        level = {"clients": clients}
        runs = {"completions": ([], 0.0), "chat": ([], 0.0)}
        # In turn, A B B A, so that a drift in the machine's load falls on both alike.
        for name in ("completions", "chat", "chat", "completions"):
            results, wall = asyncio.run(run_level(url, chats if name == "chat" else completions, clients,
                                                  args.timeout))
            runs[name] = (runs[name][0] + results, runs[name][1] + wall)
        for name, (results, wall) in runs.items():
            level[name] = summary(clients, results, wall, args.max_tokens, exact=False)
            level[name]["tokens"] = int(sum(r[2] for r in results))
        level["chat_over_completions"] = round(level["chat"]["tokens_per_s"] / level["completions"]["tokens_per_s"],
                                               3)
        levels.append(level)
        print(json.dumps(level), file=sys.stderr, flush=True)
    return levels


if __name__ == "__main__":
    main()
