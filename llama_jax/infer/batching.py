"""Continuous batching over a paged KV cache: requests join and leave a running batch at every step.

    engine = BatchingEngine(cfg, params, max_batch=64)
    engine.add("a", prompt_ids, RequestParams(max_tokens=64, temperature=0.7, stop_token_ids=(128009,)))
    while engine.has_work():
        for out in engine.step(): ...  # TokenOutput per new token; finish_reason on a request's last

Each `step` admits waiting requests into free batch slots, runs one prefill chunk (up to
`prefill_chunk` prompt tokens of one or several admitted requests, so a long prompt delays the
running requests by one chunk at a time), then one decode step for every request past its prompt.
Both run one jitted function, `model_step`, over per-layer page pools [N, P, K, E] (donated, so
updated in place) and the rows' page tables [B, M]: the decode step is compiled once for
[max_batch, 1] (with `decode_batches`, also for each of those batch sizes, the running requests
taking the smallest that holds them) and the prefill once per chunk shape [R, C] (R * C = prefill_chunk rows of tokens,
R = 1, 2, 4, 8, times the mesh's batch split; with `min_prefill_chunk`, also R * C = every
power-of-two multiple of it below prefill_chunk, so a short prompt alone is not padded to a whole
chunk). Each of those shapes is one compiled program; `serving_shapes(mixed=False)` gives fewer (9 at a
max batch of 64, where the powers of two above give 23), or `decode_batches` and `prefill_shapes`
name them.

With `mixed_prefill` (R, C) (the server's, via `serving_shapes`), a step is one call instead:
its decode rows (a decode batch, as above) followed by a prefill chunk of R rows of C tokens,
filled with the next tokens of the oldest prefilling requests (a prompt may take several rows),
each row with its own page table. Every row writes its keys and values before any row attends
(MixedPagedKV), so a piece of a prompt sees the pieces before it, and only the decode rows and
each finishing prompt's last token go through the vocabulary projection; a step with no prompt token
to feed runs the decode batch alone. Two programs per decode batch size (with and without the
chunk), where the two calls read every weight twice: on CPU a prefill call of 64 tokens costs
~18 ms beside a decode call of 13-41 ms (1-16 rows), the same tokens as a chunk in the decode call
4-5 ms. Every per-request setting (temperature, top-k, top-p, seed) is an array with a row per
request; stop ids and token limits are checked on the host. So no prompt length, output length or
setting compiles anything after those shapes.

Sampling keys are fold_in(fold_in(key(seed), stream), position), stream 0 unless `add` names one
(`engine.stream_tokens` passes each prompt's index): a request's tokens depend on its seed, stream
and prompt only, not on its batch companions or on being preempted and recomputed.

Pages (pages.py): a request is admitted when the pages of its whole context are available, and
holds them from then on; it gets one more page each time its decoding fills one. With prefix
caching, each full page written is registered under the hash of all tokens up to its end,
and a new request whose context starts with registered pages holds those instead of prefilling
them. When a page is needed and none is free or evictable, the newest request that holds pages
is preempted: its pages are released (its registered ones stay cached) and it is requeued ahead
of the requests that arrived after it, to be recomputed from its prompt and the tokens it already
produced. The oldest request always makes progress, so a request that fits the pool alone always
finishes.

Logprobs are those of the model's distribution (log_softmax of the logits, before temperature and
filters), for the sampled token and the MAX_LOGPROBS most likely tokens.

The engine owns its decoding layout (`prepare`, DecodeParams): the model's stacked `layers` are
split into one buffer per layer, and each layer's pages are their own buffers, because XLA's CPU
backend copies a layer's slice out of a stacked weight at every step. Measured on this machine's
CPU, a decode step (dim 512, 4 layers, vocab 32k, float32) took 7.9 ms at 1 row and 16.0 ms at 16
rows with per-layer weights, 19.1 and 26.6 ms with the stacked weights sliced inside the step.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import random
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import kernels
from llama_jax.config import LlamaConfig
from llama_jax.infer.pages import PageAllocator, page_keys
from llama_jax.quantize import QuantizedArray
from llama_jax.infer.sampling import MAX_TOP_K, sample_rows
from llama_jax.model import Block, PagedKV, RMSNorm
from llama_jax.params import param_logical_axes
from llama_jax.sharding import activation_sharding, axes, logical_to_sharding, logical_to_spec

MAX_LOGPROBS = 20
PAGE_AXES = (None, None, axes.KV_HEADS, axes.HEAD_DIM)  # [N, P, K, E]: split over tp on kv heads
_ROW_SPLITS = (1, 2, 4, 8)  # prefill chunk shapes: prefill_chunk tokens as R rows of prefill_chunk / R


@dataclasses.dataclass(frozen=True)
class RequestParams:
    """Per-request settings, carried as data in the batch (no recompiles)."""

    max_tokens: int  # new tokens at most (>= 1)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off; at most MAX_TOP_K
    seed: int | None = None  # None: the engine picks one; same seed + same prompt -> same tokens
    stop_token_ids: tuple[int, ...] = ()  # ends the request (finish_reason "stop"), reported as its last token
    logprobs: int | None = None  # None: none; 0: the chosen token's; n > 0: also the top n (n <= MAX_LOGPROBS)

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an integer in [0, {MAX_TOP_K}], got {self.top_k!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclasses.dataclass(frozen=True)
class TokenOutput:
    request_id: str
    token_id: int
    logprob: float | None  # when RequestParams.logprobs is not None
    top_logprobs: tuple[tuple[int, float], ...] | None  # when RequestParams.logprobs > 0
    finish_reason: str | None  # None while running; "stop" (a stop token) or "length"
    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens served from the prefix cache


class EngineFullError(RuntimeError):
    """The waiting queue is full."""


# The decoding layout ---------------------------------------------------------------------------

class DecodeParams(NamedTuple):
    """The model's parameters as the engine decodes with them: layer i's weights are `layers[i]`,
    its slice of the model's stacked `layers` subtree, in buffers of its own (see the module
    docstring for why); the rest as the model holds them."""

    tok_embeddings: Any  # [V, D]
    layers: tuple[dict, ...]
    norm: dict
    output: Any = None  # [D, V]; None with tied embeddings


def param_shardings(cfg: LlamaConfig, mesh, params):
    """Shardings matching the model's `params` as the rules table says, QuantizedArrays included (a
    scale's size-1 contracted dims are replicated, as the rules do for any dim a mesh axis does not
    divide), and LoRA-adapted weights (lora.adapt: A split like the weight's inputs, B like its outputs)."""
    def shard(logical, leaf):
        if hasattr(leaf, "map_with_axes"):  # a lora.LoraWeight (not imported: lora.py imports infer/)
            return leaf.map_with_axes(shard, logical)
        if isinstance(leaf, QuantizedArray):
            return QuantizedArray(logical_to_sharding(logical, mesh, leaf.values.shape),
                                  logical_to_sharding(logical, mesh, leaf.scale.shape))
        return logical_to_sharding(logical, mesh, leaf.shape)

    return jax.tree.map(shard, param_logical_axes(cfg), params,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def prepare(cfg: LlamaConfig, params, mesh=None, *, donate: bool = False) -> tuple[LlamaConfig, DecodeParams]:
    """(cfg, DecodeParams): the model's params placed on `mesh` as the rules table says, each layer
    split into buffers of its own (kept on the mesh: the layer axis is never split). DecodeParams
    (already placed) pass through unchanged. donate: each stacked weight is deleted once split (the tree passed in is
    unusable afterwards), so the peak is the model plus one stacked weight, not twice the layers."""
    if isinstance(params, DecodeParams):
        return cfg, params
    if mesh is not None:
        params = jax.device_put(params, param_shardings(cfg, mesh, params))
    leaves, treedef = jax.tree_util.tree_flatten(params["layers"])
    per_layer = [[] for _ in range(cfg.n_layers)]
    for leaf in leaves:
        for i, piece in enumerate(_unstack(leaf)):
            per_layer[i].append(piece)
        if donate and isinstance(leaf, jax.Array):
            leaf.delete()
    layers = tuple(jax.tree_util.tree_unflatten(treedef, leaves) for leaves in per_layer)
    return cfg, DecodeParams(params["tok_embeddings"], layers, params["norm"], params.get("output"))


def _unstack(leaf) -> list:
    if not isinstance(leaf, jax.Array):
        return list(leaf)
    sharding = leaf.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
        if spec[0] is not None:
            raise ValueError("prepare: the stacked layer axis is sharded; it must be replicated")
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    else:
        sharding = None
    return list(_unstack_jit(leaf.shape[0], sharding)(leaf))


@functools.lru_cache
def _unstack_jit(n: int, sharding):
    """One jitted split per layer count and sharding, so a second `prepare` compiles nothing."""
    return jax.jit(tuple, out_shardings=None if sharding is None else (sharding,) * n)


def batch_multiple(mesh) -> int:
    """The batch must divide over the mesh axes the cache's batch dim is split on."""
    if mesh is None:
        return 1
    split = logical_to_spec((axes.ACTIVATION_BATCH,), mesh=mesh)
    names = () if not split or split[0] is None else (split[0],) if isinstance(split[0], str) else split[0]
    return math.prod(mesh.shape[a] for a in names)


def serving_shapes(max_batch: int, prefill_chunk: int = 256, multiple: int = 1, *, mixed: bool = True) -> dict:
    """BatchingEngine arguments for a server: few compiled programs (12 at max_batch 64), none after
    warm-up.

    Decode batches `multiple` (the mesh's batch split: one request), then 4, 8, 16, .. times it up
    to max_batch: on CPU a few rows cost about one (the weights' reads), more cost about their
    count, so beyond 4 the running requests are padded to at most twice their count (the quick
    serving model, dim 256 and a 128k vocabulary, measured: 1 row 17 ms, 4 rows 28, 8 rows 34, 16
    rows 59, 64 rows 148).

    mixed (the server's): every step is one call, its decode rows plus a prefill chunk of 4 x
    multiple rows of prefill_chunk / 16 tokens (`mixed_prefill`; 4 x 16 by default), two programs
    per decode batch (a step with no prompt token to feed skips the chunk). Measured on the quick
    model (ctx ~100): the chunk adds 4-5 ms to a step of 1 to 16 decode rows (13-41 ms), where
    prefilling those 64 tokens in a call of their own cost
    ~18 ms, most of it the weights' reads and a row of vocabulary projection again. Not mixed
    (generate's layout, two calls per step; 9 programs at max_batch 64): prefill chunks
    (multiple, prefill_chunk) for long prompts, (multiple, prefill_chunk / 4) so a short prompt
    alone is not padded to a whole chunk, and (4 x multiple, prefill_chunk / 4) so prompts arriving
    together are prefilled together."""
    decode = {multiple, max_batch} | {multiple << i for i in range(2, max_batch.bit_length())
                                      if multiple << i < max_batch}
    if mixed:
        return dict(decode_batches=sorted(decode), mixed_prefill=(4 * multiple, max(1, prefill_chunk // 16)))
    quarter = max(1, prefill_chunk // 4)
    prefill = {(multiple, prefill_chunk), (multiple, quarter)}
    if 4 * multiple <= max_batch:
        prefill.add((4 * multiple, quarter))
    return dict(decode_batches=sorted(decode), prefill_shapes=sorted(prefill), prefill_chunk=prefill_chunk)


def _sharding_context(mesh):
    return contextlib.nullcontext() if mesh is None else activation_sharding(mesh)


# Device side -----------------------------------------------------------------------------------

class MixedPagedKV(NamedTuple):
    """One layer's pages for a call whose B = b + R * C rows of one token are b decode rows (page
    table rows decode_table_bM) then a prefill chunk of R rows of C tokens (chunk_table_RM), several
    rows possibly holding consecutive pieces of one prompt. Every row's keys and values are written
    before any row attends, so a piece sees the pieces before it (as PagedKV.attend)."""

    k_pages: jax.Array  # [N, P, K, E]
    v_pages: jax.Array  # [N, P, K, E]
    decode_table_bM: jax.Array  # [b, M] int32
    chunk_table_RM: jax.Array  # [R, M] int32

    def attend(self, q_BTHE, k_BTKE, v_BTKE, positions_BT, **which):
        b, R = self.decode_table_bM.shape[0], self.chunk_table_RM.shape[0]
        C = (q_BTHE.shape[0] - b) // R

        def split(x_B1Z):
            return x_B1Z[:b], x_B1Z[b:].reshape(R, C, *x_B1Z.shape[2:])

        (q_b, q_R), (k_b, k_R), (v_b, v_R), (pos_b, pos_R) = map(split, (q_BTHE, k_BTKE, v_BTKE, positions_BT))
        kv = PagedKV(self.k_pages, self.v_pages, self.decode_table_bM).write(k_b, v_b, pos_b)
        kv = kv._replace(page_table=self.chunk_table_RM).write(k_R, v_R, pos_R)
        out_b = kernels.paged_attention(q_b, kv.k_pages, kv.v_pages, self.decode_table_bM, pos_b, **which)
        out_R = kernels.paged_attention(q_R, kv.k_pages, kv.v_pages, self.chunk_table_RM, pos_R, **which)
        out_BTHE = jnp.concatenate([out_b, out_R.reshape(R * C, 1, *out_R.shape[2:])])
        return out_BTHE, self._replace(k_pages=kv.k_pages, v_pages=kv.v_pages)


def model_step(params: DecodeParams, pages, tokens_BT, positions_BT, page_table_BM, logits_at_L, seeds_L, streams_L,
               temperature_L, top_k_L, top_p_L, top_logprobs_L, chunk_table_RM=None, *, cfg: LlamaConfig, mesh=None):
    """Run each row's tokens (at positions_BT; negative: padding) through the model, writing their
    keys and values into the pages (a tuple per layer of (k, v) [N, P, K, E], donated) before any
    row attends (so a row sees what the rows before it in its sequence write in the same call),
    and sample L tokens, one from the logits at each of the tokens logits_at_L (indices into the B
    * T tokens, row-major), with the settings in row l of the [L] arrays. Returns (pages, (tokens
    [L], logprob [L], top ids [L, MAX_LOGPROBS], top logprobs [L, MAX_LOGPROBS])); the top ones are
    computed only when a row asks for them (top_logprobs_L > 0), zeros otherwise. With
    chunk_table_RM, the B rows (of T = 1 token) are decode rows and a prefill chunk (MixedPagedKV)
    and page_table_BM is the decode rows' only."""
    dt = cfg.compute_dtype
    with _sharding_context(mesh):
        embedding_VD = params.tok_embeddings
        x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0).astype(dt)
        new_pages = []
        for layer, (k_pages, v_pages) in zip(params.layers, pages):
            kv = (PagedKV(k_pages, v_pages, page_table_BM) if chunk_table_RM is None
                  else MixedPagedKV(k_pages, v_pages, page_table_BM, chunk_table_RM))
            x_BTD, kv = Block(cfg).apply({"params": layer}, x_BTD, positions_BT, None, kv)
            new_pages.append((kv.k_pages, kv.v_pages))
        # Only the L rows that sample a token go through the vocabulary projection (on CPU ~2 ms a
        # row at a 128k vocabulary, where a token row through the layers of a small model is ~0.1).
        B, T, D = x_BTD.shape
        x_L1D = jnp.take(x_BTD.reshape(B * T, 1, D), logits_at_L, axis=0)
        x_L1D = RMSNorm(cfg).apply({"params": params.norm}, x_L1D)
        if cfg.tie_embeddings:
            logits_LV = jnp.einsum("btd,vd->bv", x_L1D, embedding_VD.astype(dt), preferred_element_type=jnp.float32)
        else:
            logits_LV = jnp.einsum("btd,dv->bv", x_L1D, params.output.astype(dt), preferred_element_type=jnp.float32)
    if mesh is not None:
        sharding = logical_to_sharding(PAGE_AXES, mesh, pages[0][0].shape)
        new_pages = jax.lax.with_sharding_constraint(new_pages, jax.tree.map(lambda _: sharding, new_pages))
    # The sampled token's position: one past the token whose logits it comes from.
    sampled_at_L = jnp.take(positions_BT.reshape(-1), logits_at_L) + 1
    keys_L = jax.vmap(lambda seed, stream, position: jax.random.fold_in(
        jax.random.fold_in(jax.random.key(seed), stream), position))(seeds_L, streams_L, sampled_at_L)
    tokens_L = sample_rows(logits_LV, keys_L, temperature_L, top_k_L, top_p_L)
    # The sampled token's log-probability as jax.nn.log_softmax computes it, (x - max) - log(sum(exp(x -
    # max))), without writing the [L, V] log-softmax (a pass over the vocabulary per row), which only
    # the top log-probabilities need.
    max_L1 = jnp.max(logits_LV, axis=-1, keepdims=True)
    logsumexp_L1 = jnp.log(jnp.sum(jnp.exp(logits_LV - max_L1), axis=-1, keepdims=True))
    chosen_L = (jnp.take_along_axis(logits_LV, tokens_L[:, None], axis=-1) - max_L1 - logsumexp_L1)[:, 0]
    # A top-k over the vocabulary costs about as much as a small model's decode step on CPU.
    top_logprobs_LN, top_ids_LN = jax.lax.cond(
        jnp.any(top_logprobs_L > 0),
        lambda: tuple(jax.lax.top_k(jax.nn.log_softmax(logits_LV, axis=-1), MAX_LOGPROBS)),
        lambda: (jnp.zeros((logits_LV.shape[0], MAX_LOGPROBS), jnp.float32),
                 jnp.zeros((logits_LV.shape[0], MAX_LOGPROBS), jnp.int32)))
    return tuple(new_pages), (tokens_L, chosen_L, top_ids_LN, top_logprobs_LN)


model_step_jit = jax.jit(model_step, static_argnames=("cfg", "mesh"), donate_argnames=("pages",))


# Host side -------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class _Request:
    id: str
    tokens: list[int]  # the prompt, then every token generated so far
    prompt_len: int
    params: RequestParams
    seed: int
    stream: int
    order: int  # add() order: preempted requests go back to the waiting queue by it
    slot: int | None = None
    admitted: int = 0  # admission order: the newest is preempted first
    pages: list[int] = dataclasses.field(default_factory=list)
    keys: list[bytes] = dataclasses.field(default_factory=list)  # prefix keys of its first full written pages
    written: int = 0  # positions whose keys and values are in its pages
    prefilling: bool = True  # until the logits at its last context token are sampled
    cached_tokens: int = 0  # prompt tokens its first admission found in the prefix cache
    reported: bool = False  # its first output is out

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


def _completes(request: _Request, n: int) -> bool:
    """Whether feeding n more tokens completes the request's context (its last token is sampled)."""
    return request.written + n >= len(request.tokens)


class BatchingEngine:
    """Not thread-safe: one thread calls add, abort and step."""

    def __init__(self, cfg: LlamaConfig, params, *, mesh=None, max_batch: int = 64, max_seq_len: int | None = None,
                 page_size: int = 16, num_pages: int | None = None, prefill_chunk: int = 256,
                 min_prefill_chunk: int | None = None, decode_batches: Sequence[int] | None = None,
                 prefill_shapes: Sequence[tuple[int, int]] | None = None,
                 mixed_prefill: tuple[int, int] | None = None, max_waiting: int = 1024, prefix_caching: bool = True,
                 attention_impl: str = "auto"):
        """params: the model's (split here, a copy: see `prepare`) or DecodeParams from `prepare`.
        decode_batches: also compile the decode step for these batch sizes (max_batch is added), and
        decode the running requests in the smallest that holds them (None: always max_batch rows, one
        program). prefill_shapes: exactly these prefill chunk shapes (rows, tokens per row) instead
        of the ones min_prefill_chunk derives (see `serving_shapes`). mixed_prefill: (R, C):
        each step is one call, its decode rows and a prefill chunk of R rows of C tokens
        (`_run_mixed`); the programs are then two per decode batch size (with and without the chunk), and no
        prefill chunk shapes."""
        # "auto" is the XLA path everywhere until a Pallas paged kernel has run on a device: the
        # Triton (GPU) and Mosaic (TPU) kernels exist, equal the reference in the interpreter and
        # lower for cuda / tpu, but neither has been compiled or timed on a GPU or TPU yet.
        impl = "xla" if attention_impl == "auto" else kernels.resolve_impl(attention_impl,
                                                                            interpret=cfg.attention_interpret)
        if impl not in ("xla", "pallas"):
            raise ValueError(f"attention_impl {attention_impl!r}: paged attention has 'xla' and 'pallas' only")
        self.max_seq_len = cfg.max_seq_len if max_seq_len is None else max_seq_len
        if not 1 < self.max_seq_len <= cfg.max_seq_len:
            raise ValueError(f"max_seq_len must be in [2, {cfg.max_seq_len}] (the model's context), "
                             f"got {self.max_seq_len}")
        multiple = batch_multiple(mesh)
        if max_batch < 1 or max_batch % multiple:
            raise ValueError(f"max_batch must be a positive multiple of {multiple} (the mesh's batch split), "
                             f"got {max_batch}")
        if page_size < 1 or prefill_chunk < 1:
            raise ValueError(f"page_size and prefill_chunk must be >= 1, got {page_size} and {prefill_chunk}")
        smallest = prefill_chunk if min_prefill_chunk is None else min_prefill_chunk
        if not 1 <= smallest <= prefill_chunk:
            raise ValueError(f"min_prefill_chunk must be in [1, prefill_chunk={prefill_chunk}], got {smallest}")
        self.decode_batches = [max_batch]
        if decode_batches is not None:
            bad = [b for b in decode_batches if not 1 <= b <= max_batch or b % multiple]
            if bad:
                raise ValueError(f"decode_batches must be multiples of {multiple} in [1, max_batch={max_batch}], "
                                 f"got {bad}")
            self.decode_batches = sorted(set(decode_batches) | {max_batch})
        self.page_size = page_size
        self.pages_per_seq = -(-self.max_seq_len // page_size)
        num_pages = max_batch * self.pages_per_seq if num_pages is None else num_pages
        if num_pages < self.pages_per_seq:
            raise ValueError(f"num_pages {num_pages} cannot hold one sequence of max_seq_len {self.max_seq_len} "
                             f"({self.pages_per_seq} pages of {page_size})")
        cfg, self.params = prepare(cfg, params, mesh)
        self.cfg = dataclasses.replace(cfg, attention_impl=impl)
        self.mesh, self.max_batch, self.max_waiting = mesh, max_batch, max_waiting
        self.allocator = PageAllocator(num_pages, prefix_caching=prefix_caching)
        totals = [smallest << i for i in range(prefill_chunk.bit_length()) if smallest << i < prefill_chunk]
        self.chunk_shapes = [(k * multiple, total // k) for total in totals + [prefill_chunk] for k in _ROW_SPLITS
                             if total % k == 0 and k * multiple <= max_batch]
        if prefill_shapes is not None:
            if min_prefill_chunk is not None:
                raise ValueError("give prefill_shapes or min_prefill_chunk, not both")
            bad = [s for s in prefill_shapes if len(s) != 2 or not 1 <= s[0] <= max_batch or s[0] % multiple
                   or s[1] < 1]
            if bad or not prefill_shapes:
                raise ValueError(f"prefill_shapes must be (rows, tokens) pairs, rows a multiple of {multiple} in "
                                 f"[1, max_batch={max_batch}] and tokens >= 1, at least one; "
                                 f"got {list(prefill_shapes)}")
            self.chunk_shapes = sorted({(int(r), int(c)) for r, c in prefill_shapes})
        self.mixed_prefill = mixed_prefill
        if mixed_prefill is not None:
            if prefill_shapes is not None or min_prefill_chunk is not None:
                raise ValueError("give mixed_prefill or prefill_shapes / min_prefill_chunk, not both")
            if len(mixed_prefill) != 2 or min(mixed_prefill) < 1 or mixed_prefill[0] % multiple:
                raise ValueError(f"mixed_prefill must be (rows, tokens), rows a multiple of {multiple} (the mesh's "
                                 f"batch split), both >= 1, got {mixed_prefill}")
            self.mixed_prefill, self.chunk_shapes = (int(mixed_prefill[0]), int(mixed_prefill[1])), []
        self.pages = self._empty_pages(num_pages)
        self.page_table = np.zeros((max_batch, self.pages_per_seq), np.int32)
        self.slots: list[_Request | None] = [None] * max_batch
        self.waiting: collections.deque[_Request] = collections.deque()
        self.requests: dict[str, _Request] = {}
        self._added = self._admitted = 0
        self.counters = collections.Counter(prefilled_tokens=0, cached_tokens=0, preemptions=0, generated_tokens=0)

    def grow(self, max_seq_len: int) -> None:
        """Room for sequences of up to max_seq_len tokens: the page tables widen and the pool grows to
        max_batch such sequences, keeping every page, the running requests and the prefix cache. The
        next steps compile for the new shapes (a Conversation grows its engine by powers of two)."""
        if not self.max_seq_len <= max_seq_len <= self.cfg.max_seq_len:
            raise ValueError(f"max_seq_len can grow from {self.max_seq_len} to at most {self.cfg.max_seq_len}, "
                             f"got {max_seq_len}")
        self.max_seq_len = max_seq_len
        pages_per_seq = -(-max_seq_len // self.page_size)
        self.page_table = np.pad(self.page_table, ((0, 0), (0, pages_per_seq - self.pages_per_seq)))
        self.pages_per_seq = pages_per_seq
        extra = self.max_batch * pages_per_seq - self.allocator.num_pages
        if extra > 0:
            grown = jax.tree.map(lambda old, new: jnp.concatenate([old, new]), self.pages, self._empty_pages(extra))
            if self.mesh is not None:
                sharding = logical_to_sharding(PAGE_AXES, self.mesh, grown[0][0].shape)
                grown = jax.device_put(grown, jax.tree.map(lambda _: sharding, grown))
            self.pages = grown
            self.allocator.grow(extra)

    def _empty_pages(self, num_pages: int):
        """Zeroed pages, committed to the device(s) as the step's outputs that replace them are: the
        step's programs are compiled per input sharding, and warm-up on uncommitted pages compiled one
        that no request ran, leaving a request to compile the one it runs."""
        cfg = self.cfg
        shape = (num_pages, self.page_size, cfg.n_kv_heads, cfg.head_dim)
        if self.mesh is None:
            device = next((next(iter(x.devices())) for x in jax.tree.leaves(self.params) if isinstance(x, jax.Array)),
                          jax.devices()[0])
            zeros = lambda: jnp.zeros(shape, cfg.compute_dtype, device=device)  # noqa: E731
        else:
            zeros = jax.jit(lambda: jnp.zeros(shape, cfg.compute_dtype),
                            out_shardings=logical_to_sharding(PAGE_AXES, self.mesh, shape))
        return tuple((zeros(), zeros()) for _ in range(cfg.n_layers))

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
        """Queue a request. stream: folded into its sampling keys (see the module docstring)."""
        prompt = [int(t) for t in prompt_ids]
        self.check(len(prompt), params.max_tokens)
        bad = next((t for t in prompt if not 0 <= t < self.cfg.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {self.cfg.vocab_size})")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if len(self.waiting) >= self.max_waiting:
            raise EngineFullError(f"{len(self.waiting)} requests are waiting, the most this engine queues")
        seed = random.getrandbits(32) if params.seed is None else params.seed % 2**32
        request = _Request(request_id, prompt, len(prompt), params, seed, stream, order=self._added)
        self._added += 1
        self.requests[request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        if request.slot is None:
            self.waiting.remove(request)
        else:
            self._vacate(request)

    def has_work(self) -> bool:
        return bool(self.requests)

    def stats(self) -> dict:
        return dict(running=sum(r is not None for r in self.slots), waiting=len(self.waiting),
                    pages_used=self.allocator.used, pages_cached=self.allocator.cached,
                    pages_total=self.allocator.num_pages, **self.counters)

    def warm_up(self) -> None:
        """Compile the decode step and every prefill chunk shape (with mixed_prefill: every mixed
        step) now, before requests wait on them (rows of padding only: the pages are left as they are)."""
        if self.mixed_prefill is not None:
            R, C = self.mixed_prefill
            for b in self.decode_batches:
                jax.block_until_ready(self._run([], np.zeros((b + R * C, 1), np.int32),
                                                np.full((b + R * C, 1), -1, np.int32), [], np.zeros(b, np.int32),
                                                np.zeros((R, self.pages_per_seq), np.int32)))
        for rows, width in [(b, 1) for b in self.decode_batches] + self.chunk_shapes:  # no chunk shapes when mixed
            jax.block_until_ready(self._run([], np.zeros((rows, width), np.int32), np.full((rows, width), -1, np.int32),
                                            [], np.zeros(rows, np.int32)))

    # Scheduling --------------------------------------------------------------------------------

    def step(self) -> list[TokenOutput]:
        """Admit, prefill one chunk, decode one token for every request past its prompt; with
        mixed_prefill, all in one call (`_run_mixed`), else a prefill call and a decode call."""
        self._admit()
        decoding = [r for r in self._by_admission() if not r.prefilling]
        for request in decoding:
            self._reserve_next_page(request)
        decoding = [r for r in decoding if r.slot is not None]  # preempted for older requests' pages
        if self.mixed_prefill is not None:
            rows, result = self._run_mixed(decoding)
            return self._advance(rows, jax.device_get(result)) if rows else []
        shape, chunk = self._plan_prefill()
        pending = []
        if chunk:
            pending.append(([(r, n, row) for row, (r, n) in enumerate(chunk)], self._run_prefill(shape, chunk)))
        if decoding:
            pending.append(([(r, 1, row) for row, r in enumerate(decoding)], self._run_decode(decoding)))
        outputs = []
        for rows, result in pending:
            outputs += self._advance(rows, jax.device_get(result))
        return outputs

    def _by_admission(self) -> list[_Request]:
        return sorted((r for r in self.slots if r is not None), key=lambda r: r.admitted)

    def _admit(self) -> None:
        P = self.page_size
        while self.waiting and None in self.slots:
            request = self.waiting[0]
            # At least the last context token is prefilled: its logits give the next token.
            keys = page_keys(request.tokens[:-1], P)
            hits = self.allocator.lookup(keys)
            needed = -(-len(request.tokens) // P) - len(hits)
            if self.allocator.available() < needed:
                self.allocator.release(hits)
                return
            self.waiting.popleft()
            request.slot = self.slots.index(None)
            self.slots[request.slot] = request
            request.admitted, self._admitted = self._admitted, self._admitted + 1
            # Its whole context's pages now, so its prefill never waits for pages.
            request.pages = hits + [self.allocator.allocate() for _ in range(needed)]
            request.keys, request.written = keys[:len(hits)], len(hits) * P
            self.page_table[request.slot, :len(request.pages)] = request.pages
            if not request.reported:
                request.cached_tokens = len(hits) * P
            self.counters["cached_tokens"] += len(hits) * P

    def _reserve_next_page(self, request: _Request) -> None:
        """Give a decoding request a page for its next position if it needs one, preempting the
        newest request when none is left (the request itself when it is the newest)."""
        while len(request.pages) * self.page_size <= request.written:
            page = self.allocator.allocate()
            if page is None:
                newest = self._by_admission()[-1]
                self._preempt(newest)
                if newest is request:
                    return
                continue
            self.page_table[request.slot, len(request.pages)] = page
            request.pages.append(page)

    def _preempt(self, request: _Request) -> None:
        self._vacate(request)
        request.pages, request.keys, request.written, request.prefilling = [], [], 0, True
        # Back to the queue in arrival order, ahead of requests that never ran.
        index = next((i for i, r in enumerate(self.waiting) if r.order > request.order), len(self.waiting))
        self.waiting.insert(index, request)
        self.counters["preemptions"] += 1

    def _vacate(self, request: _Request) -> None:
        self.allocator.release(request.pages)
        self.slots[request.slot] = None
        self.page_table[request.slot] = 0
        request.slot = None

    def _plan_prefill(self) -> tuple[tuple[int, int], list[tuple[_Request, int]]]:
        """This step's prefill chunk: its shape (the one that prefills the most tokens of the
        oldest prefilling requests) and its (request, tokens) rows."""
        prefilling = [r for r in self._by_admission() if r.prefilling]
        if not prefilling:
            return (0, 0), []
        remaining = [len(r.tokens) - r.written for r in prefilling]
        # The most tokens; of shapes prefilling as many, the smallest.
        rows, width = max(self.chunk_shapes, key=lambda s: (sum(min(n, s[1]) for n in remaining[:s[0]]),
                                                            -s[0] * s[1]))
        return (rows, width), [(r, min(n, width)) for r, n in zip(prefilling[:rows], remaining)]

    # Running the model -------------------------------------------------------------------------

    def _run_prefill(self, shape, chunk):
        rows, width = shape
        tokens = np.zeros((rows, width), np.int32)
        positions = np.full((rows, width), -1, np.int32)
        logits_at = np.zeros(rows, np.int32)
        for row, (request, n) in enumerate(chunk):
            tokens[row, :n] = request.tokens[request.written:request.written + n]
            positions[row, :n] = np.arange(request.written, request.written + n)
            logits_at[row] = n - 1
        logits_at += np.arange(rows, dtype=np.int32) * width
        requests = [r for r, _ in chunk]
        return self._run(requests, tokens, positions, requests, logits_at)

    def _run_decode(self, decoding):
        """One decode step of the requests as rows 0.. of the smallest decode batch that holds them:
        on CPU a padding row costs as much as a real one (the vocabulary projection above all)."""
        B = next(b for b in self.decode_batches if b >= len(decoding))
        tokens, positions = np.zeros((B, 1), np.int32), np.full((B, 1), -1, np.int32)
        for row, request in enumerate(decoding):
            tokens[row, 0] = request.tokens[-1]
            positions[row, 0] = request.written
        return self._run(decoding, tokens, positions, decoding, np.arange(B, dtype=np.int32))

    def _run_mixed(self, decoding):
        """One call for the whole step: every decoding request a row of one token, padded to the
        smallest decode batch b that also has a sample row for each prompt finishing here, then
        the mixed_prefill chunk of R rows of C tokens: the next C tokens of the oldest prefilling
        request per row (a prompt may take several rows), each row with its request's page table.
        Only b rows go through the vocabulary projection: the decoding ones and each finishing
        prompt's last token. Returns ((request, tokens fed, sample row) per request, result)."""
        R, C = self.mixed_prefill
        pieces = []  # (request, first position, tokens) per chunk row
        for request in (r for r in self._by_admission() if r.prefilling):
            start = request.written
            while start < len(request.tokens) and len(pieces) < R:
                pieces.append((request, start, min(C, len(request.tokens) - start)))
                start += pieces[-1][2]
        fed = collections.Counter()
        for request, _, n in pieces:
            fed[request] += n
        finishing = [r for r in fed if _completes(r, fed[r])]
        if not decoding and not pieces:
            return [], None
        b = next(b for b in self.decode_batches if b >= len(decoding) + len(finishing))
        rows_fed = b + R * C if pieces else b  # no prompt token: the decode batch alone, without the chunk's cost
        tokens, positions = np.zeros((rows_fed, 1), np.int32), np.full((rows_fed, 1), -1, np.int32)
        chunk_table = np.zeros((R, self.pages_per_seq), np.int32)
        sampled, logits_at, rows = list(decoding), list(range(len(decoding))), []
        for row, request in enumerate(decoding):
            tokens[row, 0], positions[row, 0] = request.tokens[-1], request.written
            rows.append((request, 1, row))
        for row, (request, start, n) in enumerate(pieces):
            first = b + row * C
            tokens[first:first + n, 0] = request.tokens[start:start + n]
            positions[first:first + n, 0] = np.arange(start, start + n)
            chunk_table[row] = self.page_table[request.slot]
            if start + n == len(request.tokens):
                sampled.append(request)
                logits_at.append(first + n - 1)
        for request in fed:
            rows.append((request, fed[request], sampled.index(request) if request in finishing else 0))
        logits_at = np.array(logits_at + [0] * (b - len(logits_at)), np.int32)
        return rows, self._run(decoding, tokens, positions, sampled, logits_at, chunk_table if pieces else None)

    def _run(self, token_rows, tokens, positions, sampled, logits_at, chunk_table=None):
        """model_step on rows of tokens (token_rows: the request of each, for its page table; None
        or missing for padding; with chunk_table, the decode rows only), sampling at logits_at with
        the settings of the requests `sampled` (missing: padding); returns the (device) sample of each."""
        L = logits_at.shape[0]
        R = tokens.shape[0] if chunk_table is None else L
        page_table = np.zeros((R, self.pages_per_seq), np.int32)
        for row, request in enumerate(token_rows):
            if request is not None:
                page_table[row] = self.page_table[request.slot]
        seeds, streams, temperature = np.zeros(L, np.uint32), np.zeros(L, np.uint32), np.zeros(L, np.float32)
        top_k, top_p, top_logprobs = np.zeros(L, np.int32), np.ones(L, np.float32), np.zeros(L, np.int32)
        for row, request in enumerate(sampled):
            if request is not None:
                p = request.params
                seeds[row], streams[row] = request.seed, request.stream
                temperature[row], top_k[row], top_p[row] = p.temperature, p.top_k, p.top_p
                top_logprobs[row] = p.logprobs or 0
        inputs = self._place((tokens, positions, page_table, logits_at, seeds, streams, temperature, top_k, top_p,
                              top_logprobs) + (() if chunk_table is None else (chunk_table,)))
        self.pages, result = model_step_jit(self.params, self.pages, *inputs, cfg=self.cfg, mesh=self.mesh)
        return result

    def _place(self, arrays):
        if self.mesh is None:
            return arrays
        return tuple(jax.device_put(x, logical_to_sharding((axes.ACTIVATION_BATCH,) + (None,) * (x.ndim - 1),
                                                           self.mesh, x.shape)) for x in arrays)

    def _advance(self, rows, result) -> list[TokenOutput]:
        """Account for the tokens each (request, tokens fed, result row) fed, and emit the token
        sampled where a request's context ended."""
        tokens, logprobs, top_ids, top_logprobs = result
        outputs = []
        for request, n, row in rows:
            if request.prefilling:
                self.counters["prefilled_tokens"] += n
            request.written += n
            self._register_pages(request)
            if request.written < len(request.tokens):
                continue  # more of its context to prefill
            request.prefilling = False
            outputs.append(self._emit(request, int(tokens[row]), float(logprobs[row]),
                                      zip(top_ids[row].tolist(), top_logprobs[row].tolist())))
        return outputs

    def _register_pages(self, request: _Request) -> None:
        """Offer the request's newly filled pages to the prefix cache."""
        full = request.written // self.page_size
        if not self.allocator.prefix_caching or full <= len(request.keys):
            return
        parent = request.keys[-1] if request.keys else b""
        keys = page_keys(request.tokens[:full * self.page_size], self.page_size, len(request.keys), parent)
        for page, key in zip(request.pages[len(request.keys):full], keys):
            self.allocator.register(page, key)
        request.keys += keys

    def _emit(self, request: _Request, token: int, logprob: float, top) -> TokenOutput:
        request.tokens.append(token)
        self.counters["generated_tokens"] += 1
        p = request.params
        reason = "stop" if token in p.stop_token_ids else "length" if request.generated >= p.max_tokens else None
        out = TokenOutput(request.id, token,
                          logprob=None if p.logprobs is None else logprob,
                          top_logprobs=tuple(list(top)[:p.logprobs]) if p.logprobs else None,
                          finish_reason=reason, prompt_tokens=request.prompt_len,
                          cached_prompt_tokens=request.cached_tokens)
        request.reported = True
        if reason is not None:
            del self.requests[request.id]
            self._vacate(request)
        return out


__all__ = ["BatchingEngine", "RequestParams", "TokenOutput", "EngineFullError", "DecodeParams", "prepare",
           "param_shardings", "batch_multiple", "serving_shapes", "model_step", "model_step_jit", "MAX_LOGPROBS"]
