"""Decode attention in Pallas: a few query positions against a long KV cache, flash-decoding style.

Shapes: B batch, T query positions per sequence (1 for plain decode, a few for speculative
decoding, up to a whole prompt for prefill), S cache slots, H query heads, K kv heads,
G = H // K, D head_dim, R = T * G query rows per kv head, br rows per block, bk cache slots per
block, P splits of the cache.

Decode is memory bound: every step reads the whole valid cache once. So the kernel
- groups, per kv head, all G query heads and T positions into one [R, D] row block, so each K/V
  tile is read once for the whole group (GQA-aware; K/V are never repeated),
- splits the cache into P chunks processed by separate programs (flash decoding), each writing a
  partial (accumulator, running max, sum); a small XLA combine merges them, so a batch of a few
  sequences still fills the machine,
- reads only the valid prefix of each sequence: the cache slot s holds position s and a query at
  position p sees slots 0..p, so a sequence's last position bounds its blocks (ragged batches).

Two kernels, one API, as in flash_attention.py: `triton` (GPU) loops over the blocks of its split
with a data-dependent bound; `mosaic` (TPU) walks them on an "arbitrary" grid axis, with the
per-sequence lengths scalar-prefetched into SMEM so that index maps clamp past-the-end blocks and
no DMA is issued for them (scalar prefetch is TPU-only, hence the second kernel).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from llama_jax.kernels.flash_attention import (LANES, M_FLOOR, _NN, _NT, _dot, fit_lanes, online_softmax_step,
                                               resolve_lowering)


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    block_k: int  # cache slots per tile
    block_rows: int  # query rows (T * G) per program
    num_splits: int | None = None  # None: enough to give every core a few programs
    num_warps: int = 4  # triton only
    num_stages: int = 2  # triton only


# Starting points, not tuned on hardware yet.
DEFAULT_DECODE_BLOCK_SIZES = {
    "triton": DecodeBlockSizes(block_k=64, block_rows=64, num_stages=3),
    "mosaic": DecodeBlockSizes(block_k=512, block_rows=128),
}
_TARGET_PROGRAMS = {"triton": 264, "mosaic": 4}  # ~2 waves of an H100's 132 SMs; 2 TensorCores


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    block_k: int
    block_rows: int
    blocks_per_split: int
    num_blocks: int
    num_warps: int
    num_stages: int
    interpret: bool


# ---------------------------------------------------------------------------------------------
# Triton (GPU): grid (split, row block, batch, kv head); cache in its own [B, S, K, D] layout.


def _decode_kernel_triton(q_ref, k_ref, v_ref, pos_ref, acc_ref, m_ref, l_ref, *, cfg: _Config):
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
        s = _dot(q, k, _NT) * cfg.scale
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


def _partials_triton(q_BKRD, k_BSKD, v_BSKD, pos_BR, num_splits, cfg):
    B, K, Rp, D = q_BKRD.shape
    S = k_BSKD.shape[1]
    br = cfg.block_rows
    kv = pl.BlockSpec((None, S, None, D), lambda s, r, b, k: (b, 0, k, 0))
    acc, m, l = pl.pallas_call(
        functools.partial(_decode_kernel_triton, cfg=cfg),
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


# ---------------------------------------------------------------------------------------------
# Mosaic (TPU): grid (batch, kv-head group, row block, split, block in split), the last axis
# accumulating. The cache is viewed as [B, S, K * D] so a tile is (bk, W) with W = hp * D a whole
# number of 128-lane vregs: hp = 128 // D heads share a tile when D < 128 (all K heads when K
# does not split that way: a full-width tile needs no alignment). Each of those heads'
# queries is zero outside its own D lanes, so q . k_tile^T is exactly its scores, and its output
# is read from its own lanes of p . v_tile: no unaligned lane slicing.


def _decode_kernel_mosaic(last_block_BN, q_ref, k_ref, v_ref, pos_ref, acc_ref, m_ref, l_ref,
                          m_scr, l_scr, acc_scr, *, cfg: _Config):
    # last_block_BN: SMEM [B, n_row_blocks]; q_ref, acc_ref, acc_scr [hp, br, W];
    # k_ref, v_ref [bk, W]; pos_ref [br, 128]; m_ref, l_ref, m_scr, l_scr [hp, br, 128]
    bk = cfg.block_k
    b, r, split, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    j = split * cfg.blocks_per_split + t
    hp, br, W = q_ref.shape

    @pl.when(t == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, M_FLOOR, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when((j <= last_block_BN[b, r]) & (j < cfg.num_blocks))
    def _step():
        k, v = k_ref[...], v_ref[...]
        k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (br, bk), 1)
        visible = k_pos <= jnp.tile(pos_ref[...], (1, bk // LANES))
        for h in range(hp):
            s = jnp.where(visible, _dot(q_ref[h], k, _NT) * cfg.scale, -jnp.inf)
            m_prev = m_scr[h]
            m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_next)
            p = jnp.exp(s - jnp.tile(m_next, (1, bk // LANES)))
            l_scr[h] = alpha * l_scr[h] + p.sum(axis=1, keepdims=True)
            m_scr[h] = m_next
            acc_scr[h] = acc_scr[h] * fit_lanes(alpha, W) + _dot(p.astype(v.dtype), v, _NN)

    @pl.when(t == pl.num_programs(4) - 1)
    def _finish():
        acc_ref[...] = acc_scr[...]
        m_ref[...] = m_scr[...]
        l_ref[...] = l_scr[...]


def _partials_mosaic(q_BKRD, k_BSKD, v_BSKD, pos_BR, num_splits, cfg):
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
        functools.partial(_decode_kernel_mosaic, cfg=cfg),
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


_PARTIALS = {"triton": _partials_triton, "mosaic": _partials_mosaic}


# ---------------------------------------------------------------------------------------------
# Public API.


def combine_splits(acc_PBKRD, m_PBKR, l_PBKR):
    """Merge per-split partial softmaxes: rescale each split to the global running max."""
    m_BKR = m_PBKR.max(axis=0)
    w_PBKR = jnp.exp(m_PBKR - m_BKR)
    l_BKR = (w_PBKR * l_PBKR).sum(axis=0)
    acc_BKRD = (w_PBKR[..., None] * acc_PBKRD).sum(axis=0)
    return acc_BKRD / jnp.where(l_BKR > 0.0, l_BKR, 1.0)[..., None]


def _round_up(x, m):
    return -(-x // m) * m


def decode_attention(q_BTHD, k_BSKD, v_BSKD, q_positions_BT, *, scale: float | None = None,
                     block_sizes: DecodeBlockSizes | None = None, lowering: str | None = None,
                     interpret: bool = False):
    """Queries [B, T, H, D] at absolute positions [B, T] against a cache [B, S, K, D].

    Same contract as `cached_attention_reference`: slot s holds position s, a query at position
    p sees slots 0..p. A query with no visible slot (position < 0) gets output 0.
    """
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    if k_BSKD.shape != (B, S, K, D) or v_BSKD.shape != k_BSKD.shape:
        raise ValueError(f"caches k {k_BSKD.shape}, v {v_BSKD.shape} must be [B, S, K, D] "
                         f"matching q {q_BTHD.shape}")
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
    if q_positions_BT.shape != (B, T):
        raise ValueError(f"q_positions {q_positions_BT.shape} must be [B, T] = {(B, T)}")
    lowering = resolve_lowering(lowering, interpret)
    bs = block_sizes or DEFAULT_DECODE_BLOCK_SIZES[lowering]
    G = H // K
    R = T * G

    # Tiles must divide the cache: padding it would copy the whole cache every step.
    unit = LANES if lowering == "mosaic" else 16
    bk = min(bs.block_k, S)
    while S % bk and bk > unit:
        bk //= 2
    if S % bk or bk % unit:
        raise ValueError(f"cache length {S} needs a block_k dividing it that is a multiple of "
                         f"{unit}; got block_k={bs.block_k}")
    row_unit = 16 if lowering == "triton" else 8
    br = min(bs.block_rows, _round_up(R, row_unit))
    if lowering == "triton":
        br = max(16, pl.next_power_of_2(br))
    Rp = _round_up(R, br)
    num_blocks = S // bk
    num_programs = B * K * (Rp // br)
    num_splits = bs.num_splits or -(-_TARGET_PROGRAMS[lowering] // num_programs)
    num_splits = max(1, min(num_splits, num_blocks))
    blocks_per_split = -(-num_blocks // num_splits)
    num_splits = -(-num_blocks // blocks_per_split)
    cfg = _Config(scale=float(D ** -0.5 if scale is None else scale), block_k=bk, block_rows=br,
                  blocks_per_split=blocks_per_split, num_blocks=num_blocks,
                  num_warps=bs.num_warps, num_stages=bs.num_stages, interpret=interpret)

    # Rows of a kv head: r = t * G + g, i.e. the G query heads of each position together.
    q_BKRD = q_BTHD.reshape(B, T, K, G, D).transpose(0, 2, 1, 3, 4).reshape(B, K, R, D)
    q_BKRD = jnp.pad(q_BKRD, [(0, 0), (0, 0), (0, Rp - R), (0, 0)])
    pos_BR = jnp.repeat(q_positions_BT.astype(jnp.int32), G, axis=1)
    pos_BR = jnp.pad(pos_BR, [(0, 0), (0, Rp - R)], constant_values=-1)

    acc, m, l = _PARTIALS[lowering](q_BKRD, k_BSKD, v_BSKD, pos_BR, num_splits, cfg)
    o_BKRD = combine_splits(acc, m, l)[:, :, :R]
    o_BTHD = o_BKRD.reshape(B, K, T, G, D).transpose(0, 2, 1, 3, 4).reshape(B, T, H, D)
    return o_BTHD.astype(q_BTHD.dtype)
