"""Speculative decoding's host side, in plain Python (no jax): the settings, the n-gram proposer and
each sequence's adaptive number of proposals. The scheduler asks a proposer for up to k guessed next
tokens of every decoding sequence; the step feeds them after its last token (a decode row of
T = k + 1 tokens) and keeps the prefix the verification rule accepts (speculative.py) plus one token
of the target's, so a row gains 1 .. k + 1 tokens in a step.

K adapts per sequence (unless `adaptive` is off): it starts at `num_tokens`; after a verification
it becomes one more than the accepted count when a proposal was rejected (up to num_tokens after
all were kept); a sequence whose proposals were all rejected stops proposing for 1, 2, 4 .. 32
steps (reset by any acceptance), so text the proposer cannot guess runs as plain decode rows.
"""

from __future__ import annotations

import dataclasses
import itertools

from llama_jax.infer.ngram import NgramIndex
from llama_jax.infer.requests import RequestParams

METHODS = ("ngram", "draft")
MAX_PAUSE = 32  # steps a sequence whose proposals keep failing waits at most before proposing again


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """method: "ngram" (prompt lookup: the tokens that followed the latest earlier occurrence of the
    sequence's last n tokens, n from max_ngram down to min_ngram) or "draft" (a smaller model with
    the same tokenizer, `draft`: greedy proposals, draft.py). num_tokens: K, proposals per step at
    most; adaptive: K per sequence as the module says (False: always K, when the proposer has them)."""

    method: str = "ngram"
    num_tokens: int = 4
    adaptive: bool = True
    max_ngram: int = 4
    min_ngram: int = 2
    # method "draft": the draft model, a load_for_inference InferenceModel or a (cfg, params) pair
    # (draft.load_draft checks its tokenizer against the target's).
    draft: object | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or not 1 <= self.num_tokens <= 16:
            raise ValueError(f"the number of speculative tokens must be an integer in [1, 16], got {self.num_tokens!r}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got {self.min_ngram}, "
                             f"{self.max_ngram}")
        if (self.draft is not None) != (self.method == "draft") and self.draft is not None:
            raise ValueError(f"a draft model is for method 'draft', not {self.method!r}")

    @property
    def widths(self) -> list[int]:
        """The decode row widths T compiled for verification: 2 (one proposal: the common case once
        K has adapted down) and K + 1."""
        return sorted({2, self.num_tokens + 1})


@dataclasses.dataclass
class Adaptive:
    """A sequence's proposals per step (k) and its pause after proposals that all failed."""

    k: int
    pause: int = 0  # steps left without proposing
    misses: int = 0  # verifications in a row that kept nothing

    def wanted(self) -> int:
        """Proposals to ask for this step (0 while paused; counts the pause down)."""
        if self.pause:
            self.pause -= 1
            return 0
        return self.k

    def update(self, proposed: int, accepted: int, limit: int) -> None:
        if proposed == 0:
            return
        if accepted == 0:
            self.misses += 1
            self.pause = min(MAX_PAUSE, 1 << (self.misses - 1))
        else:
            self.misses = 0
        self.k = min(limit, proposed + 1 if accepted == proposed else accepted + 1)


class NgramProposer:
    """Prompt lookup over each sequence's own tokens (its prompt and output): an index per sequence,
    kept on the sequence (`proposer_state`) in step with its tokens, which only grow (rejected
    proposals are never appended)."""

    def __init__(self, max_n: int = 4, min_n: int = 2):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, seqs, ks: list[int]) -> list[list[int]]:
        """Up to ks[i] guessed next tokens of each sequence (scheduler.SequenceState)."""
        proposals = []
        for seq, k in zip(seqs, ks):
            index = seq.proposer_state
            if index is None:
                index = seq.proposer_state = NgramIndex(max_n=self.max_n, min_n=self.min_n)
            if len(index) < len(seq.tokens):
                index.extend(seq.tokens[len(index):])
            proposals.append(index.propose(k))
        return proposals


class DraftProposer:
    """Greedy proposals of a draft model, run in an engine of its own (a BatchingEngine over the
    draft's weights in the target's shapes, with its own paged cache and prefix cache): every decode
    row that proposes becomes a draft request whose prompt is the row's tokens so far, decoded
    greedily for k tokens. The prefix cache holds the pages of what the draft saw the step before, so
    a request prefills only the tokens since then (the accepted ones, the last page's rest); nothing
    of the draft's cache follows the target's preemptions or rejections, since every request is
    rebuilt from the tokens. Greedy proposals are a deterministic function of the tokens, a point
    mass, so the target's verification rule (speculative.verify) keeps its output exact at any
    temperature."""

    def __init__(self, engine):
        self.engine = engine
        self._ids = itertools.count()

    def propose(self, seqs, ks: list[int]) -> list[list[int]]:
        requests = []
        for seq, k in zip(seqs, ks):
            k = min(k, self.engine.max_seq_len - len(seq.tokens))  # a draft of a shorter context
            requests.append(f"draft-{next(self._ids)}" if k > 0 else None)
            if k > 0:
                self.engine.add(requests[-1], seq.tokens, RequestParams(k, temperature=0.0))
        proposals = {request_id: [] for request_id in requests}
        while self.engine.has_work():
            for out in self.engine.step():
                proposals[out.request_id].append(out.token_id)
        return [proposals[request_id] if request_id else [] for request_id in requests]


__all__ = ["SpeculativeConfig", "Adaptive", "NgramProposer", "DraftProposer", "METHODS", "MAX_PAUSE"]
