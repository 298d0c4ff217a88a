"""Flash attention for TPUs (Pallas Mosaic lowering): forward, dQ and dK/dV kernels.

The key walk is the last grid axis ("arbitrary"), so the pipeline emitter double-buffers K/V tiles
into VMEM and the statistics live in VMEM scratch, broadcast over the 128 lanes; blocks a causal
query block never sees are skipped and their index map clamped, so they cost no DMA. Operands are
head-major [B, H|K, Tp|Sp, D]; row statistics [B, H, Tp, 128] (lane broadcast); query ids
(segments, positions) [B, Tp, 128], key ids [B, 8, Sp]. No scalar prefetch: the same kernel math
as the GPU one.

With token positions (cfg.has_positions) visibility is no longer a function of the block indices:
each query block's last position and each key block's first are tabulated in SMEM, a block is
computed (always masked) only if its first key comes before the query block's last query, and
the index maps cannot clamp, so every key block is still DMA'd. Shapes as in flash_attention.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llama_jax.kernels.common import (LANES, MASK_VALUE, NN, NT, SUBLANES, Rows, dot, finish_softmax, fit_lanes,
                                      key_blocks, mask, online_softmax_step, query_blocks, split_refs, visible,
                                      with_rows)


def _lane_layout(rows: Rows) -> Rows:
    """Query ids [B, Tp] broadcast over the lanes [B, Tp, 128], key ids over the sublanes [B, 8, Sp]."""
    def q(x):
        return None if x is None else jnp.broadcast_to(x[:, :, None], (*x.shape, LANES))

    def k(x):
        return None if x is None else jnp.broadcast_to(x[:, None, :], (x.shape[0], SUBLANES, x.shape[1]))

    return Rows(q(rows.q_seg), k(rows.k_seg), q(rows.q_pos), k(rows.k_pos))


def _with_bounds(in_specs, args, rows: Rows, bq, bk):
    """in_specs and args followed, when the call has positions, by the SMEM tables [B, blocks] of
    each query block's last position and each key block's first."""
    if rows.q_pos is None:
        return in_specs, args
    (B, Tp), Sp = rows.q_pos.shape, rows.k_pos.shape[1]
    q_last = rows.q_pos.reshape(B, Tp // bq, bq).max(axis=2)
    k_first = rows.k_pos.reshape(B, Sp // bk, bk).min(axis=2)
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    return in_specs + [smem, smem], args + [q_last, k_first]


def _mask(s, i, j, rows, cfg, **kw):
    """s [bq, bk] with -inf where query block i does not see key block j."""
    bq, bk = s.shape

    def lanes(q_ref, k_ref):  # [bq, bk] query ids, [1, bk] key ids
        return fit_lanes(q_ref[...], bk), k_ref[pl.ds(0, 1), :]

    if rows.q_pos is None:
        q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    else:
        q_pos, k_pos = lanes(rows.q_pos, rows.k_pos)
    q_seg, k_seg = (None, None) if rows.q_seg is None else lanes(rows.q_seg, rows.k_seg)
    return mask(s, visible(q_pos, k_pos, q_seg, k_seg, cfg, **kw))


def _when_seen(step, b, i, j, bounds, index_flags):
    """step(masked) if query block i sees key block j: by the positions' bounds when the call has
    them (then always masked), else by index_flags() -> (visible, needs_mask)."""
    if bounds is not None:
        q_last, k_first = bounds
        pl.when(k_first[b, j] <= q_last[b, i])(lambda: step(True))
        return
    visible_block, needs_mask = index_flags()
    pl.when(visible_block & ~needs_mask)(lambda: step(False))
    pl.when(visible_block & needs_mask)(lambda: step(True))


def _key_block_flags(i, j, bq, bk, num_k_blocks, cfg):
    full, hi = key_blocks(i, bq, bk, num_k_blocks, cfg)
    return j < hi, j >= full


def _query_block_flags(i, j, bq, bk, num_q_blocks, cfg):
    lo, full = query_blocks(j, bq, bk, num_q_blocks, cfg)
    return i >= lo, i < full


def _split_bounds(refs, cfg):
    """(the two bounds tables or None, the refs after them)."""
    return (refs[:2], refs[2:]) if cfg.has_positions else (None, refs)


def _fwd_kernel(*refs, cfg):
    # q_ref, o_ref, acc [bq, D]; k_ref, v_ref [bk, D]; rows.q_* [bq, 128]; rows.k_* [8, bk];
    # lse_ref, m_scr, l_scr [bq, 128]; bounds: SMEM [B, Tp // bq], [B, Sp // bk]
    (q_ref, k_ref, v_ref), rows, rest = split_refs(refs, 3, cfg)
    bounds, (o_ref, lse_ref, m_scr, l_scr, acc) = _split_bounds(rest, cfg)
    bq, bk = cfg.block_q, cfg.block_k
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    def step(masked):
        s = dot(q_ref[...], k_ref[...], NT) * cfg.scale
        if masked:
            s = _mask(s, i, j, rows, cfg)
        acc[...], m_scr[...], l_scr[...] = online_softmax_step(acc[...], m_scr[...], l_scr[...], s, v_ref[...],
                                                               lanes=True)

    _when_seen(step, b, i, j, bounds, lambda: _key_block_flags(i, j, bq, bk, pl.num_programs(3), cfg))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o, lse_ref[...] = finish_softmax(acc[...], m_scr[...], l_scr[...], lanes=True)
        o_ref[...] = o.astype(o_ref.dtype)


def _dq_kernel(*refs, cfg):
    # q_ref, do_ref, dq_ref, acc [bq, D]; k_ref, v_ref [bk, D]; lse_ref, delta_ref, rows.q_*
    # [bq, 128]; rows.k_* [8, bk]; bounds as in _fwd_kernel
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), rows, rest = split_refs(refs, 6, cfg)
    bounds, (dq_ref, acc) = _split_bounds(rest, cfg)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

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

    _when_seen(step, b, i, j, bounds, lambda: _key_block_flags(i, j, bq, bk, pl.num_programs(3), cfg))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg):
    # q_ref, do_ref [bq, D]; k_ref, v_ref, dk_ref, dv_ref, dk_acc, dv_acc [bk, D];
    # lse_ref, delta_ref, rows.q_* [bq, 128]; rows.k_* [8, bk]; bounds as in _fwd_kernel
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), rows, rest = split_refs(refs, 6, cfg)
    bounds, (dk_ref, dv_ref, dk_acc, dv_acc) = _split_bounds(rest, cfg)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

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

    _when_seen(step, b, i, j, bounds, lambda: _query_block_flags(i, j, bq, bk, pl.num_programs(4), cfg))

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
    key ids)."""
    def kv_map(b, h, i, j):
        if not cfg.has_positions:  # past the diagonal: revisit the last visible block, no new DMA
            j = jnp.minimum(j, key_blocks(i, bq, bk, num_k_blocks, cfg)[1] - 1)
        return b, lax.div(h, G), j, 0

    return (pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0)),
            pl.BlockSpec((None, None, bk, D), kv_map),
            pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j: (b, 0, kv_map(b, h, i, j)[2])))


def forward(q_BTHD, k_BSKD, v_BSKD, rows, cfg):
    """(o [B, Tp, H, D], residuals for `backward`); rows: Rows of [B, Tp] / [B, Sp] int32 ids. The
    kernels run head-major: [B, H|K, Tp|Sp, D]."""
    q_BHTD, k_BKSD, v_BKSD = (x.transpose(0, 2, 1, 3) for x in (q_BTHD, k_BSKD, v_BSKD))
    B, H, Tp, D = q_BHTD.shape
    Sp = k_BKSD.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    q_block, kv_block, q_ids, k_ids = _key_walk_specs(H // k_BKSD.shape[1], bq, bk, D, Sp // bk, cfg)
    in_specs, args = with_rows([q_block, kv_block, kv_block], [q_BHTD, k_BKSD, v_BKSD], _lane_layout(rows),
                               q_ids, k_ids)
    in_specs, args = _with_bounds(in_specs, args, rows, bq, bk)
    o_BHTD, lse_BHT128 = _call(
        _fwd_kernel, cfg, "flash_attention_fwd", 1,
        grid=(B, H, Tp // bq, Sp // bk),
        in_specs=in_specs,
        out_specs=[q_block, pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))],
        out_shape=[jax.ShapeDtypeStruct(q_BHTD.shape, q_BHTD.dtype),
                   jax.ShapeDtypeStruct((B, H, Tp, LANES), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, D), jnp.float32)],
    )(*args)
    residuals = (q_BHTD, k_BKSD, v_BKSD, rows, o_BHTD, lse_BHT128[..., 0])
    return o_BHTD.transpose(0, 2, 1, 3), residuals


def backward(residuals, do_BTHD, cfg):
    """(dq, dk, dv) [B, Tp|Sp, H|K, D] of `forward`'s inputs under the output cotangent do."""
    q_BHTD, k_BKSD, v_BKSD, rows, o_BHTD, lse_BHT = residuals
    do_BHTD = do_BTHD.transpose(0, 2, 1, 3)
    B, H, Tp, D = q_BHTD.shape
    K, Sp = k_BKSD.shape[1:3]
    G = H // K
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    lane_rows = _lane_layout(rows)
    lse_BHT128 = jnp.broadcast_to(lse_BHT[..., None], (B, H, Tp, LANES))
    delta_BHT = jnp.einsum("bhtd,bhtd->bht", o_BHTD.astype(jnp.float32),
                           do_BHTD.astype(jnp.float32))
    delta_BHT128 = jnp.broadcast_to(delta_BHT[..., None], (B, H, Tp, LANES))
    inputs = [q_BHTD, k_BKSD, v_BKSD, do_BHTD, lse_BHT128, delta_BHT128]

    q_block, kv_block, q_ids, k_ids = _key_walk_specs(G, bq, bk, D, Sp // bk, cfg)
    stat_block = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))
    in_specs, args = with_rows([q_block, kv_block, kv_block, q_block, stat_block, stat_block], inputs,
                               lane_rows, q_ids, k_ids)
    in_specs, args = _with_bounds(in_specs, args, rows, bq, bk)
    dq_BHTD = _call(
        _dq_kernel, cfg, "flash_attention_dq", 1,
        grid=(B, H, Tp // bq, Sp // bk),
        in_specs=in_specs,
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q_BHTD.shape, q_BHTD.dtype),
        scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)],
    )(*args)

    # Grid (B, K, key block j, group head g, query block i): the last two accumulate into dK/dV.
    def q_map(b, k, j, g, i):
        if not cfg.has_positions:  # above the diagonal: revisit the first block that sees j, no new DMA
            i = jnp.maximum(i, query_blocks(j, bq, bk, Tp // bq, cfg)[0])
        return b, k * G + g, i, 0

    q_block = pl.BlockSpec((None, None, bq, D), q_map)
    stat_block = pl.BlockSpec((None, None, bq, LANES), q_map)
    kv_block = pl.BlockSpec((None, None, bk, D), lambda b, k, j, g, i: (b, k, j, 0))
    in_specs, args = with_rows([q_block, kv_block, kv_block, q_block, stat_block, stat_block], inputs,
                               lane_rows,
                               pl.BlockSpec((None, bq, LANES), lambda b, k, j, g, i: (b, q_map(b, k, j, g, i)[2], 0)),
                               pl.BlockSpec((None, SUBLANES, bk), lambda b, k, j, g, i: (b, 0, j)))
    in_specs, args = _with_bounds(in_specs, args, rows, bq, bk)
    dk_BKSD, dv_BKSD = _call(
        _dkv_kernel, cfg, "flash_attention_dkv", 2,
        grid=(B, K, Sp // bk, G, Tp // bq),
        in_specs=in_specs,
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k_BKSD.shape, k_BKSD.dtype),
                   jax.ShapeDtypeStruct(v_BKSD.shape, v_BKSD.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)],
    )(*args)
    return tuple(x.transpose(0, 2, 1, 3) for x in (dq_BHTD, dk_BKSD, dv_BKSD))
