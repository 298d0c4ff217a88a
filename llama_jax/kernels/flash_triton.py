"""Flash attention for GPUs (Pallas Triton lowering): forward, dQ and dK/dV kernels.

One program per (query block, batch, head) walks the key blocks in a `fori_loop`, so the running
max / sum / accumulator stay in registers. Operands keep the model's [B, Tp|Sp, H|K, D] layout;
grouped-query attention is an index map (kv head = h // G), so K/V are never repeated. The dK/dV
program of a kv head loops over its G query heads. lse and delta are [B, H, Tp].

With token positions (cfg.has_positions) the blocks a query block sees are no longer a prefix:
the loops visit every block and skip, under a `lax.cond`, those whose first key comes after the
query block's last query (read from the block's own positions), masking every other.
Shapes as in flash_attention.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llama_jax.kernels.common import (MASK_VALUE, NN, NT, dot, finish_softmax, key_blocks, mask, online_softmax_step,
                                      query_blocks, split_refs, visible, with_rows)


def _block(n, size):
    return pl.ds(pl.multiple_of(n * size, size), size)


def _ids(n, size, pos_ref, seg_ref, at):
    """(positions, segment ids or None) of the `size` tokens of block n, as [size] vectors; `at`
    indexes the refs (a whole block, or one block of a whole row). Positions are the tokens'
    indices unless the call has its own (pos_ref)."""
    pos = n * size + jnp.arange(size, dtype=jnp.int32) if pos_ref is None else pos_ref[at]
    return pos, (None if seg_ref is None else seg_ref[at])


def _mask(s, q_ids, k_ids, cfg, **kw):
    """s [bq, bk] with -inf where the queries q_ids do not see the keys k_ids."""
    (q_pos, q_seg), (k_pos, k_seg) = q_ids, k_ids
    col = lambda x: None if x is None else x[:, None]  # noqa: E731
    row = lambda x: None if x is None else x[None, :]  # noqa: E731
    return mask(s, visible(col(q_pos), row(k_pos), col(q_seg), row(k_seg), cfg, **kw))


def _over_key_blocks(body, carry, i, bq, bk, num_k_blocks, rows, cfg):
    """carry through body(j, carry, masked) over the key blocks query block i sees."""
    if cfg.has_positions:
        q_last = jnp.max(rows.q_pos[...])

        def visit(j, carry):
            seen = jnp.min(rows.k_pos[_block(j, bk)]) <= q_last
            return lax.cond(seen, functools.partial(body, j, masked=True), lambda c: c, carry)

        return lax.fori_loop(0, num_k_blocks, visit, carry)
    full, hi = key_blocks(i, bq, bk, num_k_blocks, cfg)
    carry = lax.fori_loop(0, full, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full, hi, functools.partial(body, masked=True), carry)


def _over_query_blocks(body, carry, j, bq, bk, num_q_blocks, rows, cfg):
    """carry through body(i, carry, masked) over the query blocks that see key block j."""
    if cfg.has_positions:
        k_first = jnp.min(rows.k_pos[...])

        def visit(i, carry):
            seen = k_first <= jnp.max(rows.q_pos[_block(i, bq)])
            return lax.cond(seen, functools.partial(body, i, masked=True), lambda c: c, carry)

        return lax.fori_loop(0, num_q_blocks, visit, carry)
    lo, full = query_blocks(j, bq, bk, num_q_blocks, cfg)
    carry = lax.fori_loop(lo, full, functools.partial(body, masked=True), carry)
    return lax.fori_loop(full, num_q_blocks, functools.partial(body, masked=False), carry)


def _fwd_kernel(*refs, cfg):
    # q_ref, o_ref [bq, D]; k_ref, v_ref [Sp, D]; rows.q_*, lse_ref [bq]; rows.k_* [Sp]
    (q_ref, k_ref, v_ref), rows, (o_ref, lse_ref) = split_refs(refs, 3, cfg)
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(0)
    q = q_ref[...]
    q_ids = _ids(i, bq, rows.q_pos, rows.q_seg, ...)

    def body(j, carry, masked):
        keys = _block(j, bk)
        s = dot(q, k_ref[keys, :], NT) * cfg.scale
        if masked:
            s = _mask(s, q_ids, _ids(j, bk, rows.k_pos, rows.k_seg, keys), cfg)
        return online_softmax_step(*carry, s, v_ref[keys, :])

    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    o, lse = finish_softmax(*_over_key_blocks(body, carry, i, bq, bk, k_ref.shape[0] // bk, rows, cfg))
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(*refs, cfg):
    # q_ref, do_ref, dq_ref [bq, D]; k_ref, v_ref [Sp, D]; lse_ref, delta_ref, rows.q_* [bq];
    # rows.k_* [Sp]
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), rows, (dq_ref,) = split_refs(refs, 6, cfg)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_ids = _ids(i, bq, rows.q_pos, rows.q_seg, ...)

    def body(j, dq, masked):
        keys = _block(j, bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = dot(q, k, NT) * cfg.scale
        if masked:
            s = _mask(s, q_ids, _ids(j, bk, rows.k_pos, rows.k_seg, keys), cfg)
        p = jnp.exp(s - lse)
        ds = p * (dot(do, v, NT) - delta)
        return dq + dot(ds.astype(k.dtype), k, NN)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = _over_key_blocks(body, dq, i, bq, bk, k_ref.shape[0] // bk, rows, cfg)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg):
    # q_ref, do_ref [Tp, G, D]; k_ref, v_ref, dk_ref, dv_ref [bk, D]; lse_ref, delta_ref [G, Tp];
    # rows.q_* [Tp]; rows.k_* [bk]
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), rows, (dk_ref, dv_ref) = split_refs(refs, 6, cfg)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    k_ids = _ids(j, bk, rows.k_pos, rows.k_seg, ...)

    def body(i, carry, g, masked):
        dk, dv = carry
        queries = _block(i, bq)
        q, do = q_ref[queries, g, :], do_ref[queries, g, :]
        lse, delta = lse_ref[g, queries][:, None], delta_ref[g, queries][:, None]
        s = dot(q, k, NT) * cfg.scale
        if masked:
            s = _mask(s, _ids(i, bq, rows.q_pos, rows.q_seg, queries), k_ids, cfg, key_padding=False)
        p = jnp.exp(s - lse)
        dv = dv + dot(p.astype(do.dtype).T, do, NN)
        ds = p * (dot(do, v, NT) - delta)
        dk = dk + dot(ds.astype(q.dtype).T, q, NN)
        return dk, dv

    def head(g, carry):
        return _over_query_blocks(functools.partial(body, g=g), carry, j, bq, bk, q_ref.shape[0] // bq, rows, cfg)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, q_ref.shape[1], head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _call(kernel, cfg, name, **kw):
    return pl.pallas_call(functools.partial(kernel, cfg=cfg), interpret=cfg.interpret, name=name,
                          compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                                               num_stages=cfg.num_stages), **kw)


def forward(q_BTHD, k_BSKD, v_BSKD, rows, cfg):
    """(o [B, Tp, H, D], residuals for `backward`); rows: Rows of [B, Tp] / [B, Sp] int32 ids."""
    B, Tp, H, D = q_BTHD.shape
    Sp, K = k_BSKD.shape[1:3]
    G = H // K
    bq = cfg.block_q
    q_block = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
    kv_full = pl.BlockSpec((None, Sp, None, D), lambda i, b, h: (b, 0, lax.div(h, G), 0))
    in_specs, args = with_rows([q_block, kv_full, kv_full], [q_BTHD, k_BSKD, v_BSKD], rows,
                               pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                               pl.BlockSpec((None, Sp), lambda i, b, h: (b, 0)))
    o_BTHD, lse_BHT = _call(
        _fwd_kernel, cfg, "flash_attention_fwd",
        grid=(Tp // bq, B, H),
        in_specs=in_specs,
        out_specs=[q_block, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype),
                   jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
    )(*args)
    return o_BTHD, (q_BTHD, k_BSKD, v_BSKD, rows, o_BTHD, lse_BHT)


def backward(residuals, do_BTHD, cfg):
    """(dq, dk, dv) of `forward`'s inputs under the output cotangent do [B, Tp, H, D]."""
    q_BTHD, k_BSKD, v_BSKD, rows, o_BTHD, lse_BHT = residuals
    B, Tp, H, D = q_BTHD.shape
    Sp, K = k_BSKD.shape[1:3]
    G = H // K
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    delta_BHT = jnp.einsum("bthd,bthd->bht", o_BTHD.astype(jnp.float32),
                           do_BTHD.astype(jnp.float32))
    inputs = [q_BTHD, k_BSKD, v_BSKD, do_BTHD, lse_BHT, delta_BHT]

    kv_full = pl.BlockSpec((None, Sp, None, D), lambda i, b, h: (b, 0, lax.div(h, G), 0))
    q_block = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
    stat_block = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    in_specs, args = with_rows([q_block, kv_full, kv_full, q_block, stat_block, stat_block], inputs, rows,
                               pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                               pl.BlockSpec((None, Sp), lambda i, b, h: (b, 0)))
    dq_BTHD = _call(
        _dq_kernel, cfg, "flash_attention_dq",
        grid=(Tp // bq, B, H),
        in_specs=in_specs,
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype),
    )(*args)

    # One program per (key block, batch, kv head) loops over the G query heads sharing it.
    q_group = pl.BlockSpec((None, Tp, G, D), lambda j, b, k: (b, 0, k, 0))
    kv_block = pl.BlockSpec((None, bk, None, D), lambda j, b, k: (b, j, k, 0))
    stat_group = pl.BlockSpec((None, G, Tp), lambda j, b, k: (b, k, 0))
    in_specs, args = with_rows([q_group, kv_block, kv_block, q_group, stat_group, stat_group], inputs, rows,
                               pl.BlockSpec((None, Tp), lambda j, b, k: (b, 0)),
                               pl.BlockSpec((None, bk), lambda j, b, k: (b, j)))
    dk_BSKD, dv_BSKD = _call(
        _dkv_kernel, cfg, "flash_attention_dkv",
        grid=(Sp // bk, B, K),
        in_specs=in_specs,
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k_BSKD.shape, k_BSKD.dtype),
                   jax.ShapeDtypeStruct(v_BSKD.shape, v_BSKD.dtype)],
    )(*args)
    return dq_BTHD, dk_BSKD, dv_BSKD
