"""Flash attention for GPUs (Pallas Triton lowering): forward, dQ and dK/dV kernels.

One program per (query block, batch, head) walks the key blocks in a `fori_loop`, so the running
max / sum / accumulator stay in registers. Operands keep the model's [B, Tp, H|K, D] layout;
grouped-query attention is an index map (kv head = h // G), so K/V are never repeated. The dK/dV
program of a kv head loops over its G query heads. lse and delta are [B, H, Tp].
Shapes as in flash_attention.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llama_jax.kernels.common import (M_FLOOR, NN, NT, dot, key_blocks, mask, online_softmax_step, query_blocks,
                                      split_refs, visible)

def _fwd_kernel_triton(*refs, cfg):
    # q_ref [bq, D]; k_ref, v_ref [Tp, D]; qs_ref [bq]; ks_ref [Tp]; o_ref [bq, D]; lse_ref [bq]
    (q_ref, k_ref, v_ref), qs_ref, ks_ref, (o_ref, lse_ref) = split_refs(refs, 3, cfg)
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(0)
    q = q_ref[...]
    q_pos = (i * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
    q_seg = None if qs_ref is None else qs_ref[...][:, None]

    def body(j, carry, masked):
        acc, m, l = carry
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = dot(q, k, NT) * cfg.scale
        if masked:
            k_pos = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
            k_seg = None if ks_ref is None else ks_ref[keys][None, :]
            s = mask(s, visible(q_pos, k_pos, q_seg, k_seg, cfg))
        return online_softmax_step(acc, m, l, s, v)

    full, hi = key_blocks(i, bq, bk, k_ref.shape[0] // bk, cfg)
    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), M_FLOOR, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    carry = lax.fori_loop(0, full, functools.partial(body, masked=False), carry)
    acc, m, l = lax.fori_loop(full, hi, functools.partial(body, masked=True), carry)
    seen = l > 0.0
    l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l), 0.0)


def _dq_kernel_triton(*refs, cfg):
    # q_ref, do_ref, dq_ref [bq, D]; k_ref, v_ref [Tp, D]; lse_ref, delta_ref, qs_ref [bq];
    # ks_ref [Tp]
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, (dq_ref,) = split_refs(refs, 6, cfg)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_pos = (i * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
    q_seg = None if qs_ref is None else qs_ref[...][:, None]

    def body(j, dq, masked):
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = dot(q, k, NT) * cfg.scale
        if masked:
            k_pos = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
            k_seg = None if ks_ref is None else ks_ref[keys][None, :]
            s = mask(s, visible(q_pos, k_pos, q_seg, k_seg, cfg))
        p = jnp.exp(s - lse)
        ds = p * (dot(do, v, NT) - delta)
        return dq + dot(ds.astype(k.dtype), k, NN)

    full, hi = key_blocks(i, bq, bk, k_ref.shape[0] // bk, cfg)
    dq = jnp.zeros(q.shape, jnp.float32)
    dq = lax.fori_loop(0, full, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(full, hi, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel_triton(*refs, cfg):
    # q_ref, do_ref [Tp, G, D]; k_ref, v_ref, dk_ref, dv_ref [bk, D]; lse_ref, delta_ref [G, Tp];
    # qs_ref [Tp]; ks_ref [bk]
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, (dk_ref, dv_ref) = split_refs(refs, 6, cfg)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    k_pos = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
    k_seg = None if ks_ref is None else ks_ref[...][None, :]

    def body(i, carry, g, masked):
        dk, dv = carry
        rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        lse, delta = lse_ref[g, rows][:, None], delta_ref[g, rows][:, None]
        s = dot(q, k, NT) * cfg.scale
        if masked:
            q_pos = (i * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
            q_seg = None if qs_ref is None else qs_ref[rows][:, None]
            s = mask(s, visible(q_pos, k_pos, q_seg, k_seg, cfg, key_padding=False))
        p = jnp.exp(s - lse)
        dv = dv + dot(p.astype(do.dtype).T, do, NN)
        ds = p * (dot(do, v, NT) - delta)
        dk = dk + dot(ds.astype(q.dtype).T, q, NN)
        return dk, dv

    lo, full = query_blocks(j, bq, bk, q_ref.shape[0] // bq, cfg)
    num_q_blocks = q_ref.shape[0] // bq

    def head(g, carry):
        carry = lax.fori_loop(lo, full, functools.partial(body, g=g, masked=True), carry)
        return lax.fori_loop(full, num_q_blocks, functools.partial(body, g=g, masked=False), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, q_ref.shape[1], head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _triton_params(cfg, head_dim):
    num_warps = cfg.num_warps or (4 if head_dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages)


def forward(q_BTHD, k_BTKD, v_BTKD, qs_BT, ks_BT, cfg):
    B, Tp, H, D = q_BTHD.shape
    G = H // k_BTKD.shape[2]
    bq = cfg.block_q
    in_specs = [
        pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, Tp, None, D), lambda i, b, h: (b, 0, lax.div(h, G), 0)),
        pl.BlockSpec((None, Tp, None, D), lambda i, b, h: (b, 0, lax.div(h, G), 0)),
    ]
    args = [q_BTHD, k_BTKD, v_BTKD]
    if cfg.has_segments:
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                     pl.BlockSpec((None, Tp), lambda i, b, h: (b, 0))]
        args += [qs_BT, ks_BT]
    o_BTHD, lse_BHT = pl.pallas_call(
        functools.partial(_fwd_kernel_triton, cfg=cfg),
        grid=(Tp // bq, B, H),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype),
                   jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
        compiler_params=_triton_params(cfg, D),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(*args)
    return o_BTHD, lse_BHT


def backward(q_BTHD, k_BTKD, v_BTKD, qs_BT, ks_BT, o_BTHD, lse_BHT, do_BTHD, cfg):
    B, Tp, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    G = H // K
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    delta_BHT = jnp.einsum("bthd,bthd->bht", o_BTHD.astype(jnp.float32),
                           do_BTHD.astype(jnp.float32))
    params = _triton_params(cfg, D)

    kv_full = pl.BlockSpec((None, Tp, None, D), lambda i, b, h: (b, 0, lax.div(h, G), 0))
    q_block = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
    row_block = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    in_specs = [q_block, kv_full, kv_full, q_block, row_block, row_block]
    args = [q_BTHD, k_BTKD, v_BTKD, do_BTHD, lse_BHT, delta_BHT]
    if cfg.has_segments:
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                     pl.BlockSpec((None, Tp), lambda i, b, h: (b, 0))]
        args += [qs_BT, ks_BT]
    dq_BTHD = pl.pallas_call(
        functools.partial(_dq_kernel_triton, cfg=cfg),
        grid=(Tp // bq, B, H),
        in_specs=in_specs,
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(*args)

    # One program per (key block, batch, kv head) loops over the G query heads sharing it.
    q_group = pl.BlockSpec((None, Tp, G, D), lambda j, b, k: (b, 0, k, 0))
    kv_block = pl.BlockSpec((None, bk, None, D), lambda j, b, k: (b, j, k, 0))
    rows_group = pl.BlockSpec((None, G, Tp), lambda j, b, k: (b, k, 0))
    in_specs = [q_group, kv_block, kv_block, q_group, rows_group, rows_group]
    args = [q_BTHD, k_BTKD, v_BTKD, do_BTHD, lse_BHT, delta_BHT]
    if cfg.has_segments:
        in_specs += [pl.BlockSpec((None, Tp), lambda j, b, k: (b, 0)),
                     pl.BlockSpec((None, bk), lambda j, b, k: (b, j))]
        args += [qs_BT, ks_BT]
    dk_BTKD, dv_BTKD = pl.pallas_call(
        functools.partial(_dkv_kernel_triton, cfg=cfg),
        grid=(Tp // bk, B, K),
        in_specs=in_specs,
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k_BTKD.shape, k_BTKD.dtype),
                   jax.ShapeDtypeStruct(v_BTKD.shape, v_BTKD.dtype)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(*args)
    return dq_BTHD, dk_BTKD, dv_BTKD
