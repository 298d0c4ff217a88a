"""The speculative verification rule: the tokens it puts out are distributed as the target's own
samples (chi-square over many keys on a tiny vocabulary), whatever the proposals; greedy rows keep
exactly the proposals that are the argmax, then the argmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from llama_jax.infer import sampling
from llama_jax.infer.speculative import target_probs, verify

V, K, N = 6, 3, 40_000
LOGITS_PV = np.array([[2.0, 1.0, 0.5, 0.0, -1.0, 0.3],
                      [0.1, 0.2, 1.5, -0.5, 0.9, 0.0],
                      [1.0, 1.0, 1.0, 0.2, 0.0, -2.0],
                      [0.0, 3.0, 0.0, 0.0, 1.0, 0.5]], np.float32)


def run(temperature, top_k, top_p, proposals, seed=0):
    keys = jax.random.split(jax.random.key(seed), N * (K + 1)).reshape(N, K + 1)
    full = lambda value, dtype: jnp.full(N, value, dtype)  # noqa: E731
    return jax.jit(verify)(jnp.broadcast_to(LOGITS_PV, (N, K + 1, V)), jnp.broadcast_to(jnp.asarray(proposals), (N, K)),
                           full(len(proposals), jnp.int32), keys, full(temperature, jnp.float32),
                           full(top_k, jnp.int32), full(top_p, jnp.float32))


def assert_distributed_as(tokens, probs):
    counts = np.bincount(tokens, minlength=V)
    expected = probs * len(tokens)
    support = expected > 0
    assert counts[~support].sum() == 0, (counts, probs)  # nothing outside the target's support
    if support.sum() > 1:
        chi2 = ((counts[support] - expected[support]) ** 2 / expected[support]).sum()
        assert stats.chi2.sf(chi2, support.sum() - 1) > 1e-3, (counts, expected)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8), (1.0, 4, 0.9)])
@pytest.mark.parametrize("proposals", [[0, 2, 1], [4, 4, 4], [1, 2, 0]])
def test_the_tokens_out_are_distributed_as_the_target_s_samples(temperature, top_k, top_p, proposals):
    accepted, tokens = map(np.asarray, run(temperature, top_k, top_p, proposals))
    p = np.asarray(target_probs(jnp.asarray(LOGITS_PV), jnp.full(K + 1, temperature), jnp.full(K + 1, top_k, jnp.int32),
                                jnp.full(K + 1, top_p)))
    assert_distributed_as(tokens[:, 0], p[0])  # the first new token, whatever was proposed
    kept_first = accepted >= 1  # given the first proposal was kept, the second token is p_1's
    if kept_first.sum() > 1000:
        assert_distributed_as(tokens[kept_first, 1], p[1])
    assert np.all((tokens >= 0).sum(axis=1) == accepted + 1)
    assert np.array_equal(tokens[:, :1][accepted >= 1, 0], np.full((accepted >= 1).sum(), proposals[0]))


def test_target_probs_is_what_sample_rows_draws_from():
    temperature, top_k, top_p = 0.8, 4, 0.85
    logits = jnp.broadcast_to(jnp.asarray(LOGITS_PV[0]), (N, V))
    keys = jax.random.split(jax.random.key(3), N)
    full = lambda value, dtype: jnp.full(N, value, dtype)  # noqa: E731
    drawn = jax.jit(sampling.sample_rows)(logits, keys, full(temperature, jnp.float32), full(top_k, jnp.int32),
                                          full(top_p, jnp.float32))
    p = np.asarray(target_probs(logits[:1], full(temperature, jnp.float32)[:1], full(top_k, jnp.int32)[:1],
                                full(top_p, jnp.float32)[:1]))[0]
    assert_distributed_as(np.asarray(drawn), p)


def test_greedy_keeps_the_proposals_that_are_the_argmax_then_the_argmax():
    argmax = LOGITS_PV.argmax(-1)  # 0, 2, 0, 1
    cases = {(0, 2, 0): (3, [0, 2, 0, 1]), (0, 2, 5): (2, [0, 2, 0, -1]), (3, 2, 0): (0, [0, -1, -1, -1])}
    for proposals, (kept, tokens) in cases.items():
        accepted, out = verify(jnp.asarray(LOGITS_PV)[None], jnp.asarray([proposals]), jnp.asarray([3]),
                               jax.random.split(jax.random.key(0), K + 1)[None], jnp.zeros(1), jnp.zeros(1, jnp.int32),
                               jnp.ones(1))
        assert (int(accepted[0]), np.asarray(out[0]).tolist()) == (kept, tokens), proposals
    assert argmax.tolist() == [0, 2, 0, 1]


def test_fewer_proposals_than_positions_draw_the_bonus_after_the_last():
    accepted, out = verify(jnp.asarray(LOGITS_PV)[None], jnp.asarray([[0, 2, 9]]), jnp.asarray([2]),
                           jax.random.split(jax.random.key(0), K + 1)[None], jnp.zeros(1), jnp.zeros(1, jnp.int32),
                           jnp.ones(1))
    assert int(accepted[0]) == 2 and np.asarray(out[0]).tolist() == [0, 2, 0, -1]  # proposal 9 is not looked at
