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


def _kernel(q_ref, k_ref, v_ref, pos_ref, acc_ref, m_ref, l_ref, *, cfg):
    # q_ref, acc_ref [br, D]; k_ref, v_ref [S, D]; pos_ref, m_ref, l_ref [br]
    bk = cfg.block_k
    split = pl.program_id(0)
    q = q_ref[...]
    pos = pos_ref[...]
    lo = split * cfg.blocks_per_split
    # Blocks past the highest position in this row block are never read: the ragged batch.
    hi = jnp.minimum(jnp.minimum(lo + cfg.blocks_per_split, cfg.num_blocks),
                     lax.div(jnp.max(pos) + bk, bk))

    def body(j, carry):
        acc, m, l = carry
        slots = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k, v = k_ref[slots, :], v_ref[slots, :]
        s = dot(q, k, NT) * cfg.scale
        k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
        s = jnp.where(k_pos[None, :] <= pos[:, None], s, -jnp.inf)
        return online_softmax_step(acc, m, l, s, v)

    br = q.shape[0]
    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((br,), M_FLOOR, jnp.float32),
             jnp.zeros((br,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi, body, carry)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def partials(q_BKRD, k_BSKD, v_BSKD, pos_BR, num_splits, cfg):
    B, K, Rp, D = q_BKRD.shape
    S = k_BSKD.shape[1]
    br = cfg.block_rows
    kv = pl.BlockSpec((None, S, None, D), lambda s, r, b, k: (b, 0, k, 0))
    acc, m, l = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(num_splits, Rp // br, B, K),
        in_specs=[pl.BlockSpec((None, None, br, D), lambda s, r, b, k: (b, k, r, 0)), kv, kv,
                  pl.BlockSpec((None, br), lambda s, r, b, k: (b, r))],
        out_specs=[pl.BlockSpec((None, None, None, br, D), lambda s, r, b, k: (s, b, k, r, 0)),
                   pl.BlockSpec((None, None, None, br), lambda s, r, b, k: (s, b, k, r)),
                   pl.BlockSpec((None, None, None, br), lambda s, r, b, k: (s, b, k, r))],
        out_shape=[jax.ShapeDtypeStruct((num_splits, B, K, Rp, D), jnp.float32),
                   jax.ShapeDtypeStruct((num_splits, B, K, Rp), jnp.float32),
                   jax.ShapeDtypeStruct((num_splits, B, K, Rp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="decode_attention",
    )(q_BKRD, k_BSKD, v_BSKD, pos_BR)
    return acc, m, l
