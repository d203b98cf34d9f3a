"""What agreeing on signals costs per step under JAX multi-host, printing JSON.

`PreemptibleBackup` asks every process at every step whether any of them got SIGTERM/SIGINT (one small
all-gather), so that all stop at the same step. This starts two JAX processes on 127.0.0.1 (gloo
collectives, one CPU device each) and times that question.

    python benchmarks/agree_cost.py --calls 200
"""

import json
import os
import subprocess
import sys

import _common

WORKER = """
import json, os, sys, time
sys.path.insert(0, sys.argv[3])
import keras
keras.distribution.initialize(sys.argv[1], 2, int(sys.argv[2]))
from keras_nanogpt import distribute
distribute.agreed_signal(None)  # compile the all-gather
calls = int(sys.argv[4])
start = time.perf_counter()
for _ in range(calls):
    distribute.agreed_signal(None)
print(json.dumps({"process": int(sys.argv[2]), "ms_per_step": (time.perf_counter() - start) * 1000 / calls}))
"""


def main():
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    address = _common.free_address()
    report = {**_common.machine(), "calls": args.calls}
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", TF_CPP_MIN_LOG_LEVEL="3")
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, address, str(i), _common.ROOT, str(args.calls)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for i in range(2)]
    results = [json.loads(w.communicate(timeout=600)[0].strip().splitlines()[-1]) for w in workers]
    report["ms_per_step"] = [round(r["ms_per_step"], 3) for r in results]
    report["load_average_at_end"] = _common.load_average()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
