"""Text generation: a KV-cached decode loop compiled once per backend and shape, keras-hub samplers,
stop sequences, batches of prompts and streaming.

How a call runs:

1. Prompts become rows of token ids (text goes through the model's vectorizer), each cropped to its
   last `sequence_length` tokens for the model. The rows sit left-aligned in one token buffer, the
   window, whose KV cache has a power-of-two length (16 at least, `sequence_length` at most) big
   enough for the longest prompt plus `max_new_tokens`: a handful of shapes serve every call.
2. Prefill: the prompt positions that all rows share run through `NanoGPT.call_with_cache` at once.
3. Decode: one compiled loop makes all the new tokens: `jax.lax.while_loop` under `jax.jit` on JAX,
   `tf.while_loop` under `tf.function(jit_compile=True)` on TensorFlow, a Python loop under
   `torch.no_grad()` on PyTorch. Each step feeds every row's token at `index - 1` and writes the
   sampled token at `index`, except where a row's longer prompt still has a token there (as
   keras-hub's samplers do), so prompts of different lengths share a batch and each row gets the
   tokens it would get alone. The weights are arguments of the compiled functions: new prompts,
   new seeds and training do not retrace them.
4. Past the context, the window slides: a row sees at most `sequence_length` tokens. When its window
   is full and more tokens are wanted, its last `sequence_length // 2` tokens (at least 1) are
   prefilled again at positions 0.. and decoding goes on. Each new token thus sees between
   `sequence_length // 2` and `sequence_length` tokens of context, exactly what a plain loop gives
   that recomputes the whole context each step and moves the context's start that way. (nanoGPT
   crops to the last `sequence_length` tokens at every step instead: a full forward pass per token.)

Samplers are keras-hub's (`keras_hub.samplers`): `temperature`, `top_k` and `top_p` choose greedy,
random, top-k or top-p sampling; `sampler=` takes any keras-hub sampler object or name. Token
samplers (greedy, random, top-k, top-p and the like) run inside the loop above; search samplers
(beam, contrastive) run their own keras-hub loop, compiled the same way, window by window (each
window starts the search afresh from the best row so far).
"""

import numbers
import typing

import keras
import numpy as np
from keras import ops

from keras_nanogpt import _validation

SAMPLERS = ("greedy", "random", "top_k", "top_p", "beam", "contrastive")
_MIN_BUCKET = 16


def generate(model, prompt, max_new_tokens=100, temperature=1.0, top_k=None, top_p=None,
             sampler=None, seed=None, stop=None):
    """Continue `prompt` with up to `max_new_tokens` new tokens.

    Args:
        model: a `NanoGPT`.
        prompt: a string or a list of strings (the model needs a vectorizer), or int ids
            `(batch, time)`. A prompt longer than the context is cropped from the left for the
            model (the output keeps all of it). Characters the vocabulary lacks become its
            out-of-vocabulary token, with a warning.
        max_new_tokens: number of tokens to add (>= 0), or a list of them, one per prompt row.
        temperature: softmax temperature (> 0), or 0 for greedy decoding.
        top_k: sample only among the `top_k` most likely tokens (>= 1; None: all).
        top_p: sample only among the most likely tokens whose probabilities add up to `top_p`
            (nucleus sampling, in (0, 1]; None: all). Combines with `top_k` and `temperature`.
        sampler: a keras-hub sampler object or name (one of `SAMPLERS`, with keras-hub's defaults,
            e.g. 5 beams) instead of temperature/top_k/top_p.
        seed: integer seed: the same seed gives the same tokens (on one backend). None: fresh draws.
        stop: stop sequences: a string, a token id, or a list of strings, ids and lists of ids. A
            row ends where the first stop sequence in its new tokens begins; the stop sequence is
            not included. Generation ends early once every row has stopped.

    Returns:
        For a string, the prompt followed by the new text; for a list of strings, a list of those.
        For ids, `(batch, time + n)` ids, n the new tokens of the longest row (`max_new_tokens`
        unless every row stopped early); rows that stopped sooner are padded with 0.
        Text prompts never produce the padding id 0.

    Example:
        >>> generate(model, "It is a truth", max_new_tokens=20, top_k=40, seed=0)  # doctest: +SKIP
    """
    job = _Job(model, prompt, max_new_tokens, temperature, top_k, top_p, sampler, seed, stop)
    for _ in job.run(stream=False):
        pass
    return job.result()


def stream(model, prompt, max_new_tokens=100, temperature=1.0, top_k=None, top_p=None,
           sampler=None, seed=None, stop=None):
    """Yield the new text piece by piece as it is made; arguments as `generate`.

    `prompt + "".join(pieces) == generate(...)` for the same arguments and seed. A piece that may
    still become a stop sequence is held back until it cannot. Token samplers yield each token as
    it is made, search samplers (beam, contrastive) once per context window.

    Returns:
        A `Stream`: an iterator of the pieces that can also end rows early (`Stream.cancel`).

    Yields:
        For a string prompt, strings. For a list of strings, lists with one string per prompt; for
        ids, lists with one 1-D int array of new ids per row (empty where nothing is new).

    Example:
        >>> for piece in stream(model, "It is a truth", max_new_tokens=50):  # doctest: +SKIP
        ...     print(piece, end="", flush=True)
    """
    job = _Job(model, prompt, max_new_tokens, temperature, top_k, top_p, sampler, seed, stop)
    return Stream(job)


class Stream:
    """The iterator `stream` returns; it can also end a row early and tell how each row ended.

    Rows run in one batch: `cancel(row)` makes no more tokens for that row (it keeps what it has),
    so the batch ends as soon as the other rows do. A server uses it when a client goes away.

    Example:
        >>> pieces = stream(model, ["It is", "He"], max_new_tokens=50)  # doctest: +SKIP
        >>> first = next(pieces); pieces.cancel(1)  # row 0 goes on to 50 tokens, row 1 stops here
    """

    def __init__(self, job):
        self._job = job
        self._pieces = _pieces(job)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._pieces)

    def cancel(self, row):
        """Make no more tokens for prompt row `row`."""
        self._job.stopped[row] = self._job.cancelled[row] = True

    def token_count(self, row):
        """How many new tokens the row has so far (stop sequences cut off)."""
        return len(self._job.new_ids[row])

    def finish_reason(self, row):
        """None while the row runs; then "stop" (it met a stop sequence), "length" (it made its
        `max_new_tokens`) or "cancelled"."""
        job = self._job
        if job.cancelled[row]:
            return "cancelled"
        if job.stopped[row]:
            return "stop"
        return "length" if len(job.new_ids[row]) == job.limits[row] else None


def check_arguments(max_new_tokens=100, temperature=1.0, top_k=None, top_p=None, sampler=None,
                    seed=None, stop=None):
    """Check the arguments of `generate` that do not depend on the model, raising as `generate` would.

    Lets a caller (a callback, the command line) refuse bad settings before training starts.

    Returns:
        `(max_new_tokens, temperature, top_k, top_p, seed)`, checked. `stop` is taken (so every keyword
        of `generate` is) but needs the model's vocabulary: `generate` checks it.

    Example:
        >>> check_arguments(max_new_tokens=20, top_p=0.9)
        (20, 1.0, None, 0.9, None)
    """
    if isinstance(max_new_tokens, (list, tuple)):  # one per prompt row
        max_new_tokens = [_validation.check_int("max_new_tokens", m, minimum=0) for m in max_new_tokens]
    else:
        max_new_tokens = _validation.check_int("max_new_tokens", max_new_tokens, minimum=0)
    temperature = _validation.check_float("temperature", temperature, 0.0, float("inf"))
    if top_k is not None:
        top_k = _validation.check_int("top_k", top_k)
    if top_p is not None:
        top_p = _validation.check_float("top_p", top_p, 0.0, 1.0, low_inclusive=False, high_inclusive=True)
    if seed is not None:
        seed = _validation.check_int("seed", seed, minimum=0)
    if sampler is not None:
        if temperature != 1.0 or top_k is not None or top_p is not None:
            raise ValueError("Pass either `sampler` or temperature/top_k/top_p, not both; got "
                             f"sampler={sampler!r}, temperature={temperature}, top_k={top_k}, "
                             f"top_p={top_p}.")
        if isinstance(sampler, str):
            _validation.check_choice("sampler", sampler, SAMPLERS)
    return max_new_tokens, temperature, top_k, top_p, seed


def _pieces(job):
    sent = [0] * job.batch
    sent_text = [""] * job.batch  # the text of each row's `sent` tokens, so it is decoded once
    for _ in job.run(stream=True):
        ready = [job.ready(row) for row in range(job.batch)]
        if ready == sent:
            continue
        if job.kind == "ids":
            pieces = [np.asarray(ids[old:new], "int32") for ids, old, new in zip(job.new_ids, sent, ready)]
        else:
            texts = [job.new_text(row, new) for row, new in enumerate(ready)]
            pieces = [text[len(old):] for text, old in zip(texts, sent_text)]
            sent_text = texts
        sent = ready
        yield pieces[0] if job.kind == "text" else pieces


class _Job:
    """One generate/stream call: the checked arguments, the rows, and the host side of decoding."""

    def __init__(self, model, prompt, max_new_tokens, temperature, top_k, top_p, sampler, seed, stop):
        self.model = model
        max_new_tokens, temperature, top_k, top_p, self.seed = check_arguments(
            max_new_tokens, temperature, top_k, top_p, sampler, seed)
        self.compiled = _compiled(model)
        self.sampler, self.temperature = self.compiled.sampler(sampler, temperature, top_k, top_p)
        self.kind, self.texts, self.prompts = _prompt_rows(model, prompt)
        self.stops = _stop_sequences(model, stop)
        self.batch = len(self.prompts)
        if isinstance(max_new_tokens, list) and len(max_new_tokens) != self.batch:
            raise ValueError(f"`max_new_tokens` holds {len(max_new_tokens)} numbers for {self.batch} "
                             f"prompt rows; give one number, or one per row.")
        self.limits = np.broadcast_to(np.array(max_new_tokens, "int32"), (self.batch,))  # per row
        self.new_ids = [[] for _ in self.prompts]
        self.stopped = [False] * self.batch    # met a stop sequence, or cancelled
        self.cancelled = [False] * self.batch  # ended by `Stream.cancel`

    def run(self, stream):
        """Fill `self.new_ids`, yielding after each compiled call (each token when streaming)."""
        if not self.limits.any():
            return
        window = _Window(self)
        while True:
            start = window.index
            window.advance(stream)
            self._collect(window, start)
            yield
            if all(self.stopped[row] or len(self.new_ids[row]) == self.limits[row]
                   for row in range(self.batch)):
                return
            if window.full:
                window.slide()

    def _collect(self, window, start):
        """Take the new tokens at window slots `start..window.index` and cut rows at their stops."""
        for row in range(self.batch):
            if self.stopped[row]:
                continue
            ids = self.new_ids[row]
            before = len(ids)
            first = max(start, int(window.lengths[row]))
            last = max(first, min(window.index, int(window.limit[row])))  # limit < 0 once a row is done
            ids.extend(int(t) for t in window.tokens[row, first:last])
            stop_at = _first_stop(ids, self.stops, before)
            if stop_at is not None:
                del ids[stop_at:]
                self.stopped[row] = True

    def ready(self, row):
        """How many of the row's new tokens are final (cannot be the start of a stop sequence)."""
        ids = self.new_ids[row]
        if self.stopped[row] or len(ids) == self.limits[row]:
            return len(ids)
        held = max((k for stop in self.stops for k in range(1, len(stop))
                    if k <= len(ids) and tuple(ids[-k:]) == stop[:k]), default=0)
        return len(ids) - held

    def new_text(self, row, count):
        """The text of the row's first `count` new tokens, decoded after the prompt's last token
        (so a word-level vocabulary puts its space in front)."""
        from keras_nanogpt import data

        vectorizer, last = self.model.vectorizer, int(self.prompts[row][-1])
        head = data.decode(vectorizer, [last])
        return data.decode(vectorizer, [last, *self.new_ids[row][:count]])[len(head):]

    def result(self):
        if self.kind == "ids":
            new = np.zeros((self.batch, max(len(ids) for ids in self.new_ids)), "int32")
            for row, ids in enumerate(self.new_ids):
                new[row, :len(ids)] = ids
            return np.concatenate([np.stack(self.prompts).astype("int32"), new], axis=1)
        texts = [text + self.new_text(row, len(self.new_ids[row])) for row, text in enumerate(self.texts)]
        return texts[0] if self.kind == "text" else texts


class _Window:
    """The token window on the host and the decode state on the device, for one job."""

    def __init__(self, job):
        self.job = job
        context = job.model.sequence_length
        rows = [ids[-context:] for ids in job.prompts]
        self.lengths = np.array([len(ids) for ids in rows], "int32")  # prompt tokens in the window
        self.limit = self.lengths + job.limits                       # where each row has all it needs
        self.search = not _is_token_sampler(job.sampler)
        # The cache has `slots` positions; the window holds one token more (the newest token is
        # never fed back), except with search samplers, whose look-ahead feeds every slot.
        self.slots = min(context, _bucket(int(self.limit.max())))
        self.width = self.slots if self.search else self.slots + 1
        self.keep = max(1, context // 2)
        self.tokens = np.zeros((job.batch, self.width), "int32")
        for row, ids in enumerate(rows):
            self.tokens[row, :len(ids)] = ids
        self.index = int(self.lengths.min())  # the next slot to write
        self.cache = None
        self.bias = _logit_bias(job)
        seeds = [np.asarray(ops.convert_to_numpy(v.value)) for v in job.sampler.variables]
        if job.seed is not None:  # the same seed, the same draws: restart the sampler's generators
            seeds = [np.array([job.seed & 0x7FFFFFFF, i], s.dtype) for i, s in enumerate(seeds)]
        self.seeds = seeds
        length = max([len(stop) for stop in job.stops], default=1)
        self.stops = np.full((len(job.stops), length), -1, "int32")  # right-aligned; -1 matches all
        for i, stop in enumerate(job.stops):
            self.stops[i, length - len(stop):] = stop
        self.tail = np.full((job.batch, length), -1, "int32")  # each row's last new tokens
        self.done = np.zeros((job.batch,), bool)              # rows that met a stop sequence

    @property
    def full(self):
        return self.index == self.width

    def advance(self, stream):
        """Run the compiled decode from `index` to the window's end (one token when streaming)."""
        compiled, job = self.job.compiled, self.job
        if self.search:
            self.tokens = compiled.search(job.sampler, job.stops, self.tokens, self.lengths,
                                          self.index, self.bias)
            self.index = self.width
            return
        if self.cache is None:
            self.cache = job.model.empty_cache(job.batch, self.slots)
            self.cache = compiled.prefill(self.tokens, self.index, self.cache)
        end = self.index + 1 if stream else self.width
        outputs = compiled.decode(job.sampler, dict(
            tokens=self.tokens, cache=self.cache, index=np.array(self.index, "int32"),
            end=np.array(end, "int32"), lengths=self.lengths, limit=self.limit, seeds=self.seeds,
            tail=self.tail, done=self.done, stops=self.stops,
            temperature=np.array(job.temperature, "float32"), bias=self.bias))
        tokens, self.cache, index, self.seeds, self.tail, self.done = outputs
        for variable, value in zip(job.sampler.variables, self.seeds):
            variable.assign(value)  # without a seed, the next call draws on from here
        self.tokens = np.asarray(ops.convert_to_numpy(tokens))
        self.index = int(ops.convert_to_numpy(index))

    def slide(self):
        """Keep the window's last `keep` tokens at slots 0.., to be prefilled again."""
        shift = self.width - self.keep
        self.tokens = np.concatenate(
            [self.tokens[:, shift:], np.zeros((self.job.batch, shift), "int32")], axis=1)
        self.lengths = np.maximum(self.lengths - shift, 0)
        self.limit = self.limit - shift
        self.index = self.keep
        if self.cache is not None:
            self.cache = self.job.compiled.prefill(self.tokens, self.index, self.cache)


def _first_stop(ids, stops, since=0):
    """Where the first stop sequence in `ids` that ends after `since` begins, or None."""
    for end in range(since + 1, len(ids) + 1):
        starts = [end - len(stop) for stop in stops
                  if end >= len(stop) and tuple(ids[end - len(stop):end]) == stop]
        if starts:
            return min(starts)
    return None


def _bucket(length):
    return max(_MIN_BUCKET, 1 << max(0, length - 1).bit_length())


def _logit_bias(job):
    """Added to the logits: -inf on the padding id 0 for text prompts (it decodes to nothing)."""
    bias = np.zeros((job.model.vocabulary_size,), "float32")
    if job.kind != "ids":
        from keras_nanogpt import data

        if data.decode(job.model.vectorizer, [0]) == "":
            bias[0] = -np.inf
    return bias


def _is_token_sampler(sampler):
    """Whether the sampler picks one token from probabilities (keras-hub's base loop), not a search."""
    import keras_hub

    return type(sampler).__call__ is keras_hub.samplers.Sampler.__call__


def _prompt_rows(model, prompt):
    """`(kind, texts, rows)`: kind "text", "texts" or "ids"; rows are 1-D int32 arrays."""
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                   and all(isinstance(p, str) for p in prompt)):
        kind, texts = ("text", [prompt]) if isinstance(prompt, str) else ("texts", list(prompt))
        from keras_nanogpt import tokenizers

        return kind, texts, [tokenizers.prompt_ids(model.vectorizer, text) for text in texts]
    try:
        ids = np.asarray(prompt)
    except ValueError:  # ragged lists
        ids = np.asarray([], dtype=object)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"`prompt` must be a string, a list of strings or integer ids of shape "
                         f"(batch, time) with time >= 1; got shape {ids.shape} of {ids.dtype}.")
    _validation.check_ids("prompt", ids, model.vocabulary_size)
    return "ids", None, list(ids.astype("int32"))


def _stop_sequences(model, stop):
    """The stop sequences as tuples of token ids."""
    if stop is None:
        return []
    items = [stop] if isinstance(stop, (str, numbers.Integral)) else stop
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"`stop` must be a string, a token id or a list of them; got {type(stop).__name__}.")
    sequences = []
    for item in items:
        if isinstance(item, str):
            if model.vectorizer is None:
                raise ValueError(f"A `stop` string ({item!r}) needs a model with a `vectorizer`; "
                                 f"pass token ids instead.")
            from keras_nanogpt import data

            ids = tuple(int(i) for i in data.encode(model.vectorizer, item))
        elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
            ids = (int(item),)
        elif isinstance(item, (list, tuple)) and all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in item):
            ids = tuple(int(i) for i in item)
        else:
            raise TypeError(f"`stop` items must be strings, token ids or lists of ids; got {item!r}.")
        if not ids:
            raise ValueError(f"`stop` sequence {item!r} holds no tokens.")
        _validation.check_ids("stop", np.array(ids), model.vocabulary_size)
        sequences.append(ids)
    return sequences


def compiled_function(model, key, build):
    """`build()` compiled for the backend (see `_compile`), made once per `key` and kept with the
    model's generation functions (other modules' compiled model functions, e.g. scoring's)."""
    compiled = _compiled(model)
    return compiled._function(key, lambda: _compile(model, build(), compiled._count_trace))


def _compiled(model):
    """The model's `_Compiled` functions, made on first use and kept on the model; made again when
    the model's variables changed (LoRA enabled or merged, quantization)."""
    compiled = getattr(model, "_kn_generation", None)
    if compiled is None or not compiled.current():
        compiled = _Compiled(model)
        object.__setattr__(model, "_kn_generation", compiled)  # not a tracked Keras attribute
    return compiled


class _Compiled:
    """Per model: samplers by setting, compiled functions by sampler, and how often they traced."""

    def __init__(self, model):
        self.model = model
        self.variables = tuple(model.variables)  # the functions below take exactly these
        self.samplers = {}
        self.functions = {}
        self.steps = {}  # PyTorch: compiled decode steps by sampler kind and shapes (_torch_compile)
        self.traces = 0  # traces (JAX, TensorFlow) or compilations (PyTorch) of the functions below

    def sampler(self, sampler, temperature, top_k, top_p):
        """`(sampler, temperature)`: a keras-hub sampler (the same object for the same settings,
        so its compiled loop is reused) and the temperature the logits are divided by."""
        import keras_hub

        if sampler is not None:  # a name is checked by `check_arguments` already
            if isinstance(sampler, str):
                if sampler not in self.samplers:
                    self.samplers[sampler] = keras_hub.samplers.get(sampler)
                return self.samplers[sampler], 1.0
            if not isinstance(sampler, keras_hub.samplers.Sampler):
                raise TypeError(f"`sampler` must be a keras_hub.samplers.Sampler or one of {SAMPLERS}; "
                                f"got {type(sampler).__name__}.")
            return sampler, 1.0
        vocabulary = self.model.vocabulary_size
        top_k = None if top_k is None or top_k >= vocabulary else top_k
        samplers = keras_hub.samplers
        if temperature == 0:
            key, make = ("greedy",), samplers.GreedySampler
        elif top_p is not None and top_p < 1:
            key, make = ("top_p", top_p, top_k), lambda: samplers.TopPSampler(p=top_p, k=top_k)
        elif top_k is not None:
            key, make = ("top_k", top_k), lambda: samplers.TopKSampler(k=top_k)
        else:
            key, make = ("random",), samplers.RandomSampler
        if key not in self.samplers:
            self.samplers[key] = make()
        return self.samplers[key], temperature or 1.0

    def current(self):
        """Whether the model still has exactly the variables these functions were made for."""
        variables = self.model.variables
        return len(variables) == len(self.variables) and all(
            a is b for a, b in zip(variables, self.variables))

    def _function(self, key, make):
        if key not in self.functions:
            self.functions[key] = make()
        return self.functions[key]

    def _count_trace(self):
        self.traces += 1

    def prefill(self, tokens, index, cache):
        """Fill the cache at the window's first `index - 1` positions (rounded up to a power of two)."""
        if index <= 1:
            return cache
        length = min(ops.shape(cache[0][0])[-1], _bucket(index - 1))
        model = self.model
        prefill = self._function("prefill", lambda: _compile(
            model, lambda t, c: model.call_with_cache(t, c, 0)[2], self._count_trace))
        return prefill(tokens[:, :length], cache)

    def decode(self, sampler, arguments):
        return self._function(("decode", sampler), lambda: _compile_decode(self, sampler))(**arguments)

    def search(self, sampler, stops, tokens, lengths, index, bias):
        # keras-hub's search loops stop early on single-token stop ids only; longer stop sequences
        # are cut afterwards.
        stop_ids = tuple(sorted(stop[0] for stop in stops if len(stop) == 1)) or None
        function = self._function(("search", sampler, stop_ids), lambda: _compile(
            self.model, _search_function(self.model, sampler, stop_ids), self._count_trace))
        return np.asarray(ops.convert_to_numpy(function(tokens, lengths, np.array(index, "int32"), bias)))


def _decode_function(model, sampler):
    """The decode loop: from `index` until `end`, or until every row is done or met a stop."""

    def decode(tokens, cache, index, end, lengths, limit, seeds, tail, done, stops, temperature, bias):
        def cond(tokens, cache, index, seeds, tail, done):
            return ops.logical_and(index < end, _running(index, limit, done))

        def body(tokens, cache, index, seeds, tail, done):
            logits, cache = _next_logits(model, tokens, cache, index, temperature, bias)
            token, seeds = _sample(sampler, logits, seeds)
            tokens, tail, done = _commit(tokens, index, token, lengths, limit, tail, done, stops)
            return tokens, cache, index + 1, seeds, tail, done

        return ops.while_loop(cond, body, (tokens, cache, index, seeds, tail, done))

    return decode


class _TokenStep(typing.NamedTuple):
    """The decode loop's body as parts, for a backend that compiles one token's step (PyTorch).

    `step(tokens, cache, index, token, write, lengths, limit, tail, done, stops, temperature, bias)`
    writes `token` at slot `index - 1` where `write` (a boolean scalar) holds and the row's prompt
    has no token there, runs the model on slot `index - 1`, and returns `(tokens, cache, tail, done,
    running, probabilities)`: `running`, whether some row still wants slot `index`, and the
    sampler's probabilities for it. `draw(probabilities, seeds)` gives `(tokens, seeds)`; `commit`
    is `_commit`.
    """

    step: typing.Callable
    draw: typing.Callable
    commit: typing.Callable


def _token_step(model, sampler):
    """The `_TokenStep` of the decode loop for `sampler`."""

    def step(tokens, cache, index, token, write, lengths, limit, tail, done, stops, temperature, bias):
        tokens, tail, done = _commit(tokens, index - 1, token, lengths, limit, tail, done, stops, write)
        logits, cache = _next_logits(model, tokens, cache, index, temperature, bias)
        probabilities = sampler.compute_probabilities(logits)
        return tokens, cache, tail, done, _running(index, limit, done), probabilities

    return _TokenStep(step, lambda probabilities, seeds: _draw(sampler, probabilities, seeds), _commit)


def _next_logits(model, tokens, cache, index, temperature, bias):
    """The logits for slot `index` (divided by `temperature`, plus `bias`): the model run on each row's
    token at `index - 1`, which also goes into the cache. Returns `(logits, cache)`."""
    fed = ops.take(tokens, ops.reshape(index - 1, (1,)), axis=1)  # (batch, 1)
    logits, _, cache = model.call_with_cache(fed, cache, index - 1)
    return logits[:, 0] / temperature + bias, cache


def _commit(tokens, index, token, lengths, limit, tail, done, stops, write=None):
    """Write `token` at slot `index` in the rows whose prompt has no token there (and where `write`),
    and mark the rows whose new tokens now end with a stop sequence. Returns `(tokens, tail, done)`."""
    generated = index >= lengths  # (batch,) False where the prompt has a token here
    if write is not None:
        generated = ops.logical_and(generated, write)
    token = ops.where(generated, token, ops.take(tokens, index, axis=1))
    tokens = ops.slice_update(tokens, [0, index], token[:, None])
    if ops.shape(stops)[0] > 0:
        tail, done = _match_stops(tail, done, token, ops.logical_and(generated, index < limit), stops)
    return tokens, tail, done


def _running(index, limit, done):
    """Whether some row has not met a stop and still wants a token at slot `index`."""
    return ops.logical_not(ops.all(ops.logical_or(done, index >= limit)))


def _sample(sampler, logits, seeds):
    """One token per row from the keras-hub sampler, its seed generators' state passed in and out."""
    return _draw(sampler, sampler.compute_probabilities(logits), seeds)


def _draw(sampler, probabilities, seeds):
    """The sampler's tokens for `probabilities`, its seed generators' state passed in and out."""
    variables = sampler.variables
    with keras.StatelessScope(state_mapping=list(zip(variables, seeds))) as scope:
        token = sampler.get_next_token(probabilities)
    return ops.cast(token, "int32"), [scope.get_current_value(v) for v in variables]


def _match_stops(tail, done, token, counts, stops):
    """Push `token` onto each counted row's tail and mark rows whose tail ends with a stop sequence."""
    tail = ops.where(counts[:, None], ops.concatenate([tail[:, 1:], token[:, None]], axis=1), tail)
    equal = ops.logical_or(tail[:, None, :] == stops[None], stops[None] < 0)  # (batch, stops, length)
    met = ops.any(ops.all(equal, axis=-1), axis=-1)
    return tail, ops.logical_or(done, ops.logical_and(counts, met))


def _search_function(model, sampler, stop_ids):
    """A keras-hub search sampler (beam, contrastive) over the whole window, after one prefill."""
    heads, head_dim = model.num_heads, model.hidden_dim // model.num_heads

    def search(tokens, lengths, index, bias):
        batch, width = ops.shape(tokens)
        # keras-hub's samplers repeat the cache along axis 0 for the beams: give them the batch there.
        def split(cache):
            return tuple((ops.reshape(k, (-1, heads, head_dim, width)),
                          ops.reshape(v, (-1, heads, width, head_dim))) for k, v in cache)

        def merge(cache):
            return tuple((ops.reshape(k, (-1, head_dim, width)), ops.reshape(v, (-1, width, head_dim)))
                         for k, v in cache)

        def next(prompt, cache, index):
            fed = ops.slice(prompt, [0, index - 1], [ops.shape(prompt)[0], 1])
            logits, hidden, cache = model.call_with_cache(fed, merge(cache), index - 1)
            return logits[:, 0] + bias, hidden[:, 0], split(cache)

        _, hidden, cache = model.call_with_cache(tokens, model.empty_cache(batch, width), 0)
        mask = ops.arange(width, dtype="int32")[None, :] < lengths[:, None]
        return sampler(next, tokens, cache=split(cache), index=index, mask=mask,
                       stop_token_ids=stop_ids, hidden_states=hidden, model=model)

    return search


# ---------------------------------------------------------------------------------------------
# Backend-specific compilation: the one place that knows which backend runs.
# ---------------------------------------------------------------------------------------------

def _compile_decode(compiled, sampler):
    """The decode loop for `sampler`, compiled for the backend (see `_compile`).

    PyTorch: a Python loop over one token's step, which `_torch_compile.Decoder` runs eagerly or
    compiled by TorchInductor, whichever the call's length pays for; its compiled steps are shared
    by the model's samplers (`compiled.steps`).
    """
    if keras.backend.backend() == "torch":
        from keras_nanogpt import _torch_compile

        return _torch_compile.Decoder(compiled.model, sampler, _token_step(compiled.model, sampler),
                                      compiled.steps, compiled._count_trace)
    return _compile(compiled.model, _decode_function(compiled.model, sampler), compiled._count_trace)


def _compile(model, function, on_trace):
    """`function` compiled for the backend, taking the model's weights as arguments.

    JAX: `jax.jit` of a stateless function whose first argument is the weights (as keras-hub's
    `CausalLM.generate` does). TensorFlow: `tf.function(jit_compile=True)`, weights likewise passed
    in. PyTorch (and any other backend): run eagerly, without autograd (prefill and search
    samplers; the decode loop is `_compile_decode`'s).
    """
    backend = keras.backend.backend()
    if backend not in ("jax", "tensorflow"):

        def run(*args, **kwargs):
            args, kwargs = keras.tree.map_structure(ops.convert_to_tensor, (args, kwargs))
            if backend == "torch":
                import torch

                with torch.no_grad():
                    return function(*args, **kwargs)
            return function(*args, **kwargs)

        return run

    variables = model.variables

    def stateless(values, *args, **kwargs):
        on_trace()  # runs only while tracing
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return function(*args, **kwargs)

    if backend == "jax":
        import jax

        compiled = jax.jit(stateless)
    else:
        import tensorflow as tf

        compiled = tf.function(stateless, jit_compile=True)
    return lambda *args, **kwargs: compiled([v.value for v in variables], *args, **kwargs)
