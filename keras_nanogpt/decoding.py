"""The decode loop's device side, in `keras.ops` only: one token's step, sampling (keras-hub's samplers after
top-k and top-p as tensor inputs), stop-sequence matching, and the search samplers' loop.

Sampling values are inputs, not constants: a static `Filter` says how many tokens are ranked and whether
top_p applies, so a handful of compiled loops serve every temperature, `top_k` and `top_p`
(`filter_probabilities`); the samplers' seed state is passed in and out.

`keras_nanogpt.generation` runs these on the host's windows; `keras_nanogpt.backends` compiles them
(`jax.jit`, `tf.function(jit_compile=True)`, or on PyTorch one token's step traced or compiled by
TorchInductor).

Example:
    >>> loop = decode_loop(model, keras_hub.samplers.GreedySampler())  # doctest: +SKIP
"""

import typing

import keras
from keras import ops


class DecodeState(typing.NamedTuple):
    """What the decode loop changes as it makes tokens: the window, its KV cache and the rows' progress.

    A pytree (a named tuple): `ops.while_loop`, `jax.jit`, `tf.function` and the PyTorch decoder take
    and return it whole. On the host (`generation._Window`) `index` is a Python int, `cache` None
    until the first token step, and `tokens` a numpy array.

    Args:
        tokens: the window's token ids, `(batch, width)` int32; prompts left-aligned.
        cache: the model's KV cache, one `(keys, values)` pair per layer (`NanoGPT.empty_cache`).
        index: the next slot to write, an int32 scalar.
        seeds: the sampler's seed generators' states, a list in `sampler.variables` order.
        tail: each row's last new tokens, `(batch, stop length)` int32 (-1 before the first).
        done: `(batch,)` bool, rows that met a stop sequence.

    Example:
        >>> state = DecodeState(tokens, model.empty_cache(2, 16), np.array(3, "int32"), seeds,
        ...                     tail, done)  # doctest: +SKIP
        >>> state = decode(state, rows, np.array(16, "int32"))  # doctest: +SKIP
    """

    tokens: typing.Any
    cache: typing.Any
    index: typing.Any
    seeds: typing.Any
    tail: typing.Any
    done: typing.Any


class Rows(typing.NamedTuple):
    """What stays fixed while the decode loop runs over one window: each row's bounds, the stop
    sequences and how the logits are shaped.

    Args:
        lengths: `(batch,)` int32, prompt tokens in the window (no new token is written below).
        limit: `(batch,)` int32, the slot where each row has all the tokens it wants.
        stops: `(stops, length)` int32, the stop sequences right-aligned, -1 matching anything.
        temperature: a float32 scalar the logits are divided by.
        bias: `(vocabulary,)` float32, added to the logits.
        top_k: an int32 scalar, sample among the `top_k` most likely tokens (0: all).
        top_p: a float32 scalar, sample among the most likely tokens whose probabilities add up to
            `top_p` (1.0: all). Both are inputs of the compiled loop: new values compile nothing.
            Applied before the draw of keras-hub's `RandomSampler` only (`filters`).

    Example:
        >>> import numpy as np
        >>> rows = Rows(np.array([3, 5], "int32"), np.array([23, 25], "int32"),
        ...             np.full((0, 1), -1, "int32"), np.array(1.0, "float32"),
        ...             np.zeros((65,), "float32"), np.array(40, "int32"), np.array(1.0, "float32"))
        >>> rows.limit - rows.lengths
        array([20, 20], dtype=int32)
    """

    lengths: typing.Any
    limit: typing.Any
    stops: typing.Any
    temperature: typing.Any
    bias: typing.Any
    top_k: typing.Any
    top_p: typing.Any


def decode_loop(model, sampler):
    """The decode loop: from `state.index` until `end`, or until every row is done or met a stop.

    Args:
        model: a `NanoGPT` (its `call_with_cache` runs at every step).
        sampler: a keras-hub token sampler.

    Returns:
        `decode(state, rows, end)` -> the new `DecodeState`, an `ops.while_loop`; `rows` is a `Rows`
        and `end` an int32 scalar, the slot to stop before.

    Example:
        >>> loop = decode_loop(model, keras_hub.samplers.GreedySampler())  # doctest: +SKIP
        >>> state = loop(state, rows, np.array(16, "int32"))  # doctest: +SKIP
    """

    def decode(state, rows, end):
        # `ops.while_loop` hands the loop's variables over as separate arguments, in field order.
        def cond(*fields):
            state = DecodeState(*fields)
            return ops.logical_and(state.index < end, _running(state, rows))

        def body(*fields):
            state = DecodeState(*fields)
            logits, cache = _next_logits(model, state, rows)
            token, seeds = _sample(sampler, logits, state.seeds, rows)
            state = _commit(state._replace(cache=cache, seeds=seeds), rows, state.index, token)
            return state._replace(index=state.index + 1)

        return DecodeState(*ops.while_loop(cond, body, state))

    return decode


def prefill(model):
    """The prefill, `(tokens, cache) -> cache`: the KV cache after the prompt's `tokens` ran at positions 0...

    Example:
        >>> cache = prefill(model)(tokens, model.empty_cache(1))  # doctest: +SKIP
    """
    return lambda tokens, cache: model.call_with_cache(tokens, cache, 0)[2]


class TokenStep(typing.NamedTuple):
    """The decode loop's body as parts, for a backend that compiles one token's step (PyTorch).

    `step(state, rows, token, write)` writes `token` at slot `state.index - 1` where `write` (a
    boolean scalar) holds and the row's prompt has no token there, runs the model on slot
    `state.index - 1`, and returns `(state, running, probabilities)`: the `DecodeState` with new
    tokens, cache, tail and done (its `seeds` untouched: the step does not read them), `running`,
    whether some row still wants slot `state.index`, and the sampler's probabilities for it.
    `draw(probabilities, seeds, top_k, top_p)` gives `(tokens, seeds)` (`Rows.top_k`, `Rows.top_p`
    applied where the sampler `filters`); `commit` is `_commit`.

    Example:
        >>> parts = token_step(model, keras_hub.samplers.GreedySampler())  # doctest: +SKIP
        >>> state, running, probabilities = parts.step(state, rows, token, write)  # doctest: +SKIP
    """

    step: typing.Callable
    draw: typing.Callable
    commit: typing.Callable


def token_step(model, sampler):
    """The `TokenStep` of the decode loop for `sampler` (the loop's body, for PyTorch's decoder).

    Args:
        model: a `NanoGPT`.
        sampler: a keras-hub token sampler.

    Example:
        >>> parts = token_step(model, keras_hub.samplers.GreedySampler())  # doctest: +SKIP
    """

    def step(state, rows, token, write):
        state = _commit(state, rows, state.index - 1, token, write)
        logits, cache = _next_logits(model, state, rows)
        probabilities = sampler.compute_probabilities(logits)
        return state._replace(cache=cache), _running(state, rows), probabilities

    def draw(probabilities, seeds, top_k, top_p):
        return _draw(sampler, probabilities, seeds, top_k, top_p)

    return TokenStep(step, draw, _commit)


def _next_logits(model, state, rows):
    """The logits for slot `state.index` (divided by the temperature, plus the bias): the model run on
    each row's token at `index - 1`, which also goes into the cache. Returns `(logits, cache)`."""
    fed = ops.take(state.tokens, ops.reshape(state.index - 1, (1,)), axis=1)  # (batch, 1)
    logits, _, cache = model.call_with_cache(fed, state.cache, state.index - 1)
    return logits[:, 0] / rows.temperature + rows.bias, cache


def _commit(state, rows, slot, token, write=None):
    """Write `token` at slot `slot` in the rows whose prompt has no token there (and where `write`),
    and mark the rows whose new tokens now end with a stop sequence. Returns the `DecodeState` with
    new `tokens`, `tail` and `done`."""
    tokens, tail, done = state.tokens, state.tail, state.done
    generated = slot >= rows.lengths  # (batch,) False where the prompt has a token here
    if write is not None:
        generated = ops.logical_and(generated, write)
    token = ops.where(generated, token, ops.take(tokens, slot, axis=1))
    tokens = ops.slice_update(tokens, [0, slot], token[:, None])
    if ops.shape(rows.stops)[0] > 0:
        tail, done = _match_stops(tail, done, token, ops.logical_and(generated, slot < rows.limit), rows.stops)
    return state._replace(tokens=tokens, tail=tail, done=done)


def _running(state, rows):
    """Whether some row has not met a stop and still wants a token at slot `state.index`."""
    return ops.logical_not(ops.all(ops.logical_or(state.done, state.index >= rows.limit)))


def _sample(sampler, logits, seeds, rows):
    """One token per row from the keras-hub sampler, its seed generators' state passed in and out."""
    return _draw(sampler, sampler.compute_probabilities(logits), seeds, rows.top_k, rows.top_p)


def _draw(sampler, probabilities, seeds, top_k, top_p):
    """The sampler's tokens for `probabilities`, its seed generators' state passed in and out. Where
    the sampler has a `Filter` (`filters`), it draws among the filter's bucket of most likely tokens,
    those outside the top-k and the top-p nucleus at 0 (`_candidates`), and maps the draw back to
    token ids."""
    plan = filters(sampler)
    variables = sampler.variables
    with keras.StatelessScope(state_mapping=list(zip(variables, seeds))) as scope:
        if plan is None:
            token = sampler.get_next_token(probabilities)
        else:
            ranked, indices, _ = _candidates(probabilities, top_k, top_p, plan)
            choice = ops.cast(sampler.get_next_token(ranked), "int32")  # a rank in the bucket
            token = ops.take_along_axis(indices, ops.reshape(choice, (-1, 1)), axis=-1)[:, 0]
    return ops.cast(token, "int32"), [scope.get_current_value(v) for v in variables]


class Filter(typing.NamedTuple):
    """The static part of top-k / top-p filtering, one compiled decode loop each (the values of
    `top_k` and `top_p` stay tensor inputs: new values compile nothing).

    Args:
        bucket: how many of the most likely tokens are ranked (`ops.top_k`'s static k): a row's
            `top_k` must be 1..bucket (0: all of the bucket). The vocabulary size when some row
            keeps every token (top_k 0), else `buckets`' smallest size holding top_k.
        nucleus: whether `top_p` applies (a cumulative sum over the bucket); False when every row's
            top_p is 1.

    Example:
        >>> filter_plan(50257, 40, 1.0), filter_plan(50257, 0, 0.9), filter_plan(50257, 0, 1.0)
        (Filter(bucket=64, nucleus=False), Filter(bucket=50257, nucleus=True), None)
    """

    bucket: int
    nucleus: bool


def buckets(vocabulary):
    """The bucket sizes `Filter.bucket` takes for a vocabulary: 64, 512, 4096, ... (x8) below it, then
    the vocabulary itself: a handful of compiled loops (6 for GPT-2's 50,257 tokens, 2 for 65).

    Example:
        >>> buckets(65), buckets(50257)
        ([64, 65], [64, 512, 4096, 32768, 50257])
    """
    sizes, size = [], 64
    while size < vocabulary:
        sizes.append(size)
        size *= 8
    return sizes + [vocabulary]


def filter_plan(vocabulary, top_k, top_p):
    """The `Filter` for `top_k` and `top_p` (scalars or one per row; top_k 0 and top_p 1.0: all
    tokens), or None where no row filters (the draw takes every token: no ranking at all).

    Example:
        >>> filter_plan(96, [3, 40], [1.0, 0.5])
        Filter(bucket=64, nucleus=True)
    """
    import numpy as np

    top_k = np.asarray(top_k, "int64").reshape(-1)
    top_k = np.where(top_k >= vocabulary, 0, top_k)  # as many as the vocabulary: all
    nucleus = bool((np.asarray(top_p, "float64") < 1.0).any())
    if (top_k <= 0).any():
        return Filter(vocabulary, nucleus) if nucleus or (top_k > 0).any() else None
    return Filter(next(size for size in buckets(vocabulary) if size >= top_k.max()), nucleus)


def filtered_sampler(plan):
    """A keras-hub `RandomSampler` that draws after the `Filter` `plan` (`filters` reads it back)."""
    import keras_hub

    sampler = keras_hub.samplers.RandomSampler()
    sampler.keras_nanogpt_filter = Filter(int(plan.bucket), bool(plan.nucleus))
    return sampler


def filters(sampler):
    """The `Filter` the decode loop applies (with `Rows.top_k` and `Rows.top_p`) before the sampler's
    draw, or None: a `RandomSampler` made by `filtered_sampler` (generation's sampler at temperature > 0
    with top_k or top_p) has one; other samplers choose their tokens themselves.

    Example:
        >>> import keras_hub
        >>> filters(filtered_sampler(Filter(64, False))), filters(keras_hub.samplers.RandomSampler())
        (Filter(bucket=64, nucleus=False), None)
    """
    import keras_hub

    if type(sampler) is not keras_hub.samplers.RandomSampler:
        return None
    return getattr(sampler, "keras_nanogpt_filter", None)


def _candidates(probabilities, top_k, top_p, plan):
    """`(ranked, indices, threshold)`: the `plan.bucket` most likely tokens' probabilities, descending,
    with those outside the top-k and the top-p nucleus at 0, their token ids (both `(batch, bucket)`),
    and the last kept probability, `(batch, 1)`."""
    ranked, indices = ops.top_k(probabilities, k=plan.bucket, sorted=True)
    top_k = ops.reshape(ops.cast(top_k, "int32"), (-1, 1))  # (1, 1) or (batch, 1)
    count = ops.where(top_k > 0, ops.minimum(top_k, plan.bucket), plan.bucket)
    if plan.nucleus:
        # A rank is in the nucleus when the probabilities ranked before it add up to `top_p` at most;
        # the bucket holds every rank top_k keeps, so its cumulative sum is the vocabulary's there.
        top_p = ops.reshape(ops.cast(top_p, "float32"), (-1, 1))
        cumulative = ops.cumsum(ranked, axis=-1)
        inside = 1 + ops.sum(ops.cast(cumulative[:, :-1] <= top_p, "int32"), axis=-1, keepdims=True)
        count = ops.minimum(count, ops.where(top_p >= 1.0, plan.bucket, inside))  # 1.0: all
    threshold = ops.take_along_axis(ranked, count - 1, axis=-1)  # (batch, 1)
    return ops.where(ranked >= threshold, ranked, ops.zeros_like(ranked)), indices, threshold


def filter_probabilities(probabilities, top_k, top_p, plan=None):
    """`probabilities` with every token outside the top-k and the top-p nucleus set to 0.

    `top_k` and `top_p` are tensors (scalars, or one per row), so one compiled program serves every
    value. The tokens kept are keras-hub's `TopKSampler` / `TopPSampler`'s: the `top_k` most likely,
    and of those the most likely ones up to and including the first whose cumulative probability
    passes `top_p`; tokens exactly as likely as the last one kept are kept too (within the plan's
    bucket). The decode loop draws from the bucket itself (`_draw`); this gives the same tokens over
    the whole vocabulary.

    Args:
        probabilities: `(batch, vocabulary)` float32, each row adding up to 1.
        top_k: int32, the most likely tokens to keep (0: all).
        top_p: float32 in (0, 1], the nucleus's probability (1.0: all).
        plan: a `Filter` (static: its bucket must hold every row's top_k); None ranks the whole
            vocabulary.

    Returns:
        `(batch, vocabulary)` float32, not renormalised (a categorical draw over their logarithms
        needs no normalisation).

    Example:
        >>> import numpy as np
        >>> p = np.array([[0.1, 0.5, 0.15, 0.25]], "float32")
        >>> ops.convert_to_numpy(filter_probabilities(p, np.array(2, "int32"), np.array(1.0, "float32")))
        array([[0.  , 0.5 , 0.  , 0.25]], dtype=float32)
        >>> ops.convert_to_numpy(filter_probabilities(p, np.array(0, "int32"), np.array(0.4, "float32")))
        array([[0. , 0.5, 0. , 0. ]], dtype=float32)
        >>> ops.convert_to_numpy(filter_probabilities(p, np.array(2, "int32"), np.array(1.0, "float32"),
        ...                                           Filter(bucket=2, nucleus=False)))
        array([[0.  , 0.5 , 0.  , 0.25]], dtype=float32)
    """
    probabilities = ops.convert_to_tensor(probabilities)
    if plan is None:
        plan = Filter(ops.shape(probabilities)[-1], True)
    _, _, threshold = _candidates(probabilities, top_k, top_p, plan)
    return ops.where(ops.greater_equal(probabilities, threshold), probabilities, ops.zeros_like(probabilities))


def _match_stops(tail, done, token, counts, stops):
    """Push `token` onto each counted row's tail and mark rows whose tail ends with a stop sequence."""
    tail = ops.where(counts[:, None], ops.concatenate([tail[:, 1:], token[:, None]], axis=1), tail)
    equal = ops.logical_or(tail[:, None, :] == stops[None], stops[None] < 0)  # (batch, stops, length)
    met = ops.any(ops.all(equal, axis=-1), axis=-1)
    return tail, ops.logical_or(done, ops.logical_and(counts, met))


def search_loop(model, sampler, stop_ids):
    """A keras-hub search sampler (beam, contrastive) over the whole window, after one prefill.

    Args:
        model: a `NanoGPT`.
        sampler: a keras-hub search sampler.
        stop_ids: single-token stop ids the search may end on, or None.

    Returns:
        `search(tokens, lengths, index, bias)` -> the window's tokens.

    Example:
        >>> search = search_loop(model, keras_hub.samplers.BeamSampler(num_beams=3), None)  # doctest: +SKIP
    """
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
