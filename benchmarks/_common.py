"""What the benchmark scripts share: this checkout's package on the path, the machine's state, worker processes.

Each script is run as `python benchmarks/NAME.py`, so this folder is on `sys.path` and `import _common` finds
this file; importing it puts the checkout first on the path, ahead of any installed keras_nanogpt.

Example:
    >>> report = {**_common.machine(), "runs": []}  # doctest: +SKIP
    >>> report["load_average_at_end"] = _common.load_average()
"""

import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def load_average():
    """The 1-minute load average, rounded: the machine may be shared, and a busy one slows every run."""
    return round(os.getloadavg()[0], 2)


def machine():
    """The head of every report: the date, the CPU count and the load average at the start."""
    return {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "load_average_at_start": load_average()}


def run_worker(script, backend, *worker):
    """Run `script` again with this command line and `--worker *worker` under `backend`; its JSON last line.

    Returns:
        The worker's last stdout line as JSON, or `{"error": [its last stderr lines]}` when it failed.
    """
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, script, *sys.argv[1:], "--worker", *worker]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-3:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_address():
    """`127.0.0.1:PORT` with a port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"
