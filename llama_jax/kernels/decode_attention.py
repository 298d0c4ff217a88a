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

One kernel per lowering, one file each: `decode_triton.py` (GPU) loops over the blocks of its split
with a data-dependent bound; `decode_mosaic.py` (TPU) walks them on an "arbitrary" grid axis, with
the per-sequence lengths scalar-prefetched into SMEM so that index maps clamp past-the-end blocks
and no DMA is issued for them (scalar prefetch is TPU-only, hence the second kernel).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl

from llama_jax.kernels import decode_mosaic, decode_triton
from llama_jax.kernels.common import LANES, resolve_lowering, round_up


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

# lowering -> its module's partials(q, k, v, pos, num_splits, cfg) -> per-split (acc, m, l)
_LOWERINGS = {"triton": decode_triton, "mosaic": decode_mosaic}


# ---------------------------------------------------------------------------------------------
# Public API.


def combine_splits(acc_PBKRD, m_PBKR, l_PBKR):
    """Merge per-split partial softmaxes: rescale each split to the global running max."""
    m_BKR = m_PBKR.max(axis=0)
    w_PBKR = jnp.exp(m_PBKR - m_BKR)
    l_BKR = (w_PBKR * l_PBKR).sum(axis=0)
    acc_BKRD = (w_PBKR[..., None] * acc_PBKRD).sum(axis=0)
    return acc_BKRD / jnp.where(l_BKR > 0.0, l_BKR, 1.0)[..., None]


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
    br = min(bs.block_rows, round_up(R, row_unit))
    if lowering == "triton":
        br = max(16, pl.next_power_of_2(br))
    Rp = round_up(R, br)
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

    acc, m, l = _LOWERINGS[lowering].partials(q_BKRD, k_BSKD, v_BSKD, pos_BR, num_splits, cfg)
    o_BKRD = combine_splits(acc, m, l)[:, :, :R]
    o_BTHD = o_BKRD.reshape(B, K, T, G, D).transpose(0, 2, 1, 3, 4).reshape(B, T, H, D)
    return o_BTHD.astype(q_BTHD.dtype)
