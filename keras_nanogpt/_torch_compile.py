"""PyTorch backend only: generation's decode loop with one token's step compiled by TorchInductor,
or run eagerly where compiling would not pay for itself.

Run eagerly, a token costs Keras's Python overhead for each of its ~44 layer calls (about 15 ms a
token at 4 layers x 128 wide on two CPU cores), far more than its arithmetic. Compiled, the step
(`generation._TokenStep`: write the previous token, run the model on it, the sampler's
probabilities) is one graph:

1. `make_fx` traces the step once into ATen operations, with the model's weights as inputs (Keras's
   layer machinery runs only while tracing: one model definition, no copy of it in plain torch).
   The KV cache's updates are copied back into the cache's own buffers, so the compiled graph
   writes one position a token in place instead of copying the cache.
2. `torch._inductor.compile` compiles the graph for its static shapes, with CUDA graphs on a GPU.
   There is one graph per sampler kind and shape (batch, window, stop sequences, dtypes), shared by
   the model's samplers and reused across prompts, seeds and training; the cache index is a tensor
   input, so no token recompiles. TorchInductor's on-disk caches (`TORCHINDUCTOR_CACHE_DIR`,
   `/tmp/torchinductor_<user>` by default) make a later process's compilation of the same graph
   cheaper.
3. Random samplers draw outside the graph: keras-hub's `get_next_token` with Keras's seeded torch
   generators, exactly as the eager step draws, so a seed gives the same tokens on either path.

When: a step is compiled once the eager time it would save (the time already spent running it
eagerly, plus the window's remaining tokens at the measured eager rate) reaches the expected
compilation time (`expected_compile_seconds`: less where TorchInductor's disk caches hold the
step already, which a record of earlier compilations beside them tells). As in
the ski-rental problem, that never costs more than about twice the better choice made in
hindsight, and a single short call never compiles. The environment variable
`KERAS_NANOGPT_TORCH_COMPILE` overrides the choice: `always` compiles at once, `never` never;
`auto` is the default.
"""

import hashlib
import json
import os
import threading
import time
import warnings

import keras
import torch
from keras import ops
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from keras_nanogpt import _files

ENVIRONMENT_VARIABLE = "KERAS_NANOGPT_TORCH_COMPILE"
MODES = ("auto", "always", "never")
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


class _Step:
    """The compiled step for one sampler kind and signature (None until compiled), and the time
    spent running it eagerly."""

    def __init__(self, key):
        self.key = key  # a digest of the model's config, the sampler kind, the shapes and versions
        self.function = None
        self.failed = False
        self.eager_seconds = 0.0
        self.eager_steps = 0
        self.lock = threading.Lock()

    def pays_to_compile(self, mode, remaining, expected_seconds):
        """Whether compiling now pays for itself under `mode`, with `remaining` tokens to go and
        `expected_seconds` of compilation."""
        if self.failed or mode == "never":
            return False
        if mode == "always":
            return True
        if not self.eager_steps:  # measure the eager rate first
            return False
        rate = self.eager_seconds / self.eager_steps
        return self.eager_seconds + remaining * rate >= expected_seconds


class Decoder:
    """generation's decode function on PyTorch: the same arguments and results as the compiled
    `jax.lax.while_loop` / `tf.while_loop` of the other backends, from a Python loop over steps.

    Args:
        model: the `NanoGPT`.
        sampler: the keras-hub token sampler.
        parts: its `generation._TokenStep`.
        steps: the model's dict of `_Step`s, shared by its samplers.
        on_compile: called once for each compilation (generation counts them as traces).
    """

    def __init__(self, model, sampler, parts, steps, on_compile):
        self.model = model
        self.parts = parts
        self.steps = steps
        self.on_compile = on_compile
        # Samplers share a graph where their steps are the same computation (keras-hub's token
        # samplers differ only in `get_next_token`, which runs outside the graph).
        self.kind = (type(sampler).compute_probabilities, float(sampler.temperature))

    def __call__(self, tokens, cache, index, end, lengths, limit, seeds, tail, done, stops,
                 temperature, bias):
        tokens, cache, lengths, limit, seeds, tail, done, stops, temperature, bias = keras.tree.map_structure(
            ops.convert_to_tensor, (tokens, cache, lengths, limit, seeds, tail, done, stops, temperature, bias))
        mode = compile_mode()
        index, end = int(index), int(end)
        cache = [tensor for pair in cache for tensor in pair]  # keys, values, keys, ...
        token = torch.zeros(tokens.shape[:1], dtype=torch.int32, device=tokens.device)
        write = torch.tensor(False, device=tokens.device)
        constants = (lengths, limit, tail, done, stops, temperature, bias)
        signature = self._signature(tokens, cache, token, constants)
        step = self.steps.get(signature)
        if step is None:
            step = self.steps.setdefault(signature, _Step(self._digest(signature)))
        last = min(end, int(limit.max()))  # this window's last slot that any row wants
        expected = None if step.function or mode != "auto" else expected_compile_seconds(step.key)
        with torch.no_grad():
            weights = [variable.value.detach() for variable in self.model.variables]
            if tokens.device.type == "cuda":  # static inputs of the CUDA graphs, not copied in each replay
                for tensor in weights + cache:
                    torch._dynamo.mark_static_address(tensor, guard=False)
            while True:
                position = torch.tensor(index, dtype=torch.int32, device=tokens.device)
                if step.function is None and step.pays_to_compile(mode, last - index, expected):
                    self._compile(step, weights, tokens, cache, position, token, write, constants)
                if step.function is not None:
                    tokens, tail, done, running, probabilities = step.function(
                        *weights, tokens, *cache, position, token, write, lengths, limit, tail, done,
                        stops, temperature, bias)
                else:
                    start = time.perf_counter()
                    tokens, pairs, tail, done, running, probabilities = self.parts.step(
                        tokens, _pairs(cache), position, token, write, lengths, limit, tail, done,
                        stops, temperature, bias)
                    cache = [tensor for pair in pairs for tensor in pair]
                    step.eager_seconds += time.perf_counter() - start
                    step.eager_steps += 1
                constants = (lengths, limit, tail, done, stops, temperature, bias)
                if not bool(running):
                    break
                token, seeds = self.parts.draw(probabilities, seeds)
                index += 1
                if index >= end:  # the window's last token: written without running the model
                    last_slot = torch.tensor(index - 1, dtype=torch.int32, device=tokens.device)
                    tokens, tail, done = self.parts.commit(
                        tokens, last_slot, token, lengths, limit, tail, done, stops)
                    break
                write = torch.tensor(True, device=tokens.device)
        return tokens, _pairs(cache), index, seeds, tail, done

    def _signature(self, tokens, cache, token, constants):
        tensors = [v.value for v in self.model.variables] + [tokens, *cache, token, *constants]
        return self.kind, tuple((tuple(t.shape), t.dtype, t.device.type) for t in tensors)

    def _digest(self, signature):
        """A name for the step that is the same in another process for the same computation."""
        import keras_nanogpt

        config = {k: v for k, v in self.model.get_config().items() if k not in ("name", "vectorizer")}
        (function, temperature), shapes = signature
        text = repr((torch.__version__, keras.__version__, keras_nanogpt.__version__,
                     json.dumps(config, sort_keys=True, default=str), function.__module__,
                     function.__qualname__, temperature, [(s, str(d), t) for s, d, t in shapes]))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _compile(self, step, weights, tokens, cache, position, token, write, constants):
        """Trace the step into ATen operations and compile it with TorchInductor (see the module)."""
        with step.lock:
            if step.function is not None or step.failed:
                return
            start = time.perf_counter()
            try:
                step.function = _compiled_step(self.model, self.parts.step, len(weights), len(cache), [
                    *weights, tokens, *cache, position, token, write, *constants])
            except Exception as error:  # e.g. no C++ compiler for TorchInductor: stay eager
                step.failed = True
                warnings.warn(f"Compiling the PyTorch decode step failed, so generation runs eagerly "
                              f"(slower): {type(error).__name__}: {error}", RuntimeWarning, stacklevel=4)
                return
            seconds = time.perf_counter() - start
            cold = step.key not in _records()
            if cold:
                _cold_compile_seconds.append(seconds)
            compile_log.append({"seconds": round(seconds, 2), "cold": cold})
            _record(step.key, seconds)
            self.on_compile()


def _pairs(cache):
    return tuple(zip(cache[0::2], cache[1::2]))


def _compiled_step(model, step, num_weights, num_cache, example):
    """`step` as one TorchInductor graph over flat tensors: the weights, tokens, the cache's tensors
    (updated in place), then the step's other arguments; returns `(tokens, tail, done, running,
    probabilities)`."""
    variables = model.variables

    def flat_step(*tensors):
        weights, tokens = tensors[:num_weights], tensors[num_weights]
        cache = tensors[num_weights + 1:num_weights + 1 + num_cache]
        rest = tensors[num_weights + 1 + num_cache:]
        with keras.StatelessScope(state_mapping=list(zip(variables, weights))):
            tokens, pairs, tail, done, running, probabilities = step(tokens, _pairs(cache), *rest)
        for old, new in zip(cache, [tensor for pair in pairs for tensor in pair]):
            old.copy_(new)
        return tokens, tail, done, running, probabilities

    # Trace on copies: tracing runs the step for real, and it writes into the cache.
    example = [t if i < num_weights else t.clone() for i, t in enumerate(example)]
    graph = make_fx(flat_step)(*example)
    if example[0].device.type == "cuda":
        # CUDA graphs; the cache's buffers are static inputs (see `Decoder.__call__`).
        for tensor in example[:num_weights] + example[num_weights + 1:num_weights + 1 + num_cache]:
            torch._dynamo.mark_static_address(tensor, guard=False)
        compiled = torch.compile(graph, mode="reduce-overhead", fullgraph=True, dynamic=False)
    else:
        # TorchInductor without Dynamo (nothing left to trace, no guards to check at each token),
        # given fake inputs with a shape environment as Dynamo gives it: its on-disk caches need one.
        # One thread for its C++ kernels: one token's attention and norms are a few microseconds of
        # work, and OpenMP's barriers inside a kernel cost more (milliseconds on a busy machine);
        # the matrix multiplies stay ATen's, on all of torch's threads.
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        compiled = torch._inductor.compile(
            graph, [fake_mode.from_tensor(t, static_shapes=True) for t in example],
            options={"cpp.threads": 1})
    compiled(*example)  # compiles now where compiling waits for a first call
    return compiled
