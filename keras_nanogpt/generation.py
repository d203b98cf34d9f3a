"""Text generation, the host side: prompts to rows, the token window, samplers, stop sequences, batches
and streaming. The loop's device side is `decoding.py`; `compiling.py` keeps its compiled forms.

How a call runs:

1. Prompts become rows of token ids (text goes through the model's vectorizer), each cropped to its
   last `sequence_length` tokens for the model. The rows sit left-aligned in one token buffer, the
   window, whose KV cache has a power-of-two length (16 at least, `sequence_length` at most) big
   enough for the longest prompt plus `max_new_tokens`: a handful of shapes serve every call.
2. Prefill: the prompt positions that all rows share run through `NanoGPT.call_with_cache` at once.
3. Decode: one compiled loop makes all the new tokens (`jax.lax.while_loop` under `jax.jit`,
   `tf.while_loop` under XLA, on PyTorch one token's step as a traced graph or TorchInductor; see
   `backends.py`). Each step feeds every row's token at `index - 1` and writes the sampled token at
   `index`, except where a row's longer prompt still has a token there (as keras-hub's samplers do),
   so prompts of different lengths share a batch and each row gets the tokens it would get alone.
   The weights are arguments of the compiled functions: new prompts, seeds and training do not retrace.
4. Past the context, the window slides: when a row's window is full, its last `sequence_length // 2`
   tokens (at least 1) are prefilled again at positions 0.. and decoding goes on. Each new token sees
   `sequence_length // 2` to `sequence_length` tokens of context, as a loop that recomputes the whole
   context each step and moves its start that way would give (nanoGPT crops at every step instead).

Sampling: `temperature`, `top_k` and `top_p` are inputs of the compiled loop (`decoding.Rows`), not
part of it: temperature 0 runs the greedy loop (keras-hub's `GreedySampler`), any other settings a
sampling loop per `decoding.Filter` (none without top_k and top_p; else the top-k bucket ranked,
64, 512, ... or the whole vocabulary, and whether top_p applies), then keras-hub's `RandomSampler`'s
seeded draw among the bucket, so new values compile nothing and keep nothing beyond those few loops. `sampler=` takes any keras-hub sampler object or name
instead, each object with its own loop. Token samplers run inside the loop above; search samplers
(beam, contrastive) run their own keras-hub loop, compiled the same way, window by window (each
starts afresh from the best row so far).
"""
import collections
import numbers

import numpy as np
from keras import ops

from keras_nanogpt import _validation, backends, compiling, decoding, tokenizers

SAMPLERS = ("greedy", "random", "top_k", "top_p", "beam", "contrastive")
_MIN_BUCKET = 16


def __getattr__(name):  # names that moved: they warn and work
    return _validation.moved(__name__, name, {"compiled_function": compiling.compiled_function})


def generate(model, prompt, max_new_tokens=100, temperature=1.0, top_k=None, top_p=None,
             sampler=None, seed=None, stop=None):
    """Continue `prompt` with up to `max_new_tokens` new tokens.

    Args:
        model: a `NanoGPT`.
        prompt: a string or a list of strings (the model needs a vectorizer), int ids
            `(batch, time)`, or a list of 1-D int id arrays of different lengths. A prompt longer
            than the context is cropped from the left for the model (the output keeps all of it).
            Characters the vocabulary lacks become its out-of-vocabulary token, with a warning.
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
        unless every row stopped early); rows that stopped sooner are padded with 0. For 1-D id arrays
        of different lengths, a list of 1-D arrays: each prompt followed by its new ids.
        Text prompts never produce the padding id 0.

    Example:
        >>> generate(model, "It is a truth", max_new_tokens=20, top_k=40, seed=0)  # doctest: +SKIP
    """
    job = _Job(model, prompt, _Settings(max_new_tokens, temperature, top_k, top_p, sampler, seed, stop))
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
        ids (either form), lists with one 1-D int array of new ids per row (empty where nothing is new).

    Example:
        >>> for piece in stream(model, "It is a truth", max_new_tokens=50):  # doctest: +SKIP
        ...     print(piece, end="", flush=True)
    """
    job = _Job(model, prompt, _Settings(max_new_tokens, temperature, top_k, top_p, sampler, seed, stop))
    return Stream(job)


def compile_packages(model, batch_sizes=(1,), windows=None, sampling=("greedy", "random")):
    """Build the compiled packages of the decode loop ahead of time, for the calls that will use them
    (PyTorch: AOTInductor packages under `$KERAS_HOME/keras_nanogpt/aot`; `keras-nanogpt compile`).

    One decode-step package per batch size, window and sampling kind, and one prefill package per batch
    size and window (for prompts that fill the window; a shorter prompt's prefill package is built in
    the background on first use): a later process's `generate`, `stream` or server then loads them in
    milliseconds instead of tracing or compiling. Packages already there are loaded and checked, not
    built again.

    Args:
        model: a `NanoGPT`.
        batch_sizes: prompt rows per call.
        windows: KV-cache lengths (powers of two from 16, at most the context; a call uses the smallest
            that holds its prompt and new tokens); default: the model's context (long calls).
        sampling: "greedy" (temperature 0) and/or "random" (any temperature, top_k and top_p).

    Returns:
        `{"packages": n, "built": ..., "loaded": ..., "directory": ...}`.

    Example:
        >>> compile_packages(model, batch_sizes=(1, 8))  # doctest: +SKIP
    """
    context_manager, counts = backends.building_packages()
    context = model.sequence_length
    windows = [context] if windows is None else list(windows)
    for window in windows:
        if window != min(context, _bucket(window)):
            raise ValueError(f"`windows` holds {window}: each must be a power of two from {_MIN_BUCKET} to "
                             f"the context ({context}), or the context itself.")
    for kind in sampling:
        _validation.check_choice("sampling", kind, ("greedy", "random"))
    batch_sizes = [_validation.check_int("batch_sizes", b, minimum=1) for b in batch_sizes]
    before = counts()
    with context_manager:
        for batch in batch_sizes:
            for window in windows:
                # A prompt of window - 1 tokens and one new token: the window is `window` slots long.
                prompt = np.ones((batch, window - 1), "int32")
                for kind in sampling:
                    generate(model, prompt, max_new_tokens=1, temperature=0 if kind == "greedy" else 1.0, seed=0)
    after = counts()
    return {"packages": len(batch_sizes) * len(windows) * (len(sampling) + 1),  # the steps' and the prefills'
            "built": after["built"] - before["built"], "loaded": after["loaded"] - before["loaded"],
            "directory": after["directory"]}


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

    def text(self, row):
        """The row's new text so far, decoded (a piece that may still become a stop sequence held back);
        for any prompt form, ids included (the model needs a vectorizer)."""
        return self._job.new_text(row, self._job.ready(row))

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
    sent, sent_text = [0] * job.batch, [""] * job.batch  # tokens sent per row, and their text (decoded once)
    for _ in job.run(stream=True):
        ready = [job.ready(row) for row in range(job.batch)]
        if ready == sent:
            continue
        if job.kind != "text" and job.kind != "texts":
            pieces = [np.asarray(ids[old:new], "int32") for ids, old, new in zip(job.new_ids, sent, ready)]
        else:
            texts = [job.new_text(row, new) for row, new in enumerate(ready)]
            pieces = [text[len(old):] for text, old in zip(texts, sent_text)]
            sent_text = texts
        sent = ready
        yield pieces[0] if job.kind == "text" else pieces


# A generate/stream call's options besides the model and the prompt, as given (`_Job` checks them).
_Settings = collections.namedtuple("_Settings", "max_new_tokens temperature top_k top_p sampler seed stop")


class _Job:
    """One generate/stream call: the checked arguments (a `_Settings`), the rows, and the host side of decoding."""

    def __init__(self, model, prompt, settings):
        self.model = model
        max_new_tokens, temperature, top_k, top_p, self.seed = check_arguments(**settings._asdict())
        self.compiled = compiling.compiled_functions(model)
        self.sampler, self.sampling = _sampler(self.compiled, settings.sampler, temperature, top_k, top_p)
        self.kind, self.texts, self.prompts = _prompt_rows(model, prompt)
        self.stops = _stop_sequences(model, settings.stop)
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
            start = window.state.index
            window.advance(stream)
            self._collect(window, start)
            yield
            if all(self.stopped[row] or len(self.new_ids[row]) == self.limits[row]
                   for row in range(self.batch)):
                return
            if window.full:
                window.slide()

    def _collect(self, window, start):
        """Take the new tokens at window slots `start..window.state.index` and cut rows at their stops."""
        state, rows = window.state, window.rows
        for row in range(self.batch):
            if self.stopped[row]:
                continue
            ids = self.new_ids[row]
            before = len(ids)
            first = max(start, int(rows.lengths[row]))
            last = max(first, min(state.index, int(rows.limit[row])))  # limit < 0 once a row is done
            ids.extend(int(t) for t in state.tokens[row, first:last])
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
        tokenizer, last = self.model.tokenizer, int(self.prompts[row][-1])
        head = tokenizer.decode([last])
        return tokenizer.decode([last, *self.new_ids[row][:count]])[len(head):]

    def result(self):
        if self.kind == "id rows":
            return [np.concatenate([np.asarray(p, "int32"), np.asarray(ids, "int32")])
                    for p, ids in zip(self.prompts, self.new_ids)]
        if self.kind == "ids":
            new = np.zeros((self.batch, max(len(ids) for ids in self.new_ids)), "int32")
            for row, ids in enumerate(self.new_ids):
                new[row, :len(ids)] = ids
            return np.concatenate([np.stack(self.prompts).astype("int32"), new], axis=1)
        texts = [text + self.new_text(row, len(self.new_ids[row])) for row, text in enumerate(self.texts)]
        return texts[0] if self.kind == "text" else texts


class _Window:
    """The token window on the host and the decode state on the device, for one job: `state` (a `DecodeState`,
    its cache None until the first token step) changes as tokens come, `rows` (a `Rows`) when the window slides."""

    def __init__(self, job):
        self.job = job
        context = job.model.sequence_length
        prompts = [ids[-context:] for ids in job.prompts]
        lengths = np.array([len(ids) for ids in prompts], "int32")  # prompt tokens in the window
        limit = lengths + job.limits                                 # where each row has all it needs
        self.search = not _is_token_sampler(job.sampler)
        # The cache has `slots` positions; the window holds one token more (the newest token is
        # never fed back), except with search samplers, whose look-ahead feeds every slot.
        self.slots = min(context, _bucket(int(limit.max())))
        self.width = self.slots if self.search else self.slots + 1
        self.keep = max(1, context // 2)
        tokens = np.zeros((job.batch, self.width), "int32")
        for row, ids in enumerate(prompts):
            tokens[row, :len(ids)] = ids
        seeds = [np.asarray(ops.convert_to_numpy(v.value)) for v in job.sampler.variables]
        if job.seed is not None:  # the same seed, the same draws: restart the sampler's generators
            seeds = [np.array([job.seed & 0x7FFFFFFF, i], s.dtype) for i, s in enumerate(seeds)]
        stops = _stop_rows(job.stops, job.model.vocabulary_size)
        length = stops.shape[1]
        temperature, top_k, top_p = job.sampling
        self.rows = decoding.Rows(lengths=lengths, limit=limit, stops=stops,
                                  temperature=np.array(temperature, "float32"), bias=_logit_bias(job),
                                  top_k=np.array(top_k, "int32"), top_p=np.array(top_p, "float32"))
        tail = np.full((job.batch, length), -1, "int32")  # each row's last new tokens; done: met a stop
        self.state = decoding.DecodeState(tokens=tokens, cache=None, index=int(lengths.min()), seeds=seeds,
                                          tail=tail, done=np.zeros((job.batch,), bool))

    @property
    def full(self):
        return self.state.index == self.width

    def advance(self, stream):
        """Run the compiled decode from `state.index` to the window's end (one token when streaming)."""
        compiled, job = self.job.compiled, self.job
        if self.search:
            self._search()
            return
        if self.state.cache is None:
            self.state = self.state._replace(cache=job.model.empty_cache(job.batch, self.slots))
            self._prefill()
        end = self.state.index + 1 if stream else self.width
        state = compiled.decode(job.sampler)(
            self.state._replace(index=np.array(self.state.index, "int32")), self.rows, np.array(end, "int32"))
        for variable, value in zip(job.sampler.variables, state.seeds):
            variable.assign(value)  # without a seed, the next call draws on from here
        self.state = state._replace(tokens=np.asarray(ops.convert_to_numpy(state.tokens)),
                                    index=int(ops.convert_to_numpy(state.index)))

    def slide(self):
        """Keep the window's last `keep` tokens at slots 0.., to be prefilled again."""
        shift = self.width - self.keep
        tokens = np.concatenate(
            [self.state.tokens[:, shift:], np.zeros((self.job.batch, shift), "int32")], axis=1)
        self.rows = self.rows._replace(lengths=np.maximum(self.rows.lengths - shift, 0),
                                       limit=self.rows.limit - shift)
        self.state = self.state._replace(tokens=tokens, index=self.keep)
        if self.state.cache is not None:
            self._prefill()

    def _prefill(self):
        """Fill the cache at the window's first `index - 1` positions (rounded up to a power of two)."""
        if self.state.index <= 1:
            return
        length = min(self.slots, _bucket(self.state.index - 1))
        prefill = self.job.compiled.prefill()
        self.state = self.state._replace(cache=prefill(self.state.tokens[:, :length], self.state.cache))

    def _search(self):
        """Run the search sampler over the whole window."""
        job = self.job
        # keras-hub's search loops stop early on single-token stop ids only; longer stop sequences
        # are cut afterwards.
        stop_ids = tuple(sorted(stop[0] for stop in job.stops if len(stop) == 1)) or None
        search = job.compiled.function(("search", job.sampler, stop_ids),
                                       lambda: decoding.search_loop(job.model, job.sampler, stop_ids))
        tokens = search(self.state.tokens, self.rows.lengths, np.array(self.state.index, "int32"), self.rows.bias)
        self.state = self.state._replace(tokens=np.asarray(ops.convert_to_numpy(tokens)), index=self.width)


def _first_stop(ids, stops, since=0):
    """Where the first stop sequence in `ids` that ends after `since` begins, or None."""
    for end in range(since + 1, len(ids) + 1):
        starts = [end - len(stop) for stop in stops
                  if end >= len(stop) and tuple(ids[end - len(stop):end]) == stop]
        if starts:
            return min(starts)
    return None


def _stop_rows(stops, vocabulary_size):
    """The stop sequences as `Rows.stops`: right-aligned, -1 (matching anything) in front. Both sizes are
    rounded up to a power of two, so a handful of shapes (compiled loops) serve every stop list; the
    padding rows hold `vocabulary_size`, an id no token has, and never match."""
    if not stops:
        return np.full((0, 1), -1, "int32")
    count, length = (1 << (n - 1).bit_length() for n in (len(stops), max(len(stop) for stop in stops)))
    rows = np.full((count, length), -1, "int32")
    rows[len(stops):] = vocabulary_size
    for i, stop in enumerate(stops):
        rows[i, length - len(stop):] = stop
    return rows


def _bucket(length):
    return max(_MIN_BUCKET, 1 << max(0, length - 1).bit_length())


def _logit_bias(job):
    """Added to the logits: -inf on the padding id 0 for text prompts (it decodes to nothing)."""
    bias = np.zeros((job.model.vocabulary_size,), "float32")
    if job.kind in ("text", "texts") and job.model.tokenizer.decode([0]) == "":
            bias[0] = -np.inf
    return bias


def _is_token_sampler(sampler):
    """Whether the sampler picks one token from probabilities (keras-hub's base loop), not a search."""
    import keras_hub

    return type(sampler).__call__ is keras_hub.samplers.Sampler.__call__


def _prompt_rows(model, prompt):
    """`(kind, texts, rows)`: kind "text", "texts", "ids" or "id rows" (a list of 1-D arrays, any lengths);
    rows are 1-D int32 arrays."""
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                   and all(isinstance(p, str) for p in prompt)):
        kind, texts = ("text", [prompt]) if isinstance(prompt, str) else ("texts", list(prompt))
        return kind, texts, [tokenizers.prompt_ids(model.tokenizer, text) for text in texts]
    if (isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, np.ndarray) and p.ndim == 1
                                                             for p in prompt)
            and len({p.shape[0] for p in prompt}) > 1):  # rows of one length stay `(batch, time)` ids
        return "id rows", None, [_validation.check_id_array(f"prompt[{i}]", p, 1, model.vocabulary_size,
                                                            "1-D integer token ids, at least one")
                                 for i, p in enumerate(prompt)]
    ids = _validation.check_id_array("prompt", prompt, 2, model.vocabulary_size, "a string, a list of "
                                     "strings or integer ids of shape (batch, time) with time >= 1")
    return "ids", None, list(ids)


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
            if model.tokenizer is None:
                raise ValueError(f"A `stop` string ({item!r}) needs a model with a `vectorizer`; "
                                 f"pass token ids instead.")
            ids = tuple(int(i) for i in model.tokenizer.encode(item))
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


def _sampler(compiled, sampler, temperature, top_k, top_p):
    """`(sampler, (temperature, top_k, top_p))`: a keras-hub sampler (kept per model: greedy, or one
    per `decoding.filter_plan`, so its compiled loop is reused whatever the values) and the values for
    `decoding.Rows` (top_k 0 and top_p 1.0: all tokens)."""
    import keras_hub

    if sampler is not None:  # a name is checked by `check_arguments` already
        if isinstance(sampler, str):
            return compiled.keep(("sampler", sampler), lambda: keras_hub.samplers.get(sampler)), (1.0, 0, 1.0)
        if not isinstance(sampler, keras_hub.samplers.Sampler):
            raise TypeError(f"`sampler` must be a keras_hub.samplers.Sampler or one of {SAMPLERS}; "
                            f"got {type(sampler).__name__}.")
        return sampler, (1.0, 0, 1.0)
    if temperature == 0:
        return compiled.keep(("sampler", "greedy"), keras_hub.samplers.GreedySampler), (1.0, 0, 1.0)
    top_k = 0 if top_k is None or top_k >= compiled.model.vocabulary_size else top_k
    top_p = 1.0 if top_p is None else top_p
    # One object per `decoding.Filter` (a handful: the top-k bucket, whether top_p applies, or none),
    # whatever the values: `decoding._draw` applies top_k and top_p in the loop.
    plan = decoding.filter_plan(compiled.model.vocabulary_size, top_k, top_p)
    random = compiled.keep(("sampler", "random", plan), lambda: decoding.filtered_sampler(plan) if plan
                           else keras_hub.samplers.RandomSampler())
    return random, (temperature, top_k, top_p)
