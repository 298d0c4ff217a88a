"""Sampling: small pure functions from next-token logits [B, V] to token ids [B].

Order of the filters, as in Meta's and HF's generate: divide by the temperature, keep the `top_k`
most likely tokens, then keep the nucleus: the fewest most likely of those whose probability
(renormalised over the survivors of top-k) reaches `top_p`. Ties go to the lower token id, so the
kept set has exactly the stated size. Temperature 0 is greedy (argmax, lower id on ties).

Every row draws with its own key, so a prompt's sample does not depend on its batch-mates: the key of
a token is fold_in(fold_in(key(seed), stream), position) (`sampling_keys`).

`sample` takes one setting for the whole batch (a static argument); `sample_rows` takes each row's
own temperature, top-k and top-p as arrays, so a continuous batch of requests with different
settings runs one compiled program. It filters among the MAX_TOP_K most likely tokens of a row
(a fixed shape); a row without top-k and top-p draws from the whole vocabulary.

Before sampling, the engine's step shapes a row's logits, in this order (vLLM's):
1. `apply_repetition_penalty` (HF's / vLLM's repetition_penalty r, over the tokens of the prompt and
   the output): a raw logit x of such a token becomes x / r if x > 0, else x * r;
2. `apply_logit_bias`, sparse additive terms: OpenAI's presence and frequency penalties over the
   tokens generated so far, x[t] -= presence * (count[t] > 0) + frequency * count[t], its logit_bias
   x[t] += bias[t], and min_tokens as -inf on the stop tokens until that many were generated (a mask
   after the additions: -inf absorbs them);
3. `apply_token_mask`: the tokens a grammar allows;
then temperature, top-k and top-p as above. Log-probabilities (`chosen_logprobs`, `top_logprobs`)
are the model's own distribution, log_softmax of the raw logits, before all of these.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llama_jax.infer.requests import MAX_LOGPROBS, MAX_TOP_K, check_penalties, check_sampling


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How generate / stream_tokens / Conversation sample (hashable: `sample` takes it as a static
    argument, and uses temperature, top_p and top_k only). The penalties, logit_bias and min_tokens
    are the engine's (requests.RequestParams has their definitions), and so is the grammar."""

    temperature: float = 0.6
    top_p: float = 0.9  # 1.0 keeps every token
    top_k: int = 0  # 0 keeps every token
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # a {token id: bias} dict is accepted
    min_tokens: int = 0
    n: int = 1  # samples per prompt (stream_tokens, generate), the prompt prefilled once
    # A llama_jax.grammar.CompiledGrammar every sample's tokens follow (the engine masks each step's
    # logits with it and ends the answer when it completes), or None. Not part of the hash: `sample`
    # never reads it.
    grammar: object | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        check_sampling(self.temperature, self.top_p, self.top_k)
        object.__setattr__(self, "logit_bias", check_penalties(self.presence_penalty, self.frequency_penalty,
                                                               self.repetition_penalty, self.logit_bias))
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")

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


ARGMAX_SLABS = 64  # argmax_rows splits a row into this many slabs


def argmax_rows(logits_BV):
    """jnp.argmax(logits_BV, axis=-1) as int32 (the lowest id among equal maxima), faster on CPU.

    XLA:CPU reduces a (value, index) pair along a row's minor axis without vectorising it (bench/RESULTS.md,
    "Numbers moved from docstrings", has the timing). Here the row is viewed as S slabs
    of V / S ids: the max and its lowest slab across the slabs (the major axis: vectorised), then
    the lowest id among the slab maxima equal to the row's. The same ids, ties included (the lowest id of a row's maxima is the lowest over
    the columns of each column's lowest); a vocabulary S does not divide takes jnp.argmax."""
    B, V = logits_BV.shape
    S = ARGMAX_SLABS
    if V % S:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    slabs_BSW = logits_BV.reshape(B, S, V // S)
    column_max_BW = slabs_BSW.max(axis=1)
    slab_BW = jnp.min(jnp.where(slabs_BSW == column_max_BW[:, None, :], jnp.arange(S, dtype=jnp.int32)[:, None], S),
                      axis=1)
    ids_BW = slab_BW * (V // S) + jnp.arange(V // S, dtype=jnp.int32)
    row_max_B1 = column_max_BW.max(axis=-1, keepdims=True)
    # A row with a NaN (no maximum equal to itself) gets an id in range, not V.
    return jnp.minimum(jnp.min(jnp.where(column_max_BW == row_max_B1, ids_BW, V), axis=-1), V - 1)


def sample(logits_BV, keys_B, params: SamplingParams):
    """Token ids [B] int32; keys_B holds one PRNG key per row (unused when greedy)."""
    if params.greedy:
        return argmax_rows(logits_BV)
    logits_BV = logits_BV.astype(jnp.float32) / params.temperature
    if params.top_k == 0 and params.top_p == 1:
        return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)
    values_BC, ids_BC, keep_BC = _candidates(logits_BV, params.top_k, params.top_p)
    values_BC = jnp.where(keep_BC, values_BC, -jnp.inf)
    choice_B = jax.vmap(jax.random.categorical)(keys_B, values_BC)
    return jnp.take_along_axis(ids_BC, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


def sample_rows(logits_BV, keys_B, temperature_B, top_k_B, top_p_B):
    """Token ids [B] int32, each row with its own settings (temperature 0: greedy; top_k 0 and top_p
    1: no filter). A nucleus is taken among the row's MAX_TOP_K most likely tokens."""
    logits_BV = logits_BV.astype(jnp.float32)
    greedy_B = argmax_rows(logits_BV)

    def draw():
        scaled_BV = logits_BV / jnp.where(temperature_B == 0, 1.0, temperature_B)[:, None]
        unfiltered_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BV).astype(jnp.int32)
        filtering_B = (top_k_B > 0) | (top_p_B < 1)
        drawn_B = jax.lax.cond(jnp.any(filtering_B),
                               lambda: jnp.where(filtering_B, _filtered(scaled_BV, keys_B, top_k_B, top_p_B),
                                                 unfiltered_B),
                               lambda: unfiltered_B)
        return jnp.where(temperature_B == 0, greedy_B, drawn_B)

    # Noise over the vocabulary and the top-k sort cost more than a small model's step on CPU:
    # a batch that needs neither skips them (lax.cond runs one branch).
    return jax.lax.cond(jnp.any(temperature_B > 0), draw, lambda: greedy_B)


def _filtered(scaled_BV, keys_B, top_k_B, top_p_B):
    values_BC, ids_BC = jax.lax.top_k(scaled_BV, min(MAX_TOP_K, scaled_BV.shape[-1]))
    rank_C = jnp.arange(values_BC.shape[-1])
    keep_BC = (top_k_B[:, None] == 0) | (rank_C[None, :] < top_k_B[:, None])
    probs_BC = jax.nn.softmax(jnp.where(keep_BC, values_BC, -jnp.inf), axis=-1)
    # A token is needed while the more likely ones hold less than top_p; the first always is.
    keep_BC &= jnp.cumsum(probs_BC, axis=-1) - probs_BC < top_p_B[:, None]
    choice_B = jax.vmap(jax.random.categorical)(keys_B, jnp.where(keep_BC, values_BC, -jnp.inf))
    return jnp.take_along_axis(ids_BC, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


def sampling_keys(seeds_L, streams_L, positions_L):
    """One PRNG key per row: fold_in(fold_in(key(seed), stream), position of the token drawn), so a
    token depends on its request's seed, stream and position only, not on batch-mates or on being
    recomputed after a preemption."""
    return jax.vmap(lambda seed, stream, position: jax.random.fold_in(
        jax.random.fold_in(jax.random.key(seed), stream), position))(seeds_L, streams_L, positions_L)


def apply_token_mask(logits_LV, allowed_LW):
    """Logits with the tokens a row does not allow at -inf. allowed_LW: uint32 [L, ceil(V / 32)],
    bit (t % 32) of word t // 32 set when token t is allowed (the layout grammar engines such as
    xgrammar fill). A row that allows nothing is left as it is (a mask must never leave a row
    without a token; the caller's grammar decides what an empty mask means)."""
    L, V = logits_LV.shape
    W = allowed_LW.shape[-1]
    # Each word's 32 bits broadcast out in place (no gather of a word per token): ~10x faster on CPU
    # for Llama 3's vocabulary.
    bits_LW32 = (allowed_LW[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    allowed_LV = bits_LW32.reshape(L, W * 32)[:, :V] == 1
    any_L1 = jnp.any(allowed_LW != 0, axis=-1, keepdims=True)
    return jnp.where(allowed_LV | ~any_L1, logits_LV, -jnp.inf)


def apply_logit_bias(logits_LV, ids_LN, bias_LN):
    """Logits plus bias_LN[l, n] at token ids_LN[l, n] (ids < 0: unused slots); repeated ids add up.
    OpenAI's logit_bias and its presence / frequency penalties are all such sparse additive terms."""
    V = logits_LV.shape[-1]
    rows_L1 = jnp.arange(logits_LV.shape[0])[:, None]
    bias_LN = jnp.where(ids_LN >= 0, bias_LN, 0.0)
    return logits_LV.at[rows_L1, jnp.where(ids_LN >= 0, ids_LN, V)].add(bias_LN.astype(logits_LV.dtype),
                                                                        mode="drop")


def apply_repetition_penalty(logits_LV, ids_LN, penalized_LN, penalty_L):
    """Logits with each listed token t of a row (ids_LN[l, n] >= 0 and penalized_LN[l, n]) divided by
    the row's penalty if positive, multiplied by it otherwise (HF's and vLLM's repetition_penalty).
    A row's listed ids must be distinct (each is set once from its raw logit)."""
    V = logits_LV.shape[-1]
    rows_L1 = jnp.arange(logits_LV.shape[0])[:, None]
    raw_LN = jnp.take_along_axis(logits_LV, jnp.clip(ids_LN, 0, V - 1), axis=1)
    r_L1 = penalty_L[:, None].astype(logits_LV.dtype)
    penalized_value_LN = jnp.where(raw_LN > 0, raw_LN / r_L1, raw_LN * r_L1)
    target_LN = jnp.where((ids_LN >= 0) & penalized_LN, ids_LN, V)  # past the vocabulary: dropped
    return logits_LV.at[rows_L1, target_LN].set(penalized_value_LN, mode="drop")


def chosen_logprobs(logits_LV, tokens_L):
    """log_softmax(logits)[l, tokens_L[l]] as jax.nn.log_softmax computes it, (x - max) - log(sum(exp(x -
    max))), without writing the [L, V] log-softmax: only the top log-probabilities need that."""
    max_L1 = jnp.max(logits_LV, axis=-1, keepdims=True)
    logsumexp_L1 = jnp.log(jnp.sum(jnp.exp(logits_LV - max_L1), axis=-1, keepdims=True))
    return (jnp.take_along_axis(logits_LV, tokens_L[:, None], axis=-1) - max_L1 - logsumexp_L1)[:, 0]


def top_logprobs(logits_LV, wanted_L):
    """(log-probabilities [L, MAX_LOGPROBS] descending, their ids) of each row's most likely tokens;
    zeros unless some row wants them (wanted_L > 0): a top-k over the vocabulary costs about as much
    as a small model's whole step on CPU."""
    L, V = logits_LV.shape
    pad = ((0, 0), (0, max(0, MAX_LOGPROBS - V)))  # a vocabulary smaller than that (tests): -inf, id 0 after it

    def top():
        values_LK, ids_LK = jax.lax.top_k(jax.nn.log_softmax(logits_LV, axis=-1), min(MAX_LOGPROBS, V))
        return jnp.pad(values_LK, pad, constant_values=-jnp.inf), jnp.pad(ids_LK, pad)

    return jax.lax.cond(jnp.any(wanted_L > 0), top,
                        lambda: (jnp.zeros((L, MAX_LOGPROBS), jnp.float32), jnp.zeros((L, MAX_LOGPROBS), jnp.int32)))


__all__ = ["SamplingParams", "keep_mask", "sample", "sample_rows", "argmax_rows", "sampling_keys", "apply_token_mask",
           "apply_logit_bias", "apply_repetition_penalty", "chosen_logprobs", "top_logprobs", "MAX_TOP_K"]
