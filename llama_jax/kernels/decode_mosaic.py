"""Decode attention for TPUs (Pallas Mosaic lowering): per-split partial softmaxes.

Mosaic (TPU): grid (batch, kv-head group, row block, split, block in split), the last axis
accumulating. The cache is viewed as [B, S, K * D] so a tile is (bk, W) with W = hp * D a whole
number of 128-lane vregs: hp = 128 // D heads share a tile when D < 128 (all K heads when K
does not split that way: a full-width tile needs no alignment). Each of those heads'
queries is zero outside its own D lanes, so q . k_tile^T is exactly its scores, and its output
is read from its own lanes of p . v_tile: no unaligned lane slicing.
Shapes as in decode_attention.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llama_jax.kernels.common import LANES, M_FLOOR, NT, dot, fit_lanes, online_softmax_step


def _kernel(last_block_BN, q_ref, k_ref, v_ref, pos_ref, acc_ref, m_ref, l_ref, m_scr, l_scr, acc_scr, *, cfg):
    # last_block_BN: SMEM [B, n_row_blocks]; q_ref, acc_ref, acc_scr [hp, br, W];
    # k_ref, v_ref [bk, W]; pos_ref [br, 128]; m_ref, l_ref, m_scr, l_scr [hp, br, 128]
    bk = cfg.block_k
    b, r, split, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    j = split * cfg.blocks_per_split + t
    hp, br, _ = q_ref.shape

    @pl.when(t == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, M_FLOOR, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when((j <= last_block_BN[b, r]) & (j < cfg.num_blocks))
    def _step():
        k, v = k_ref[...], v_ref[...]
        k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (br, bk), 1)
        visible = k_pos <= fit_lanes(pos_ref[...], bk)
        for h in range(hp):
            s = jnp.where(visible, dot(q_ref[h], k, NT) * cfg.scale, -jnp.inf)
            acc_scr[h], m_scr[h], l_scr[h] = online_softmax_step(acc_scr[h], m_scr[h], l_scr[h], s, v, lanes=True)

    @pl.when(t == pl.num_programs(4) - 1)
    def _finish():
        acc_ref[...] = acc_scr[...]
        m_ref[...] = m_scr[...]
        l_ref[...] = l_scr[...]


def partials(q_BKRD, k_BSKD, v_BSKD, pos_BR, num_splits, cfg):
    B, K, Rp, D = q_BKRD.shape
    S = k_BSKD.shape[1]
    hp = LANES // D if D < LANES and K % (LANES // D) == 0 else 1
    if (hp * D) % LANES:
        hp = K  # a tile as wide as all kv heads: a full-width block needs no lane alignment
    W, KG = hp * D, K // hp
    br, bk, bps = cfg.block_rows, cfg.block_k, cfg.blocks_per_split
    n_rb = Rp // br

    # Head h of a group keeps its queries in lanes [h*D, (h+1)*D) of a W-wide row, zeros elsewhere.
    q = q_BKRD.reshape(B, KG, hp, Rp, D)
    q = jnp.einsum("bgird,ij->bgirjd", q, jnp.eye(hp, dtype=q.dtype)).reshape(B, KG, hp, Rp, W)
    k_BSW = k_BSKD.reshape(B, S, K * D)
    v_BSW = v_BSKD.reshape(B, S, K * D)
    last_block_BN = lax.div(pos_BR.reshape(B, n_rb, br).max(axis=2), bk)  # -1 // bk -> 0: harmless
    pos_BR128 = jnp.broadcast_to(pos_BR[..., None], (B, Rp, LANES))

    def kv_map(b, g, r, s, t, last):
        return b, jnp.minimum(s * bps + t, jnp.minimum(last[b, r], cfg.num_blocks - 1)), g

    out_map = lambda b, g, r, s, t, last: (s, b, g, 0, r, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(B, KG, n_rb, num_splits, bps),
        in_specs=[pl.BlockSpec((None, None, hp, br, W),
                               lambda b, g, r, s, t, last: (b, g, 0, r, 0)),
                  pl.BlockSpec((None, bk, W), kv_map),
                  pl.BlockSpec((None, bk, W), kv_map),
                  pl.BlockSpec((None, br, LANES), lambda b, g, r, s, t, last: (b, r, 0))],
        out_specs=[pl.BlockSpec((None, None, None, hp, br, W), out_map),
                   pl.BlockSpec((None, None, None, hp, br, LANES), out_map),
                   pl.BlockSpec((None, None, None, hp, br, LANES), out_map)],
        scratch_shapes=[pltpu.VMEM((hp, br, LANES), jnp.float32),
                        pltpu.VMEM((hp, br, LANES), jnp.float32),
                        pltpu.VMEM((hp, br, W), jnp.float32)],
    )
    acc, m, l = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((num_splits, B, KG, hp, Rp, W), jnp.float32),
                   jax.ShapeDtypeStruct((num_splits, B, KG, hp, Rp, LANES), jnp.float32),
                   jax.ShapeDtypeStruct((num_splits, B, KG, hp, Rp, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="decode_attention",
    )(last_block_BN, q, k_BSW, v_BSW, pos_BR128)
    # Keep each head's own lanes: [P, B, KG, hp, Rp, hp, D] -> diagonal over the two hp axes.
    acc = acc.reshape(num_splits, B, KG, hp, Rp, hp, D)
    acc = jnp.einsum("pbgirjd,ij->pbgird", acc, jnp.eye(hp, dtype=acc.dtype))
    return (acc.reshape(num_splits, B, K, Rp, D), m[..., 0].reshape(num_splits, B, K, Rp),
            l[..., 0].reshape(num_splits, B, K, Rp))
