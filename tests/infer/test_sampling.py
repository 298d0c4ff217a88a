"""Sampling: exactly the right tokens survive top-k / top-p, draws follow the filtered distribution,
greedy is argmax, and a row's draw depends only on its own key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.infer.sampling import MAX_TOP_K, SamplingParams, argmax_rows, keep_mask, sample, sample_rows

# Probabilities 1/2, 1/4, 1/8, 1/16, 1/16 (ids shuffled so order is not the id order).
PROBS = {3: 0.5, 0: 0.25, 4: 0.125, 1: 0.0625, 2: 0.0625}
LOGITS = jnp.log(jnp.asarray([[PROBS[i] for i in range(5)]], jnp.float32))


def kept(logits, **kw):
    return set(np.flatnonzero(np.asarray(keep_mask(logits, **kw))[0]).tolist())


def draw(logits, params, n=4000, seed=0):
    """n samples of one row of logits, each with its own key."""
    keys = jax.random.split(jax.random.key(seed), n)
    return np.asarray(sample(jnp.broadcast_to(logits, (n, logits.shape[-1])), keys, params))


@pytest.mark.parametrize("k, expected", [(1, {3}), (2, {3, 0}), (3, {3, 0, 4}), (5, {0, 1, 2, 3, 4}),
                                         (9, {0, 1, 2, 3, 4})])
def test_top_k_keeps_the_k_most_likely(k, expected):
    assert kept(LOGITS, top_k=k) == expected


def test_top_k_ties_keep_exactly_k_lowest_ids_first():
    logits = jnp.asarray([[1.0, 5.0, 5.0, 5.0, 5.0, 0.0]])
    assert kept(logits, top_k=2) == {1, 2}
    assert kept(logits, top_k=5) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("p, expected", [
    (0.3, {3}),  # the top token alone holds 0.5
    (0.6, {3, 0}),
    (0.74, {3, 0}),
    (0.8, {3, 0, 4}),
    (0.9, {3, 0, 4, 1}),  # 0.875 before id 1; its tie (id 2) is not needed after it
    (0.95, {0, 1, 2, 3, 4}),
    (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(LOGITS, top_p=p) == expected


def test_top_p_applies_to_the_top_k_survivors_renormalised():
    # Without top-k, 0.5 precedes id 0 (< 0.6: kept). Among the top 2, id 3 holds 2/3 >= 0.6.
    assert kept(LOGITS, top_p=0.6) == {3, 0}
    assert kept(LOGITS, top_k=2, top_p=0.6) == {3}
    assert kept(LOGITS, top_k=3, top_p=0.7) == {3, 0}  # 4/7 before id 0, 6/7 before id 4


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(temperature=1.0, top_k=2, top_p=1.0), {3: 2 / 3, 0: 1 / 3}),
    (SamplingParams(temperature=1.0, top_k=0, top_p=0.8), {3: 4 / 7, 0: 2 / 7, 4: 1 / 7}),
    (SamplingParams(temperature=1.0, top_k=0, top_p=1.0), PROBS),
    # Temperature 0.5 squares the probabilities before renormalising: 16:4:1:1/4:1/4.
    (SamplingParams(temperature=0.5, top_k=0, top_p=1.0),
     {3: 16 / 21.5, 0: 4 / 21.5, 4: 1 / 21.5, 1: 0.25 / 21.5, 2: 0.25 / 21.5}),
])
def test_samples_follow_the_filtered_distribution(params, expected):
    samples = draw(LOGITS, params)
    assert set(samples.tolist()) == set(expected)
    for token, p in expected.items():
        # 4000 draws: 5 standard deviations of a frequency is at most 0.04.
        assert abs(np.mean(samples == token) - p) < 0.04, (token, p)


def test_greedy_is_argmax_with_lower_id_on_ties():
    logits = jnp.asarray([[0.0, 2.0, 7.0, 7.0], [9.0, 1.0, 1.0, 9.0]])
    keys = jax.random.split(jax.random.key(0), 2)
    assert sample(logits, keys, SamplingParams(temperature=0.0)).tolist() == [2, 0]


@pytest.mark.parametrize("vocab", [64 * 8, 64 * 8 + 3])  # slabs of 8 ids; a vocabulary the slabs do not divide
def test_argmax_rows_is_argmax_with_ties_and_nans(vocab):
    logits = np.round(np.random.default_rng(0).standard_normal((6, vocab)), 1).astype(np.float32)  # many ties
    logits[1, [5, 300]] = logits[1].max() + 1  # maxima in different slabs, the later one in an earlier column
    logits[2, [9, 17]] = logits[2].max() + 1  # in one column: slab 1 and slab 2
    logits[3] = 0.0  # all equal
    logits[4, -1] = np.inf
    logits[5, 7] = np.nan
    ids = argmax_rows(jnp.asarray(logits))
    assert ids.dtype == jnp.int32
    assert ids[:5].tolist() == np.argmax(logits[:5], axis=-1).tolist()
    assert 0 <= int(ids[5]) < vocab  # a NaN row: some id in range


def test_same_key_same_token_and_rows_are_independent():
    logits = jax.random.normal(jax.random.key(1), (4, 64)) * 3
    keys = jax.random.split(jax.random.key(2), 4)
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
    batch = sample(logits, keys, params)
    assert sample(logits, keys, params).tolist() == batch.tolist()
    for r in range(4):
        assert int(sample(logits[r:r + 1], keys[r:r + 1], params)[0]) == int(batch[r])
    draws = [sample(logits, jax.random.split(jax.random.key(s), 4), params).tolist() for s in range(3, 8)]
    assert any(d != batch.tolist() for d in draws)


@pytest.mark.parametrize("vocab", [64, 4 * MAX_TOP_K])
def test_sample_rows_draws_what_sample_draws_with_each_rows_setting(vocab):
    settings = [SamplingParams(0.0), SamplingParams(1.0, 1.0, 0), SamplingParams(1.0, 1.0, 2),
                SamplingParams(1.0, 0.8, 0), SamplingParams(0.5, 0.9, 3), SamplingParams(1.3, 0.95, 40)]
    B = len(settings)
    logits = jax.random.normal(jax.random.key(1), (B, vocab)) * 3
    for seed in range(5):
        keys = jax.random.split(jax.random.key(seed), B)
        rows = sample_rows(logits, keys, jnp.asarray([s.temperature for s in settings], jnp.float32),
                           jnp.asarray([s.top_k for s in settings]), jnp.asarray([s.top_p for s in settings]))
        expected = [int(sample(logits[r:r + 1], keys[r:r + 1], s)[0]) for r, s in enumerate(settings)]
        assert rows.tolist() == expected


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
])
def test_bad_sampling_params_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
