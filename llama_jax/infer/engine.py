"""The continuous-batching engine: requests join and leave a running batch at every step.

    engine = BatchingEngine(cfg, params, max_batch=64)
    engine.add("a", prompt_ids, RequestParams(max_tokens=64, temperature=0.7, stop_token_ids=(128009,)))
    while engine.has_work():
        for out in engine.step(): ...  # TokenOutput per new token; finish_reason on a request's last

It ties the parts together: the scheduler plans each step (scheduler.py, plain Python), the engine
turns the plan into StepInputs arrays, runs the jitted step (step.py) on its per-layer weights
(weights.py) and page pools (kv_cache.py), and hands the sampled tokens back to the scheduler.

Every step is one call in one layout: the decode rows (padded to the smallest of `decode_batches`
that holds them) plus, when a prompt has tokens to prefill, a chunk of R rows of C tokens (one of
`chunk_shapes`). So the compiled programs are, per decode batch size, one without a chunk and one
per chunk shape, all compiled by `warm_up`; no prompt length, output length or per-request setting
(temperature, top-k, top-p, seed, logprobs) compiles anything after that; the step's hooks do, once
each, when a batch first uses them: penalties and biases (one program per padded list length,
penalties.py) and the page copies of n > 1 samples. `serving_shapes` gives the server's few shapes,
`prefill_shapes` the chunk shapes of offline generation.

With `speculative` (speculation.SpeculativeConfig) the scheduler asks a proposer for each decode
row's guesses (prompt lookup, or a draft model's engine) and the step verifies them: a row gains 1 to
K + 1 tokens, exactly as decoding without guesses would give them (docs/speculative.md); a step
with guesses compiles its own program per step shape (decode rows 2 or K + 1 tokens wide).

Logprobs are those of the model's distribution (log_softmax of the logits, before temperature and
filters), for the sampled token and the MAX_LOGPROBS most likely tokens.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from llama_jax import kernels
from llama_jax.config import LlamaConfig
from llama_jax.infer.kv_cache import empty_pages, grow_pages
from llama_jax.infer.penalties import pack_terms, row_terms
from llama_jax.infer.requests import RequestParams, TokenOutput
from llama_jax.infer.scheduler import Scheduler, StepPlan
from llama_jax.infer.speculation import DraftProposer, SpeculativeConfig
from llama_jax.infer.step import StepInputs, model_logits_jit, model_step_jit, sample_step_jit
from llama_jax.infer.weights import decode_params, weights_device
from llama_jax.sharding import axes, batch_split, logical_to_sharding
from llama_jax.vocab import check_token_ids

_ROW_SPLITS = (1, 2, 4, 8)  # prefill_shapes: a chunk of T tokens as R rows of T / R


def serving_shapes(max_batch: int, prefill_chunk: int = 256, multiple: int = 1) -> dict:
    """BatchingEngine arguments for a server: few compiled programs (12 at max_batch 64), none after
    warm-up. Decode batches `multiple` (the mesh's batch split: one request), then 4, 8, 16, ..
    times it up to max_batch: on CPU a few rows cost about one (the weights' reads), more cost
    about their count, so beyond 4 the running requests are padded to at most twice their count.
    One chunk shape, 4 x multiple rows of prefill_chunk / 16 tokens: a step's prompt tokens ride
    along with its decode rows at a small cost to their latency (bench/RESULTS.md, "Serving under load")."""
    decode = {multiple, max_batch} | {multiple << i for i in range(2, max_batch.bit_length())
                                      if multiple << i < max_batch}
    return dict(decode_batches=sorted(decode), chunk_shapes=[(4 * multiple, max(1, prefill_chunk // 16))])


def prefill_shapes(prefill_chunk: int, *, smallest: int | None = None, multiple: int = 1,
                   max_rows: int | None = None) -> list[tuple[int, int]]:
    """Chunk shapes for offline generation: R rows of T / R tokens (R = 1, 2, 4, 8 times the mesh's
    batch split, at most max_rows) for T = prefill_chunk and every power-of-two multiple of
    `smallest` below it, so a short prompt alone is not padded to a whole chunk and prompts
    arriving together are prefilled together."""
    smallest = prefill_chunk if smallest is None else smallest
    if not 1 <= smallest <= prefill_chunk:
        raise ValueError(f"the smallest chunk must be in [1, prefill_chunk={prefill_chunk}], got {smallest}")
    totals = [smallest << i for i in range(prefill_chunk.bit_length()) if smallest << i < prefill_chunk]
    return [(k * multiple, total // k) for total in totals + [prefill_chunk] for k in _ROW_SPLITS
            if total % k == 0 and (max_rows is None or k * multiple <= max_rows)]


class BatchingEngine:
    """Not thread-safe: one thread calls add, abort and step."""

    def __init__(self, cfg: LlamaConfig, params, *, mesh=None, max_batch: int = 64, max_seq_len: int | None = None,
                 page_size: int = 16, num_pages: int | None = None, decode_batches: Sequence[int] | None = None,
                 chunk_shapes: Sequence[tuple[int, int]] | None = None, max_waiting: int = 1024,
                 prefix_caching: bool = True, attention_impl: str = "auto",
                 speculative: SpeculativeConfig | None = None, proposer=None):
        """params: the model's (split here, a copy: see weights.decode_params) or DecodeParams.
        decode_batches: the decode row counts compiled (max_batch is added); a step takes the
        smallest that holds its rows (None: always max_batch). chunk_shapes: the (rows, tokens)
        shapes of a step's prompt chunk (None: prefill_shapes(256)). speculative: propose tokens
        for the decode rows and verify them in the step (speculation.py; None: off); proposer: what
        proposes them (None: the method's own; see Scheduler)."""
        # "auto" is the XLA path everywhere until a Pallas paged kernel has run on a device: the
        # Triton (GPU) and Mosaic (TPU) kernels equal the reference in the interpreter and lower
        # for cuda / tpu, but neither has been compiled or timed on a GPU or TPU yet.
        impl = "xla" if attention_impl == "auto" else kernels.resolve_impl(attention_impl,
                                                                            interpret=cfg.attention_interpret)
        if impl not in ("xla", "pallas"):
            raise ValueError(f"attention_impl {attention_impl!r}: paged attention has 'xla' and 'pallas' only")
        self.max_seq_len = cfg.max_seq_len if max_seq_len is None else max_seq_len
        if not 1 < self.max_seq_len <= cfg.max_seq_len:
            raise ValueError(f"max_seq_len must be in [2, {cfg.max_seq_len}] (the model's context), "
                             f"got {self.max_seq_len}")
        multiple = batch_split(mesh)
        if max_batch < 1 or max_batch % multiple:
            raise ValueError(f"max_batch must be a positive multiple of {multiple} (the mesh's batch split), "
                             f"got {max_batch}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        decode_batches = [max_batch] if decode_batches is None else list(decode_batches)
        bad = [b for b in decode_batches if not 1 <= b <= max_batch or b % multiple]
        if bad:
            raise ValueError(f"decode_batches must be multiples of {multiple} in [1, max_batch={max_batch}], got {bad}")
        chunk_shapes = prefill_shapes(256, multiple=multiple, max_rows=max_batch) if chunk_shapes is None \
            else list(chunk_shapes)
        bad = [s for s in chunk_shapes if len(s) != 2 or min(s) < 1 or s[0] % multiple]
        if bad or not chunk_shapes:
            raise ValueError(f"chunk_shapes must be (rows, tokens) pairs, rows a multiple of {multiple} (the mesh's "
                             f"batch split), both >= 1, at least one; got {chunk_shapes}")
        pages_per_seq = -(-self.max_seq_len // page_size)
        num_pages = max_batch * pages_per_seq if num_pages is None else num_pages
        if num_pages < pages_per_seq:
            raise ValueError(f"num_pages {num_pages} cannot hold one sequence of max_seq_len {self.max_seq_len} "
                             f"({pages_per_seq} pages of {page_size})")
        cfg, self.params = decode_params(cfg, params, mesh)
        self.cfg = dataclasses.replace(cfg, attention_impl=impl)
        self.mesh, self.max_batch, self.page_size = mesh, max_batch, page_size
        self.draft_engine = None
        if speculative is not None and speculative.method == "draft" and proposer is None:
            proposer = self._draft_proposer(speculative, mesh=mesh, max_batch=max_batch, page_size=page_size,
                                            decode_batches=decode_batches, chunk_shapes=chunk_shapes,
                                            attention_impl=attention_impl)
        self.scheduler = Scheduler(max_batch=max_batch, page_size=page_size, pages_per_seq=pages_per_seq,
                                   num_pages=num_pages, decode_batches=decode_batches, chunk_shapes=chunk_shapes,
                                   max_waiting=max_waiting, prefix_caching=prefix_caching, speculative=speculative,
                                   proposer=proposer)
        self.pages = self._empty_pages(num_pages)

    def _draft_proposer(self, speculative: SpeculativeConfig, **shapes):
        """The draft model's proposer: an engine of its own over the draft's weights, in the target's shapes."""
        if speculative.draft is None:
            raise ValueError("speculative method 'draft' needs its draft model (SpeculativeConfig.draft)")
        draft = speculative.draft
        cfg, params = (draft.cfg, draft.params) if hasattr(draft, "cfg") else draft
        if cfg.vocab_size != self.cfg.vocab_size:
            raise ValueError(f"the draft model's vocabulary has {cfg.vocab_size} ids, the target's {self.cfg.vocab_size}")
        self.draft_engine = BatchingEngine(cfg, params, max_seq_len=min(self.max_seq_len, cfg.max_seq_len),
                                           **shapes)
        return DraftProposer(self.draft_engine)

    @property
    def decode_batches(self) -> list[int]:
        return self.scheduler.decode_batches

    @property
    def chunk_shapes(self) -> list[tuple[int, int]]:
        return self.scheduler.chunk_shapes

    @property
    def speculative(self) -> SpeculativeConfig | None:
        return self.scheduler.speculative

    @property
    def requests(self) -> dict:
        """request id -> its sequences not finished yet (one, or a forked request's samples)."""
        return self.scheduler.requests

    @property
    def counters(self):
        return self.scheduler.counters

    def _empty_pages(self, num_pages: int):
        device = None if self.mesh is not None else weights_device(self.params)
        return empty_pages(self.cfg, num_pages, self.page_size, mesh=self.mesh, device=device)

    def grow(self, max_seq_len: int) -> None:
        """Room for sequences of up to max_seq_len tokens: the page tables widen and the pool grows to
        max_batch such sequences, keeping every page, the running requests and the prefix cache. The
        next steps compile for the new shapes (a Conversation grows its engine by powers of two)."""
        if not self.max_seq_len <= max_seq_len <= self.cfg.max_seq_len:
            raise ValueError(f"max_seq_len can grow from {self.max_seq_len} to at most {self.cfg.max_seq_len}, "
                             f"got {max_seq_len}")
        self.max_seq_len = max_seq_len
        pages_per_seq = -(-max_seq_len // self.page_size)
        extra = self.scheduler.grow(pages_per_seq, self.max_batch * pages_per_seq)
        if extra:
            self.pages = grow_pages(self.pages, self._empty_pages(extra), mesh=self.mesh)
        if self.draft_engine is not None:
            self.draft_engine.grow(min(max_seq_len, self.draft_engine.cfg.max_seq_len))

    # Requests ----------------------------------------------------------------------------------

    def check(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len < 1:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if prompt_len + max_tokens > self.max_seq_len:
            raise ValueError(f"a prompt of {prompt_len} tokens plus max_tokens {max_tokens} is "
                             f"{prompt_len + max_tokens} tokens, more than the context of {self.max_seq_len}")

    def add(self, request_id: str, prompt_ids: Sequence[int], params: RequestParams, *, stream: int = 0) -> None:
        """Queue a request. stream: folded into its sampling keys (sampling.sampling_keys); sample i of
        its params.n draws with stream + i, so it equals an n = 1 request with that stream."""
        prompt = [int(t) for t in prompt_ids]
        self.check(len(prompt), params.max_tokens)
        check_token_ids(prompt, self.cfg.vocab_size)
        check_token_ids([t for t, _ in params.logit_bias], self.cfg.vocab_size, what="logit_bias token id")
        self.scheduler.add(request_id, prompt, params, stream=stream)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Drop the request (every sample), or only its sample `index` (scheduler.abort)."""
        self.scheduler.abort(request_id, index)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> dict:
        return self.scheduler.stats()

    def warm_up(self, *, grammars: bool = False) -> None:
        """Compile every step program now (each decode batch, alone and with each chunk shape),
        before requests wait on them: rows of padding only, the pages are left as they are.
        grammars: also the two calls a step with grammar rows runs (a server that may get JSON schemas
        or tools: its first such request would otherwise stall every stream while they compile)."""
        if self.draft_engine is not None:
            self.draft_engine.warm_up()
        speculative = self.speculative
        widths = [1, *speculative.widths] if speculative is not None else [1]
        for b in self.decode_batches:
            for shape in [None, *self.chunk_shapes]:
                for width in widths:
                    plan = StepPlan([], b, shape, [], [], [], width=width)
                    for masked in (False, True) if grammars else (False,):
                        jax.block_until_ready(self._run(plan, masked=masked))

    # Stepping ----------------------------------------------------------------------------------

    def step(self) -> list[TokenOutput]:
        """Plan, run and account for one step: a token for every decoding request, the next prompt
        tokens of the oldest prefilling ones."""
        plan = self.scheduler.schedule()
        if plan is None:
            return []
        out = self._run(plan)
        if not any(s.params.logprobs is not None for s in plan.sampled):
            tokens, accepted = jax.device_get((out.tokens_L, out.accepted_b))
            return self.scheduler.update(plan, tokens, accepted=accepted)
        out = jax.device_get(out)
        return self.scheduler.update(plan, out.tokens_L, out.logprobs_L, out.top_ids_LK, out.top_logprobs_LK,
                                     accepted=out.accepted_b)

    def _run(self, plan: StepPlan, *, masked: bool = False):
        """The step's StepOutputs (on the device) for the plan; the pages are updated in place.

        With grammar rows (or `masked`: warm-up) the step is two calls: the model's forward is
        dispatched first, and while the device runs it the host fills the rows' token masks (each
        needs the row's previous token, so it cannot be built a step ahead); sampling then takes them."""
        inputs = self._place(step_arrays(plan, self.scheduler.page_table))
        constrained = [(seq.matcher, row) for row, seq in enumerate(plan.sampled) if seq.matcher is not None]
        if not (constrained or masked):
            self.pages, out = model_step_jit(self.params, self.pages, inputs, cfg=self.cfg, mesh=self.mesh)
            return out
        self.pages, logits = model_logits_jit(self.params, self.pages, inputs, cfg=self.cfg, mesh=self.mesh)
        allowed = token_masks(constrained, len(inputs.sample_at_L), self.cfg.vocab_size, width=plan.width,
                              proposals=plan.proposals)
        return sample_step_jit(logits, inputs._replace(allowed_LW=self._place_rows(allowed)))

    def _place_rows(self, x: np.ndarray):
        if self.mesh is None:
            return x
        return jax.device_put(x, logical_to_sharding((axes.ACTIVATION_BATCH, None), self.mesh, x.shape))

    def _place(self, inputs: StepInputs) -> StepInputs:
        """Every input split on its rows as the batch is, but the page copies: their rows are not
        the batch's, and every device copies its share of each page."""
        if self.mesh is None:
            return inputs

        def place(x, rows=axes.ACTIVATION_BATCH):
            return jax.device_put(x, logical_to_sharding((rows,) + (None,) * (x.ndim - 1), self.mesh, x.shape))

        placed = jax.tree.map(place, inputs._replace(page_copies_C2=None))
        if inputs.page_copies_C2 is None:
            return placed
        return placed._replace(page_copies_C2=place(inputs.page_copies_C2, rows=None))


def token_masks(constrained: list[tuple[object, int]], rows: int, vocab_size: int, *, width: int = 1,
                proposals: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """allowed_LW (uint32 [rows, ceil(V / 32)]): each (matcher, sample row)'s grammar mask, every token
    allowed in the other rows. A matcher sampled in several rows (a request forking into n samples)
    fills one and the others are copies (one matcher is not filled from two threads at once).

    With speculation (width T > 1) sample row l's masks are rows l * T .. l * T + T - 1: the mask
    after each proposal of proposals[l] the grammar allows, the matcher advanced through them and
    rolled back after; a proposal it refuses gets a mask without it (so verification rejects it)."""
    from llama_jax.grammar import fill_rows

    allowed = np.full((rows, -(-vocab_size // 32)), 0xFFFFFFFF, np.uint32)
    first: dict[int, int] = {}
    for matcher, row in constrained:
        first.setdefault(id(matcher), row)
    fill_rows([(matcher, row * width) for matcher, row in constrained if first[id(matcher)] == row], allowed)
    for matcher, row in constrained:
        if first[id(matcher)] != row:
            allowed[row * width] = allowed[first[id(matcher)] * width]
    drafts = [(matcher, row, list(proposals[row][:matcher.valid_prefix(proposals[row])]))
              for matcher, row in constrained if row < len(proposals) and proposals[row]]
    for j in range(width - 1):
        live = [(matcher, row, draft) for matcher, row, draft in drafts if len(draft) > j]
        for matcher, _, draft in live:
            matcher.accept(draft[j])
        fill_rows([(matcher, row * width + j + 1) for matcher, row, _ in live], allowed)
    for matcher, _, draft in drafts:
        matcher.rollback(len(draft))
    return allowed


def step_arrays(plan: StepPlan, page_table: np.ndarray) -> StepInputs:
    """The plan as the step's input arrays (numpy): decode rows, then the chunk's rows. With
    speculation (plan.width T > 1) each decode row is T tokens (its last, its proposals, padding) and
    each sample row has T entries, the settings repeated and the penalties as they would be after
    each proposal."""
    b, M, T = plan.decode_batch, page_table.shape[1], plan.width
    R, C = plan.chunk_shape or (0, 0)
    B = b * T + R * C
    tokens, positions = np.zeros((B, 1), np.int32), np.full((B, 1), -1, np.int32)
    decode_table = np.zeros((b, M), np.int32)
    proposals = plan.proposals or [[] for _ in plan.decoding]
    for row, (seq, guess) in enumerate(zip(plan.decoding, proposals)):
        fed = [seq.tokens[-1], *guess]
        tokens[row * T:row * T + len(fed), 0] = fed
        positions[row * T:row * T + len(fed), 0] = np.arange(seq.written, seq.written + len(fed))
        decode_table[row] = page_table[seq.slot]
    chunk_table = None
    if plan.chunk_shape is not None:
        chunk_table = np.zeros((R, M), np.int32)
        for row, piece in enumerate(plan.pieces):
            first, start, n = b * T + row * C, piece.start, piece.length
            tokens[first:first + n, 0] = piece.seq.tokens[start:start + n]
            positions[first:first + n, 0] = np.arange(start, start + n)
            chunk_table[row] = page_table[piece.seq.slot]
    L = b * T
    sample_at = np.zeros(L, np.int32)
    for row, at in enumerate(plan.sample_at):
        # A decode row's T positions; a finishing prompt's sample row reads its last token's logits only.
        sample_at[row * T:row * T + T] = at + np.arange(T) if row < len(plan.decoding) else at
    seeds, streams, temperature = np.zeros(L, np.uint32), np.zeros(L, np.uint32), np.zeros(L, np.float32)
    top_k, top_p, top_logprobs = np.zeros(L, np.int32), np.ones(L, np.float32), np.zeros(L, np.int32)
    for row, (seq, stream) in enumerate(zip(plan.sampled, plan.streams)):
        p, rows = seq.params, slice(row * T, row * T + T)
        seeds[rows], streams[rows] = seq.seed, stream
        temperature[rows], top_k[rows], top_p[rows], top_logprobs[rows] = (p.temperature, p.top_k, p.top_p,
                                                                           p.logprobs or 0)
    inputs = StepInputs(tokens, positions, decode_table, chunk_table, sample_at, seeds, streams, temperature, top_k,
                        top_p, top_logprobs)
    if T > 1:
        proposals_bK = np.full((b, T - 1), -1, np.int32)
        for row, guess in enumerate(proposals):
            proposals_bK[row, :len(guess)] = guess
        inputs = inputs._replace(proposals_bK=proposals_bK)
    if plan.page_copies:
        # Padded to the most a step can have, a copy per batch row (rows with source -1 copy nothing):
        # one more program per step shape, not one per count.
        copies = np.full((page_table.shape[0], 2), -1, np.int32)
        copies[:len(plan.page_copies)] = plan.page_copies
        inputs = inputs._replace(page_copies_C2=copies)
    if not any(s.params.shapes_logits for s in plan.sampled):
        return inputs
    terms = [None] * L
    for row, seq in enumerate(plan.sampled):
        if seq.params.shapes_logits:
            guess = proposals[row] if row < len(plan.decoding) else []
            counts = seq.counts
            for j in range(len(guess) + 1):  # as they would be after the row's first j proposals
                if j:
                    counts = counts + collections.Counter(guess[j - 1:j])
                terms[row * T + j] = row_terms(seq.params, seq.prompt_tokens, counts, seq.generated + j)
    repetition = np.repeat([s.params.repetition_penalty for s in plan.sampled], T)
    ids, bias, penalized, repetition = pack_terms(terms, repetition, L)
    return inputs._replace(bias_ids_LN=ids, bias_LN=bias, penalized_LN=penalized, repetition_L=repetition)


__all__ = ["BatchingEngine", "serving_shapes", "prefill_shapes", "step_arrays"]
