"""Generation: cached decoding equals a full recompute, samplers, seeds, stops, batches, streaming."""

import keras_hub
import numpy as np
import pytest
from conftest import CONTEXT, make_sharp_model, reference_greedy, to_numpy

import keras_nanogpt as kn

@pytest.fixture(scope="module")
def sharp_model(char_vectorizer):
    """Shared by the tests that do not train it, so its compiled generation functions are reused."""
    return make_sharp_model(char_vectorizer)


@pytest.fixture()
def trainable_model(char_vectorizer):
    return make_sharp_model(char_vectorizer)


@pytest.mark.parametrize("prompt_length, steps", [(3, 10), (3, 3 * CONTEXT), (CONTEXT + 5, 20)])
def test_greedy_cached_decoding_equals_full_recompute(sharp_model, prompt_length, steps):
    prompt = list(np.random.default_rng(prompt_length).integers(1, sharp_model.vocabulary_size, prompt_length))
    generated = sharp_model.generate([prompt], max_new_tokens=steps, temperature=0)
    assert generated.shape == (1, prompt_length + steps)
    assert generated[0].tolist() == reference_greedy(sharp_model, prompt, steps)


def test_prompts_of_different_lengths_share_a_batch(sharp_model):
    prompts = ["It is a truth universally", "Mr. B", "she said"]
    together = sharp_model.generate(prompts, max_new_tokens=12, temperature=0)
    assert together == [sharp_model.generate(p, max_new_tokens=12, temperature=0) for p in prompts]


def test_stream_joins_to_generate(sharp_model):
    arguments = dict(max_new_tokens=25, temperature=0.9, top_p=0.9, seed=7)
    pieces = list(sharp_model.stream("It is a", **arguments))
    assert len(pieces) > 1
    assert "It is a" + "".join(pieces) == sharp_model.generate("It is a", **arguments)
    batch = list(sharp_model.stream(["It is", "He"], **arguments))
    joined = ["It is" + "".join(p[0] for p in batch), "He" + "".join(p[1] for p in batch)]
    assert joined == sharp_model.generate(["It is", "He"], **arguments)


def test_seed_repeats_and_samplers_reduce_to_greedy(sharp_model):
    first = sharp_model.generate("It is", max_new_tokens=30, seed=3)
    assert first == sharp_model.generate("It is", max_new_tokens=30, seed=3)
    assert first != sharp_model.generate("It is", max_new_tokens=30, seed=4)
    greedy = sharp_model.generate("It is", max_new_tokens=30, temperature=0)
    assert sharp_model.generate("It is", max_new_tokens=30, top_k=1, seed=5) == greedy
    assert sharp_model.generate("It is", max_new_tokens=30, top_p=1e-6, seed=5) == greedy
    assert sharp_model.generate("It is", max_new_tokens=30, sampler="greedy") == greedy


def test_top_k_restricts_to_the_k_most_likely(sharp_model):
    prompt = [[5, 9, 11]]
    logits = to_numpy(sharp_model(np.array(prompt, "int32")))[0, -1]
    allowed = set(np.argsort(logits)[-3:].tolist())
    for seed in range(8):
        token = sharp_model.generate(prompt, max_new_tokens=1, top_k=3, seed=seed)[0, -1]
        assert int(token) in allowed


def test_top_p_restricts_to_the_nucleus(sharp_model):
    prompt = [[5, 9, 11]]
    logits = to_numpy(sharp_model(np.array(prompt, "int32")))[0, -1].astype("float64") / 2.0
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    order = np.argsort(-probabilities)
    before = np.concatenate([[0.0], np.cumsum(probabilities[order])[:-1]])  # probability ranked ahead
    allowed = set(order[before <= 0.6].tolist())
    assert 1 < len(allowed) < len(order)
    drawn = {int(sharp_model.generate(prompt, max_new_tokens=1, temperature=2.0, top_p=0.6, seed=seed)[0, -1])
             for seed in range(24)}
    assert drawn <= allowed and len(drawn) > 1


def test_filter_probabilities_takes_k_and_p_as_tensors():
    from keras_nanogpt import decoding

    p = np.array([[0.1, 0.5, 0.15, 0.25], [0.25, 0.25, 0.3, 0.2]], "float32")

    def kept(k, top_p):
        filtered = decoding.filter_probabilities(p, np.array(k, "int32"), np.array(top_p, "float32"))
        return (to_numpy(filtered) > 0).astype(int).tolist()

    assert kept(0, 1.0) == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert kept(2, 1.0) == [[0, 1, 0, 1], [1, 1, 1, 0]]  # ties with the last kept stay
    assert kept(1, 1.0) == [[0, 1, 0, 0], [0, 0, 1, 0]]
    assert kept(0, 0.5) == [[0, 1, 0, 1], [1, 1, 1, 0]]  # up to the first token past p
    assert kept(0, 0.1) == [[0, 1, 0, 0], [0, 0, 1, 0]]
    assert kept(3, 0.8) == [[0, 1, 1, 1], [1, 1, 1, 0]]  # both limits
    per_row = decoding.filter_probabilities(p, np.array([1, 0], "int32"), np.array([1.0, 0.2], "float32"))
    assert (to_numpy(per_row) > 0).astype(int).tolist() == [[0, 1, 0, 0], [0, 0, 1, 0]]


def test_sampling_values_are_inputs_of_one_loop(sharp_model):
    """New temperature, top_k and top_p values compile nothing and keep nothing: one loop per shape and
    `decoding.Filter` (top-k bucket, whether top_p applies), whatever the values."""
    from keras_nanogpt import decoding

    vocabulary = sharp_model.vocabulary_size
    settings = [dict(top_k=1 + i, top_p=0.3 + 0.047 * i, temperature=0.2 + 0.13 * i, seed=i) for i in range(15)]
    settings += [dict(top_p=0.31 + 0.045 * i) for i in range(15)]
    settings += [dict(top_k=2 + i, temperature=1.5 - 0.07 * i) for i in range(15)]
    settings += [dict(temperature=0.5 + 0.1 * i) for i in range(5)]
    plans = {decoding.filter_plan(vocabulary, s.get("top_k", 0), s.get("top_p", 1.0)) for s in settings}
    assert len(plans) <= 2 * len(decoding.buckets(vocabulary)) + 1
    first = {}
    for setting in settings:  # one call per plan compiles its loop
        first.setdefault(decoding.filter_plan(vocabulary, setting.get("top_k", 0), setting.get("top_p", 1.0)), setting)
    for setting in first.values():
        sharp_model.generate("It is", max_new_tokens=4, **setting)
    compiled = sharp_model._kn_compiled
    traces, kept = compiled.traces, len(compiled.kept)
    for setting in settings:
        sharp_model.generate("It is", max_new_tokens=4, **setting)
    assert compiled.traces == traces and len(compiled.kept) == kept, list(compiled.kept)


def _reference_filter(probabilities, top_k, top_p):
    """Which tokens top-k and top-p keep, token by token in numpy (no ties): a token is kept when fewer
    than top_k tokens are more likely and the probability of the tokens more likely adds up to top_p at most."""
    more_likely = probabilities[:, None, :] > probabilities[:, :, None]  # [row, token, other]
    ahead = (more_likely * probabilities[:, None, :]).sum(-1)
    top_k = np.broadcast_to(np.where(np.asarray(top_k) > 0, top_k, probabilities.shape[1]), (len(probabilities),))
    top_p = np.broadcast_to(np.asarray(top_p, "float64"), (len(probabilities),))
    keep = more_likely.sum(-1) < top_k[:, None]
    return keep & ((ahead <= top_p[:, None]) | (top_p[:, None] >= 1.0))


def test_bucketed_top_k_keeps_what_a_full_sort_keeps():
    """`decoding.Filter`'s bucket ranks the top-k bucket only (no full sort); the tokens kept are the
    full sort's and a reference's, for scalar and per-row k and p, with and without the nucleus."""
    from keras_nanogpt import decoding

    rng = np.random.default_rng(0)
    vocabulary = 600  # buckets 64, 512, 600
    logits = rng.normal(0, 2.0, (6, vocabulary))
    probabilities = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype("float32")
    cases = [(1, 1.0), (3, 1.0), (40, 1.0), (64, 1.0), (65, 1.0), (300, 1.0), (512, 1.0), (599, 1.0),
             (40, 0.5), (500, 0.9), (0, 0.3), (0, 0.95), ([1, 7, 64, 2, 40, 9], [1.0, 0.2, 0.9, 1.0, 0.6, 0.01]),
             ([200, 513, 1, 3, 3, 50], 1.0), ([0, 3, 5, 600, 1, 1], [0.5, 1.0, 1.0, 0.5, 1.0, 1.0])]
    for top_k, top_p in cases:
        plan = decoding.filter_plan(vocabulary, top_k, top_p)
        assert plan is not None and plan.bucket in decoding.buckets(vocabulary)
        expected = _reference_filter(probabilities, np.where(np.asarray(top_k) >= vocabulary, 0, top_k), top_p)
        k, p = np.array(top_k, "int32"), np.array(top_p, "float32")
        bucketed = to_numpy(decoding.filter_probabilities(probabilities, k, p, plan))
        full = to_numpy(decoding.filter_probabilities(probabilities, k, p))
        assert ((bucketed > 0) == expected).all(), (top_k, top_p, plan)
        np.testing.assert_array_equal(bucketed, full)
        np.testing.assert_array_equal(bucketed, np.where(expected, probabilities, 0))
    assert decoding.filter_plan(vocabulary, 40, 1.0) == decoding.Filter(64, False)
    assert decoding.filter_plan(vocabulary, 0, 1.0) is None  # no filter: no ranking at all
    assert decoding.filter_plan(vocabulary, vocabulary, 1.0) is None
    assert decoding.filter_plan(vocabulary, 0, 0.9) == decoding.Filter(vocabulary, True)  # the full sort


def _seeds(sampler, seed):
    """The sampler's seed state for `seed`, as generation sets it."""
    return [np.array([seed, i], to_numpy(v.value).dtype) for i, v in enumerate(sampler.variables)]


def test_draws_within_the_bucket_follow_the_filtered_probabilities():
    """The decode loop's draw (`decoding._draw`) takes a rank in the bucket and maps it back: every
    token is one the filter keeps, each drawn about as often as its renormalised probability."""
    from keras_nanogpt import decoding

    rng = np.random.default_rng(1)
    vocabulary, rows = 200, 4000
    logits = rng.normal(0, 1.5, (vocabulary,))
    row = np.exp(logits) / np.exp(logits).sum()
    for top_k, top_p in [(5, 1.0), (40, 0.6), (0, 0.4)]:
        plan = decoding.filter_plan(vocabulary, top_k, top_p)
        sampler = decoding.filtered_sampler(plan)
        probabilities = np.broadcast_to(row, (rows, vocabulary)).astype("float32")
        tokens, _ = decoding._draw(sampler, probabilities, _seeds(sampler, 7), np.array(top_k, "int32"),
                                   np.array(top_p, "float32"))
        tokens = to_numpy(tokens)
        kept = _reference_filter(row[None], top_k, top_p)[0]
        assert kept[tokens].all(), (top_k, top_p)
        expected = np.where(kept, row, 0) / np.where(kept, row, 0).sum()
        counts = np.bincount(tokens, minlength=vocabulary) / rows
        assert np.abs(counts - expected).max() < 0.04, (top_k, top_p)
        assert (counts[expected > 0.05] > 0).all()
    # One batch, each row its own k and p (rows 0 and 1 greedy-like, row 2 all tokens).
    probabilities = np.broadcast_to(row, (3, vocabulary)).astype("float32")
    k, p = np.array([1, 64, 0], "int32"), np.array([1.0, 1e-6, 1.0], "float32")
    plan = decoding.filter_plan(vocabulary, k, p)
    assert plan == decoding.Filter(vocabulary, True)
    for seed in range(5):
        sampler = decoding.filtered_sampler(plan)
        tokens, _ = decoding._draw(sampler, probabilities, _seeds(sampler, seed), k, p)
        assert to_numpy(tokens)[:2].tolist() == [int(row.argmax())] * 2


def test_stop_strings_end_the_text(sharp_model):
    free = sharp_model.generate("It is", max_new_tokens=40, temperature=0)
    new = free[len("It is"):]
    stop = new[10:12]
    stopped = sharp_model.generate("It is", max_new_tokens=40, temperature=0, stop=["\x00never", stop])
    assert stopped == "It is" + new[:new.index(stop)]
    free_ids = sharp_model.generate([[5, 6]], max_new_tokens=20, temperature=0)[0, 2:].tolist()
    stop_id = free_ids[6]
    stopped_ids = sharp_model.generate([[5, 6]], max_new_tokens=20, temperature=0, stop=stop_id)
    assert stopped_ids[0].tolist() == [5, 6] + free_ids[:free_ids.index(stop_id)]


@pytest.mark.parametrize("sampler", ["beam", keras_hub.samplers.BeamSampler(num_beams=2),
                                     "contrastive", "top_k", "random"])
def test_keras_hub_samplers(sharp_model, sampler):
    text = sharp_model.generate(["It is", "Mr. Darcy"], max_new_tokens=6, sampler=sampler)
    assert text[0].startswith("It is") and text[1].startswith("Mr. Darcy")
    assert [len(t) for t in text] == [len("It is") + 6, len("Mr. Darcy") + 6]


def test_compiled_once_across_prompts_seeds_and_training(trainable_model, small_text, char_vectorizer):
    sharp_model = trainable_model
    sharp_model.generate("It is", max_new_tokens=8, seed=0)
    traces = sharp_model._kn_compiled.traces
    sharp_model.generate("Mr. Darcy", max_new_tokens=8, seed=1)
    sharp_model.compile()
    train, _ = kn.data.make_datasets(small_text, char_vectorizer, CONTEXT, 8, seed=0)
    before = sharp_model.generate("It is", max_new_tokens=8, temperature=0)
    sharp_model.fit(train.take(3), verbose=0)
    after = sharp_model.generate("It is", max_new_tokens=8, temperature=0)
    sharp_model.generate("She", max_new_tokens=8, seed=2)
    assert sharp_model._kn_compiled.traces - traces <= 1  # at most the greedy sampler's loop
    assert after == reference_text(sharp_model, "It is", 8)  # the new weights are used
    assert isinstance(before, str)


def reference_text(model, prompt, steps):
    ids = kn.data.encode(model.vectorizer, prompt).tolist()
    return prompt + kn.data.decode(model.vectorizer, reference_greedy(model, ids, steps)[len(ids):])


@pytest.mark.parametrize("kwargs, argument", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(prompt=[[1, 10_000]]), "prompt"),
    (dict(prompt=[[-1, 2]]), "prompt"),
    (dict(sampler="nucleus"), "sampler"),
    (dict(sampler="beam", top_k=5), "sampler"),
    (dict(stop=[""]), "stop"),
    (dict(seed=-3), "seed"),
])
def test_bad_arguments_name_the_argument(sharp_model, kwargs, argument):
    arguments = dict(prompt="It is", max_new_tokens=5)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        sharp_model.generate(**arguments)


def test_text_prompt_needs_a_vectorizer():
    model = kn.NanoGPT(30, 16, 1, 2, 16)
    with pytest.raises(ValueError, match="vectorizer"):
        model.generate("hello", max_new_tokens=3)


def test_generation_callback_prints_and_logs_samples(tmp_path, trainable_model, small_text, char_vectorizer):
    sharp_model = trainable_model
    printed = []
    callback = kn.callbacks.TextGenerationCallback(
        ["It is", "Mr. Darcy"], max_new_tokens=10, every=2, print_fn=printed.append,
        log_dir=tmp_path / "logs", temperature=0.8, top_p=0.95, seed=0)
    sharp_model.compile()
    train, _ = kn.data.make_datasets(small_text, char_vectorizer, CONTEXT, 8, seed=0)
    sharp_model.fit(train.take(2), epochs=4, verbose=0, callbacks=[callback])
    assert len(callback.samples) == 2 and len(printed) == 2
    assert all(s[0].startswith("It is") and s[1].startswith("Mr. Darcy") for s in callback.samples)
    assert "Mr. Darcy" in printed[-1]
    events = list((tmp_path / "logs").rglob("events.out.tfevents*"))
    assert events and sum(e.stat().st_size for e in events) > 0
