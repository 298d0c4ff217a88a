"""Paged attention for GPUs (Pallas Triton lowering): per-split partial softmaxes.

Grid (split, row block, batch, kv head); the pool keeps its own [N, P, K, D] layout and each
program sees its kv head's whole pool. A program loops over the blocks of its split up to the one
holding its rows' last position (a data-dependent bound), gathering the J pages of a block with
one indexed load (`k_ref[pages]`), the row's page table beside its queries. Shapes as in
paged_attention.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llama_jax.kernels.common import MASK_VALUE, NT, dot, online_softmax_step


def _kernel(q_ref, k_ref, v_ref, table_ref, pos_ref, acc_ref, m_ref, l_ref, *, cfg):
    # q_ref, acc_ref [br, D]; k_ref, v_ref [N, P, D] (this kv head); table_ref [Mp]; pos_ref, m_ref, l_ref [br]
    J = cfg.pages_per_block
    P, D = k_ref.shape[1], k_ref.shape[2]
    bk = J * P
    q, pos = q_ref[...], pos_ref[...]
    lo = pl.program_id(0) * cfg.blocks_per_split
    # Blocks past the rows' last position are never read: the ragged batch.
    hi = jnp.minimum(jnp.minimum(lo + cfg.blocks_per_split, cfg.num_blocks), lax.div(jnp.max(pos) + bk, bk))

    def body(j, carry):
        acc, m, l = carry
        pages = table_ref[pl.ds(pl.multiple_of(j * J, J), J)]
        k, v = k_ref[pages].reshape(bk, D), v_ref[pages].reshape(bk, D)
        s = dot(q, k, NT) * cfg.scale
        k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
        s = jnp.where(k_pos[None, :] <= pos[:, None], s, -jnp.inf)
        return online_softmax_step(acc, m, l, s, v)

    br = q.shape[0]
    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((br,), MASK_VALUE, jnp.float32), jnp.zeros((br,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi, body, carry)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def partials(q_BKRD, k_pages_NPKD, v_pages_NPKD, table_BM, pos_BR, num_splits, cfg):
    B, K, Rp, D = q_BKRD.shape
    N, P = k_pages_NPKD.shape[:2]
    M = table_BM.shape[1]
    br = cfg.block_rows
    pages = pl.BlockSpec((N, P, None, D), lambda s, r, b, k: (0, 0, k, 0))
    out_map = lambda s, r, b, k: (s, b, k, r)  # noqa: E731
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(num_splits, Rp // br, B, K),
        in_specs=[pl.BlockSpec((None, None, br, D), lambda s, r, b, k: (b, k, r, 0)), pages, pages,
                  pl.BlockSpec((None, M), lambda s, r, b, k: (b, 0)),
                  pl.BlockSpec((None, br), lambda s, r, b, k: (b, r))],
        out_specs=[pl.BlockSpec((None, None, None, br, D), lambda s, r, b, k: (s, b, k, r, 0)),
                   pl.BlockSpec((None, None, None, br), out_map),
                   pl.BlockSpec((None, None, None, br), out_map)],
        out_shape=[jax.ShapeDtypeStruct((num_splits, B, K, Rp, D), jnp.float32),
                   jax.ShapeDtypeStruct((num_splits, B, K, Rp), jnp.float32),
                   jax.ShapeDtypeStruct((num_splits, B, K, Rp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="paged_attention",
    )(q_BKRD, k_pages_NPKD, v_pages_NPKD, table_BM, pos_BR)
