"""Speculative verification: the target model scores a row's K proposed tokens in one step, and the
standard rule keeps a prefix of them so that the tokens out are distributed exactly as the target's
own samples, at any temperature, top-k and top-p.

For proposals that are a point mass (prompt lookup: q(d) = 1 for the proposed d), proposal j is
accepted with probability min(1, p_j(d_j) / q(d_j)) = p_j(d_j); at the first rejection the token is
drawn from the residual max(p_j - q, 0), normalized: p_j without d_j. When all m proposals are
accepted, a bonus token is drawn from p_m. Greedy rows (temperature 0): p is one-hot at the argmax,
so a proposal is kept exactly when it is the argmax, and the output equals plain greedy decoding.

Shapes: L rows, K proposals at most (K + 1 target positions), V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.infer.requests import MAX_TOP_K
from llama_jax.infer import sampling
from llama_jax.infer.sampling import argmax_rows


def target_probs(logits_BV, temperature_B, top_k_B, top_p_B):
    """The distribution `sampling.sample_rows` draws each row's token from, as probabilities [B, V]:
    softmax(logits / temperature), restricted by top-k / top-p to the row's MAX_TOP_K most likely
    tokens when either is on; one-hot at the argmax for temperature 0."""
    logits_BV = logits_BV.astype(jnp.float32)
    B, V = logits_BV.shape
    scaled_BV = logits_BV / jnp.where(temperature_B == 0, 1.0, temperature_B)[:, None]
    full_BV = jax.nn.softmax(scaled_BV, axis=-1)
    values_BC, ids_BC = jax.lax.top_k(scaled_BV, min(MAX_TOP_K, V))
    rank_C = jnp.arange(values_BC.shape[-1])
    keep_BC = (top_k_B[:, None] == 0) | (rank_C[None, :] < top_k_B[:, None])
    probs_BC = jax.nn.softmax(jnp.where(keep_BC, values_BC, -jnp.inf), axis=-1)
    keep_BC &= jnp.cumsum(probs_BC, axis=-1) - probs_BC < top_p_B[:, None]
    kept_BC = jax.nn.softmax(jnp.where(keep_BC, values_BC, -jnp.inf), axis=-1)
    filtered_BV = jnp.zeros_like(full_BV).at[jnp.arange(B)[:, None], ids_BC].set(kept_BC)
    filtering_B = (top_k_B > 0) | (top_p_B < 1)
    greedy_BV = jax.nn.one_hot(argmax_rows(logits_BV), V, dtype=jnp.float32)
    return jnp.where((temperature_B == 0)[:, None], greedy_BV,
                     jnp.where(filtering_B[:, None], filtered_BV, full_BV))


def proposal_probs(logits_NV, ids_N, temperature_N, top_k_N, top_p_N):
    """target_probs(...)[n, ids_N[n]] without the [N, V] scatter when it is not needed: one-hot for
    greedy rows, the softmax's entry for rows without top-k / top-p (lax.cond: a batch of greedy rows
    computes neither the softmax nor a top-k)."""
    logits_NV = logits_NV.astype(jnp.float32)
    greedy_N = (argmax_rows(logits_NV) == ids_N).astype(jnp.float32)

    def drawn():
        scaled_NV = logits_NV / jnp.where(temperature_N == 0, 1.0, temperature_N)[:, None]
        at_N = jnp.take_along_axis(scaled_NV, ids_N[:, None], axis=-1)[:, 0]
        full_N = jnp.exp(at_N - jax.nn.logsumexp(scaled_NV, axis=-1))
        filtering_N = (top_k_N > 0) | (top_p_N < 1)
        filtered_N = jax.lax.cond(jnp.any(filtering_N & (temperature_N > 0)), lambda: jnp.take_along_axis(
            target_probs(logits_NV, temperature_N, top_k_N, top_p_N), ids_N[:, None], axis=-1)[:, 0], lambda: full_N)
        return jnp.where(temperature_N == 0, greedy_N, jnp.where(filtering_N, filtered_N, full_N))

    return jax.lax.cond(jnp.any(temperature_N > 0), drawn, lambda: greedy_N)


def verify(logits_LPV, proposals_LK, proposed_L, keys_LP, temperature_L, top_k_L, top_p_L):
    """(accepted_L, tokens_LP): row l keeps its first accepted_L[l] proposals (of proposed_L[l] <= K)
    and then one token of the target's (the residual's draw at the first rejection, or the bonus
    draw after them all), so tokens_LP[l, :accepted + 1] are its new tokens (-1 after them).

    logits_LPV: the target's logits at the P = K + 1 positions of each row (position j predicts the
    token after proposal j - 1); keys_LP: each position's sampling key (sampling.sampling_keys). The
    bonus token is `sampling.sample_rows` with its position's key, so a row with no proposals draws
    exactly the token a plain decode step draws; the acceptance test and the residual draw fold the
    key in two other ways."""
    L, P, V = logits_LPV.shape
    K = P - 1
    flat = lambda x: jnp.repeat(x, K)  # noqa: E731 (each row's setting at each of its proposals)
    live_LK = jnp.arange(K)[None, :] < proposed_L[:, None]
    proposals_LK = jnp.where(live_LK, proposals_LK, 0)
    p_LK = proposal_probs(logits_LPV[:, :K].reshape(L * K, V), proposals_LK.reshape(-1), flat(temperature_L),
                          flat(top_k_L), flat(top_p_L)).reshape(L, K)
    uniform_LK = jax.vmap(jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 0))))(keys_LP[:, :K])
    accept_LK = live_LK & (uniform_LK < p_LK)
    accepted_L = jnp.sum(jnp.cumprod(accept_LK, axis=-1), axis=-1).astype(jnp.int32)
    # The last position's logits and key: after a rejection, or after every proposal (the bonus).
    at_L = jnp.take_along_axis(logits_LPV, accepted_L[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    key_L = jnp.take_along_axis(keys_LP, accepted_L[:, None], axis=1)[:, 0]
    bonus_L = sampling.sample_rows(at_L, key_L, temperature_L, top_k_L, top_p_L)
    rejected_L = accepted_L < proposed_L
    rejected_id_L = jnp.take_along_axis(jnp.pad(proposals_LK, ((0, 0), (0, 1))), accepted_L[:, None], axis=1)[:, 0]

    def residual():
        # At a rejection the token comes from the target without the proposal: a point mass's
        # max(p - q, 0), normalized. Greedy rows get the argmax (the rejected proposal was not it).
        probs_LV = target_probs(at_L, temperature_L, top_k_L, top_p_L)
        probs_LV = jnp.where(jax.nn.one_hot(rejected_id_L, V, dtype=jnp.bool_), 0.0, probs_LV)
        keys = jax.vmap(lambda key: jax.random.fold_in(key, 1))(key_L)
        return jax.vmap(jax.random.categorical)(keys, jnp.log(probs_LV)).astype(jnp.int32)

    drawn_L = jax.lax.cond(jnp.any(rejected_L & (temperature_L > 0)), residual, lambda: argmax_rows(at_L))
    final_L = jnp.where(rejected_L, drawn_L, bonus_L)
    j_P = jnp.arange(P)
    padded_LP = jnp.pad(proposals_LK, ((0, 0), (0, 1)))
    tokens_LP = jnp.where(j_P[None, :] < accepted_L[:, None], padded_LP,
                          jnp.where(j_P[None, :] == accepted_L[:, None], final_L[:, None], -1))
    return accepted_L, tokens_LP


__all__ = ["target_probs", "proposal_probs", "verify"]
