"""Generation engine: a bucketed prefill, then one jitted decode step over a preallocated KV cache.

    for event in stream_tokens(cfg, params, prompt_ids, max_new_tokens=64, sampling=SamplingParams(0.0),
                               stop_ids=tokenizer.stop_tokens):
        ...  # TokenEvent(index, token, None) per new token, TokenEvent(index, None, reason) at the end

Compilation: `prefill` is compiled once per prompt bucket (powers of two from MIN_BUCKET up to the
cache length), and `decode_step` once; both again only for another config, sampling setting, batch
size, cache length bucket or mesh. Nothing is compiled per prompt length, stop set, seed or token.
Both are module-level jits, so repeated calls (chat turns, batches of a prompts file) reuse them.

Prompts of unequal lengths share a batch right-padded: prefill writes every row's padded prompt at
slots 0..T-1 (PREFILL_CHUNK tokens at a time), samples each row's first token from the logits at
its own last prompt position, and decode steps then write each row at its own position, overwriting
its pad slots before any query can see them. Rows that stop early keep stepping in place (same
token, same slot) until the whole batch is done; their outputs are ignored.

Sampling keys are fold_in(fold_in(key(seed), prompt index), position), so a prompt's tokens do not
depend on which batch it lands in, nor on the batch size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.infer.quantize import QuantizedArray
from llama_jax.infer.sampling import SamplingParams, sample
from llama_jax.model import KVCache, Llama, param_logical_axes, split_layers
from llama_jax.sharding import activation_sharding, axes, logical_to_sharding, logical_to_spec

MIN_BUCKET = 32  # shortest prefill: short prompts (a chat header is ~10 tokens) share one program
# Longer prompts run through the model this many tokens at a time, so prefill never holds more than
# [B, PREFILL_CHUNK, vocab] logits and [B, heads, PREFILL_CHUNK, cache] attention scores.
PREFILL_CHUNK = 512


class PromptTooLongError(ValueError):
    pass


class DecodeState(NamedTuple):
    cache: KVCache
    tokens: jax.Array  # [B] int32: each row's newest token, the next step's input
    positions: jax.Array  # [B] int32: the position of `tokens`
    last: jax.Array  # [B] int32: the last position a row may fill (prompt + max_new_tokens - 1)
    done: jax.Array  # [B] bool: a stop token was sampled, or position `last` is filled
    keys: jax.Array  # [B] PRNG keys, one per prompt
    stop_ids: jax.Array  # [S] int32 token ids that end a row (data, so a new stop set compiles nothing)


class TokenEvent(NamedTuple):
    index: int  # the prompt's index in the caller's list
    token: int | None  # a new token (never a stop token), or None when the prompt finishes
    finish_reason: str | None = None  # "stop" (a stop token came) or "length" (token limit or context end)


def bucket_length(n: int, cap: int) -> int:
    """The power of two >= n (at least MIN_BUCKET), at most cap."""
    return min(cap, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


# Sharding ---------------------------------------------------------------------------------------

def param_shardings(cfg: LlamaConfig, mesh, params):
    """Shardings matching `params` as the rules table says, QuantizedArrays included (a scale's
    size-1 contracted dims are replicated, as the rules do for any dim a mesh axis does not divide)."""
    def shard(logical, leaf):
        if isinstance(leaf, QuantizedArray):
            return QuantizedArray(logical_to_sharding(logical, mesh, leaf.values.shape),
                                  logical_to_sharding(logical, mesh, leaf.scale.shape))
        return logical_to_sharding(logical, mesh, leaf.shape)

    return jax.tree.map(shard, param_logical_axes(cfg), params,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def batch_multiple(mesh) -> int:
    """The batch must divide over the mesh axes the cache's batch dim is split on."""
    if mesh is None:
        return 1
    split = logical_to_spec((axes.CACHE_BATCH,), mesh=mesh)
    names = () if not split or split[0] is None else (split[0],) if isinstance(split[0], str) else split[0]
    return math.prod(mesh.shape[a] for a in names)


def _sharding_context(mesh):
    return contextlib.nullcontext() if mesh is None else activation_sharding(mesh)


def prepare(cfg: LlamaConfig, params, mesh=None, *, donate: bool = False) -> tuple[LlamaConfig, dict]:
    """(cfg, params) as decoding wants them: placed on `mesh` as the rules table says, and split into
    per-layer buffers (LlamaConfig.per_layer_params). Measured on XLA's CPU, a Llama-3.2-1B decode
    step with the stacked layout spends most of its time copying layer slices (bench/decode.py).
    donate: the stacked weights are deleted as they are split (see model.split_layers)."""
    if mesh is not None:
        params = jax.device_put(params, param_shardings(cfg, mesh, params))
    return split_layers(cfg, params, donate=donate)


def _constrain_cache(cache: KVCache, mesh) -> KVCache:
    if mesh is None:
        return cache
    sharding = logical_to_sharding(cache.logical_axes, mesh, jax.tree.leaves(cache.k)[0].shape)
    return jax.lax.with_sharding_constraint(cache, jax.tree.map(lambda _: sharding, cache))


def _next_tokens(logits_BV, keys_B, positions_B, stop_ids, sampling):
    """Sample the token at `positions_B`; also say which rows it stops."""
    step_keys_B = jax.vmap(jax.random.fold_in)(keys_B, positions_B)
    tokens_B = sample(logits_BV, step_keys_B, sampling)
    return tokens_B, jnp.isin(tokens_B, stop_ids)


def _report(tokens_B, emitted_B, stop_B, done_B):
    """[4, B] int32 for the host: the new tokens; whether each is an output (the row was live);
    whether it is a stop token; whether the row is done. A fresh array, never an alias of the
    (donated) state."""
    return jnp.stack([tokens_B, emitted_B.astype(jnp.int32), stop_B.astype(jnp.int32), done_B.astype(jnp.int32)])


def prefill(params, tokens_BT, lengths_B, last_B, keys_B, stop_ids_S, cache: KVCache | None = None, offset=0, *,
            cfg: LlamaConfig, sampling: SamplingParams, cache_len: int, chunk: int = PREFILL_CHUNK, mesh=None):
    """Run the right-padded prompts through the cache, `chunk` tokens at a time, and sample each
    row's first new token from the logits at its last prompt position. Returns (DecodeState,
    report [4, B]).

    Without `cache`, a fresh one of `cache_len` slots and tokens_BT at positions 0..T-1. With one
    (donated), tokens_BT continues it at positions offset..offset+T-1 (a conversation whose first
    `offset` tokens are already in the cache); lengths_B count every token, offset included.
    """
    B, T = tokens_BT.shape
    # Buckets are powers of two, so this is `chunk`, except for a bucket cut short at a context
    # length that is not a power of two.
    C = math.gcd(T, chunk)
    cache = _constrain_cache(KVCache.init(cfg, B, cache_len) if cache is None else cache, mesh)

    def run_chunk(carry, start):
        cache, logits_BV = carry
        tokens_BC = jax.lax.dynamic_slice_in_dim(tokens_BT, start, C, axis=1)
        first = offset + start  # the position of the chunk's first token
        positions_BC = jnp.broadcast_to(first + jnp.arange(C, dtype=jnp.int32), (B, C))
        # Logits only at each row's last prompt token, or at the chunk's end when that is elsewhere;
        # they are kept for rows whose last prompt token lies in this chunk.
        offset_B = lengths_B - 1 - first
        here_B = (offset_B >= 0) & (offset_B < C)
        with _sharding_context(mesh):
            logits_B1V, cache = Llama(cfg).apply({"params": params}, tokens_BC, positions=positions_BC, cache=cache,
                                                 logits_at=jnp.clip(offset_B, 0, C - 1))
        return (cache, jnp.where(here_B[:, None], logits_B1V[:, 0], logits_BV)), None

    logits_BV = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    (cache, logits_BV), _ = jax.lax.scan(run_chunk, (cache, logits_BV), jnp.arange(0, T, C, dtype=jnp.int32))
    tokens_B, stop_B = _next_tokens(logits_BV, keys_B, lengths_B, stop_ids_S, sampling)
    emitted_B = lengths_B <= last_B  # padding rows of a short last batch have last < length
    done_B = ~emitted_B | stop_B | (lengths_B >= last_B)
    state = DecodeState(_constrain_cache(cache, mesh), tokens_B, lengths_B, last_B, done_B, keys_B, stop_ids_S)
    return state, _report(tokens_B, emitted_B, stop_B, done_B)


def decode_step(params, state: DecodeState, *, cfg: LlamaConfig, sampling: SamplingParams, mesh=None):
    """Feed each row's newest token, sample the next. Pure; the state's buffers are donated.
    Returns (DecodeState, report [4, B])."""
    with _sharding_context(mesh):
        logits_B1V, cache = Llama(cfg).apply({"params": params}, state.tokens[:, None],
                                             positions=state.positions[:, None], cache=state.cache)
    positions_B = jnp.where(state.done, state.positions, state.positions + 1)
    tokens_B, stop_B = _next_tokens(logits_B1V[:, 0], state.keys, positions_B, state.stop_ids, sampling)
    tokens_B = jnp.where(state.done, state.tokens, tokens_B)
    done_B = state.done | stop_B | (positions_B >= state.last)
    cache = _constrain_cache(cache, mesh)
    report = _report(tokens_B, ~state.done, stop_B, done_B)
    return state._replace(cache=cache, tokens=tokens_B, positions=positions_B, done=done_B), report


_STATIC = ("cfg", "sampling", "mesh")
prefill_jit = jax.jit(prefill, static_argnames=_STATIC + ("cache_len", "chunk"), donate_argnames=("cache",))
decode_step_jit = jax.jit(decode_step, static_argnames=_STATIC, donate_argnames=("state",))


# Host side -------------------------------------------------------------------------------------

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
        bad = next((t for t in ids if not 0 <= t < cfg.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt {i}: token id {bad} is outside the model's vocabulary [0, {cfg.vocab_size})")
        if truncate and len(ids) > keep:
            ids = ids[-1:] if keep == 1 else ids[:1] + ids[len(ids) - keep + 1:]
        elif len(ids) > limit:
            raise PromptTooLongError(f"prompt {i} has {len(ids)} tokens, but the model's context is "
                                     f"{cfg.max_seq_len} tokens: a prompt may have at most {limit}")
        checked.append(ids)
    return checked


def stream_tokens(cfg: LlamaConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (), seed: int = 0,
                  batch_size: int | None = None, mesh=None, truncate: bool = False,
                  prefill_chunk: int = PREFILL_CHUNK) -> Iterator[TokenEvent]:
    """Generate for every prompt (lists of token ids), `batch_size` prompts at a time.

    Yields TokenEvents as tokens arrive: tokens of one prompt in order, then its finish event;
    prompts of one batch interleave. Params must already sit where `mesh` wants them (`prepare`
    places them, and splits them per layer, which decodes fastest); the batch is rounded up to a
    multiple of the mesh's batch split. Computes in cfg.dtype: from `llama_jax.load`, float32 on a
    CPU backend unless a dtype was named there (config.compute_dtype).
    """
    prompts = check_prompts(cfg, prompts, max_new_tokens, truncate)
    if not prompts:
        return
    if max_new_tokens == 0:
        for i in range(len(prompts)):
            yield TokenEvent(i, None, "length")
        return
    multiple = batch_multiple(mesh)
    B = -(-(batch_size or len(prompts)) // multiple) * multiple
    longest = max(len(p) for p in prompts)
    # One cache length for the whole call, so every batch reuses one compiled decode step.
    cache_len = bucket_length(min(longest + max_new_tokens, cfg.max_seq_len), cfg.max_seq_len)
    if prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
        raise ValueError(f"prefill_chunk must be a power of two, got {prefill_chunk}")
    static = dict(cfg=cfg, sampling=sampling, mesh=mesh)
    stop_ids = _stop_array(stop_ids)
    base_key = jax.random.key(seed)
    for start in range(0, len(prompts), B):
        yield from _generate_batch(params, prompts[start:start + B], start, B, cache_len, max_new_tokens,
                                   base_key, stop_ids, prefill_chunk, static)


def _generate_batch(params, batch, start, B, cache_len, max_new_tokens, base_key, stop_ids, chunk, static):
    cfg, mesh = static["cfg"], static["mesh"]
    T = bucket_length(max(len(p) for p in batch), cache_len)
    tokens = np.zeros((B, T), np.int32)
    lengths = np.ones(B, np.int32)
    last = np.zeros(B, np.int32)  # padding rows (a short last batch) have last < length: done at once
    for r, ids in enumerate(batch):
        tokens[r, :len(ids)] = ids
        lengths[r] = len(ids)
        last[r] = min(len(ids) + max_new_tokens, cfg.max_seq_len) - 1
    keys = jax.vmap(jax.random.fold_in, (None, 0))(base_key, jnp.arange(start, start + B))
    inputs = (tokens, lengths, last, keys)
    if mesh is not None:
        inputs = tuple(jax.device_put(x, logical_to_sharding((axes.CACHE_BATCH,) + (None,) * (x.ndim - 1), mesh,
                                                             x.shape)) for x in inputs)

    state, report = prefill_jit(params, *inputs, stop_ids, cache_len=cache_len, chunk=chunk, **static)
    rows = len(batch)
    yield from _decode(params, state, report, start, rows, int(np.max(last[:rows] - lengths[:rows])), static)


def _decode(params, state, report, start, rows, max_steps, static):
    """Decode steps until every row is done (at most max_steps): yields TokenEvents, returns the
    last DecodeState."""
    pending = report
    for _ in range(max_steps):
        # Dispatch step N before reading step N-1's tokens, so the device never waits on the host.
        state, report = decode_step_jit(params, state, **static)
        events, all_done = _read_report(pending, start, rows)
        yield from events
        if all_done:
            return state
        pending = report
    yield from _read_report(pending, start, rows)[0]
    return state


class Conversation:
    """One sequence whose KV cache outlives each generation, for multi-turn chat: a call prefills
    only the prompt tokens after the longest prefix already in the cache (the earlier turns), so a
    turn costs its own tokens, not the whole dialog's.

        conversation = Conversation(cfg, params)
        for event in conversation.stream(dialog_ids, max_new_tokens=256, stop_ids=tokenizer.stop_tokens): ...

    Tokens equal `stream_tokens` on the same prompt (same seed, prompt index 0). The cache holds the
    prompt and every generated token that was fed back; the reply's last token and a stop token are
    not counted, so a next prompt that re-encodes the reply differently only re-prefills from the
    first differing token. The cache grows by powers of two up to the model's context. Computes in
    cfg.dtype, as `stream_tokens` does.
    """

    def __init__(self, cfg: LlamaConfig, params, *, mesh=None, prefill_chunk: int = PREFILL_CHUNK):
        if batch_multiple(mesh) != 1:
            raise ValueError("a Conversation is one sequence: its mesh cannot split the batch (use tp only)")
        self.cfg, self.params, self.mesh, self.chunk = cfg, params, mesh, prefill_chunk
        self.cache: KVCache | None = None
        self.cached_ids: list[int] = []  # token ids whose keys/values fill the cache's first slots

    def stream(self, prompt: Sequence[int], *, max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
               stop_ids: Sequence[int] = (), seed: int = 0) -> Iterator[TokenEvent]:
        (prompt,) = check_prompts(self.cfg, [prompt], max_new_tokens)
        if max_new_tokens == 0:
            yield TokenEvent(0, None, "length")
            return
        cfg = self.cfg
        reuse = _common_prefix(self.cached_ids, prompt[:-1])  # at least one token left to give logits
        total = min(len(prompt) + max_new_tokens, cfg.max_seq_len)
        T = bucket_length(len(prompt) - reuse, cfg.max_seq_len)
        if reuse + T > cfg.max_seq_len:  # the padded suffix would run past the context: start over
            reuse, T = 0, bucket_length(len(prompt), cfg.max_seq_len)
        cache_len = bucket_length(max(total, reuse + T), cfg.max_seq_len)
        cache = self._cache(cache_len, keep=reuse)
        self.cache, self.cached_ids = None, []  # donated below: a failed call leaves nothing stale

        tokens = np.zeros((1, T), np.int32)
        tokens[0, :len(prompt) - reuse] = prompt[reuse:]
        lengths, last = np.array([len(prompt)], np.int32), np.array([total - 1], np.int32)
        keys = jax.random.fold_in(jax.random.key(seed), 0)[None]
        stop = _stop_array(stop_ids)
        static = dict(cfg=cfg, sampling=sampling, mesh=self.mesh)
        state, report = prefill_jit(self.params, tokens, lengths, last, keys, stop, cache, np.int32(reuse),
                                    cache_len=cache_len, chunk=self.chunk, **static)
        generated = []
        events = _decode(self.params, state, report, 0, 1, total - len(prompt), static)
        while True:
            try:
                event = next(events)
            except StopIteration as finished:
                state = finished.value
                break
            if event.token is not None:
                generated.append(event.token)
            yield event
        self.cache, self.cached_ids = state.cache, list(prompt) + generated[:-1]

    def _cache(self, cache_len: int, keep: int) -> KVCache | None:
        """The cache to continue (grown to cache_len slots), or None for a fresh one."""
        if keep == 0 or self.cache is None:
            return None
        if self.cache.max_len == cache_len:
            return self.cache
        # Slots are axis -3 of [L, B, S, K, E] and of each per-layer [B, S, K, E] alike.
        grow = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(0, cache_len - x.shape[-3]), (0, 0), (0, 0)])  # noqa: E731
        return jax.tree.map(grow, self.cache)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _stop_array(stop_ids: Sequence[int]) -> np.ndarray:
    """The stop ids padded with -1 (matches no token) to a multiple of 8, so stop sets of up to 8
    ids share one compiled shape."""
    stop_set = sorted({int(s) for s in stop_ids})
    stop = np.full(max(8, -(-len(stop_set) // 8) * 8), -1, np.int32)
    stop[:len(stop_set)] = stop_set
    return stop


def _read_report(report, start, rows):
    tokens, emitted, stop, done = np.asarray(report)[:, :rows]
    events = []
    for r in np.flatnonzero(emitted):
        index = start + int(r)
        if stop[r]:
            events.append(TokenEvent(index, None, "stop"))
            continue
        events.append(TokenEvent(index, int(tokens[r])))
        if done[r]:
            events.append(TokenEvent(index, None, "length"))
    return events, bool(done.all())


__all__ = ["DecodeState", "TokenEvent", "PromptTooLongError", "Conversation", "prepare", "prefill", "decode_step",
           "prefill_jit", "decode_step_jit", "stream_tokens", "check_prompts", "bucket_length", "param_shardings",
           "batch_multiple", "MIN_BUCKET", "PREFILL_CHUNK"]
