"""PyTorch backend only: generation's decode loop, one token's step run as a traced ATen graph,
compiled by TorchInductor where that pays, or run eagerly where neither does (and its prefill,
`Prefill`: eagerly or from an AOTInductor package).

Run eagerly, a token costs Keras's Python overhead for each of its ~44 layer calls (5-10 ms a token
at 4 layers x 128 wide on two CPU cores), far more than its arithmetic. The step
(`decoding.TokenStep`: write the previous token, run the model on it, the sampler's
probabilities) is instead:

1. traced once by `_torch_tracing.trace` into a lean ATen graph with the model's weights as inputs
   (Keras's layer machinery runs only while tracing: one model definition, no copy of it in plain
   torch); the KV cache is updated in its own buffers, one position a token;
2. or compiled by TorchInductor (`_torch_tracing.inductor`) from the same graph, with CUDA graphs
   on a GPU: faster again, but 15-30 s on a cold cache (about 1 s where TorchInductor's on-disk
   caches, `TORCHINDUCTOR_CACHE_DIR`, already hold the step);
3. or, in the default mode, run from the step's AOTInductor package where one is on disk (for the CPU,
   or for CUDA where the model's variables are on a GPU)
   (`_torch_aot`: loaded in milliseconds, no tracing or compiling in this process). The first call
   that traces a step starts a background builder for its package (`_request_package`); until the
   package is on disk the step stays a traced graph (TorchInductor here would take the CPU from the
   builder, for a function the package then replaces).

There is one step per sampler kind and shape (batch, window, stop sequences, dtypes), shared by the
model's samplers and reused across prompts, seeds, sampling settings and training; the cache index is
a tensor input, so no token retraces. The sampler's draw (keras-hub's `get_next_token`) is a small traced graph of
its own per sampler, with `top_k` and `top_p` as its tensor inputs (`decoding._draw`: no value
traces again; each `decoding.Filter` is a sampler of its own, sharing the step) and Keras's seeded categorical draw as one operator (`_torch_keras_internals.seeded_categorical`):
a seed gives the same tokens on every path.

When: as in the ski-rental problem, a step moves up (eager -> graph -> TorchInductor) once the time
it would save, the time already spent at its level plus the window's remaining tokens at the
measured rate, reaches the expected cost of the move (`expected_trace_seconds`,
`expected_compile_seconds`: less where TorchInductor's disk caches hold the step already, which a
record of earlier compilations beside them tells). That never costs more than about twice the best
choice made in hindsight. `KERAS_NANOGPT_TORCH_COMPILE` overrides the choice: `always` compiles
with TorchInductor at once, `trace` runs the graph and never compiles, `never` stays eager; `auto`
is the default.
"""

import hashlib
import json
import os
import threading
import time
import typing
import warnings

import keras
import torch
from keras import ops
from torch.fx.experimental.proxy_tensor import make_fx

from keras_nanogpt import _files, _torch_aot, _torch_keras_internals, _torch_tracing, _version, decoding

ENVIRONMENT_VARIABLE = "KERAS_NANOGPT_TORCH_COMPILE"
MODES = ("auto", "always", "trace", "never")
COMPILE_SECONDS = 30.0  # a first (cold) compilation of the 4-layer step on a 2-core CPU (RESULTS.md)
WARM_FRACTION = 0.25  # a compilation TorchInductor's disk caches already hold, against a cold one (measured)
_cold_compile_seconds = []  # cold compilations measured in this process, most recent last
compile_log = []  # every compilation in this process: {"seconds": ..., "cold": ...}, most recent last


def compile_mode():
    """The compile choice from `KERAS_NANOGPT_TORCH_COMPILE`: "auto" (the default), "always" or "never"."""
    mode = os.environ.get(ENVIRONMENT_VARIABLE, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"The environment variable {ENVIRONMENT_VARIABLE} must be one of {MODES}; "
                         f"got {os.environ[ENVIRONMENT_VARIABLE]!r}.")
    return mode


def _record_path():
    """Where compilation times are kept, beside TorchInductor's own caches (which they describe)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.path.join(cache_dir(), "keras_nanogpt", "compile_seconds.json")


def _records():
    try:
        with open(_record_path()) as f:
            records = json.load(f)
        return records if isinstance(records, dict) else {}
    except (OSError, ValueError):
        return {}


def _record(key, seconds):
    """Remember how long compiling `key` took (so a later process expects its caches to hold it)."""
    records = _records()
    entry = records.get(key, {})
    entry = {"first": entry.get("first", seconds), "last": seconds, "count": entry.get("count", 0) + 1}
    try:
        with _files.atomic_path(_record_path()) as tmp, open(tmp, "w") as f:
            json.dump({**records, key: entry}, f)
    except OSError:  # a read-only cache directory: only this process's estimates are lost
        pass


def expected_compile_seconds(key):
    """How long compiling the step `key` is expected to take: as long as last time if it compiled
    before (TorchInductor's disk caches then hold it; the first time, `WARM_FRACTION` of that),
    else as long as the last cold compilation in this process, else `COMPILE_SECONDS`."""
    entry = _records().get(key)
    if entry:
        return entry["last"] if entry["count"] > 1 else WARM_FRACTION * entry["first"]
    return _cold_compile_seconds[-1] if _cold_compile_seconds else COMPILE_SECONDS


TRACE_SECONDS = 1.0  # a first trace of the 4-layer step on a 2-core CPU, before one is measured (RESULTS.md)
_trace_seconds = []  # traces measured in this process, most recent last


def expected_trace_seconds():
    """How long tracing a step is expected to take: as long as the last one in this process, else
    `TRACE_SECONDS`."""
    return _trace_seconds[-1] if _trace_seconds else TRACE_SECONDS


class _Step:
    """One sampler kind and signature's step: its traced graph, TorchInductor function and AOTInductor
    package (None until made or loaded), and the time spent running it eagerly and as a graph."""

    def __init__(self, key):
        self.key = key  # a digest of the model's config, the sampler kind, the shapes and versions
        self.graph = None
        self.function = None
        self.package = None  # the loaded AOTInductor package's run function (`_torch_aot.load`)
        self.package_key = None  # set where packages are used: the "auto" mode, not opted out
        self.requested = False  # a builder was asked for the package (once per process)
        self.failed = False  # TorchInductor failed here once: never again
        self.seconds = {"eager": 0.0, "graph": 0.0}  # after each level's first step (one-off costs)
        self.steps = {"eager": 0, "graph": 0}
        self.lock = threading.Lock()

    def level(self):
        if self.package:
            return "package"
        return "compiled" if self.function else "graph" if self.graph else "eager"

    def next_level(self, mode, remaining, awaiting_package=False):
        """The level to move to now under `mode` ("graph" or "compiled"), with `remaining` tokens to
        go, or None to stay; never "compiled" while `awaiting_package` (its builder is or may be at work)."""
        level = self.level()
        if level in ("package", "compiled") or mode == "never":
            return None
        if mode == "always":
            return None if self.failed else "compiled"
        if mode == "trace":
            return "graph" if level == "eager" else None
        if self.steps[level] < 2:  # measure this level's rate first (its first step has one-off costs)
            return None
        saved = self.seconds[level] * (1 + remaining / (self.steps[level] - 1))
        if not (self.failed or awaiting_package) and saved >= expected_compile_seconds(self.key):
            return "compiled"
        if level == "eager" and saved >= expected_trace_seconds():
            return "graph"
        return None


class Decoder:
    """generation's decode function on PyTorch: the same arguments and results as the compiled
    `jax.lax.while_loop` / `tf.while_loop` of the other backends, from a Python loop over steps.

    Args:
        model: the `NanoGPT`.
        sampler: the keras-hub token sampler.
        parts: its `decoding.TokenStep`.
        steps: the model's dict of `_Step`s, shared by its samplers.
        on_compile: called once for each trace of a step (generation counts them as traces).

    Example:
        >>> parts = decoding.token_step(model, sampler)  # doctest: +SKIP
        >>> decode = Decoder(model, sampler, parts, {}, lambda: None)  # doctest: +SKIP
        >>> state = decode(state, rows, np.array(16, "int32"))  # doctest: +SKIP
    """

    def __init__(self, model, sampler, parts, steps, on_compile):
        self.model = model
        self.sampler = sampler
        self.parts = parts
        self.steps = steps
        self.on_compile = on_compile
        self.draws = {}  # traced draws by signature
        # Samplers share a step where their steps are the same computation (keras-hub's token
        # samplers differ only in `get_next_token`, the draw).
        self.kind = (type(sampler).compute_probabilities, float(sampler.temperature))

    def __call__(self, state, rows, end):
        """Decode from `state.index` until `end`, or until no row wants more.

        Args:
            state: a `decoding.DecodeState` (arrays or tensors; `index` an int or a scalar).
            rows: a `decoding.Rows`.
            end: the slot to stop before (an int or a scalar).

        Returns:
            The new `decoding.DecodeState`, its `index` a Python int.
        """
        index, end = int(state.index), int(end)
        state, rows = keras.tree.map_structure(ops.convert_to_tensor, (state._replace(index=index), rows))
        mode = compile_mode()
        device = state.tokens.device
        token = torch.zeros(state.tokens.shape[:1], dtype=torch.int32, device=device)
        write = torch.tensor(False, device=device)
        signature = self._signature(state, rows, token)
        step = self.steps.get(signature)
        if step is None:
            (function, temperature), shapes = signature
            step = self.steps.setdefault(signature, _Step(_digest(
                self.model, (function.__module__, function.__qualname__, temperature), shapes)))
        last = min(end, int(rows.limit.max()))  # this window's last slot that any row wants
        with torch.no_grad():
            weights = [variable.value.detach() for variable in self.model.variables]
            layout = _Layout(len(weights), 2 * len(state.cache))
            awaiting = False  # the step's package may come: TorchInductor in this process would only compete with it
            if _packages_used():
                self._find_package(step, _flatten(weights, state._replace(
                    index=torch.tensor(index, dtype=torch.int32)), rows, token, write), layout)
                awaiting = step.package is None and _torch_aot.can_build(step.package_key)
            if device.type == "cuda":  # static inputs of the CUDA graphs, not copied in each replay
                for tensor in weights + _flat_cache(state.cache):
                    torch._dynamo.mark_static_address(tensor, guard=False)
            while True:
                state = state._replace(index=torch.tensor(index, dtype=torch.int32, device=device))
                target = step.next_level(mode, last - index, awaiting)
                if target:
                    self._move_up(step, target, _flatten(weights, state, rows, token, write), layout)
                level = step.level()
                if level == "eager":
                    start = time.perf_counter()
                    state, running, probabilities = self.parts.step(state, rows, token, write)
                else:
                    function = step.package or step.function or step.graph
                    start = time.perf_counter()
                    tokens, tail, done, running, probabilities = function(
                        *_flatten(weights, state, rows, token, write))
                    state = state._replace(tokens=tokens, tail=tail, done=done)
                if not bool(running):
                    break
                token, seeds = self._draw(level, probabilities, state.seeds, rows)
                state = state._replace(seeds=seeds)
                if level in step.steps:
                    if step.steps[level]:
                        step.seconds[level] += time.perf_counter() - start
                    step.steps[level] += 1
                index += 1
                if index >= end:  # the window's last token: written without running the model
                    last_slot = torch.tensor(index - 1, dtype=torch.int32, device=device)
                    state = self.parts.commit(state, rows, last_slot, token)
                    break
                write = torch.tensor(True, device=device)
        return state._replace(cache=_pairs(_flat_cache(state.cache)), index=index)

    def _draw(self, level, probabilities, seeds, rows):
        """The sampler's tokens and new seed state: eagerly with an eager step, else as a traced graph
        (`rows.top_k` and `rows.top_p` are its inputs: no value traces it again)."""
        if level == "eager":
            return self.parts.draw(probabilities, seeds, rows.top_k, rows.top_p)
        inputs = [probabilities, rows.top_k, rows.top_p, *seeds]
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        draw = self.draws.get(key)
        if draw is None:
            draw = self.draws[key] = _traced_draw(self.parts.draw, inputs)
        token, *seeds = draw(*inputs)
        return token, seeds

    def _signature(self, state, rows, token):
        """The step's kind and its inputs' shapes, dtypes and devices (all but the index and `write`)."""
        constants = (rows.lengths, rows.limit, state.tail, state.done, rows.stops, rows.temperature, rows.bias)
        tensors = [v.value for v in self.model.variables] + [state.tokens, *_flat_cache(state.cache), token,
                                                             *constants]
        return self.kind, tuple((tuple(t.shape), t.dtype, t.device.type) for t in tensors)

    def _move_up(self, step, target, example, layout):
        """Trace the step (`target` "graph") or compile it with TorchInductor ("compiled") for the
        flat inputs `example` (`_flatten`'s, laid out as `layout` says)."""
        with step.lock:
            if step.level() in (target, "compiled"):
                return
            start = time.perf_counter()
            if target == "graph":
                step.graph = _traced_step(self.model, self.parts.step, layout, example)
                _trace_seconds.append(time.perf_counter() - start)
                self.on_compile()
                self._request_package(step, example, layout)
                return
            try:
                step.function = _compiled_step(self.model, self.parts.step, layout, example, step.graph)
            except Exception as error:  # e.g. no C++ compiler for TorchInductor: stay as it was
                step.failed = True
                warnings.warn(f"Compiling the PyTorch decode step failed, so generation runs "
                              f"{'as a traced graph' if step.graph else 'eagerly'} (slower): "
                              f"{type(error).__name__}: {error}", RuntimeWarning, stacklevel=4)
                return
            seconds = time.perf_counter() - start
            if step.graph is None:  # traced inside the compilation
                self.on_compile()
            cold = step.key not in _records()
            if cold:
                _cold_compile_seconds.append(seconds)
            compile_log.append({"seconds": round(seconds, 2), "cold": cold})
            _record(step.key, seconds)


    def _find_package(self, step, example, layout):
        """Use the step's AOTInductor package where one is on disk (loaded once; a builder may have made
        it since the last call); inside `_torch_aot.building_now()` build a missing one first."""
        if step.package_key is None:
            step.package_key = _torch_aot.package_key(step.key, example[0].device)
        if step.package is None:
            step.package = _torch_aot.load(step.package_key)
        if (step.package is None and _torch_aot.builds_in_process()
                and _torch_aot.can_build(step.package_key)):
            build_package(step.package_key, _flat_step(self.model, self.parts.step, layout), example,
                          layout.num_weights)
            step.package = _torch_aot.load(step.package_key)

    def _request_package(self, step, example, layout):
        """A call that pays for tracing or compiling the step also pays for its package: start a builder
        in the background (once per step and process; `_torch_aot.spawn`)."""
        if step.package_key and not step.requested:
            step.requested = True
            if _torch_aot.can_build(step.package_key):
                import keras_hub

                sampler = keras_hub.samplers.serialize(self.sampler)
                _torch_aot.spawn(step.package_key, lambda path: _write_spec(
                    path, self.model, example, layout.num_weights, kind="step", sampler=sampler, layout=tuple(layout)))


class Prefill:
    """generation's prefill on PyTorch (`decoding.prefill`: the KV cache after the prompt), run from its
    AOTInductor package where one is on disk, else eagerly; the first eager run of a shape (generation pads
    prompts to power-of-two lengths) starts its package's builder, so later calls and programs use it.

    Eagerly the 4-layer, 128-wide model's 16-token prefill costs ~15 ms (Keras's layer calls), from its
    package ~1 ms; tracing it in the process (~0.7 s) would not pay back within a program's first calls
    (RESULTS.md). Packages are used as the decode step's are: the "auto" mode, not opted out.

    Args:
        model: the `NanoGPT`.

    Example:
        >>> cache = Prefill(model)(tokens, model.empty_cache(1))  # doctest: +SKIP
    """

    def __init__(self, model):
        self.model = model
        self.function = decoding.prefill(model)
        self.keys = {}  # package keys by the inputs' shapes, dtypes and devices
        self.packages = {}  # by package key: the loaded package's run function, or None (not on disk yet)
        self.requested = set()  # the package keys a builder was asked for (once per process)

    def __call__(self, tokens, cache):
        """The cache after `tokens` (`(batch, length)`) ran at positions 0.. against `cache`."""
        tokens, cache = keras.tree.map_structure(ops.convert_to_tensor, (tokens, cache))
        with torch.no_grad():
            weights = [variable.value.detach() for variable in self.model.variables]
            example = [*weights, tokens, *_flat_cache(cache)]
            run = self._package(example, len(weights)) if _packages_used() else None
            return _pairs(list(run(*example))) if run else self.function(tokens, cache)

    def _package(self, example, num_weights):
        """The package for the shapes of `example` (loaded once; built now inside `_torch_aot.building_now()`),
        or None after starting its builder."""
        shapes = tuple((tuple(t.shape), t.dtype, t.device.type) for t in example)
        if shapes not in self.keys:
            self.keys[shapes] = _torch_aot.package_key(_digest(self.model, "prefill", shapes), example[0].device)
        key = self.keys[shapes]
        if self.packages.get(key) is None:
            self.packages[key] = _torch_aot.load(key)
        if self.packages[key] is None and key not in self.requested and _torch_aot.can_build(key):
            self.requested.add(key)
            function = _flat_prefill(self.model, num_weights)
            if _torch_aot.builds_in_process():
                build_package(key, function, example, num_weights)
                self.packages[key] = _torch_aot.load(key)
            else:
                _torch_aot.spawn(key, lambda path: _write_spec(path, self.model, example, num_weights, kind="prefill"))
        return self.packages[key]


def _packages_used():
    """Whether AOTInductor packages are used now: the "auto" mode (or inside `_torch_aot.building_now()`), not
    opted out."""
    return (compile_mode() == "auto" or _torch_aot.builds_in_process()) and _torch_aot.enabled()


def _digest(model, kind, shapes):
    """A name for a function of `model` (`kind`: the step's sampler, or "prefill") for inputs of `shapes`
    (shape, dtype and device type each) that is the same in another process for the same computation."""
    config = {k: v for k, v in model.get_config().items() if k not in ("name", "vectorizer")}
    text = repr((torch.__version__, keras.__version__, _version.__version__,
                 json.dumps(config, sort_keys=True, default=str), kind, [(s, str(d), t) for s, d, t in shapes]))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _write_spec(path, model, example, num_weights, **what):
    """What a background builder (`_torch_aot_build`) needs to trace a function of `model` again: the model's
    config and device, the weights' shapes, the function's other inputs (as this call had them) and `what`
    (its `kind`, and for a step the sampler's config and the layout)."""
    weights = example[:num_weights]
    spec = {"model": keras.saving.serialize_keras_object(model), "device": str(weights[0].device),
            "weights": [(tuple(t.shape), str(t.dtype)) for t in weights],
            "inputs": [t.detach().clone() for t in example[num_weights:]], **what}
    with _files.atomic_path(path) as tmp:
        torch.save(spec, tmp)


def build_package(key, function, example, num_weights):
    """Trace `function` (`_flat_step`'s or `_flat_prefill`'s) for the flat inputs `example` (the weights first,
    `num_weights` of them) and compile it into the AOTInductor package `key` (`_torch_aot.build`)."""
    graph = _torch_tracing.trace(function, _copies(example, num_weights))
    return _torch_aot.build(key, graph, _copies(example, num_weights))


def _pairs(cache):
    return tuple(zip(cache[0::2], cache[1::2]))


def _flat_cache(pairs):
    return [tensor for pair in pairs for tensor in pair]  # keys, values, keys, ...


class _Layout(typing.NamedTuple):
    """How many of the traced step's flat inputs (`_flatten`'s) are weights, and how many the cache's tensors."""

    num_weights: int
    num_cache: int


def _flatten(weights, state, rows, token, write):
    """The step's arguments as the flat tensors its traced graph takes: the weights, the tokens, the
    cache's tensors (keys, values, keys, ...), the index, the token to write, `write`, then
    `lengths, limit, tail, done, stops, temperature, bias` (the state's seeds and the rows' `top_k`
    and `top_p` are the draw's inputs, not the step's).

    Example:
        >>> tensors = _flatten(weights, state, rows, token, write)  # doctest: +SKIP
    """
    return [*weights, state.tokens, *_flat_cache(state.cache), state.index, token, write,
            rows.lengths, rows.limit, state.tail, state.done, rows.stops, rows.temperature, rows.bias]


def _unflatten(tensors, layout):
    """`_flatten`'s inverse: `(weights, state, rows, token, write)`, the state with no seeds."""
    weights, tokens = tensors[:layout.num_weights], tensors[layout.num_weights]
    cache = tensors[layout.num_weights + 1:layout.num_weights + 1 + layout.num_cache]
    index, token, write, lengths, limit, tail, done, stops, temperature, bias = (
        tensors[layout.num_weights + 1 + layout.num_cache:])
    state = decoding.DecodeState(tokens, _pairs(cache), index, (), tail, done)
    rows = decoding.Rows(lengths, limit, stops, temperature, bias, top_k=None, top_p=None)  # the draw's
    return weights, state, rows, token, write


def _flat_step(model, step, layout):
    """`step` (`decoding.TokenStep.step`) as a function of `_flatten`'s flat tensors, the cache's
    updated in place; returns `(tokens, tail, done, running, probabilities)`."""
    variables = model.variables

    def flat_step(*tensors):
        weights, state, rows, token, write = _unflatten(tensors, layout)
        with keras.StatelessScope(state_mapping=list(zip(variables, weights))):
            new, running, probabilities = step(state, rows, token, write)
        for old, tensor in zip(_flat_cache(state.cache), _flat_cache(new.cache)):
            old.copy_(tensor)
        return new.tokens, new.tail, new.done, running, probabilities

    return flat_step


def _flat_prefill(model, num_weights):
    """`decoding.prefill` as a function of the flat tensors `weights..., tokens, cache...` (keys, values, keys,
    ...), returning the new cache's tensors."""
    variables, prefill = model.variables, decoding.prefill(model)

    def flat_prefill(*tensors):
        weights, tokens, cache = tensors[:num_weights], tensors[num_weights], list(tensors[num_weights + 1:])
        with keras.StatelessScope(state_mapping=list(zip(variables, weights))):
            return tuple(_flat_cache(prefill(tokens, _pairs(cache))))

    return flat_prefill


def _copies(example, num_weights):
    # Tracing runs the step for real, and it writes into the cache: trace on copies.
    return [t if i < num_weights else t.clone() for i, t in enumerate(example)]


def _traced_step(model, step, layout, example):
    """`_flat_step` traced into a lean ATen graph."""
    return _torch_tracing.trace(_flat_step(model, step, layout), _copies(example, layout.num_weights))


def _compiled_step(model, step, layout, example, graph=None):
    """`_flat_step` compiled by TorchInductor (from `graph`, where it was traced already)."""
    if example[0].device.type == "cuda":
        # CUDA graphs; the cache's buffers are static inputs (see `Decoder.__call__`).
        first_cache = layout.num_weights + 1
        for tensor in example[:layout.num_weights] + example[first_cache:first_cache + layout.num_cache]:
            torch._dynamo.mark_static_address(tensor, guard=False)
    example = _copies(example, layout.num_weights)
    if graph is None:
        graph = make_fx(_flat_step(model, step, layout))(*example)
    return _torch_tracing.inductor(graph, example)


def _traced_draw(draw, inputs):
    """The sampler's `draw(probabilities, seeds, top_k, top_p) -> (tokens, seeds)` as a traced graph of
    the flat tensors `inputs` (`probabilities, top_k, top_p, *seeds`), its categorical draw as one
    seeded operator (`_torch_keras_internals.traceable_draws`)."""

    def flat_draw(probabilities, top_k, top_p, *seeds):
        token, seeds = draw(probabilities, list(seeds), top_k, top_p)
        return (token, *seeds)

    with _torch_keras_internals.traceable_draws():
        return _torch_tracing.trace(flat_draw, [t.clone() for t in inputs])
