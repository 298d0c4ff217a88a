"""Decode attention for GPUs (Pallas Triton lowering): per-split partial softmaxes.

Grid (split, row block, batch, kv head); the cache keeps its own [B, S, K, D] layout. Each program
loops over the blocks of its split with a data-dependent bound. Shapes as in decode_attention.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llama_jax.kernels.common import M_FLOOR, NT, dot, online_softmax_step


def fold_split(q, pos, bk, load_kv, cfg, out_refs):
    """Write the partial softmax (acc, m, l) of rows q [br, D] at positions pos [br] over this
    program's split of key blocks (bk slots each, block j = load_kv(j) -> k, v [bk, D]) to
    out_refs; the decode and the paged kernels differ only in load_kv."""
    lo = pl.program_id(0) * cfg.blocks_per_split
    # Blocks past the highest position in this row block are never read: the ragged batch.
    hi = jnp.minimum(jnp.minimum(lo + cfg.blocks_per_split, cfg.num_blocks), lax.div(jnp.max(pos) + bk, bk))

    def body(j, carry):
        k, v = load_kv(j)
        s = dot(q, k, NT) * cfg.scale
        k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
        s = jnp.where(k_pos[None, :] <= pos[:, None], s, -jnp.inf)
        return online_softmax_step(*carry, s, v)

    br = q.shape[0]
    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((br,), M_FLOOR, jnp.float32), jnp.zeros((br,), jnp.float32))
    for ref, value in zip(out_refs, lax.fori_loop(lo, hi, body, carry)):
        ref[...] = value


def split_call(kernel, kv_specs, num_splits, q_BKRD, br, cfg, name):
    """pallas_call of kernel(q, *kv operands, pos, acc, m, l) over the grid (split, row block,
    batch, kv head): q [B, K, Rp, D] and pos [B, Rp] in row blocks of br, the kv operands by
    kv_specs; per-split (acc, m, l) out."""
    B, K, Rp, D = q_BKRD.shape
    stat = pl.BlockSpec((None, None, None, br), lambda s, r, b, k: (s, b, k, r))
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=(num_splits, Rp // br, B, K),
        in_specs=[pl.BlockSpec((None, None, br, D), lambda s, r, b, k: (b, k, r, 0)), *kv_specs,
                  pl.BlockSpec((None, br), lambda s, r, b, k: (b, r))],
        out_specs=[pl.BlockSpec((None, None, None, br, D), lambda s, r, b, k: (s, b, k, r, 0)), stat, stat],
        out_shape=[jax.ShapeDtypeStruct((num_splits, B, K, Rp, D), jnp.float32),
                   jax.ShapeDtypeStruct((num_splits, B, K, Rp), jnp.float32),
                   jax.ShapeDtypeStruct((num_splits, B, K, Rp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name=name,
    )


def _kernel(q_ref, k_ref, v_ref, pos_ref, acc_ref, m_ref, l_ref, *, cfg):
    # q_ref, acc_ref [br, D]; k_ref, v_ref [S, D]; pos_ref, m_ref, l_ref [br]
    bk = cfg.block_k

    def load_kv(j):
        slots = pl.ds(pl.multiple_of(j * bk, bk), bk)
        return k_ref[slots, :], v_ref[slots, :]

    fold_split(q_ref[...], pos_ref[...], bk, load_kv, cfg, (acc_ref, m_ref, l_ref))


def partials(q_BKRD, k_BSKD, v_BSKD, pos_BR, num_splits, cfg):
    S, D = k_BSKD.shape[1], k_BSKD.shape[3]
    kv = pl.BlockSpec((None, S, None, D), lambda s, r, b, k: (b, 0, k, 0))
    return split_call(_kernel, [kv, kv], num_splits, q_BKRD, cfg.block_rows, cfg, "decode_attention")(
        q_BKRD, k_BSKD, v_BSKD, pos_BR)
