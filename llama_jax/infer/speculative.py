"""Speculative verification (issue #26; not wired into the engine yet): the target model scores a
row's K proposed tokens in one step, and the standard rule keeps a prefix of them so that the tokens
out are distributed exactly as the target's own samples, at any temperature, top-k and top-p.

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


def verify(logits_LPV, proposals_LK, proposed_L, keys_LP, temperature_L, top_k_L, top_p_L):
    """(accepted_L, tokens_LP): row l keeps its first accepted_L[l] proposals (of proposed_L[l] <= K)
    and then one token of the target's (the residual's draw at the first rejection, or the bonus
    draw after them all), so tokens_LP[l, :accepted + 1] are its new tokens (-1 after them).

    logits_LPV: the target's logits at the P = K + 1 positions of each row (position j predicts the
    token after proposal j - 1); keys_LP: a PRNG key per row and position (the acceptance test and
    the residual draw of a position fold it in two ways)."""
    L, P, V = logits_LPV.shape
    K = P - 1
    flat = lambda x: jnp.repeat(x, P)  # noqa: E731 (each row's setting at each of its positions)
    probs_LPV = target_probs(logits_LPV.reshape(L * P, V), flat(temperature_L), flat(top_k_L),
                             flat(top_p_L)).reshape(L, P, V)
    j_K = jnp.arange(K)
    live_LK = j_K[None, :] < proposed_L[:, None]
    proposals_LK = jnp.where(live_LK, proposals_LK, 0)
    p_at_proposal_LK = jnp.take_along_axis(probs_LPV[:, :K], proposals_LK[..., None], axis=-1)[..., 0]
    test_keys_LK = jax.vmap(jax.vmap(lambda key: jax.random.fold_in(key, 0)))(keys_LP[:, :K])
    draw_keys_LP = jax.vmap(jax.vmap(lambda key: jax.random.fold_in(key, 1)))(keys_LP)
    uniform_LK = jax.vmap(jax.vmap(jax.random.uniform))(test_keys_LK)
    accept_LK = live_LK & (uniform_LK < p_at_proposal_LK)
    accepted_L = jnp.sum(jnp.cumprod(accept_LK, axis=-1), axis=-1).astype(jnp.int32)
    # The residual at a rejected position: p without the proposal (a point mass's max(p - q, 0)).
    rejected_LPV = jnp.pad(jax.nn.one_hot(proposals_LK, V, dtype=jnp.bool_) & live_LK[..., None],
                           ((0, 0), (0, 1), (0, 0)))
    residual_LPV = jnp.where(rejected_LPV, 0.0, probs_LPV)
    drawn_LP = jax.vmap(jax.vmap(jax.random.categorical))(draw_keys_LP, jnp.log(residual_LPV)).astype(jnp.int32)
    final_L = jnp.take_along_axis(drawn_LP, accepted_L[:, None], axis=-1)[:, 0]
    j_P = jnp.arange(P)
    padded_LP = jnp.pad(proposals_LK, ((0, 0), (0, 1)))
    tokens_LP = jnp.where(j_P[None, :] < accepted_L[:, None], padded_LP,
                          jnp.where(j_P[None, :] == accepted_L[:, None], final_L[:, None], -1))
    return accepted_L, tokens_LP


__all__ = ["target_probs", "verify"]
