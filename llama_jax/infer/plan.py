"""What the scheduler tracks and what it plans, in plain Python (no jax): a sequence's state, a chunk
row's piece of a prompt, and one step's plan (scheduler.py makes them, engine.py turns a plan into
the step's arrays)."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from llama_jax.infer.requests import RequestParams
from llama_jax.infer.speculation import Adaptive


@dataclasses.dataclass(eq=False)
class SequenceState:
    """A request as the scheduler tracks it."""

    id: str
    tokens: list[int]  # the prompt, then every token generated so far
    prompt_len: int
    params: RequestParams
    seed: int
    stream: int  # folded into its sampling keys (sampling.sampling_keys)
    order: int  # add() order: preempted sequences go back to the waiting queue by it
    slot: int | None = None
    admitted: int = 0  # admission order: the newest is preempted first
    pages: list[int] = dataclasses.field(default_factory=list)
    keys: list[bytes] = dataclasses.field(default_factory=list)  # prefix keys of its first full written pages
    written: int = 0  # positions whose keys and values are in its pages
    prefilling: bool = True  # until the logits at its last context token are sampled
    cached_tokens: int = 0  # prompt tokens its first admission found in the prefix cache
    reported: bool = False  # its first output is out
    index: int = 0  # which of its request's samples it is
    samples: int = 1  # the sequences it forks into when its prefill ends (a request's n, until it forks)
    spare_slots: list[int] = dataclasses.field(default_factory=list)  # held for the samples it forks into
    spare_pages: list[int] = dataclasses.field(default_factory=list)  # their copies of its last partial page
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # generated tokens'
    prompt_tokens: np.ndarray | None = None  # the prompt's distinct tokens, for a repetition penalty
    matcher: object | None = None  # its grammar's state (params.grammar.matcher()): fills its token masks
    speculation: Adaptive | None = None  # its proposals per step, with speculative decoding
    proposer_state: object | None = None  # the proposer's own record of it (an n-gram index)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclasses.dataclass
class Piece:
    """A chunk row: `length` tokens of `seq` from position `start`."""

    seq: SequenceState
    start: int
    length: int


@dataclasses.dataclass
class StepPlan:
    """One step: `decoding` are decode rows 0.., padded to `decode_batch` rows; `pieces` fill the
    chunk of `chunk_shape` (R, C) rows, row r from token b + r * C (None: no chunk). `sampled[l]`
    is the sequence whose next token sample row l draws, from the logits of token `sample_at[l]`
    (index into the step's rows); the rows past len(sampled) are padding. A request forking into n
    samples is in `sampled` n times, each row with its own key stream (`streams[l]`, row l's).
    `page_copies`: (source, destination) pages the step copies before any row writes. With
    speculation (`width` > 1) every decode row is `width` tokens: its last token, its proposals and
    padding; `sample_at[l]` is then the first of sample row l's `width` logits."""

    decoding: list[SequenceState]
    decode_batch: int
    chunk_shape: tuple[int, int] | None
    pieces: list[Piece]
    sampled: list[SequenceState]
    sample_at: list[int]
    streams: list[int] = dataclasses.field(default_factory=list)
    page_copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    # Speculative decoding: decode row r feeds its last token and then proposals[r], each decode
    # row `width` tokens wide (1: plain decode rows); sample row l's tokens come from l * width on.
    proposals: list[list[int]] = dataclasses.field(default_factory=list)
    width: int = 1

    @property
    def fed(self) -> dict[int, tuple[SequenceState, int]]:
        """id(seq) -> (seq, tokens this step feeds it): the chunk's sequences first (a prompt finishing
        here reports its first token before the running ones report their next), then the decode rows."""
        return {**fed_by(self.pieces), **{id(s): (s, 1) for s in self.decoding}}


def fed_by(pieces: list[Piece]) -> dict[int, tuple[SequenceState, int]]:
    fed = {}
    for piece in pieces:
        seq, n = fed.get(id(piece.seq), (piece.seq, 0))
        fed[id(seq)] = (seq, n + piece.length)
    return fed


__all__ = ["SequenceState", "Piece", "StepPlan", "fed_by"]
