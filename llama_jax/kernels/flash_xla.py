"""Flash attention in plain XLA, masked by positions: context parallelism's attention on CPU.

Shapes: B batch, T queries, S keys, H query heads, K kv heads, G = H // K, D head dim; inside,
the G query heads of a kv head are folded into its rows, R = T * G (token-major, so a block of
rows is a run of tokens), and split into blocks of bq rows; keys into blocks of bk.

The dense reference materialises [T, S] scores per head: on a context-parallel device T/cp
queries against all T keys, O(T^2 / cp), which is what bounded a CPU row at a few thousand
tokens. Here a scan walks query blocks and, inside, key blocks with the online softmax the
Pallas kernels use (common.online_softmax_step), so a step's temporaries are [bq, bk] per kv
head whatever the row length. The backward is written out (FlashAttention-2): the forward saves
only its output and lse, and one pass over the same blocks recomputes each block's
probabilities (keys-major, so dK and dV are plain matmuls, faster on CPU than queries-major),
accumulating dQ of the query block and dK / dV of every key block. A key block
whose first position comes after the query block's last (for every row of the batch) is
skipped under a `lax.cond`, which XLA executes as a branch: with positions counting along the
row that is half of causal attention's blocks.

A query that sees no key gets output 0 (like the kernels; the reference averages V instead).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from llama_jax.kernels.common import MASK_VALUE, NN, NT, Rows, dot, finish_softmax, mask, online_softmax_step, \
    round_up

DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K = 256, 256  # tokens: a step's scores, 256 KiB per kv head at G = 1, stay in L2
TN = ((0,), (0,))


def _per_row_and_head(f):
    """f of one (batch row, kv head) -> f over leading [B, K] dims. Its last two operands, the
    queries' and the keys' (positions, segment ids), are [B, n]: shared by the kv heads."""

    def over_heads(*args):
        return jax.vmap(f, in_axes=(0,) * (len(args) - 2) + (None, None))(*args)

    return jax.vmap(over_heads)


def _scores(q, k, rows_q, rows_k, scale, *, keys_major=False):
    """Masked scaled scores of one row and head, [bq, bk] (or [bk, bq] if keys_major); rows_*:
    (positions, segment ids or None)."""
    (q_pos, q_seg), (k_pos, k_seg) = rows_q, rows_k
    across, down = (lambda x: x[None, :]), (lambda x: x[:, None])  # noqa: E731
    query, key = (across, down) if keys_major else (down, across)
    visible = key(k_pos) <= query(q_pos)
    if q_seg is not None:
        visible &= key(k_seg) == query(q_seg)
    return mask((dot(k, q, NT) if keys_major else dot(q, k, NT)) * scale, visible)


def _unseen(k_first, q_last):
    """A key block is skipped when every row's first key comes after its last query."""
    return jnp.all(k_first > q_last)


def _opaque(loop):
    """loop(body, ...) under jax.checkpoint, which saves nothing when partially evaluated. An
    enclosing scan (the model's scan over layers) partially evaluates this function to hoist
    loop-invariant work: the masks and block choices depend only on positions, which are
    invariant across layers, and would be stacked for every (query block, key block) pair,
    [T/cp, T] per device again. Under checkpoint they are recomputed where they are used."""
    return lambda body, *args: jax.checkpoint(lambda *a: loop(body, *a))(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, rows, scale):
    return _forward(q, k, v, rows, scale)[0]


def _blocks(rows):
    """Per-block (positions, segment ids) of queries and keys, and each block's last query /
    first key position: [nq | nk, B, ...] like the blocks of q and k."""
    q_rows, k_rows = (rows.q_pos, rows.q_seg), (rows.k_pos, rows.k_seg)
    return q_rows, k_rows, rows.q_pos.max(axis=-1), rows.k_pos.min(axis=-1)


def _forward(q, k, v, rows, scale):
    """q [nq, B, K, bq, D], k, v [nk, B, K, bk, D]; rows: Rows of [nq, B, bq] / [nk, B, bk]."""
    q_rows, k_rows, q_last, k_first = _blocks(rows)

    @_per_row_and_head
    def step(acc, m, l, q, k, v, rows_q, rows_k):
        return online_softmax_step(acc, m, l, _scores(q, k, rows_q, rows_k, scale), v)

    def query_block(xs):
        q_i, rows_i, last_i = xs

        def key_block(carry, ys):
            k_j, v_j, rows_j, first_j = ys
            visit = lambda c: step(*c, q_i, k_j, v_j, rows_i, rows_j)  # noqa: E731
            return lax.cond(_unseen(first_j, last_i), lambda c: c, visit, carry), None

        init = (jnp.zeros(q_i.shape, jnp.float32), jnp.full(q_i.shape[:-1], MASK_VALUE, jnp.float32),
                jnp.zeros(q_i.shape[:-1], jnp.float32))
        (acc, m, l), _ = lax.scan(key_block, init, (k, v, k_rows, k_first))
        out, lse = jax.vmap(jax.vmap(finish_softmax))(acc, m, l)
        return out.astype(q_i.dtype), lse

    out, lse = _opaque(lax.map)(query_block, (q, q_rows, q_last))
    return out, (q, k, v, rows, out, lse)


def _backward(scale, residuals, do):
    q, k, v, rows, out, lse = residuals
    q_rows, k_rows, q_last, k_first = _blocks(rows)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    @_per_row_and_head
    def grads(dq, q, k, v, do, lse, delta, rows_q, rows_k):
        """One block's share: (dQ of the query block + its part, (dK, dV) of the key block)."""
        # Keys-major: dK and dV are then plain matmuls, only dQ contracts over a transposed operand.
        p = jnp.exp(_scores(q, k, rows_q, rows_k, scale, keys_major=True) - lse[None, :])  # [bk, bq]
        ds = p * (dot(v, do, NT) - delta[None, :])
        dk = dot(ds.astype(q.dtype), q, NN) * scale
        dv = dot(p.astype(do.dtype), do, NN)
        return dq + dot(ds.astype(k.dtype), k, TN) * scale, (dk, dv)

    def query_block(dkv, xs):
        q_i, do_i, lse_i, delta_i, rows_i, last_i = xs

        def key_block(dq_i, ys):
            k_j, v_j, rows_j, first_j = ys
            none = lambda dq: (dq, (jnp.zeros(k_j.shape, jnp.float32),) * 2)  # noqa: E731
            visit = lambda dq: grads(dq, q_i, k_j, v_j, do_i, lse_i, delta_i, rows_i, rows_j)  # noqa: E731
            return lax.cond(_unseen(first_j, last_i), none, visit, dq_i)

        dq_i, (dk, dv) = lax.scan(key_block, jnp.zeros(q_i.shape, jnp.float32), (k, v, k_rows, k_first))
        return (dkv[0] + dk, dkv[1] + dv), dq_i.astype(q.dtype)

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = _opaque(lax.scan)(query_block, (zeros, zeros), (q, do, lse, delta, q_rows, q_last))
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_forward, _backward)


def flash_attention_xla(q_BTHD, k_BSKD, v_BSKD, q_positions_BT, kv_positions_BS, segment_ids_BT=None,
                        kv_segment_ids_BS=None, *, scale: float | None = None, block_q: int = DEFAULT_BLOCK_Q,
                        block_k: int = DEFAULT_BLOCK_K):
    """Causal attention of q [B, T, H, D] to k, v [B, S, K, D] by positions -> [B, T, H, D].

    Query t sees key s iff kv_positions[s] <= q_positions[t] and (with segment ids) both carry
    the same id: `positional_attention_reference`'s contract, the tokens in any order.
    block_q / block_k: tokens per query / key block (clamped to T / S; T and S are padded to them).
    """
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1:3]
    G = H // K
    scale = float(D ** -0.5 if scale is None else scale)
    bq, bk = min(block_q, T), min(block_k, S)
    Tp, Sp = round_up(T, bq), round_up(S, bk)
    int32 = jnp.iinfo(jnp.int32)

    def blocks(x, n, length, value):
        """[B, L, ...] padded to n blocks of `length` along L, as [n, B, length, ...]."""
        x = jnp.pad(x, [(0, 0), (0, n * length - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=value)
        return jnp.moveaxis(x.reshape(x.shape[0], n, length, *x.shape[2:]), 1, 0)

    # Queries: [B, T, K, G, D] -> blocks of bq tokens, their G heads folded into bq * G rows.
    q = blocks(q_BTHD.reshape(B, T, K, G, D), Tp // bq, bq, 0)  # [nq, B, bq, K, G, D]
    q = q.transpose(0, 1, 3, 2, 4, 5).reshape(Tp // bq, B, K, bq * G, D)
    k, v = (blocks(x, Sp // bk, bk, 0).transpose(0, 1, 3, 2, 4) for x in (k_BSKD, v_BSKD))  # [nk, B, K, bk, D]
    q_row = lambda x, pad: jnp.repeat(blocks(x.astype(jnp.int32), Tp // bq, bq, pad), G, axis=-1)  # noqa: E731
    k_row = lambda x, pad: blocks(x.astype(jnp.int32), Sp // bk, bk, pad)  # noqa: E731
    # Padded queries sit before every key and padded keys after every query: neither is ever seen.
    rows = Rows(q_pos=q_row(q_positions_BT, int32.min), k_pos=k_row(kv_positions_BS, int32.max))
    if segment_ids_BT is not None:
        kv_segment_ids_BS = segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS
        rows = rows._replace(q_seg=q_row(segment_ids_BT, -1), k_seg=k_row(kv_segment_ids_BS, -1))
    out = _flash(q, k, v, rows, scale)  # [nq, B, K, bq * G, D]
    out = out.reshape(Tp // bq, B, K, bq, G, D).transpose(1, 0, 3, 2, 4, 5).reshape(B, Tp, H, D)
    return out[:, :T]


__all__ = ["flash_attention_xla", "DEFAULT_BLOCK_Q", "DEFAULT_BLOCK_K"]
