"""Generation over token ids on the continuous-batching engine (engine.py), the one decode path.

    for event in stream_tokens(cfg, params, prompt_ids, max_new_tokens=64, sampling=SamplingParams(0.0),
                               stop_ids=tokenizer.stop_tokens):
        ...  # TokenEvent(index, token, None) per new token, TokenEvent(index, None, reason) at the end

`stream_tokens` runs a list of prompts through a BatchingEngine of `batch_size` rows: a prompt
joins as soon as a row is free, and its tokens stream out as they come. Each prompt's sampling
keys are fold_in(fold_in(key(seed), prompt index), position) (the engine's `stream` is the prompt's
index), so a prompt's tokens do not depend on the batch it lands in, nor on the batch size. With
`sampling.n` > 1, sample i of prompt p draws with stream p * n + i (so n = 1 keeps the keys above),
the prompt prefilled once and its pages shared by the samples.

The engine is sized for the call: its context is the power of two (at least MIN_BUCKET) that holds
the longest prompt and its new tokens, its pool holds that for every row, and its prefill chunks
are powers of two from MIN_BUCKET up to `prefill_chunk` (engine.prefill_shapes). Its step is
compiled once per context bucket and chunk shape, and once without a chunk; nothing per prompt
length, stop set, seed or token.

`Conversation` keeps one engine between chat turns: the pages of earlier turns stay in its prefix
cache, so a turn prefills only the tokens past the full pages it shares with what came before.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from llama_jax.config import LlamaConfig
from llama_jax.infer.engine import BatchingEngine, prefill_shapes
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.sampling import SamplingParams
from llama_jax.infer.speculation import SpeculativeConfig
from llama_jax.sharding import batch_split
from llama_jax.vocab import check_token_ids

MIN_BUCKET = 32  # the shortest context and prefill chunk: a chat header is ~10 tokens
PREFILL_CHUNK = 512  # prompt tokens per engine step at most, so a step never holds more logits
PAGE_SIZE = 16


class PromptTooLongError(ValueError):
    pass


class TokenEvent(NamedTuple):
    index: int  # the prompt's index in the caller's list
    token: int | None  # a new token (never a stop token), or None when the prompt finishes
    finish_reason: str | None = None  # "stop" (a stop token came) or "length" (token limit or context end)
    sample: int = 0  # which of the prompt's sampling.n samples (0 .. n-1)


def bucket_length(n: int, cap: int) -> int:
    """The power of two >= n (at least MIN_BUCKET), at most cap."""
    return min(cap, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


def check_prompts(cfg: LlamaConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  truncate: bool = False) -> list[list[int]]:
    """Token lists ready for the engine, or a one-line ValueError naming the first bad prompt.

    A prompt must leave room for at least one new token. With `truncate`, a prompt that leaves no
    room for `max_new_tokens` keeps its first token (bos) and its last ones.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = cfg.max_seq_len - 1
    keep = max(1, min(limit, cfg.max_seq_len - max_new_tokens))
    checked = []
    for i, ids in enumerate(prompts):
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        check_token_ids(ids, cfg.vocab_size, what=f"prompt {i}: token id")
        if truncate and len(ids) > keep:
            ids = ids[-1:] if keep == 1 else ids[:1] + ids[len(ids) - keep + 1:]
        elif len(ids) > limit:
            raise PromptTooLongError(f"prompt {i} has {len(ids)} tokens, but the model's context is "
                                     f"{cfg.max_seq_len} tokens: a prompt may have at most {limit}")
        checked.append(ids)
    return checked


def request_params(cfg: LlamaConfig, prompt_len: int, max_new_tokens: int, sampling: SamplingParams,
                   stop_ids: Sequence[int], seed: int) -> RequestParams:
    """The engine's settings for one prompt: at most max_new_tokens, fewer at the context's end (and
    min_tokens no more than that)."""
    max_tokens = min(max_new_tokens, cfg.max_seq_len - prompt_len)
    return RequestParams(max_tokens, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                         seed=seed, stop_token_ids=tuple(stop_ids), presence_penalty=sampling.presence_penalty,
                         frequency_penalty=sampling.frequency_penalty, repetition_penalty=sampling.repetition_penalty,
                         logit_bias=sampling.logit_bias, min_tokens=min(sampling.min_tokens, max_tokens),
                         n=sampling.n, grammar=sampling.grammar)


def paged_attention_impl(cfg: LlamaConfig) -> str:
    """The paged attention the config's implementation names (the engine has 'xla' and 'pallas')."""
    return cfg.attention_impl if cfg.attention_impl in ("xla", "pallas") else "auto"


def _engine(cfg: LlamaConfig, params, mesh, *, max_batch: int, max_seq_len: int, prefill_chunk: int,
            **settings) -> BatchingEngine:
    """The engine generate and Conversation run on: prefill chunks from MIN_BUCKET tokens up to
    prefill_chunk, pages of PAGE_SIZE, the paged attention cfg names."""
    shapes = prefill_shapes(prefill_chunk, smallest=min(MIN_BUCKET, prefill_chunk), multiple=batch_split(mesh),
                            max_rows=max_batch)
    return BatchingEngine(cfg, params, mesh=mesh, max_batch=max_batch, max_seq_len=max_seq_len, page_size=PAGE_SIZE,
                          chunk_shapes=shapes, attention_impl=paged_attention_impl(cfg), **settings)


def stream_tokens(cfg: LlamaConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (), seed: int = 0,
                  batch_size: int | None = None, mesh=None, truncate: bool = False,
                  prefill_chunk: int = PREFILL_CHUNK, speculative: SpeculativeConfig | None = None,
                  counters: collections.Counter | None = None) -> Iterator[TokenEvent]:
    """Generate for every prompt (lists of token ids), `batch_size` prompts decoding at a time.

    Yields TokenEvents as tokens arrive: tokens of one prompt in order, then its finish event;
    prompts decoding together interleave. params: the model's, or DecodeParams from `weights.decode_params`
    (which places them on `mesh` and splits them per layer once, instead of at every call). The
    batch is rounded up to a multiple of the mesh's batch split, and to at least sampling.n rows (the
    samples of a prompt decode together). Computes in cfg.dtype: from
    `llama_jax.load`, float32 on a CPU backend unless a dtype was named there (config.compute_dtype).
    speculative: speculative decoding's settings (speculation.SpeculativeConfig; the same tokens for
    greedy, the same distribution when sampling). counters: updated with the engine's counters
    (generated, proposed and accepted tokens, ...) once every prompt is done.
    """
    prompts = check_prompts(cfg, prompts, max_new_tokens, truncate)
    if prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
        raise ValueError(f"prefill_chunk must be a power of two, got {prefill_chunk}")
    if not prompts:
        return
    if max_new_tokens == 0:
        for i in range(len(prompts)):
            for sample in range(sampling.n):
                yield TokenEvent(i, None, "length", sample)
        return
    requests = [request_params(cfg, len(p), max_new_tokens, sampling, stop_ids, seed) for p in prompts]
    multiple = batch_split(mesh)
    rows = -(-max(batch_size or len(prompts) * sampling.n, sampling.n) // multiple) * multiple
    longest = max(len(p) for p in prompts)
    # A chunk that holds the first rows' prompts in one step, when prefill_chunk allows.
    chunk = min(prefill_chunk, rows * bucket_length(longest, cfg.max_seq_len))
    engine = _engine(cfg, params, mesh, max_batch=rows, prefill_chunk=chunk, max_waiting=len(prompts),
                     max_seq_len=bucket_length(min(longest + max_new_tokens, cfg.max_seq_len), cfg.max_seq_len),
                     speculative=speculative)
    for i, (prompt, params_i) in enumerate(zip(prompts, requests)):
        engine.add(str(i), prompt, params_i, stream=i * sampling.n)
    yield from _events(engine, stop_ids)
    if counters is not None:
        counters.update(engine.counters)


def _events(engine: BatchingEngine, stop_ids: Sequence[int]) -> Iterator[TokenEvent]:
    """Step the engine until it is idle, turning its outputs (request id = prompt index) into
    TokenEvents: a stop token is not returned, its request just finishes; the token that completes a
    grammar (also "stop") is returned, then the finish."""
    stop_ids = frozenset(stop_ids)
    while engine.has_work():
        for out in engine.step():
            index, sample = int(out.request_id), out.index
            if out.finish_reason == "stop" and out.token_id in stop_ids:
                yield TokenEvent(index, None, "stop", sample)
                continue
            yield TokenEvent(index, out.token_id, None, sample)
            if out.finish_reason is not None:
                yield TokenEvent(index, None, out.finish_reason, sample)


class Conversation:
    """One sequence continued over chat turns: the engine that generates each turn is kept, and with
    it the pages of the earlier turns (its prefix cache), so a turn prefills only the tokens after
    the full pages it shares with the previous turn's prompt and reply, not the whole dialog.

        conversation = Conversation(cfg, params)
        for event in conversation.stream(dialog_ids, max_new_tokens=256, stop_ids=tokenizer.stop_tokens): ...

    Tokens equal `stream_tokens` on the same prompt (same seed, prompt index 0). The engine's context
    grows by powers of two up to the model's, keeping its pages. Computes in cfg.dtype, as
    `stream_tokens` does. speculative: as stream_tokens'; `engine.counters` add up over the turns.
    """

    def __init__(self, cfg: LlamaConfig, params, *, mesh=None, prefill_chunk: int = PREFILL_CHUNK,
                 speculative: SpeculativeConfig | None = None):
        if batch_split(mesh) != 1:
            raise ValueError("a Conversation is one sequence: its mesh cannot split the batch (use tp only)")
        self.cfg, self.params, self.mesh, self.chunk = cfg, params, mesh, prefill_chunk
        self.speculative = speculative
        self.engine: BatchingEngine | None = None
        self.cached_ids: list[int] = []  # the ids the last turn fed the engine (prompt, reply but its last token)

    def stream(self, prompt: Sequence[int], *, max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
               stop_ids: Sequence[int] = (), seed: int = 0) -> Iterator[TokenEvent]:
        cfg = self.cfg
        if sampling.n != 1:
            raise ValueError(f"a Conversation continues one sequence: sampling.n must be 1, got {sampling.n}")
        (prompt,) = check_prompts(cfg, [prompt], max_new_tokens)
        if max_new_tokens == 0:
            yield TokenEvent(0, None, "length")
            return
        params = request_params(cfg, len(prompt), max_new_tokens, sampling, stop_ids, seed)
        context = bucket_length(len(prompt) + params.max_tokens, cfg.max_seq_len)
        if self.engine is None:
            self.engine = _engine(cfg, self.params, self.mesh, max_batch=1, max_seq_len=context,
                                  prefill_chunk=self.chunk, speculative=self.speculative)
            self.params = self.engine.params  # split once, for every turn
        elif self.engine.max_seq_len < context:
            self.engine.grow(context)
        self.engine.add("0", prompt, params)
        generated = []
        try:
            for event in _events(self.engine, stop_ids):
                if event.token is not None:
                    generated.append(event.token)
                yield event
        finally:
            self.engine.abort("0")  # a turn the caller stopped reading frees its pages (no-op once finished)
        self.cached_ids = list(prompt) + generated[:-1]


__all__ = ["TokenEvent", "PromptTooLongError", "Conversation", "stream_tokens", "check_prompts", "bucket_length",
           "request_params", "paged_attention_impl", "MIN_BUCKET", "PREFILL_CHUNK", "PAGE_SIZE"]
