"""PyTorch backend only: decode and train steps compiled ahead of time by AOTInductor into packages on disk (keyed,
checksummed, capped, loaded by the C++ loader in milliseconds), and the background builders that make them.

TorchInductor compiled in the process (`_torch_tracing.inductor`) costs 3-4 s in every new process even
from a warm disk cache (Inductor's imports and its instruction-set probe). An AOTInductor package is
a shared library in a zip file: `torch._C._aoti.AOTIModelPackageLoader` opens it in about 10 ms
without importing Inductor, and the step it runs costs a few ATen kernel launches instead of the traced
graph's ~200 operator dispatches.

- What: the traced decode step (`_torch_compile`'s graph of the Keras model itself, weights as inputs:
  a model whose weights changed, by training or loading, runs the same package), or the traced train
  step (`_torch_training`: variables updated in place), exported by `torch.export` and compiled by
  `torch._inductor.aoti_compile_and_package`.
- Where: `$KERAS_HOME/keras_nanogpt/aot/` (or `KERAS_NANOGPT_AOT_DIR`), one `KEY.pt2` and one
  `KEY.json` sidecar each. The key digests the step's own key (a decode step's: model configuration,
  sampler kind, shapes and dtypes of every input, the torch, Keras and keras_nanogpt versions; a train
  step's: its traced graph's code and constants, and the same shapes and versions), the sources of the
  modules on the step's path, and the device (`device_tag`: the CPU's instruction set, or the GPU and
  CUDA version: the step's tensors on a GPU make a CUDA package).
- Safety: a package is put in place whole (the first of two builders of one key wins), then its
  sidecar (its key and sha256) is written; a package is loaded only when its sidecar names this key
  and its bytes hash to the sidecar's sum (a truncated library would crash the process). A corrupt,
  foreign or unreadable package is removed with a warning and built again.
- Size: `KERAS_NANOGPT_AOT_CACHE_MB` (default 1024) caps the folder; the packages used longest ago go first.
- Opt-out: `KERAS_NANOGPT_AOT=0`. Without a C++ compiler packages are not built (one warning).
- Builders: `spawn` starts `python -m keras_nanogpt._torch_aot_build` at the lowest priority
  (SCHED_IDLE and nice 19, one compiler job at a time: at nice 19 alone the traced path's calls took
  1.7-2.5x as long while it built on 2 cores, RESULTS.md), with this process's thread count (TorchInductor
  writes it into a CPU package's parallel loops, so it is in the key too), in a process group of its own
  (so Ctrl-C does not reach it) within this session: it outlives a short script and the next program
  finds the package. Not in a new session, since Linux's autogroups give each session an equal share of
  the CPU whatever its priority (a builder in its own session slowed the traced path's calls 6-23x on 2
  cores); a lock file keeps processes from starting two for one key.
  `wait_for_builders` / `stop_builders` end this process's ones (tests do).

Example:
    >>> run = load(package_key(step_key, torch.device("cpu")))  # doctest: +SKIP
    >>> outputs = run(*flat_inputs) if run else None  # doctest: +SKIP
"""

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import torch

from keras_nanogpt import _files

ENVIRONMENT_VARIABLE = "KERAS_NANOGPT_AOT"
DIRECTORY_VARIABLE = "KERAS_NANOGPT_AOT_DIR"
CAP_VARIABLE = "KERAS_NANOGPT_AOT_CACHE_MB"
DEFAULT_CAP_MB = 1024
FORMAT = 1  # the layout of the packages and sidecars; a new one makes every old package stale
LOCK_SECONDS = 1800  # a builder's lock older than this is a dead builder's
# The modules whose code the step's graph comes from: a change to any of them makes the packages stale.
_SOURCES = ("layers.py", "model.py", "decoding.py", "_torch_tracing.py", "_torch_compile.py",
            "_torch_keras_internals.py", "_torch_aot.py", "_torch_aot_build.py")
counters = {"loaded": 0, "built": 0, "spawned": 0, "rejected": 0}  # this process's, for tests and benchmarks
_builders = []  # the builder processes this process started
_warned = set()
_in_process = []  # non-empty inside `building_now()`
_source_digest = []


def enabled():
    """Whether packages are used and built (`KERAS_NANOGPT_AOT` is not 0, off, false or no)."""
    return os.environ.get(ENVIRONMENT_VARIABLE, "1").strip().lower() not in ("0", "off", "false", "no")


def directory():
    """The package folder: `KERAS_NANOGPT_AOT_DIR`, else `$KERAS_HOME/keras_nanogpt/aot` (`~/.keras` without
    KERAS_HOME, as Keras itself)."""
    chosen = os.environ.get(DIRECTORY_VARIABLE)
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(os.path.abspath(home), "keras_nanogpt", "aot")


def cap_bytes():
    """The folder's size cap in bytes (`KERAS_NANOGPT_AOT_CACHE_MB`, default `DEFAULT_CAP_MB`)."""
    text = os.environ.get(CAP_VARIABLE, "").strip()
    try:
        megabytes = float(text) if text else DEFAULT_CAP_MB
    except ValueError:
        raise ValueError(f"The environment variable {CAP_VARIABLE} must be a number of megabytes; "
                         f"got {text!r}.") from None
    return int(megabytes * (1 << 20))


def device_tag(device):
    """What a package compiled for the torch device `device` depends on beyond the step: the CPU's
    instruction set and torch's thread count, or the GPU's name and compute capability and the CUDA
    version (AOTInductor compiles for the device of the step's tensors)."""
    if device.type == "cuda":
        return (f"cuda|{torch.cuda.get_device_name(device)}|{torch.cuda.get_device_capability(device)}|"
                f"{torch.version.cuda}")
    # TorchInductor writes the thread count into a CPU package's parallel loops (`num_threads(N)`).
    return f"cpu|{torch.backends.cpu.get_cpu_capability()}|{torch.get_num_threads()} threads"


def package_key(step_key, device):
    """The package's name for the step `step_key` (`_torch_compile`'s digest), this code and `device_tag(device)`."""
    if not _source_digest:
        here = os.path.dirname(os.path.abspath(__file__))
        digest = hashlib.sha256()
        for name in _SOURCES:
            with open(os.path.join(here, name), "rb") as f:
                digest.update(f.read())
        _source_digest.append(digest.hexdigest())
    text = f"{FORMAT}|{step_key}|{_source_digest[0]}|{device_tag(device)}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def paths(key):
    """`(package, sidecar, lock, failure)`: the files of the package `key`."""
    base = os.path.join(directory(), key)
    return f"{base}.pt2", f"{base}.json", f"{base}.building", f"{base}.failed"


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(key):
    """The package `key` as a function of the step's flat tensors (returning its outputs), or None when
    it is not there (or not finished). A package that fails its checks is removed with a warning."""
    package, sidecar = paths(key)[:2]
    if not os.path.exists(sidecar):
        return None  # not built, or its builder has not finished
    problem = _problem(key)
    if problem:
        return _reject(key, problem)
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(package, "model", False, 1, -1)
    except Exception as error:  # a library this process cannot open
        return _reject(key, f"{type(error).__name__}: {error}")
    with contextlib.suppress(OSError):
        os.utime(sidecar)  # last used now: eviction removes the packages used longest ago
    counters["loaded"] += 1
    run = loader.run
    return lambda *tensors: run(list(tensors))


def _problem(key):
    """Why the package `key` on disk may not be loaded, or None where its sidecar names it (this key, this
    `FORMAT`) and its bytes hash to the sidecar's sum."""
    package, sidecar = paths(key)[:2]
    try:
        with open(sidecar) as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or meta.get("key") != key or meta.get("format") != FORMAT:
            return "its sidecar names another package (foreign or stale)"
        if _sha256(package) != meta.get("sha256"):
            return "its checksum does not match (a truncated or changed file)"
    except (OSError, ValueError) as error:
        return f"it or its sidecar {sidecar} cannot be read ({type(error).__name__}: {error})"
    return None


def _reject(key, why):
    package, sidecar = paths(key)[:2]
    counters["rejected"] += 1
    warnings.warn(f"The AOTInductor package {package} is ignored and will be built again: {why}.",
                  RuntimeWarning, stacklevel=3)
    for path in (sidecar, package):
        with contextlib.suppress(OSError):
            os.remove(path)
    return None


def build(key, graph_module, example, options=None):
    """Export `graph_module` (the traced step) for the flat tensors `example` and compile it into the
    package `key` (`options`: TorchInductor's settings for it): written under a temporary name, put in
    place whole (`_install`: the first of two builders of one key wins), then its sidecar; returns the
    package's path."""
    import torch._inductor  # the builder's import, never the loader's

    package, sidecar = paths(key)[:2]
    os.makedirs(directory(), exist_ok=True)
    start = time.perf_counter()
    tmp = os.path.join(directory(), f".{key}.{os.getpid()}.tmp.pt2")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations inside export
            exported = torch.export.export(graph_module, tuple(example), strict=False)
            torch._inductor.aoti_compile_and_package(exported, package_path=tmp, inductor_configs=options)
        meta = {"key": key, "format": FORMAT, "sha256": _sha256(tmp), "torch": torch.__version__,
                "device": device_tag(example[0].device), "seconds": round(time.perf_counter() - start, 2)}
        installed = _install(tmp, key)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    if installed:
        with _files.atomic_path(sidecar) as path, open(path, "w") as f:
            json.dump(meta, f)
    counters["built"] += 1
    evict(keep=key)
    return package


def _install(tmp, key):
    """Put the finished package `tmp` in place as `key`'s, unless another builder's package that passes
    the checks is there already; returns whether it did. A hard link, so the first of two builders
    finishing at once wins and the other's bytes never meet the first's sidecar."""
    package = paths(key)[0]
    try:
        os.link(tmp, package)
        return True
    except FileExistsError:
        if not _problem(key):
            return False  # another builder's whole package, sidecar and all
    except OSError:  # a file system without hard links
        pass
    os.replace(tmp, package)
    return True


def evict(keep=None):
    """Remove the packages used longest ago until the folder is within `cap_bytes()` (never `keep`)."""
    folder = directory()
    try:
        names = [name for name in os.listdir(folder) if name.endswith(".pt2") and not name.startswith(".")]
    except OSError:
        return
    entries = []
    for name in names:
        key = name[:-4]
        package, sidecar = paths(key)[:2]
        try:
            size = os.path.getsize(package)
            used = os.path.getmtime(sidecar if os.path.exists(sidecar) else package)
        except OSError:
            continue
        entries.append((used, size, key))
    total, cap = sum(size for _, size, _ in entries), cap_bytes()
    for _, size, key in sorted(entries):
        if total <= cap:
            break
        if key == keep:
            continue
        for path in paths(key)[:2]:
            with contextlib.suppress(OSError):
                os.remove(path)
        total -= size


def compiler_available():
    """Whether a C++ compiler for AOTInductor is on the PATH (`CXX`, else g++, c++ or clang++)."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return any(shutil.which(name.split()[0]) for name in names)


def warn_once(what, message):
    if what not in _warned:
        _warned.add(what)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def can_build(key):
    """Whether a package for `key` may be built now: packages on, a C++ compiler (else one warning), and
    no earlier build of it that failed (its log is kept beside it)."""
    if not enabled():
        return False
    if not compiler_available():
        warn_once("compiler", "No C++ compiler found (g++, c++, clang++ or $CXX), so PyTorch decoding and training are "
                              "not compiled ahead of time: they run as traced graphs (slower).")
        return False
    failure = paths(key)[3]
    if os.path.exists(failure):
        warn_once(failure, f"Building the AOTInductor package {key} failed before (see {failure}), so "
                           f"that step runs as a traced graph; remove that file to try again.")
        return False
    return True


@contextlib.contextmanager
def building_now():
    """Inside: a missing package is built in this process, at once (`keras-nanogpt compile`)."""
    _in_process.append(True)
    try:
        yield
    finally:
        _in_process.pop()


def builds_in_process():
    return bool(_in_process)


def _claim(lock):
    """Take the builder's lock file `lock`, or return False where a live builder holds it."""
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(handle)
            return True
        except FileExistsError:
            try:
                with open(lock) as f:
                    pid = int(f.read().strip() or 0)
                fresh = time.time() - os.path.getmtime(lock) < LOCK_SECONDS
            except (OSError, ValueError):
                pid, fresh = 0, True  # being written by its claimant
            if fresh and (pid == 0 or _alive(pid)):
                return False
            with contextlib.suppress(OSError):
                os.remove(lock)  # a dead builder's
    return False


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spawn(key, write_spec):
    """Start a background builder for the package `key` unless one runs; `write_spec(path)` writes what
    it needs (`_torch_aot_build` reads it). Returns whether one was started."""
    package, _, lock, _ = paths(key)
    os.makedirs(directory(), exist_ok=True)
    if not _claim(lock):
        return False
    spec = os.path.join(directory(), f"{key}.spec")
    try:
        write_spec(spec)
        command = _lowest_priority([sys.executable, "-m", "keras_nanogpt._torch_aot_build", spec])
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS=str(torch.get_num_threads()),
                   TORCHINDUCTOR_COMPILE_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        with open(os.path.join(directory(), f"{key}.log"), "w") as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env=env, process_group=0)  # not a new session: see the module docstring
        with open(lock, "w") as f:
            f.write(str(process.pid))
    except Exception:
        with contextlib.suppress(OSError):
            os.remove(lock)
        raise
    _builders.append((process, key))
    counters["spawned"] += 1
    return True


def _lowest_priority(command):
    """`command` run at the lowest priority there is: Linux's SCHED_IDLE (`chrt --idle 0`: any runnable
    thread of another process preempts it at once, so this process's intra-op threads never wait for
    it) and nice 19, where those tools run here."""
    if shutil.which("nice"):
        command = ["nice", "-n", "19", *command]
    if _idle_allowed():
        command = ["chrt", "--idle", "0", *command]
    return command


@functools.cache
def _idle_allowed():
    """Whether `chrt --idle 0` runs here (a tool that is there, a policy the sandbox allows)."""
    try:
        return subprocess.run(["chrt", "--idle", "0", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def wait_for_builders(timeout=None):
    """Wait for the builders this process started; returns their exit codes (None: still running)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    codes = []
    for entry in list(_builders):
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            codes.append(entry[0].wait(left))
            _builders.remove(entry)
        except subprocess.TimeoutExpired:
            codes.append(None)
    return codes


def stop_builders():
    """End the builders this process started (their whole process groups) and wait for them."""
    for entry in list(_builders):
        process, key = entry
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
        process.wait()
        _builders.remove(entry)
        for path in (paths(key)[2], os.path.join(directory(), f"{key}.spec")):
            with contextlib.suppress(OSError):
                os.remove(path)  # what a killed builder leaves
