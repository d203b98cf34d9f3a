"""Distinct sampling values against `keras-nanogpt serve`: the server's memory growth and the slowest
request over 100 distinct `top_p` and 20 distinct `top_k` values (JSON on stdout).

    python benchmarks/serve_sampling.py                          # TensorFlow, the nano config
    KERAS_BACKEND=jax python benchmarks/serve_sampling.py --max-tokens 8

The server is the console script (a subprocess on a free 127.0.0.1 port) serving serve_speed.py's
model (the "nano" config, a char vocabulary of tinyshakespeare, untrained). One client sends, one after
another, a greedy request and one sampled request (the warm-up: each loop compiled once), then 100
requests with distinct `top_p` (temperature 0.8) and 20 with distinct `top_k`, each for
`--max-tokens` tokens. Before the change each new value compiled and kept one more decode loop (2,071
MiB for these 120 values, 1.5-1.8 s a new value); now they are inputs of one loop.

Reported: the server's resident memory (VmRSS from /proc) after the warm-up, after the first 10
distinct requests and at the end, the growth over the 120, and the slowest request after the first 10
(and over all 120). The load average at the start and the end is in the JSON: the machine may be
shared.
"""

import json
import os
import tempfile
import time

import _common
import httpx
import serve_speed


def parse_arguments(argv=None):
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--model", help="a .keras file to serve (default: the nano config, made here)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--top-p-values", type=int, default=100)
    parser.add_argument("--top-k-values", type=int, default=20)
    return parser.parse_args(argv)


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


def main(argv=None):
    args = parse_arguments(argv)
    results = {"backend": os.environ.get("KERAS_BACKEND", "tensorflow"), "max_tokens": args.max_tokens,
               **_common.machine()}
    with tempfile.TemporaryDirectory() as folder:
        path = args.model
        if path is None:
            path = os.path.join(folder, "nano.keras")
            _, results["model"] = serve_speed.make_model(path)
        process, url = serve_speed.start_server(path, args.max_tokens)
        try:
            with httpx.Client(base_url=url, timeout=600) as http:
                def ask(**sampling):
                    started = time.perf_counter()
                    response = http.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": args.max_tokens,
                                                                 **sampling})
                    response.raise_for_status()
                    return time.perf_counter() - started

                warm = [ask(temperature=0), ask(temperature=0.8, top_k=40)]
                start = rss_mib(process.pid)
                values = ([dict(temperature=0.8, top_p=round(0.05 + 0.009 * i, 4)) for i in range(args.top_p_values)]
                          + [dict(temperature=0.8, top_k=2 + i) for i in range(args.top_k_values)])
                seconds, after_ten = [], None
                for i, sampling in enumerate(values):
                    seconds.append(ask(**sampling))
                    if i == 9:
                        after_ten = rss_mib(process.pid)
                end = rss_mib(process.pid)
        finally:
            process.terminate()
            process.wait(60)
    results.update({
        "warm_up_seconds": [round(s, 3) for s in warm],
        "distinct_values": len(values),
        "rss_mib": {"after_warm_up": start, "after_10": after_ten, "end": end},
        "rss_growth_mib": round(end - start, 1),
        "slowest_request_s_after_10": round(max(seconds[10:]), 3),
        "slowest_request_s": round(max(seconds), 3),
        "median_request_s": round(sorted(seconds)[len(seconds) // 2], 3),
        "load_average_at_end": _common.load_average(),
    })
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
