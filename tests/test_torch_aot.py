"""PyTorch only: the decode step's and the prefill's AOTInductor packages (keras_nanogpt/_torch_aot.py): built
once in the background by detached builders at the lowest priority while the traced graph serves (never
TorchInductor in the process meanwhile), loaded by the next call, a fresh process, `stream` and the server,
token for token equal to the eager step and a full recompute, reused by new weights; two builders of one
package at once leave one whole package; a truncated, wrongly summed, foreign, stale or unreadable package
warns and is built again; another torch version has its own; the opt-out, the size cap, the missing compiler.

Two packages (the step's and the prefill's) are built for the whole module (a 1-layer, 16-wide model: tens
of seconds), a second builder of the step's beside them; every builder a test starts is waited for or ended
before its test's folder goes."""

import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import keras
import numpy as np
import pytest
from conftest import BACKEND, ThreadServer

import keras_nanogpt as kn

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="AOTInductor packages are PyTorch's")

PROMPT = [[3, 1, 4, 1, 5]]
CONFIG = dict(vocabulary_size=24, sequence_length=16, num_layers=1, num_heads=2, hidden_dim=16)
BUILD_SECONDS = 600  # the bound on the module's one build (a busy 2-core machine)


def make_model(seed):
    keras.utils.set_random_seed(seed)
    return kn.NanoGPT(**CONFIG)


def generate(model, mode="auto", tokens=30):
    os.environ["KERAS_NANOGPT_TORCH_COMPILE"] = mode
    try:
        return model.generate(PROMPT, max_new_tokens=tokens, temperature=0).tolist()
    finally:
        del os.environ["KERAS_NANOGPT_TORCH_COMPILE"]


def levels(model):
    return {step.level() for step in model._kn_compiled.steps.values()}


def recompute(model, tokens):
    """Greedy decoding that runs the whole sequence through the model for each token (within the context)."""
    ids = np.array(PROMPT, "int32")
    for _ in range(tokens):
        logits = keras.ops.convert_to_numpy(model(ids, training=False))
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None].astype("int32")], axis=1)
    return ids.tolist()


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    """The module's package folder, packages on, tracing at once in "auto" (a tiny model's step never pays for
    it otherwise), TorchInductor's in-process compilation never chosen."""
    from keras_nanogpt import _torch_aot, _torch_compile

    folder = tmp_path_factory.mktemp("aot")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_NANOGPT_AOT", "1")
        patch.setenv("KERAS_NANOGPT_AOT_DIR", str(folder))
        patch.setattr(_torch_compile, "expected_trace_seconds", lambda: 0.0)
        patch.setattr(_torch_compile, "expected_compile_seconds", lambda key: float("inf"))
        yield folder
        _torch_aot.stop_builders()


@pytest.fixture(scope="module")
def built(aot, tmp_path_factory):
    """The first call: the traced graph serves it and a background builder makes the package; a second builder
    of the same package runs at the same time (as where a stale lock was taken over); both waited for."""
    from keras_nanogpt import _torch_aot

    model = make_model(3)
    eager = generate(model, "never")
    before = dict(_torch_aot.counters)
    start = time.perf_counter()
    first = generate(model)
    first_seconds = time.perf_counter() - start
    assert levels(model) == {"graph"}
    spawned = _torch_aot.counters["spawned"] - before["spawned"]
    (step,) = model._kn_compiled.steps.values()
    spec = aot / f"{step.package_key}.spec"  # the decode step's (the prefill's builder runs too)
    twin_spec = tmp_path_factory.mktemp("twin") / spec.name  # its own copy: the first builder removes its spec
    shutil.copy(spec, twin_spec)
    twin = subprocess.Popen([sys.executable, "-m", "keras_nanogpt._torch_aot_build", str(twin_spec)],
                            env=builder_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    policy = builder_policy(_torch_aot._builders[0][0].pid)
    codes = _torch_aot.wait_for_builders(timeout=BUILD_SECONDS)
    twin_output = twin.communicate(timeout=BUILD_SECONDS)[0]
    packages = sorted(aot.glob("*.pt2"))
    (prefill_key,) = model._kn_compiled.kept["prefill"].keys.values()
    return dict(step_key=step.package_key, prefill_key=prefill_key, model=model, eager=eager, first=first,
                first_seconds=first_seconds, spawned=spawned, codes=codes, policy=policy,
                twin=(twin.returncode, twin_output[-3000:]), packages=packages,
                logs=[p.read_text()[-3000:] for p in aot.glob("*.log")] + [
                    p.read_text()[-3000:] for p in aot.glob("*.failed")])


def builder_env():
    """This process's environment for a process of the package's own (a builder, a fresh program)."""
    return dict(os.environ, KERAS_BACKEND="torch", KERAS_NANOGPT_AOT="1",
                PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def builder_policy(pid, seconds=10):
    """The builder's scheduling policy once `chrt` has set it (its pid stays through `chrt` and `nice`), and
    whether it runs in this session (Linux's autogroups: another session's share of the CPU ignores its
    priority) in a process group of its own (Ctrl-C at a terminal does not reach it)."""
    deadline = time.monotonic() + seconds
    while os.sched_getscheduler(pid) != os.SCHED_IDLE and time.monotonic() < deadline:
        time.sleep(0.05)
    placed = os.getsid(pid) == os.getsid(0) and os.getpgid(pid) == pid != os.getpgid(0)
    return os.sched_getscheduler(pid), os.getpriority(os.PRIO_PROCESS, pid), placed


def test_first_call_traces_and_builds_the_package_in_the_background(built, aot):
    from keras_nanogpt import _torch_aot

    assert built["first"] == built["eager"]  # served by the traced graph, not waiting for the build
    assert built["spawned"] == 2  # the decode step's builder and the prefill's
    if _torch_aot._idle_allowed() and shutil.which("nice"):
        assert built["policy"][:2] == (os.SCHED_IDLE, 19)  # the lowest priority there is
    assert built["policy"][2]  # in this session, in a process group of its own
    assert built["codes"] == [0, 0], built["logs"]
    assert sorted(p.stem for p in built["packages"]) == sorted([built["step_key"], built["prefill_key"]])
    for package in built["packages"]:
        sidecar = json.loads(package.with_suffix(".json").read_text())
        assert sidecar["key"] == package.stem and len(sidecar["sha256"]) == 64
    assert not list(aot.glob("*.building")) and not list(aot.glob("*.spec"))  # the builder cleaned up


def test_two_builders_of_one_package_at_once_leave_one_whole_package(built, aot):
    from keras_nanogpt import _torch_aot

    assert built["twin"][0] == 0, built["twin"][1]
    assert sorted(p.name for p in aot.iterdir()) == sorted(  # one package each, no temporary files left
        f"{key}{suffix}" for key in (built["step_key"], built["prefill_key"]) for suffix in (".pt2", ".json"))
    assert _torch_aot._problem(built["step_key"]) is None  # its sidecar names it and its checksum holds
    assert _torch_aot.load(built["step_key"]) is not None


def test_one_of_many_processes_claiming_a_builder_lock_at_once_gets_it(tmp_path):
    import multiprocessing

    from keras_nanogpt import _torch_aot

    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(4), context.Queue()

    def claim():
        barrier.wait()
        results.put(_torch_aot._claim(str(tmp_path / "key.building")))

    processes = [context.Process(target=claim) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert sorted(results.get(timeout=10) for _ in processes) == [False, False, False, True]


def test_the_next_call_runs_the_package_equal_to_eager_and_a_recompute(built):
    from keras_nanogpt import _torch_aot

    model, loaded = built["model"], _torch_aot.counters["loaded"]
    assert generate(model) == built["eager"]  # 30 tokens: past the context, the window slides
    assert levels(model) == {"package"} and _torch_aot.counters["loaded"] == loaded + 2  # the step, the prefill
    assert generate(model, tokens=10) == recompute(model, 10)
    assert _torch_aot.counters["loaded"] == loaded + 2  # loaded once per model and function
    assert model._kn_compiled.traces == 1  # the first call's trace only


def test_a_fresh_process_loads_the_package_and_compiles_nothing(built, aot, tmp_path):
    path = tmp_path / "model.keras"
    built["model"].save(path)
    script = (
        "import json, sys, time\n"
        "import keras_nanogpt as kn\n"
        "from keras_nanogpt import _torch_aot\n"
        f"model = kn.load_model({str(path)!r})\n"
        "start = time.perf_counter()\n"
        f"tokens = model.generate({PROMPT}, max_new_tokens=30, temperature=0).tolist()\n"
        "seconds = time.perf_counter() - start\n"
        "levels = sorted({s.level() for s in model._kn_compiled.steps.values()})\n"
        "print(json.dumps(dict(tokens=tokens, counters=_torch_aot.counters, levels=levels,\n"
        "                      traces=model._kn_compiled.traces, seconds=seconds)))\n")
    done = subprocess.run([sys.executable, "-c", script], env=builder_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["tokens"] == built["eager"]
    assert report["levels"] == ["package"] and report["traces"] == 0  # nothing traced, nothing compiled
    assert report["counters"] == {"loaded": 2, "built": 0, "spawned": 0, "rejected": 0}


def test_streaming_runs_the_packages(built, monkeypatch):
    """`stream` (and so the server, which decodes through it) loads the step's and the prefill's packages."""
    from keras_nanogpt import _torch_aot

    monkeypatch.setenv("KERAS_NANOGPT_TORCH_COMPILE", "auto")
    model, before = make_model(3), dict(_torch_aot.counters)
    pieces = list(model.stream(PROMPT, max_new_tokens=30, temperature=0))
    assert len(pieces) == 30 and levels(model) == {"package"}
    assert _torch_aot.counters["loaded"] == before["loaded"] + 2 and _torch_aot.counters["spawned"] == before["spawned"]


def test_the_server_runs_the_packages(built, monkeypatch):
    """A server's greedy completion of one row loads the same two packages (the vectorizer is not in the key)."""
    import httpx

    from keras_nanogpt import _torch_aot, serve

    vectorizer = kn.data.make_vectorizer("abcdefghijklmnopqrstuv", level="char")  # 22 characters, 24 ids
    assert vectorizer.vocabulary_size() == CONFIG["vocabulary_size"]
    keras.utils.set_random_seed(3)
    model = kn.NanoGPT(**CONFIG, vectorizer=vectorizer)
    monkeypatch.setenv("KERAS_NANOGPT_TORCH_COMPILE", "auto")
    before = dict(_torch_aot.counters)
    server = ThreadServer(serve.create_app(model, name="tiny"))
    try:
        reply = httpx.post(server.url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": "abcde", "max_tokens": 30, "temperature": 0})
    finally:
        server.stop()
    assert reply.status_code == 200 and levels(model) == {"package"}
    assert _torch_aot.counters["loaded"] == before["loaded"] + 2 and _torch_aot.counters["spawned"] == before["spawned"]


def test_new_weights_reuse_the_package(built, aot):
    from keras_nanogpt import _torch_aot

    other = make_model(7)  # the same configuration, other weights
    before = dict(_torch_aot.counters)
    tokens = generate(other)
    assert levels(other) == {"package"}
    assert _torch_aot.counters["loaded"] == before["loaded"] + 2
    assert _torch_aot.counters["spawned"] == before["spawned"] and len(list(aot.glob("*.pt2"))) == 2
    assert tokens == generate(other, "never") and tokens != built["eager"]  # the new weights' tokens
    other.set_weights([w * 1.5 for w in other.get_weights()])  # changed in place: the same model object
    assert generate(other) == generate(other, "never")


@pytest.mark.parametrize("damage", ["truncated", "checksum", "foreign", "stale", "unreadable"])
def test_a_damaged_package_warns_and_is_built_again(built, aot, damage):
    from keras_nanogpt import _torch_aot

    package = aot / f"{built['step_key']}.pt2"
    sidecar = package.with_suffix(".json")
    saved = {path: path.read_bytes() for path in (package, sidecar)}
    try:
        meta = json.loads(saved[sidecar])
        if damage == "truncated":
            package.write_bytes(saved[package][:len(saved[package]) // 2])
        elif damage == "unreadable":
            sidecar.write_text("{not json")
        else:  # a sidecar with another checksum, another package's key, an older layout
            changed = {"checksum": {"sha256": "0" * 64}, "foreign": {"key": "0" * 32}, "stale": {"format": 0}}
            sidecar.write_text(json.dumps({**meta, **changed[damage]}))
        before = dict(_torch_aot.counters)
        model = make_model(3)
        with pytest.warns(RuntimeWarning, match="ignored and will be built again"):
            assert generate(model) == built["eager"]  # the traced graph serves; no crash
        assert levels(model) == {"graph"}
        assert _torch_aot.counters["rejected"] == before["rejected"] + 1
        assert _torch_aot.counters["spawned"] == before["spawned"] + 1  # building it again
        assert _torch_aot.counters["loaded"] == before["loaded"] + 1  # the prefill's package, whole
    finally:
        _torch_aot.stop_builders()  # this test's builder: ended, not left to outlive the folder
        for path, data in saved.items():
            path.write_bytes(data)


def test_another_torch_version_has_a_package_of_its_own(built, aot, monkeypatch):
    import torch

    from keras_nanogpt import _torch_aot

    monkeypatch.setattr(torch, "__version__", "0.0.0")
    model, before = make_model(3), dict(_torch_aot.counters)
    try:
        assert generate(model) == built["eager"]
        assert levels(model) == {"graph"} and _torch_aot.counters["loaded"] == before["loaded"]
        assert _torch_aot.counters["spawned"] == before["spawned"] + 2  # its own packages, under other keys
    finally:
        _torch_aot.stop_builders()


def test_another_thread_count_has_a_package_of_its_own():
    import torch

    from keras_nanogpt import _torch_aot

    threads = torch.get_num_threads()
    try:
        keys = set()
        for count in (1, 2):
            torch.set_num_threads(count)
            keys.add(_torch_aot.package_key("step", torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)
    assert len(keys) == 2  # TorchInductor writes the thread count into a CPU package's loops


def test_the_opt_out_neither_loads_nor_builds(built, monkeypatch):
    from keras_nanogpt import _torch_aot

    monkeypatch.setenv("KERAS_NANOGPT_AOT", "0")
    before = dict(_torch_aot.counters)
    model = make_model(3)
    assert generate(model) == built["eager"]
    assert levels(model) == {"graph"} and _torch_aot.counters == before


def test_compile_packages_finds_the_package_there(built):
    report = kn.generation.compile_packages(make_model(3), batch_sizes=[1], windows=[16], sampling=["greedy"])
    assert (report["packages"], report["built"], report["loaded"]) == (2, 0, 2)  # the step's and the prefill's
    with pytest.raises(ValueError, match="windows.*24"):
        kn.generation.compile_packages(built["model"], windows=[24])


def test_the_cap_evicts_the_packages_used_longest_ago(tmp_path, monkeypatch):
    from keras_nanogpt import _torch_aot

    monkeypatch.setenv("KERAS_NANOGPT_AOT_DIR", str(tmp_path))
    monkeypatch.setenv("KERAS_NANOGPT_AOT_CACHE_MB", "2.5")
    now = time.time()
    for age, key in ((30, "old"), (20, "middle"), (10, "new")):
        package, sidecar = _torch_aot.paths(key)[:2]
        with open(package, "wb") as f:
            f.write(b"\0" * (1 << 20))
        with open(sidecar, "w") as f:
            json.dump({"key": key}, f)
        os.utime(sidecar, (now - age, now - age))
    os.utime(_torch_aot.paths("old")[1])  # used just now: the middle one is the least recently used
    _torch_aot.evict(keep="new")
    assert sorted(p.stem for p in tmp_path.glob("*.pt2")) == ["new", "old"]
    monkeypatch.setenv("KERAS_NANOGPT_AOT_CACHE_MB", "0")
    _torch_aot.evict(keep="new")  # the one just built stays, whatever the cap
    assert [p.stem for p in tmp_path.glob("*.pt2")] == ["new"]


def test_without_a_compiler_one_warning_and_no_builder(tmp_path, monkeypatch):
    from keras_nanogpt import _torch_aot

    monkeypatch.setenv("KERAS_NANOGPT_AOT_DIR", str(tmp_path))
    monkeypatch.setenv("KERAS_NANOGPT_AOT", "1")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(_torch_aot, "_warned", set())
    with pytest.warns(RuntimeWarning, match="No C\\+\\+ compiler"):
        assert not _torch_aot.can_build("somekey")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert not _torch_aot.can_build("otherkey")  # said once
    assert not _torch_aot.compiler_available()


def test_no_compilation_in_the_process_while_the_package_can_come(built, monkeypatch):
    """Where the ski rental would compile the step with TorchInductor, a step whose package can be built stays a
    traced graph and its builder starts; once its build has failed, it compiles (TorchInductor stood in by the
    traced graph here: no compiler run)."""
    from keras_nanogpt import _torch_aot, _torch_compile

    monkeypatch.setattr(_torch_compile, "expected_compile_seconds", lambda key: 0.0)
    monkeypatch.setattr(_torch_compile, "_compiled_step", lambda model, step, layout, example, graph=None:
                        _torch_compile._traced_step(model, step, layout, example))
    batch = np.array([[3, 1, 4], [1, 5, 9]], "int32")  # a new shape: no package for it
    before, compilations = _torch_aot.counters["spawned"], len(_torch_compile.compile_log)
    model = make_model(3)
    monkeypatch.setenv("KERAS_NANOGPT_TORCH_COMPILE", "auto")
    failure = None
    try:
        tokens = model.generate(batch, max_new_tokens=12, temperature=0)
        assert levels(model) == {"graph"} and len(_torch_compile.compile_log) == compilations
        assert _torch_aot.counters["spawned"] == before + 2  # the step's builder and the prefill's
        _torch_aot.stop_builders()
        (step,) = model._kn_compiled.steps.values()
        failure = _torch_aot.paths(step.package_key)[3]
        open(failure, "w").close()  # its build failed: no package will come
        model = make_model(3)
        with pytest.warns(RuntimeWarning, match="failed before"):
            assert (model.generate(batch, max_new_tokens=12, temperature=0) == tokens).all()
        assert levels(model) == {"compiled"} and len(_torch_compile.compile_log) == compilations + 1
    finally:
        _torch_aot.stop_builders()
        if failure:
            os.remove(failure)
