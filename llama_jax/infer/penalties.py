"""A request's penalties, logit_bias and min_tokens as the step's sparse per-row lists (host side,
numpy only; the step applies them with sampling.apply_repetition_penalty and apply_logit_bias).

Each sample row gets the distinct tokens whose logits its request changes, with the additive term
of each (presence, frequency, logit_bias, -inf for a stop token before min_tokens) and whether the
repetition penalty applies to it. The lists are padded to N, a power of two of at least MIN_SLOTS,
so a batch's lengths compile a few programs, not one per length. Building a row costs O(distinct
tokens it names): the scheduler keeps each sequence's generated-token counts as they come.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from llama_jax.infer.requests import RequestParams

MIN_SLOTS = 16  # the shortest padded list: most requests name fewer tokens (a few biases, the outputs so far)


class RowTerms(NamedTuple):
    ids: np.ndarray  # [n] int64, distinct and sorted
    bias: np.ndarray  # [n] float64: added to the logit (after the repetition penalty)
    penalized: np.ndarray  # [n] bool: the repetition penalty applies


def row_terms(params: RequestParams, prompt_tokens, counts: Mapping[int, int], generated: int) -> RowTerms:
    """The terms of one sample row of a request that has generated `generated` tokens so far,
    `counts[t]` times token t; prompt_tokens: the prompt's distinct tokens (an int array or None;
    read by the repetition penalty only). numpy over the listed tokens: a long prompt's thousand distinct
    tokens cost tens of microseconds a row, not a Python loop each."""
    generated_ids = np.fromiter(counts.keys(), np.int64, len(counts))
    repeated = np.zeros(0, np.int64)
    if params.repetition_penalty != 1:
        prompt_ids = np.asarray(() if prompt_tokens is None else prompt_tokens, np.int64).reshape(-1)
        repeated = np.concatenate([prompt_ids, generated_ids])
    penalizing = bool(params.presence_penalty or params.frequency_penalty)
    bias_ids = np.fromiter((t for t, _ in params.logit_bias), np.int64, len(params.logit_bias))
    stop_ids = np.asarray(params.stop_token_ids if generated < params.min_tokens else (), np.int64)
    ids = np.unique(np.concatenate([repeated, generated_ids if penalizing else repeated[:0], bias_ids, stop_ids]))
    bias = np.zeros(ids.size)
    if penalizing and generated_ids.size:  # counts' keys are distinct: one subtraction each
        times = np.fromiter(counts.values(), np.float64, len(counts))
        bias[np.searchsorted(ids, generated_ids)] -= params.presence_penalty + params.frequency_penalty * times
    if bias_ids.size:  # distinct too (RequestParams checks)
        bias[np.searchsorted(ids, bias_ids)] += [b for _, b in params.logit_bias]
    bias[np.searchsorted(ids, stop_ids)] = -np.inf
    return RowTerms(ids, bias, np.isin(ids, repeated))


def padded_length(n: int) -> int:
    """The power of two >= n, at least MIN_SLOTS."""
    return max(MIN_SLOTS, 1 << max(0, n - 1).bit_length())


def pack_terms(rows: Sequence[RowTerms | None], repetition: Sequence[float], L: int):
    """(ids [L, N] int32, -1 unused; bias [L, N] float32; penalized [L, N] bool or None; repetition
    [L] float32 or None) for sample rows 0.. (None: a row without terms); None, None, None, None
    when no row has any. The last two are None unless some row's repetition penalty is not 1."""
    if not any(row is not None and len(row.ids) for row in rows):
        return None, None, None, None
    N = padded_length(max(len(row.ids) for row in rows if row is not None))
    ids, bias, penalized = np.full((L, N), -1, np.int32), np.zeros((L, N), np.float32), np.zeros((L, N), bool)
    for l, row in enumerate(rows):
        if row is not None and len(row.ids):
            n = len(row.ids)
            ids[l, :n], bias[l, :n], penalized[l, :n] = row.ids, row.bias, row.penalized
    if all(r == 1 for r in repetition):
        return ids, bias, None, None
    penalty = np.ones(L, np.float32)
    penalty[:len(repetition)] = repetition
    return ids, bias, penalized, penalty


__all__ = ["RowTerms", "row_terms", "pack_terms", "padded_length", "MIN_SLOTS"]
