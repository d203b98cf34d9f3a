"""The decode loop's device side, in `keras.ops` only: one token's step, sampling with keras-hub's samplers
(their seed state passed in and out), stop-sequence matching, and the search samplers' loop.

`keras_nanogpt.generation` runs these on the host's windows; `keras_nanogpt.backends` compiles them
(`jax.jit`, `tf.function(jit_compile=True)`, or on PyTorch one token's step traced or compiled by
TorchInductor).

Example:
    >>> loop = decode_loop(model, keras_hub.samplers.GreedySampler())  # doctest: +SKIP
"""

import typing

import keras
from keras import ops


def decode_loop(model, sampler):
    """The decode loop: from `index` until `end`, or until every row is done or met a stop.

    Args:
        model: a `NanoGPT` (its `call_with_cache` runs at every step).
        sampler: a keras-hub token sampler.

    Returns:
        `decode(tokens, cache, index, end, lengths, limit, seeds, tail, done, stops, temperature,
        bias)` -> `(tokens, cache, index, seeds, tail, done)`, an `ops.while_loop`.

    Example:
        >>> loop = decode_loop(model, keras_hub.samplers.GreedySampler())  # doctest: +SKIP
    """

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


class TokenStep(typing.NamedTuple):
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


def token_step(model, sampler):
    """The `TokenStep` of the decode loop for `sampler` (the loop's body, for PyTorch's decoder).

    Args:
        model: a `NanoGPT`.
        sampler: a keras-hub token sampler.

    Example:
        >>> parts = token_step(model, keras_hub.samplers.GreedySampler())  # doctest: +SKIP
    """

    def step(tokens, cache, index, token, write, lengths, limit, tail, done, stops, temperature, bias):
        tokens, tail, done = _commit(tokens, index - 1, token, lengths, limit, tail, done, stops, write)
        logits, cache = _next_logits(model, tokens, cache, index, temperature, bias)
        probabilities = sampler.compute_probabilities(logits)
        return tokens, cache, tail, done, _running(index, limit, done), probabilities

    return TokenStep(step, lambda probabilities, seeds: _draw(sampler, probabilities, seeds), _commit)


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
