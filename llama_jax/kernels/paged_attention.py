"""Paged attention in Pallas (Triton lowering, GPU): queries at absolute positions against keys
and values in fixed-size pages named by a per-row page table, ragged rows.

Shapes: B batch, T query positions per row (1 to decode, a prefill chunk's width), H query heads,
K kv heads, G = H // K, D head dim, N pages in the pool, P slots per page, M page-table entries
per row, J pages per block (bk = J * P slots), R = T * G query rows per kv head, br rows per
program.

As decode_attention.py's Triton kernel, of which this is the paged twin: per kv head, all G query
heads of all T positions form one [R, D] row block, so each page is read once for the group (GQA);
the table is split into chunks handled by separate programs whose partial softmaxes
`combine_splits` merges (flash decoding); a program stops at the block holding its rows' last
position, so a row reads only its own pages. Each step gathers J pages with one indexed load
from the pool (`k_ref[pages]`), the page table row sitting beside the queries.

No Mosaic (TPU) kernel yet: on TPU, jax's own `ragged_paged_attention` is the model to follow.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llama_jax.kernels.decode_attention import combine_splits
from llama_jax.kernels.common import M_FLOOR, NT, default_lowering, dot, online_softmax_step


@dataclasses.dataclass(frozen=True)
class PagedBlockSizes:
    pages_per_block: int = 4  # J: pages gathered per step
    block_rows: int = 16  # query rows (T * G) per program
    num_splits: int | None = None  # None: enough to give every SM a few programs
    num_warps: int = 4
    num_stages: int = 2


_TARGET_PROGRAMS = 264  # ~2 waves of an H100's 132 SMs, as decode_attention


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    pages_per_block: int
    blocks_per_split: int
    num_blocks: int
    num_warps: int
    num_stages: int
    interpret: bool


def _paged_kernel(q_ref, k_ref, v_ref, table_ref, pos_ref, acc_ref, m_ref, l_ref, *, cfg: _Config):
    # q_ref, acc_ref [br, D]; k_ref, v_ref [N, P, D] (this kv head); table_ref [Mp]; pos_ref, m_ref, l_ref [br]
    J = cfg.pages_per_block
    P, D = k_ref.shape[1], k_ref.shape[2]
    bk = J * P
    q, pos = q_ref[...], pos_ref[...]
    lo = pl.program_id(0) * cfg.blocks_per_split
    # Blocks past the rows' last position are never read: the ragged batch.
    hi = jnp.minimum(jnp.minimum(lo + cfg.blocks_per_split, cfg.num_blocks), lax.div(jnp.max(pos) + bk, bk))

    def body(j, carry):
        acc, m, l = carry
        pages = table_ref[pl.ds(pl.multiple_of(j * J, J), J)]
        k, v = k_ref[pages].reshape(bk, D), v_ref[pages].reshape(bk, D)
        s = dot(q, k, NT) * cfg.scale
        k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
        s = jnp.where(k_pos[None, :] <= pos[:, None], s, -jnp.inf)
        return online_softmax_step(acc, m, l, s, v)

    br = q.shape[0]
    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((br,), M_FLOOR, jnp.float32), jnp.zeros((br,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi, body, carry)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _partials(q_BKRD, k_pages_NPKD, v_pages_NPKD, table_BM, pos_BR, br, num_splits, cfg):
    B, K, Rp, D = q_BKRD.shape
    N, P = k_pages_NPKD.shape[:2]
    M = table_BM.shape[1]
    pages = pl.BlockSpec((N, P, None, D), lambda s, r, b, k: (0, 0, k, 0))
    out_map = lambda s, r, b, k: (s, b, k, r)  # noqa: E731
    return pl.pallas_call(
        functools.partial(_paged_kernel, cfg=cfg),
        grid=(num_splits, Rp // br, B, K),
        in_specs=[pl.BlockSpec((None, None, br, D), lambda s, r, b, k: (b, k, r, 0)), pages, pages,
                  pl.BlockSpec((None, M), lambda s, r, b, k: (b, 0)),
                  pl.BlockSpec((None, br), lambda s, r, b, k: (b, r))],
        out_specs=[pl.BlockSpec((None, None, None, br, D), lambda s, r, b, k: (s, b, k, r, 0)),
                   pl.BlockSpec((None, None, None, br), out_map),
                   pl.BlockSpec((None, None, None, br), out_map)],
        out_shape=[jax.ShapeDtypeStruct((num_splits, B, K, Rp, D), jnp.float32),
                   jax.ShapeDtypeStruct((num_splits, B, K, Rp), jnp.float32),
                   jax.ShapeDtypeStruct((num_splits, B, K, Rp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="paged_attention",
    )(q_BKRD, k_pages_NPKD, v_pages_NPKD, table_BM, pos_BR)


def paged_attention(q_BTHD, k_pages_NPKD, v_pages_NPKD, page_table_BM, q_positions_BT, *, scale: float | None = None,
                    block_sizes: PagedBlockSizes | None = None, interpret: bool = False):
    """Same contract as `paged_attention_reference`: a query at position p sees its row's positions
    0..p; a query with no visible position (p < 0, padding) gets output 0."""
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
    if default_lowering() == "mosaic":
        raise ValueError("paged attention has a Triton (GPU) kernel only; use the 'xla' implementation on TPU")
    bs = block_sizes or PagedBlockSizes()
    G = H // K
    R = T * G
    br = max(16, pl.next_power_of_2(min(bs.block_rows, R)))
    Rp = -(-R // br) * br
    J = bs.pages_per_block
    num_blocks = -(-page_table_BM.shape[1] // J)
    table_BM = jnp.pad(page_table_BM.astype(jnp.int32), [(0, 0), (0, num_blocks * J - page_table_BM.shape[1])])
    num_splits = bs.num_splits or -(-_TARGET_PROGRAMS // (B * K * (Rp // br)))
    num_splits = max(1, min(num_splits, num_blocks))
    blocks_per_split = -(-num_blocks // num_splits)
    num_splits = -(-num_blocks // blocks_per_split)
    cfg = _Config(scale=float(D ** -0.5 if scale is None else scale), pages_per_block=J,
                  blocks_per_split=blocks_per_split, num_blocks=num_blocks, num_warps=bs.num_warps,
                  num_stages=bs.num_stages, interpret=interpret)

    # Rows of a kv head: r = t * G + g, the G query heads of each position together.
    q_BKRD = q_BTHD.reshape(B, T, K, G, D).transpose(0, 2, 1, 3, 4).reshape(B, K, R, D)
    q_BKRD = jnp.pad(q_BKRD, [(0, 0), (0, 0), (0, Rp - R), (0, 0)])
    pos_BR = jnp.repeat(q_positions_BT.astype(jnp.int32), G, axis=1)
    pos_BR = jnp.pad(pos_BR, [(0, 0), (0, Rp - R)], constant_values=-1)

    acc, m, l = _partials(q_BKRD, k_pages_NPKD, v_pages_NPKD, table_BM, pos_BR, br, num_splits, cfg)
    o_BKRD = combine_splits(acc, m, l)[:, :, :R]
    o_BTHD = o_BKRD.reshape(B, K, T, G, D).transpose(0, 2, 1, 3, 4).reshape(B, T, H, D)
    return o_BTHD.astype(q_BTHD.dtype)


__all__ = ["paged_attention", "PagedBlockSizes"]
