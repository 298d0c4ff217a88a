"""One request's grammar state, as the engine drives it: before each sampled token `fill` its row of
the step's allowed-token bitmask (`sampling.apply_token_mask`'s `allowed_LW`, uint32 [L, W] with
W = ceil(V / 32), bit t % 32 of word t // 32), after it `accept` the token.

Stop tokens: the vocabulary's stop tokens (`GrammarVocabulary.stop_tokens`) are allowed exactly
when the grammar is complete, so a constrained response can neither end early nor be cut by an
end-of-turn token inside a value. Once nothing but a stop token may follow (`{"a": 1}` closed),
`is_finished()` is true and the engine ends the request with finish "stop" without sampling one
more token; while the grammar may end or go on (a top-level number), the model chooses, and a
sampled stop token ends it as any stop token does. A request that reaches its max_tokens first ends
with "length" and an incomplete value (`is_accepting()` false).
"""

from __future__ import annotations

from collections.abc import Sequence

import llguidance
import llguidance.numpy
import numpy as np

from llama_jax.grammar.vocab import GrammarVocabulary

_executor: llguidance.LLExecutor | None = None


def _shared_executor() -> llguidance.LLExecutor:
    """llguidance's thread pool for masks of many rows at once (its threads drop the GIL)."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    return _executor


class GrammarMatcher:
    """A grammar's state after the tokens accepted so far. Made by `CompiledGrammar.matcher()`."""

    def __init__(self, ll_matcher: llguidance.LLMatcher, vocabulary: GrammarVocabulary):
        self._m = ll_matcher
        self.vocabulary = vocabulary
        self._ll_bytes = vocabulary.ll_words * 4
        self.accepted = 0  # tokens accepted since the start (what rollback can undo)

    def _check_row(self, row_W: np.ndarray) -> None:
        words = self.vocabulary.mask_words
        if row_W.dtype != np.uint32 or row_W.shape != (words,) or not row_W.flags.c_contiguous:
            raise ValueError(f"bitmask row must be a contiguous uint32 array of shape ({words},), "
                             f"got {row_W.dtype} {row_W.shape}")

    def fill(self, row_W: np.ndarray) -> None:
        """Write the allowed next tokens into row_W (uint32 [W], a row of the step's bitmask, in place).
        A matcher in an error state allows only the stop tokens, so its request ends next token."""
        self._check_row(row_W)
        self._m.unsafe_compute_mask_ptr(row_W.ctypes.data, self._ll_bytes)
        if self._ll_bytes < row_W.nbytes:  # a padded model vocabulary: ids past the tokenizer's never
            row_W[self.vocabulary.ll_words:] = 0

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token. False if the grammar does not allow it (then `error` says
        why and the matcher stays in that error state); a stop token is accepted when complete."""
        ok = self._m.consume_token(int(token_id))
        if ok:
            self.accepted += 1
        return ok

    def is_finished(self) -> bool:
        """The grammar is complete and allows nothing but a stop token: end the request ("stop")."""
        return self._m.is_stopped() and not self._m.is_error()

    def is_accepting(self) -> bool:
        """What was accepted is a complete match (a stop token may come next)."""
        return self._m.is_accepting()

    @property
    def error(self) -> str | None:
        """Why the matcher refused a token, or None."""
        return self._m.get_error() if self._m.is_error() else None

    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens accepted tokens (speculative decoding's rejected drafts). Cheap:
        llguidance keeps its parser states on a stack."""
        if not 0 <= num_tokens <= self.accepted:
            raise ValueError(f"rollback of {num_tokens} tokens: only {self.accepted} were accepted")
        if not self._m.rollback(num_tokens):
            raise ValueError(f"rollback of {num_tokens} tokens failed: {self._m.get_error()}")
        self.accepted -= num_tokens

    def valid_prefix(self, token_ids: Sequence[int]) -> int:
        """How many of token_ids (a draft) the grammar would accept in a row, without accepting them."""
        return self._m.validate_tokens([int(t) for t in token_ids])

    def reset(self) -> None:
        """Back to the start (a preempted request that is recomputed from its prompt)."""
        self._m.reset()
        self.accepted = 0


def fill_rows(rows: Sequence[tuple[GrammarMatcher, int]], allowed_LW: np.ndarray) -> None:
    """Fill allowed_LW[i] (uint32 [L, W], in place) for each (matcher, i): the rows in parallel on
    llguidance's threads. Rows not named are left as they are (the engine sets them all-ones, or
    passes no bitmask when no row of a batch has a grammar)."""
    if not rows:
        return
    vocabulary = rows[0][0].vocabulary
    if allowed_LW.dtype != np.uint32 or allowed_LW.ndim != 2 or allowed_LW.shape[1] != vocabulary.mask_words \
            or not allowed_LW.flags.c_contiguous:
        raise ValueError(f"allowed_LW must be a contiguous uint32 array of shape (L, {vocabulary.mask_words}), "
                         f"got {allowed_LW.dtype} {allowed_LW.shape}")
    if vocabulary.ll_words != vocabulary.mask_words:  # llguidance's rows would not match the engine's stride
        for matcher, i in rows:
            matcher.fill(allowed_LW[i])
        return
    llguidance.numpy.fill_next_token_bitmask_par(
        _shared_executor(), [(matcher._m, i) for matcher, i in rows], allowed_LW.view(np.int32))


__all__ = ["GrammarMatcher", "fill_rows"]
