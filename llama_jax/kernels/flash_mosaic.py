"""Flash attention for TPUs (Pallas Mosaic lowering): forward, dQ and dK/dV kernels.

The key walk is the last grid axis ("arbitrary"), so the pipeline emitter double-buffers K/V tiles
into VMEM and the statistics live in VMEM scratch, broadcast over the 128 lanes; blocks a causal
query block never sees are skipped and their index map clamped, so they cost no DMA. Operands are
head-major [B, H|K, Tp, D] (transposed by the wrapper); row statistics [B, H, Tp, 128] (lane
broadcast); query segment ids [B, Tp, 128], key segment ids [B, 8, Tp]. No scalar prefetch: the
same kernel math as the GPU one. Shapes as in flash_attention.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llama_jax.kernels.common import (LANES, M_FLOOR, NN, NT, SUBLANES, Rows, dot, finish_softmax, fit_lanes,
                                      key_blocks, mask, online_softmax_step, query_blocks, split_refs, visible,
                                      with_rows)


def _lane_layout(rows: Rows) -> Rows:
    """Query ids [B, Tp] broadcast over the lanes [B, Tp, 128], key ids over the sublanes [B, 8, Tp]."""
    if rows.q_seg is None:
        return rows
    B, Tp = rows.q_seg.shape
    return Rows(jnp.broadcast_to(rows.q_seg[:, :, None], (B, Tp, LANES)),
                jnp.broadcast_to(rows.k_seg[:, None, :], (B, SUBLANES, Tp)))


def _mask(s, i, j, rows, cfg, **kw):
    """s [bq, bk] with -inf where query block i does not see key block j."""
    bq, bk = s.shape
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    q_seg = k_seg = None
    if rows.q_seg is not None:
        q_seg = fit_lanes(rows.q_seg[...], bk)  # [bq, bk]
        k_seg = rows.k_seg[pl.ds(0, 1), :]  # [1, bk]
    return mask(s, visible(q_pos, k_pos, q_seg, k_seg, cfg, **kw))


def _when_visible(step, visible_block, needs_mask):
    """step(masked) if the block is visible at all; unmasked where all of it is."""
    pl.when(visible_block & ~needs_mask)(lambda: step(False))
    pl.when(visible_block & needs_mask)(lambda: step(True))


def _fwd_kernel(*refs, cfg):
    # q_ref, o_ref, acc [bq, D]; k_ref, v_ref [bk, D]; rows.q_seg [bq, 128]; rows.k_seg [8, bk];
    # lse_ref, m_scr, l_scr [bq, 128]
    (q_ref, k_ref, v_ref), rows, (o_ref, lse_ref, m_scr, l_scr, acc) = split_refs(refs, 3, cfg)
    bq, bk = cfg.block_q, cfg.block_k
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, M_FLOOR, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    def step(masked):
        s = dot(q_ref[...], k_ref[...], NT) * cfg.scale
        if masked:
            s = _mask(s, i, j, rows, cfg)
        acc[...], m_scr[...], l_scr[...] = online_softmax_step(acc[...], m_scr[...], l_scr[...], s, v_ref[...],
                                                               lanes=True)

    full, hi = key_blocks(i, bq, bk, pl.num_programs(3), cfg)
    _when_visible(step, j < hi, j >= full)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o, lse_ref[...] = finish_softmax(acc[...], m_scr[...], l_scr[...], lanes=True)
        o_ref[...] = o.astype(o_ref.dtype)


def _dq_kernel(*refs, cfg):
    # q_ref, do_ref, dq_ref, acc [bq, D]; k_ref, v_ref [bk, D]; lse_ref, delta_ref, rows.q_seg
    # [bq, 128]; rows.k_seg [8, bk]
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), rows, (dq_ref, acc) = split_refs(refs, 6, cfg)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    def step(masked):
        k = k_ref[...]
        s = dot(q_ref[...], k, NT) * cfg.scale
        if masked:
            s = _mask(s, i, j, rows, cfg)
        p = jnp.exp(s - fit_lanes(lse_ref[...], bk))
        ds = p * (dot(do_ref[...], v_ref[...], NT) - fit_lanes(delta_ref[...], bk))
        acc[...] += dot(ds.astype(k.dtype), k, NN)

    full, hi = key_blocks(i, bq, bk, pl.num_programs(3), cfg)
    _when_visible(step, j < hi, j >= full)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg):
    # q_ref, do_ref [bq, D]; k_ref, v_ref, dk_ref, dv_ref, dk_acc, dv_acc [bk, D];
    # lse_ref, delta_ref, rows.q_seg [bq, 128]; rows.k_seg [8, bk]
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), rows, (dk_ref, dv_ref, dk_acc, dv_acc) = (
        split_refs(refs, 6, cfg))
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(masked):
        q, do = q_ref[...], do_ref[...]
        s = dot(q, k_ref[...], NT) * cfg.scale
        if masked:
            s = _mask(s, i, j, rows, cfg, key_padding=False)
        p = jnp.exp(s - fit_lanes(lse_ref[...], bk))
        dv_acc[...] += dot(p.astype(do.dtype).T, do, NN)
        ds = p * (dot(do, v_ref[...], NT) - fit_lanes(delta_ref[...], bk))
        dk_acc[...] += dot(ds.astype(q.dtype).T, q, NN)

    lo, full = query_blocks(j, bq, bk, pl.num_programs(4), cfg)
    _when_visible(step, i >= lo, i < full)

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _call(kernel, cfg, name, num_arbitrary, **kw):
    """pallas_call over a grid whose last `num_arbitrary` axes accumulate (the others: parallel)."""
    semantics = ("parallel",) * (len(kw["grid"]) - num_arbitrary) + ("arbitrary",) * num_arbitrary
    return pl.pallas_call(functools.partial(kernel, cfg=cfg), interpret=cfg.interpret, name=name,
                          compiler_params=pltpu.CompilerParams(dimension_semantics=semantics), **kw)


def _key_walk_specs(G, bq, bk, D, num_k_blocks, cfg):
    """BlockSpecs of the grid (B, H, query block i, key block j): (query block, K/V block, query ids,
    key ids). Past the diagonal K/V revisit the last visible block: no new DMA."""
    def kv_map(b, h, i, j):
        return b, lax.div(h, G), jnp.minimum(j, key_blocks(i, bq, bk, num_k_blocks, cfg)[1] - 1), 0

    return (pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0)),
            pl.BlockSpec((None, None, bk, D), kv_map),
            pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j: (b, 0, kv_map(b, h, i, j)[2])))


def forward(q_BTHD, k_BTKD, v_BTKD, rows, cfg):
    """(o [B, Tp, H, D], residuals for `backward`); rows: Rows of [B, Tp] int32 ids. The kernels
    run head-major: [B, H|K, Tp, D]."""
    q_BHTD, k_BKTD, v_BKTD = (x.transpose(0, 2, 1, 3) for x in (q_BTHD, k_BTKD, v_BTKD))
    B, H, Tp, D = q_BHTD.shape
    bq, bk = cfg.block_q, cfg.block_k
    q_block, kv_block, q_ids, k_ids = _key_walk_specs(H // k_BKTD.shape[1], bq, bk, D, Tp // bk, cfg)
    in_specs, args = with_rows([q_block, kv_block, kv_block], [q_BHTD, k_BKTD, v_BKTD], _lane_layout(rows),
                               q_ids, k_ids)
    o_BHTD, lse_BHT128 = _call(
        _fwd_kernel, cfg, "flash_attention_fwd", 1,
        grid=(B, H, Tp // bq, Tp // bk),
        in_specs=in_specs,
        out_specs=[q_block, pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))],
        out_shape=[jax.ShapeDtypeStruct(q_BHTD.shape, q_BHTD.dtype),
                   jax.ShapeDtypeStruct((B, H, Tp, LANES), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, D), jnp.float32)],
    )(*args)
    residuals = (q_BHTD, k_BKTD, v_BKTD, rows, o_BHTD, lse_BHT128[..., 0])
    return o_BHTD.transpose(0, 2, 1, 3), residuals


def backward(residuals, do_BTHD, cfg):
    """(dq, dk, dv) [B, Tp, H|K, D] of `forward`'s inputs under the output cotangent do."""
    q_BHTD, k_BKTD, v_BKTD, rows, o_BHTD, lse_BHT = residuals
    do_BHTD = do_BTHD.transpose(0, 2, 1, 3)
    B, H, Tp, D = q_BHTD.shape
    K = k_BKTD.shape[1]
    G = H // K
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    lane_rows = _lane_layout(rows)
    lse_BHT128 = jnp.broadcast_to(lse_BHT[..., None], (B, H, Tp, LANES))
    delta_BHT = jnp.einsum("bhtd,bhtd->bht", o_BHTD.astype(jnp.float32),
                           do_BHTD.astype(jnp.float32))
    delta_BHT128 = jnp.broadcast_to(delta_BHT[..., None], (B, H, Tp, LANES))
    inputs = [q_BHTD, k_BKTD, v_BKTD, do_BHTD, lse_BHT128, delta_BHT128]

    q_block, kv_block, q_ids, k_ids = _key_walk_specs(G, bq, bk, D, Tp // bk, cfg)
    stat_block = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))
    in_specs, args = with_rows([q_block, kv_block, kv_block, q_block, stat_block, stat_block], inputs,
                               lane_rows, q_ids, k_ids)
    dq_BHTD = _call(
        _dq_kernel, cfg, "flash_attention_dq", 1,
        grid=(B, H, Tp // bq, Tp // bk),
        in_specs=in_specs,
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q_BHTD.shape, q_BHTD.dtype),
        scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)],
    )(*args)

    # Grid (B, K, key block j, group head g, query block i): the last two accumulate into dK/dV.
    # Above the diagonal the queries revisit the first block that sees key block j: no new DMA.
    def q_map(b, k, j, g, i):
        return b, k * G + g, jnp.maximum(i, query_blocks(j, bq, bk, Tp // bq, cfg)[0]), 0

    q_block = pl.BlockSpec((None, None, bq, D), q_map)
    stat_block = pl.BlockSpec((None, None, bq, LANES), q_map)
    kv_block = pl.BlockSpec((None, None, bk, D), lambda b, k, j, g, i: (b, k, j, 0))
    in_specs, args = with_rows([q_block, kv_block, kv_block, q_block, stat_block, stat_block], inputs,
                               lane_rows,
                               pl.BlockSpec((None, bq, LANES), lambda b, k, j, g, i: (b, q_map(b, k, j, g, i)[2], 0)),
                               pl.BlockSpec((None, SUBLANES, bk), lambda b, k, j, g, i: (b, 0, j)))
    dk_BKTD, dv_BKTD = _call(
        _dkv_kernel, cfg, "flash_attention_dkv", 2,
        grid=(B, K, Tp // bk, G, Tp // bq),
        in_specs=in_specs,
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k_BKTD.shape, k_BKTD.dtype),
                   jax.ShapeDtypeStruct(v_BKTD.shape, v_BKTD.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)],
    )(*args)
    return tuple(x.transpose(0, 2, 1, 3) for x in (dq_BHTD, dk_BKTD, dv_BKTD))
