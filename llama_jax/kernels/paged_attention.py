"""Paged attention in Pallas: queries at absolute positions against keys and values in fixed-size
pages named by a per-row page table, ragged rows (the continuous-batching engine's decode and
prefill chunks).

Shapes: B batch, T query positions per row (1 to decode, a prefill chunk's width), H query heads,
K kv heads, G = H // K, D head dim, N pages in the pool, P slots per page, M page-table entries
per row, J pages per block (bk = J * P slots), R = T * G query rows per kv head, br rows per
program, S splits of the page table.

Decode is memory bound: a step reads each row's pages once. So both kernels
- group, per kv head, all G query heads of all T positions into one [R, D] row block, so each page
  is read once for the group (GQA; K/V are never repeated),
- split the table into chunks handled by separate programs (flash decoding), each writing a
  partial (accumulator, running max, sum) that `combine_splits` merges, so a batch of a few rows
  still fills the machine,
- read only a row's own pages up to the block holding its last query position (ragged rows).

One kernel per lowering, one file each, behind one table: `paged_triton.py` (GPU) gathers J pages
per step with one indexed load from the pool; `paged_mosaic.py` (TPU) scalar-prefetches the page
table into SMEM and DMAs the J pages of the next block from HBM while it computes on the current
one. Both run under `interpret=True` on CPU, which is how the tests exercise them.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl

from llama_jax.kernels import paged_mosaic, paged_triton
from llama_jax.kernels.common import LANES, resolve_lowering, round_up


@dataclasses.dataclass(frozen=True)
class PagedBlockSizes:
    pages_per_block: int  # J: pages read per step
    block_rows: int  # query rows (T * G) per program
    num_splits: int | None = None  # None: enough to give every core a few programs
    num_warps: int = 4  # triton only
    num_stages: int = 2  # triton only


# Starting points, not tuned on hardware yet. Mosaic: J * P slots should be a whole number of
# 128-lane vregs (8 pages of 16) and large enough to amortise the ~0.35us per grid step.
DEFAULT_PAGED_BLOCK_SIZES = {
    "triton": PagedBlockSizes(pages_per_block=4, block_rows=16),
    "mosaic": PagedBlockSizes(pages_per_block=8, block_rows=128),
}
_TARGET_PROGRAMS = {"triton": 264, "mosaic": 4}  # ~2 waves of an H100's 132 SMs; 2 TensorCores


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    pages_per_block: int
    block_rows: int
    blocks_per_split: int
    num_blocks: int
    num_warps: int
    num_stages: int
    interpret: bool | object  # True, or pltpu.InterpretParams (Mosaic)


# lowering -> its module's partials(q_BKRD, k_pages, v_pages, table_BM, pos_BR, num_splits, cfg)
# -> per-split (acc [S, B, K, Rp, D], m [S, B, K, Rp], l [S, B, K, Rp])
_LOWERINGS = {"triton": paged_triton, "mosaic": paged_mosaic}


def combine_splits(acc_SBKRD, m_SBKR, l_SBKR):
    """Merge per-split partial softmaxes: rescale each split to the global running max. A split
    that saw no key (acc 0, max at the floor, sum 0) adds nothing; a row no split saw gets 0."""
    m_BKR = m_SBKR.max(axis=0)
    w_SBKR = jnp.exp(m_SBKR - m_BKR)
    l_BKR = (w_SBKR * l_SBKR).sum(axis=0)
    acc_BKRD = (w_SBKR[..., None] * acc_SBKRD).sum(axis=0)
    return acc_BKRD / jnp.where(l_BKR > 0.0, l_BKR, 1.0)[..., None]


def paged_attention(q_BTHD, k_pages_NPKD, v_pages_NPKD, page_table_BM, q_positions_BT, *, scale: float | None = None,
                    block_sizes: PagedBlockSizes | None = None, lowering: str | None = None,
                    interpret=False):
    """Same contract as `paged_attention_reference`: a query at position p sees its row's positions
    0..p; a query with no visible position (p < 0, padding) gets output 0.

    interpret: True runs the kernel in the Pallas interpreter; for the Mosaic kernel it may also be
    a `pltpu.InterpretParams`, the TPU interpreter, which models its DMAs and semaphores."""
    B, T, H, D = q_BTHD.shape
    _, P, K, _ = k_pages_NPKD.shape
    if k_pages_NPKD.shape[3] != D or v_pages_NPKD.shape != k_pages_NPKD.shape:
        raise ValueError(f"pages k {k_pages_NPKD.shape}, v {v_pages_NPKD.shape} must be [N, P, K, D] with "
                         f"q's D ({q_BTHD.shape})")
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
    if page_table_BM.shape[0] != B or q_positions_BT.shape != (B, T):
        raise ValueError(f"page table {page_table_BM.shape} and positions {q_positions_BT.shape} must have "
                         f"q's batch {B} (positions: [B, T] = {(B, T)})")
    lowering = resolve_lowering(lowering, interpret)
    bs = block_sizes or DEFAULT_PAGED_BLOCK_SIZES[lowering]
    J = bs.pages_per_block
    if lowering == "mosaic" and J * P > LANES and (J * P) % LANES:
        raise ValueError(f"the Mosaic kernel needs pages_per_block * page size = {J} * {P} below {LANES} or a "
                         f"multiple of it (a score tile of whole vregs)")
    G = H // K
    R = T * G
    if lowering == "triton":
        br = max(16, pl.next_power_of_2(min(bs.block_rows, R)))
    else:
        br = min(bs.block_rows, round_up(R, 8))
    Rp = round_up(R, br)
    num_blocks = -(-page_table_BM.shape[1] // J)
    table_BM = jnp.pad(page_table_BM.astype(jnp.int32), [(0, 0), (0, num_blocks * J - page_table_BM.shape[1])])
    num_splits = bs.num_splits or -(-_TARGET_PROGRAMS[lowering] // (B * K * (Rp // br)))
    num_splits = max(1, min(num_splits, num_blocks))
    blocks_per_split = -(-num_blocks // num_splits)
    num_splits = -(-num_blocks // blocks_per_split)
    cfg = _Config(scale=float(D ** -0.5 if scale is None else scale), pages_per_block=J, block_rows=br,
                  blocks_per_split=blocks_per_split, num_blocks=num_blocks, num_warps=bs.num_warps,
                  num_stages=bs.num_stages, interpret=interpret)

    # Rows of a kv head: r = t * G + g, the G query heads of each position together.
    q_BKRD = q_BTHD.reshape(B, T, K, G, D).transpose(0, 2, 1, 3, 4).reshape(B, K, R, D)
    q_BKRD = jnp.pad(q_BKRD, [(0, 0), (0, 0), (0, Rp - R), (0, 0)])
    pos_BR = jnp.repeat(q_positions_BT.astype(jnp.int32), G, axis=1)
    pos_BR = jnp.pad(pos_BR, [(0, 0), (0, Rp - R)], constant_values=-1)

    acc, m, l = _LOWERINGS[lowering].partials(q_BKRD, k_pages_NPKD, v_pages_NPKD, table_BM, pos_BR, num_splits, cfg)
    o_BKRD = combine_splits(acc, m, l)[:, :, :R]
    o_BTHD = o_BKRD.reshape(B, K, T, G, D).transpose(0, 2, 1, 3, 4).reshape(B, T, H, D)
    return o_BTHD.astype(q_BTHD.dtype)


__all__ = ["paged_attention", "PagedBlockSizes", "DEFAULT_PAGED_BLOCK_SIZES", "combine_splits"]
