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

from llama_jax.kernels.common import (LANES, M_FLOOR, NN, NT, SUBLANES, dot, fit_lanes, mask, split_refs,
                                      visible)

def _mosaic_mask(i, j, bq, bk, qs_ref, ks_ref, cfg, *, key_padding=True):
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    q_seg = k_seg = None
    if qs_ref is not None:
        q_seg = fit_lanes(qs_ref[...], bk)  # [bq, bk]
        k_seg = ks_ref[pl.ds(0, 1), :]  # [1, bk]
    return visible(q_pos, k_pos, q_seg, k_seg, cfg, key_padding=key_padding)


def _block_flags(i, j, bq, bk, cfg, *, key_padding=True):
    """(visible, needs_mask) for query block i against key block j, as traced booleans."""
    if cfg.causal:
        visible = j * bk <= i * bq + bq - 1
        needs_mask = (j + 1) * bk - 1 > i * bq
    else:
        visible = j >= 0
        needs_mask = ((j + 1) * bk > cfg.kv_len) if key_padding else j < 0
    if cfg.has_segments:
        needs_mask = j >= 0
    return visible, needs_mask


def _fwd_kernel_mosaic(*refs, cfg):
    # q_ref, o_ref, acc [bq, D]; k_ref, v_ref [bk, D]; qs_ref [bq, 128]; ks_ref [8, bk];
    # lse_ref, m_scr, l_scr [bq, 128]
    (q_ref, k_ref, v_ref), qs_ref, ks_ref, (o_ref, lse_ref, m_scr, l_scr, acc) = split_refs(refs, 3, cfg)
    bq, bk = cfg.block_q, cfg.block_k
    D = q_ref.shape[-1]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, M_FLOOR, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    def step(masked):
        v = v_ref[...]
        s = dot(q_ref[...], k_ref[...], NT) * cfg.scale
        if masked:
            s = mask(s, _mosaic_mask(i, j, bq, bk, qs_ref, ks_ref, cfg))
        m_prev = m_scr[...]
        m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - fit_lanes(m_next, bk))
        l_scr[...] = alpha * l_scr[...] + p.sum(axis=1, keepdims=True)
        m_scr[...] = m_next
        acc[...] = acc[...] * fit_lanes(alpha, D) + dot(p.astype(v.dtype), v, NN)

    visible, needs_mask = _block_flags(i, j, bq, bk, cfg)
    pl.when(visible & ~needs_mask)(lambda: step(False))
    pl.when(visible & needs_mask)(lambda: step(True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_scr[...]
        seen = l > 0.0
        l = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc[...] / fit_lanes(l, D)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(l), 0.0)


def _dq_kernel_mosaic(*refs, cfg):
    # q_ref, do_ref, dq_ref, acc [bq, D]; k_ref, v_ref [bk, D]; lse_ref, delta_ref, qs_ref
    # [bq, 128]; ks_ref [8, bk]
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, (dq_ref, acc) = split_refs(refs, 6, cfg)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    def step(masked):
        k = k_ref[...]
        s = dot(q_ref[...], k, NT) * cfg.scale
        if masked:
            s = mask(s, _mosaic_mask(i, j, bq, bk, qs_ref, ks_ref, cfg))
        p = jnp.exp(s - fit_lanes(lse_ref[...], bk))
        ds = p * (dot(do_ref[...], v_ref[...], NT) - fit_lanes(delta_ref[...], bk))
        acc[...] += dot(ds.astype(k.dtype), k, NN)

    visible, needs_mask = _block_flags(i, j, bq, bk, cfg)
    pl.when(visible & ~needs_mask)(lambda: step(False))
    pl.when(visible & needs_mask)(lambda: step(True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel_mosaic(*refs, cfg):
    # q_ref, do_ref [bq, D]; k_ref, v_ref, dk_ref, dv_ref, dk_acc, dv_acc [bk, D];
    # lse_ref, delta_ref, qs_ref [bq, 128]; ks_ref [8, bk]
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, (dk_ref, dv_ref, dk_acc, dv_acc) = (
        split_refs(refs, 6, cfg))
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    first = (g == 0) & (i == 0)
    last = (g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1)

    @pl.when(first)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(masked):
        q, do = q_ref[...], do_ref[...]
        s = dot(q, k_ref[...], NT) * cfg.scale
        if masked:
            s = mask(s, _mosaic_mask(i, j, bq, bk, qs_ref, ks_ref, cfg, key_padding=False))
        p = jnp.exp(s - fit_lanes(lse_ref[...], bk))
        dv_acc[...] += dot(p.astype(do.dtype).T, do, NN)
        ds = p * (dot(do, v_ref[...], NT) - fit_lanes(delta_ref[...], bk))
        dk_acc[...] += dot(ds.astype(q.dtype).T, q, NN)

    visible, needs_mask = _block_flags(i, j, bq, bk, cfg, key_padding=False)
    pl.when(visible & ~needs_mask)(lambda: step(False))
    pl.when(visible & needs_mask)(lambda: step(True))

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _mosaic_params(num_parallel, num_arbitrary):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * num_parallel + ("arbitrary",) * num_arbitrary)


def forward(q_BHTD, k_BKTD, v_BKTD, qs_BT128, ks_B8T, cfg):
    B, H, Tp, D = q_BHTD.shape
    G = H // k_BKTD.shape[1]
    bq, bk = cfg.block_q, cfg.block_k

    def kv_map(b, h, i, j):
        if cfg.causal:  # past the diagonal: revisit the last needed block, so no new DMA
            j = jnp.minimum(j, lax.div((i + 1) * bq - 1, bk))
        return b, lax.div(h, G), j, 0

    in_specs = [pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0)),
                pl.BlockSpec((None, None, bk, D), kv_map),
                pl.BlockSpec((None, None, bk, D), kv_map)]
    args = [q_BHTD, k_BKTD, v_BKTD]
    if cfg.has_segments:
        in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
                     pl.BlockSpec((None, SUBLANES, bk),
                                  lambda b, h, i, j: (b, 0, kv_map(b, h, i, j)[2]))]
        args += [qs_BT128, ks_B8T]
    o_BHTD, lse_BHT128 = pl.pallas_call(
        functools.partial(_fwd_kernel_mosaic, cfg=cfg),
        grid=(B, H, Tp // bq, Tp // bk),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0)),
                   pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))],
        out_shape=[jax.ShapeDtypeStruct(q_BHTD.shape, q_BHTD.dtype),
                   jax.ShapeDtypeStruct((B, H, Tp, LANES), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, D), jnp.float32)],
        compiler_params=_mosaic_params(3, 1),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(*args)
    return o_BHTD, lse_BHT128[..., 0]


def backward(q_BHTD, k_BKTD, v_BKTD, qs_BT128, ks_B8T, o_BHTD, lse_BHT, do_BHTD, cfg):
    B, H, Tp, D = q_BHTD.shape
    K = k_BKTD.shape[1]
    G = H // K
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    lse_BHT128 = jnp.broadcast_to(lse_BHT[..., None], (B, H, Tp, LANES))
    delta_BHT = jnp.einsum("bhtd,bhtd->bht", o_BHTD.astype(jnp.float32),
                           do_BHTD.astype(jnp.float32))
    delta_BHT128 = jnp.broadcast_to(delta_BHT[..., None], (B, H, Tp, LANES))

    def kv_map(b, h, i, j):
        if cfg.causal:
            j = jnp.minimum(j, lax.div((i + 1) * bq - 1, bk))
        return b, lax.div(h, G), j, 0

    q_block = pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0))
    rows = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))
    in_specs = [q_block, pl.BlockSpec((None, None, bk, D), kv_map),
                pl.BlockSpec((None, None, bk, D), kv_map), q_block, rows, rows]
    args = [q_BHTD, k_BKTD, v_BKTD, do_BHTD, lse_BHT128, delta_BHT128]
    if cfg.has_segments:
        in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
                     pl.BlockSpec((None, SUBLANES, bk),
                                  lambda b, h, i, j: (b, 0, kv_map(b, h, i, j)[2]))]
        args += [qs_BT128, ks_B8T]
    dq_BHTD = pl.pallas_call(
        functools.partial(_dq_kernel_mosaic, cfg=cfg),
        grid=(B, H, Tp // bq, Tp // bk),
        in_specs=in_specs,
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q_BHTD.shape, q_BHTD.dtype),
        scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)],
        compiler_params=_mosaic_params(3, 1),
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(*args)

    # Grid (B, K, key block, group head, query block): the last two accumulate into dK/dV.
    def q_map(b, k, j, g, i):
        if cfg.causal:  # above the diagonal: revisit the first needed block, so no new DMA
            i = jnp.maximum(i, lax.div(j * bk, bq))
        return b, k * G + g, i, 0

    q_block = pl.BlockSpec((None, None, bq, D), q_map)
    rows = pl.BlockSpec((None, None, bq, LANES), q_map)
    kv_block = pl.BlockSpec((None, None, bk, D), lambda b, k, j, g, i: (b, k, j, 0))
    in_specs = [q_block, kv_block, kv_block, q_block, rows, rows]
    args = [q_BHTD, k_BKTD, v_BKTD, do_BHTD, lse_BHT128, delta_BHT128]
    if cfg.has_segments:
        in_specs += [pl.BlockSpec((None, bq, LANES),
                                  lambda b, k, j, g, i: (b, q_map(b, k, j, g, i)[2], 0)),
                     pl.BlockSpec((None, SUBLANES, bk), lambda b, k, j, g, i: (b, 0, j))]
        args += [qs_BT128, ks_B8T]
    dk_BKTD, dv_BKTD = pl.pallas_call(
        functools.partial(_dkv_kernel_mosaic, cfg=cfg),
        grid=(B, K, Tp // bk, G, Tp // bq),
        in_specs=in_specs,
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k_BKTD.shape, k_BKTD.dtype),
                   jax.ShapeDtypeStruct(v_BKTD.shape, v_BKTD.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)],
        compiler_params=_mosaic_params(3, 2),
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(*args)
    return dq_BHTD, dk_BKTD, dv_BKTD
