"""The decoding engine's scheduler, in plain Python (no jax): which sequences run in the next step,
with which tokens, on which pages.

    plan = scheduler.schedule()          # a StepPlan, or None when nothing can run
    ... the engine runs the step the plan describes (engine.py) ...
    outputs = scheduler.update(plan, sampled)   # TokenOutputs of the tokens the step drew

Requests wait in arrival order. One is admitted into a free batch slot when the pages of its whole
context are available, counting the pages its prefix cache lookup finds (pages.py), and holds
them from then on; it gets one more page each time its decoding fills one. Each step feeds every
decoding sequence one token (a decode row) and the next prompt tokens of the oldest prefilling
ones as a chunk of R rows of C tokens (a prompt may take several rows); the chunk shape is the one
of `chunk_shapes` that feeds the most prompt tokens (the smallest of those), and the decode rows
are padded to the smallest of `decode_batches` that also holds a sample row for each prompt
finishing in this step. When a page is needed and none is free or evictable, the newest admitted
sequence is preempted: its pages are released (its registered ones stay cached) and it is requeued
ahead of the requests that arrived after it, to be recomputed from its prompt and the tokens it had
produced. The oldest sequence always makes progress, so a request that fits the pool alone always
finishes.

A request for n > 1 samples is one sequence until its prompt is prefilled: it is admitted when n
slots are free and the pages of its context are available, plus one spare page per other sample
when the context ends inside a page. The step that finishes its prefill samples n first tokens from
its last token's logits (stream + i for sample i), and the sequence forks into n: every sample holds
the prompt's full pages (the allocator's reference counts), sample 0 keeps the last, partial page
and every other sample gets a spare page, copied from it by the next step before any row writes
(StepPlan.page_copies). From then on each sample is a sequence of its own, decoded, preempted
(recomputed from its own tokens) and finished independently; the request ends when all have.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Sequence

import numpy as np

from llama_jax.infer.pages import PageAllocator, page_keys
from llama_jax.infer.plan import Piece, SequenceState, StepPlan, fed_by
from llama_jax.infer.requests import EngineFullError, RequestParams, TokenOutput
from llama_jax.infer.speculation import Adaptive, NgramProposer, SpeculativeConfig


class Scheduler:
    """Not thread-safe: one thread calls add, abort, schedule and update."""

    def __init__(self, *, max_batch: int, page_size: int, pages_per_seq: int, num_pages: int,
                 decode_batches: Sequence[int], chunk_shapes: Sequence[tuple[int, int]], max_waiting: int = 1024,
                 prefix_caching: bool = True, speculative: SpeculativeConfig | None = None, proposer=None):
        """speculative: propose tokens for the decode rows to verify (None: off); proposer: what
        proposes them (`propose(seqs, ks) -> lists`; None: speculative.method "ngram"'s NgramProposer)."""
        self.max_batch, self.page_size, self.pages_per_seq = max_batch, page_size, pages_per_seq
        self.speculative = speculative
        if speculative is not None and proposer is None:
            if speculative.method != "ngram":
                raise ValueError(f"speculative method {speculative.method!r} needs its proposer")
            proposer = NgramProposer(speculative.max_ngram, speculative.min_ngram)
        self.proposer = proposer
        self.decode_batches = sorted(set(decode_batches) | {max_batch})
        self.chunk_shapes = sorted({(int(r), int(c)) for r, c in chunk_shapes})
        self.max_waiting = max_waiting
        self.allocator = PageAllocator(num_pages, prefix_caching=prefix_caching)
        self.page_table = np.zeros((max_batch, pages_per_seq), np.int32)
        self.slots: list[SequenceState | None] = [None] * max_batch
        self.reserved: set[int] = set()  # empty slots held for the samples a prefilling request forks into
        self.waiting: collections.deque[SequenceState] = collections.deque()
        self.requests: dict[str, list[SequenceState]] = {}  # a request's sequences not finished yet
        self._copies: dict[int, tuple[int, int]] = {}  # id(sample) -> its page copy, for the next step
        self._added = self._admitted = 0
        self.counters = collections.Counter(prefilled_tokens=0, cached_tokens=0, preemptions=0, generated_tokens=0,
                                            proposed_tokens=0, accepted_tokens=0)

    # Requests ----------------------------------------------------------------------------------

    def add(self, request_id: str, prompt: list[int], params: RequestParams, *, stream: int = 0) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not params.n <= self.max_batch:
            raise ValueError(f"n must be at most max_batch={self.max_batch} (a sample decodes in a batch row), "
                             f"got {params.n}")
        spares = params.n - 1 if len(prompt) % self.page_size else 0
        if -(-len(prompt) // self.page_size) + spares > self.allocator.num_pages:
            raise ValueError(f"n={params.n} samples of a {len(prompt)}-token prompt need more pages than the pool's "
                             f"{self.allocator.num_pages}")
        if len(self.waiting) >= self.max_waiting:
            raise EngineFullError(f"{len(self.waiting)} requests are waiting, the most this engine queues")
        seed = random.getrandbits(32) if params.seed is None else params.seed % 2**32
        seq = SequenceState(request_id, list(prompt), len(prompt), params, seed, stream, order=self._added,
                            prompt_tokens=np.unique(prompt) if params.repetition_penalty != 1 else None,
                            samples=params.n, matcher=_matcher(params), speculation=self._adaptive())
        self._added += 1
        self.requests[request_id] = [seq]
        self.waiting.append(seq)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Drop a request: every one of its samples, waiting or running; or only sample `index` once
        the request has forked (a client's stop string ended that one). A no-op for what finished."""
        if index is None:
            doomed = self.requests.pop(request_id, [])
        else:
            samples = self.requests.get(request_id, [])
            seq = next((s for s in samples if s.index == index and s.samples == 1), None)
            if seq is None:  # not forked yet, or finished
                return
            if len(samples) == 1:  # its last sample: the whole request
                self.abort(request_id)
                return
            samples.remove(seq)
            doomed = [seq]
        for seq in doomed:
            if seq.slot is None:
                self.waiting.remove(seq)
            else:
                self._vacate(seq)

    def has_work(self) -> bool:
        return bool(self.requests)

    def stats(self) -> dict:
        return dict(running=sum(s is not None for s in self.slots), waiting=len(self.waiting),
                    pages_used=self.allocator.used, pages_cached=self.allocator.cached,
                    pages_total=self.allocator.num_pages, **self.counters)

    def grow(self, pages_per_seq: int, num_pages: int) -> int:
        """Wider page tables and a pool of at least num_pages; returns the pages added to the pool."""
        self.page_table = np.pad(self.page_table, ((0, 0), (0, pages_per_seq - self.pages_per_seq)))
        self.pages_per_seq = pages_per_seq
        extra = max(0, num_pages - self.allocator.num_pages)
        if extra:
            self.allocator.grow(extra)
        return extra

    # Planning ----------------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """Admit, reserve the decode rows' next pages (preempting if needed), and plan the step."""
        self._admit()
        decoding = [s for s in self._by_admission() if not s.prefilling]
        for seq in decoding:
            if seq.slot is not None:  # not preempted for an older sequence's page
                self._reserve_next_page(seq)
        decoding = [s for s in decoding if s.slot is not None]
        proposals = self._propose(decoding)
        longest = max(map(len, proposals), default=0)
        width = 1 if not longest else next(w for w in self.speculative.widths if w > longest)
        # Copies for samples forked in the last update (a preempted sample's went with its pages).
        copies, self._copies = list(self._copies.values()), {}
        shape, pieces = self._plan_chunk()
        if not decoding and not pieces:
            return None
        finishing = []
        for seq, n in fed_by(pieces).values():
            if seq.written + n >= len(seq.tokens):
                finishing += [seq] * seq.samples
        b = next(b for b in self.decode_batches if b >= len(decoding) + len(finishing))
        sample_at = [row * width for row in range(len(decoding))]
        if pieces:
            C = shape[1]
            for row, piece in enumerate(pieces):
                if piece.start + piece.length == len(piece.seq.tokens):
                    sample_at += [b * width + row * C + piece.length - 1] * piece.seq.samples
        streams = [s.stream for s in decoding]
        for seq in dict.fromkeys(finishing):
            streams += [seq.stream + i for i in range(seq.samples)]
        return StepPlan(decoding, b, shape if pieces else None, pieces, decoding + finishing, sample_at, streams,
                        copies, proposals if width > 1 else [], width)

    def _adaptive(self) -> Adaptive | None:
        return None if self.speculative is None else Adaptive(self.speculative.num_tokens)

    def _propose(self, decoding: list[SequenceState]) -> list[list[int]]:
        """Each decode row's proposals: up to its adaptive k, never past its max_tokens, as many as the
        pages it holds or free ones can take (a proposal never preempts anything)."""
        if self.proposer is None:
            return [[] for _ in decoding]
        wanted = [min(seq.speculation.wanted() if self.speculative.adaptive else self.speculative.num_tokens,
                      seq.params.max_tokens - seq.generated - 1) for seq in decoding]
        asked = [i for i, k in enumerate(wanted) if k > 0]
        proposals = [[] for _ in decoding]
        got = self.proposer.propose([decoding[i] for i in asked], [wanted[i] for i in asked]) if asked else []
        for i, guess in zip(asked, got):
            seq, guess = decoding[i], [int(t) for t in guess[:wanted[i]]]
            while guess and len(seq.pages) * self.page_size <= seq.written + len(guess):
                page = self.allocator.allocate()
                if page is None:
                    guess = guess[:len(seq.pages) * self.page_size - seq.written - 1]
                    break
                self.page_table[seq.slot, len(seq.pages)] = page
                seq.pages.append(page)
            proposals[i] = guess
        return proposals

    def _by_admission(self) -> list[SequenceState]:
        return sorted((s for s in self.slots if s is not None), key=lambda s: s.admitted)

    def _free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None and i not in self.reserved]

    def _admit(self) -> None:
        P = self.page_size
        while self.waiting and len(free := self._free_slots()) >= self.waiting[0].samples:
            seq = self.waiting[0]
            # At least the last context token is prefilled: its logits give the next token.
            keys = page_keys(seq.tokens[:-1], P)
            hits = self.allocator.lookup(keys)
            needed = -(-len(seq.tokens) // P) - len(hits)
            spares = seq.samples - 1 if len(seq.tokens) % P else 0
            if self.allocator.available() < needed + spares:
                self.allocator.release(hits)
                return
            self.waiting.popleft()
            seq.slot, *seq.spare_slots = free[:seq.samples]
            self.slots[seq.slot] = seq
            self.reserved.update(seq.spare_slots)
            seq.admitted, self._admitted = self._admitted, self._admitted + 1
            # Its whole context's pages now, so its prefill never waits for pages.
            seq.pages = hits + [self.allocator.allocate() for _ in range(needed)]
            seq.spare_pages = [self.allocator.allocate() for _ in range(spares)]
            seq.keys, seq.written = keys[:len(hits)], len(hits) * P
            self.page_table[seq.slot, :len(seq.pages)] = seq.pages
            if not seq.reported:
                seq.cached_tokens = len(hits) * P
            self.counters["cached_tokens"] += len(hits) * P

    def _reserve_next_page(self, seq: SequenceState) -> None:
        """A page for the sequence's next position if it needs one, preempting the newest sequence
        when none is left (the sequence itself when it is the newest)."""
        while len(seq.pages) * self.page_size <= seq.written:
            page = self.allocator.allocate()
            if page is None:
                newest = self._by_admission()[-1]
                self._preempt(newest)
                if newest is seq:
                    return
                continue
            self.page_table[seq.slot, len(seq.pages)] = page
            seq.pages.append(page)

    def _preempt(self, seq: SequenceState) -> None:
        self._vacate(seq)
        seq.pages, seq.keys, seq.written, seq.prefilling = [], [], 0, True
        # Back to the queue in arrival order, ahead of requests that never ran.
        index = next((i for i, s in enumerate(self.waiting) if s.order > seq.order), len(self.waiting))
        self.waiting.insert(index, seq)
        self.counters["preemptions"] += 1

    def _vacate(self, seq: SequenceState) -> None:
        self.allocator.release(seq.pages + seq.spare_pages)
        self.reserved.difference_update(seq.spare_slots)
        self._copies.pop(id(seq), None)
        self.slots[seq.slot] = None
        self.page_table[seq.slot] = 0
        seq.slot, seq.spare_slots, seq.spare_pages = None, [], []

    def _plan_chunk(self) -> tuple[tuple[int, int] | None, list[Piece]]:
        """The chunk shape feeding the most prompt tokens of the oldest prefilling sequences (of
        shapes feeding as many, the smallest), and its pieces in row order."""
        prefilling = [s for s in self._by_admission() if s.prefilling]
        if not prefilling or not self.chunk_shapes:
            return None, []
        best = None
        for shape in self.chunk_shapes:
            pieces = _fill(prefilling, *shape)
            score = (sum(p.length for p in pieces), -shape[0] * shape[1])
            if best is None or score > best[0]:
                best = score, shape, pieces
        return best[1], best[2]

    # Results -----------------------------------------------------------------------------------

    def update(self, plan: StepPlan, tokens, logprobs=None, top_ids=None, top_logprobs=None,
               accepted=None) -> list[TokenOutput]:
        """Account for the tokens the plan fed and emit each sample row's token (row l of tokens,
        logprobs [L], top_ids and top_logprobs [L, K]; the last three may be None when no request
        asked for log-probabilities). With speculation (plan.width T > 1) every sample row l has T
        entries from l * T, and decode row r's new tokens are its first accepted[r] + 1."""
        T = plan.width
        row_of = {}  # id(seq) -> its first sample row (a forking request has n consecutive ones)
        for row, seq in enumerate(plan.sampled):
            row_of.setdefault(id(seq), row)
        outputs = []
        for seq, n in plan.fed.values():
            if T > 1 and not seq.prefilling:
                outputs += self._verified(seq, row_of[id(seq)], plan, tokens, logprobs, top_ids, top_logprobs, accepted)
                continue
            if seq.prefilling:
                self.counters["prefilled_tokens"] += n
            seq.written += n
            self._register_pages(seq)
            if seq.written < len(seq.tokens):
                continue  # more of its context to prefill
            seq.prefilling = False
            first = row_of[id(seq)]
            for row, sample in enumerate(self._fork(seq) if seq.samples > 1 else [seq], start=first):
                outputs.append(self._emit(sample, int(tokens[row * T]), *_logprobs(row * T, logprobs, top_ids,
                                                                                   top_logprobs)))
        return outputs

    def _verified(self, seq, row, plan, tokens, logprobs, top_ids, top_logprobs, accepted) -> list[TokenOutput]:
        """A decode row's tokens after verification: the accepted proposals and the target's token,
        up to the first that ends the request."""
        proposed, kept = plan.proposals[row], int(accepted[row])
        T = plan.width
        new = [int(t) for t in tokens[row * T:row * T + kept + 1]]
        seq.written += kept + 1  # its last token and the kept proposals: their keys and values are right
        self._register_pages(seq, pending=new[:kept])
        self.counters["proposed_tokens"] += len(proposed)
        self.counters["accepted_tokens"] += kept
        if self.speculative.adaptive:
            seq.speculation.update(len(proposed), kept, self.speculative.num_tokens)
        outputs = []
        for i, token in enumerate(new):
            outputs.append(self._emit(seq, token, *_logprobs(row * T + i, logprobs, top_ids, top_logprobs)))
            if outputs[-1].finish_reason is not None:
                break
        return outputs

    def _fork(self, seq: SequenceState) -> list[SequenceState]:
        """The sequence (sample 0) and its samples 1 .. n-1, in their reserved slots: each holds the
        prompt's full pages once more, and a spare page that the next step fills with a copy of the
        last, partial one (which sample 0 keeps)."""
        full = len(seq.tokens) // self.page_size
        samples = [seq]
        for index, slot in enumerate(seq.spare_slots, start=1):
            pages = seq.pages[:full]
            self.allocator.share(pages)
            sample = SequenceState(seq.id, list(seq.tokens), seq.prompt_len, seq.params, seq.seed, seq.stream + index,
                                   order=seq.order, slot=slot, admitted=self._admitted, pages=pages,
                                   keys=list(seq.keys), written=seq.written, prefilling=False,
                                   cached_tokens=seq.cached_tokens, prompt_tokens=seq.prompt_tokens, index=index,
                                   matcher=_matcher(seq.params),  # forked before its first token: at the start
                                   speculation=self._adaptive())
            self._admitted += 1
            if seq.spare_pages:
                sample.pages = pages + [seq.spare_pages[index - 1]]
                self._copies[id(sample)] = (seq.pages[full], sample.pages[-1])
            self.slots[slot] = sample
            self.page_table[slot, :len(sample.pages)] = sample.pages
            samples.append(sample)
        self.reserved.difference_update(seq.spare_slots)
        seq.spare_slots, seq.spare_pages, seq.samples = [], [], 1
        self.requests[seq.id] += samples[1:]
        return samples

    def _register_pages(self, seq: SequenceState, pending: list[int] | tuple = ()) -> None:
        """Offer the sequence's newly filled pages to the prefix cache (pending: its tokens written
        but not appended yet, accepted proposals)."""
        full = seq.written // self.page_size
        if not self.allocator.prefix_caching or full <= len(seq.keys):
            return
        parent = seq.keys[-1] if seq.keys else b""
        tokens = seq.tokens + list(pending) if pending else seq.tokens
        keys = page_keys(tokens[:full * self.page_size], self.page_size, len(seq.keys), parent)
        for page, key in zip(seq.pages[len(seq.keys):full], keys):
            self.allocator.register(page, key)
        seq.keys += keys

    def _emit(self, seq: SequenceState, token: int, logprob: float | None, top) -> TokenOutput:
        seq.tokens.append(token)
        seq.counts[token] += 1
        self.counters["generated_tokens"] += 1
        p = seq.params
        reason = "stop" if token in p.stop_token_ids else "length" if seq.generated >= p.max_tokens else None
        if seq.matcher is not None and reason != "stop":
            # A grammar that allows nothing more ends the answer; a token it refused (its mask makes that
            # impossible, unless a penalty's -inf row left nothing) ends it too, rather than going on unconstrained.
            if not seq.matcher.accept(token) or seq.matcher.is_finished():
                reason = "stop"
        out = TokenOutput(seq.id, token, logprob=None if p.logprobs is None else logprob,
                          top_logprobs=tuple(list(top)[:p.logprobs]) if p.logprobs else None,
                          finish_reason=reason, prompt_tokens=seq.prompt_len, cached_prompt_tokens=seq.cached_tokens,
                          index=seq.index)
        seq.reported = True
        if reason is not None:
            samples = self.requests[seq.id]
            samples.remove(seq)
            if not samples:
                del self.requests[seq.id]
            self._vacate(seq)
        return out


def _logprobs(row: int, logprobs, top_ids, top_logprobs) -> tuple:
    """(logprob, top pairs) of sample row `row`, as _emit takes them."""
    top = () if top_ids is None else zip(top_ids[row].tolist(), top_logprobs[row].tolist())
    return None if logprobs is None else float(logprobs[row]), top


def _matcher(params: RequestParams):
    return None if params.grammar is None else params.grammar.matcher()


def _fill(prefilling: list[SequenceState], rows: int, width: int) -> list[Piece]:
    """Up to `rows` pieces of at most `width` tokens: the oldest prefilling sequences' next tokens."""
    pieces = []
    for seq in prefilling:
        start = seq.written
        while start < len(seq.tokens) and len(pieces) < rows:
            pieces.append(Piece(seq, start, min(width, len(seq.tokens) - start)))
            start += pieces[-1].length
        if len(pieces) == rows:
            break
    return pieces


__all__ = ["Scheduler", "StepPlan", "Piece", "SequenceState"]
