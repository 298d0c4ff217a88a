"""Sampling: small pure functions from next-token logits [B, V] to token ids [B].

Order of the filters, as in Meta's and HF's generate: divide by the temperature, keep the `top_k`
most likely tokens, then keep the nucleus: the fewest most likely of those whose probability
(renormalised over the survivors of top-k) reaches `top_p`. Ties go to the lower token id, so the
kept set has exactly the stated size. Temperature 0 is greedy (argmax, lower id on ties).

Every row draws with its own key, so a prompt's sample does not depend on its batch-mates.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Hashable, so the decode step is compiled once per sampling setting, not per call."""

    temperature: float = 0.6
    top_p: float = 0.9  # 1.0 keeps every token
    top_k: int = 0  # 0 keeps every token

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _candidates(logits_BV, top_k: int, top_p: float):
    """The kept tokens of each row: (logits [B, C] descending, ids [B, C], keep [B, C])."""
    V = logits_BV.shape[-1]
    C = V if top_k == 0 else min(top_k, V)
    # lax.top_k orders equal values by index, which is what makes "exactly k" well defined.
    values_BC, ids_BC = jax.lax.top_k(logits_BV, C)
    keep_BC = jnp.ones(values_BC.shape, bool)
    if top_p < 1:
        probs_BC = jax.nn.softmax(values_BC, axis=-1)
        mass_before_BC = jnp.cumsum(probs_BC, axis=-1) - probs_BC
        # A token is needed while the more likely ones hold less than top_p; the first always is.
        keep_BC = mass_before_BC < top_p
    return values_BC, ids_BC, keep_BC


def keep_mask(logits_BV, top_k: int = 0, top_p: float = 1.0):
    """Bool [B, V]: the tokens top-k then top-p keep (temperature already applied to the logits)."""
    _, ids_BC, keep_BC = _candidates(logits_BV, top_k, top_p)
    rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
    return jnp.zeros(logits_BV.shape, bool).at[rows_B1, ids_BC].set(keep_BC)


def sample(logits_BV, keys_B, params: SamplingParams):
    """Token ids [B] int32; keys_B holds one PRNG key per row (unused when greedy)."""
    if params.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / params.temperature
    if params.top_k == 0 and params.top_p == 1:
        return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)
    values_BC, ids_BC, keep_BC = _candidates(logits_BV, params.top_k, params.top_p)
    values_BC = jnp.where(keep_BC, values_BC, -jnp.inf)
    choice_B = jax.vmap(jax.random.categorical)(keys_B, values_BC)
    return jnp.take_along_axis(ids_BC, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


__all__ = ["SamplingParams", "keep_mask", "sample"]
