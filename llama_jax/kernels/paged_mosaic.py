"""Paged attention for TPUs (Pallas Mosaic lowering): per-split partial softmaxes.

Grid (batch, kv-head group, row block, split, block in split), the last axis accumulating.
- The page table and each row block's last block are scalar-prefetched into SMEM (flat: a 2-D SMEM
  array pads its rows), so a program knows which pages to read before any vector work.
- The pool stays in HBM (memory space ANY): a grid step DMAs the J pages of its block into one of
  two VMEM buffers, [J * P, W] each, and starts the next block's copies into the other buffer
  before it computes, so the reads of block j + 1 overlap the compute on block j. Blocks past a
  row block's last position are never copied (no DMA is issued, unlike a clamped BlockSpec that
  still re-reads its last block), nor computed on.
- Lanes as in the dense decode kernel this replaces: the pool is viewed as [N, P, K * D] and a
  tile is W = hp * D lanes, a whole number of 128-lane vregs (hp = 128 // D heads share it when
  D < 128, all K heads when K does not split that way: a full-width copy needs no alignment).
  Each of those heads' queries is zero outside its own D lanes, so q . k_tile^T is exactly its
  scores, and its output is read from its own lanes of p . v_tile: no unaligned lane slicing.
  Softmax statistics are [rows, 128] lane-broadcast arrays (common.py, `lanes=True`).
Shapes as in paged_attention.py.

Not yet run on a TPU (interpreter and lowering only): the whole table sits in SMEM, B * M words
(64 rows of 128K positions in pages of 16 would be 2 MiB, past a TensorCore's SMEM: such tables
would need a per-row prefetch), and page DMAs of P * W elements (4 KiB at P 16, D 128, bf16) may
be too small to reach the copy bandwidth without more pages per block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llama_jax.kernels.common import LANES, MASK_VALUE, NT, dot, fit_lanes, online_softmax_step


def _kernel(table_ref, last_ref, q_ref, k_hbm, v_hbm, pos_ref, acc_ref, m_ref, l_ref, k_buf, v_buf, sems, m_scr,
            l_scr, acc_scr, *, cfg, table_len, n_row_blocks):
    # table_ref: SMEM [B * Mp]; last_ref: SMEM [B * n_row_blocks]; q_ref, acc_ref, acc_scr [hp, br, W];
    # k_hbm, v_hbm [N, P, K * D] in HBM; k_buf, v_buf [2, J * P, W]; sems DMA [2 (k, v), 2 (buffer)];
    # pos_ref [br, 128]; m_ref, l_ref, m_scr, l_scr [hp, br, 128]
    b, g, r, split, t = (pl.program_id(axis) for axis in range(5))
    J = cfg.pages_per_block
    P = k_hbm.shape[1]
    hp, br, W = q_ref.shape
    bk = J * P
    first = split * cfg.blocks_per_split
    # The last block this program reads: its split's, or the one holding its rows' last position.
    last = jnp.minimum(last_ref[b * n_row_blocks + r], jnp.minimum(first + cfg.blocks_per_split, cfg.num_blocks) - 1)
    j = first + t

    def copies(block, buffer):
        """The DMAs of block `block`'s J pages (this kv-head group's lanes) into `buffer`."""
        for i in range(J):
            page = table_ref[b * table_len + block * J + i]
            for n, (hbm, buf) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf))):
                yield pltpu.make_async_copy(hbm.at[page, :, pl.ds(g * W, W)], buf.at[buffer, pl.ds(i * P, P)],
                                            sems.at[n, buffer])

    @pl.when(t == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

        @pl.when(first <= last)
        def _fetch_first():
            for copy in copies(first, 0):
                copy.start()

    @pl.when(j <= last)
    def _step():
        buffer = lax.rem(t, 2)

        @pl.when(j < last)
        def _fetch_next():
            for copy in copies(j + 1, 1 - buffer):
                copy.start()

        for copy in copies(j, buffer):
            copy.wait()
        k, v = k_buf[buffer], v_buf[buffer]
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


def partials(q_BKRD, k_pages_NPKD, v_pages_NPKD, table_BM, pos_BR, num_splits, cfg):
    B, K, Rp, D = q_BKRD.shape
    N, P = k_pages_NPKD.shape[:2]
    Mp = table_BM.shape[1]
    hp = LANES // D if D < LANES and K % (LANES // D) == 0 else 1
    if (hp * D) % LANES:
        hp = K  # a tile as wide as all kv heads: a full-width copy needs no lane alignment
    W, KG = hp * D, K // hp
    br, bk, bps = cfg.block_rows, cfg.pages_per_block * P, cfg.blocks_per_split
    n_rb = Rp // br

    # Head h of a group keeps its queries in lanes [h*D, (h+1)*D) of a W-wide row, zeros elsewhere.
    q = q_BKRD.reshape(B, KG, hp, Rp, D)
    q = jnp.einsum("bgird,ij->bgirjd", q, jnp.eye(hp, dtype=q.dtype)).reshape(B, KG, hp, Rp, W)
    k_NPW = k_pages_NPKD.reshape(N, P, K * D)
    v_NPW = v_pages_NPKD.reshape(N, P, K * D)
    # A row block with no real query (every position -1) reads no block at all.
    max_pos = pos_BR.reshape(B, n_rb, br).max(axis=2)
    last_block = jnp.where(max_pos < 0, -1, max_pos // bk).reshape(B * n_rb)
    pos_BR128 = jnp.broadcast_to(pos_BR[..., None], (B, Rp, LANES))

    out_map = lambda b, g, r, s, t, *_: (s, b, g, 0, r, 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, KG, n_rb, num_splits, bps),
        in_specs=[pl.BlockSpec((None, None, hp, br, W), lambda b, g, r, s, t, *_: (b, g, 0, r, 0)),
                  pl.BlockSpec(memory_space=pl.ANY),
                  pl.BlockSpec(memory_space=pl.ANY),
                  pl.BlockSpec((None, br, LANES), lambda b, g, r, s, t, *_: (b, r, 0))],
        out_specs=[pl.BlockSpec((None, None, None, hp, br, W), out_map),
                   pl.BlockSpec((None, None, None, hp, br, LANES), out_map),
                   pl.BlockSpec((None, None, None, hp, br, LANES), out_map)],
        scratch_shapes=[pltpu.VMEM((2, bk, W), k_pages_NPKD.dtype),
                        pltpu.VMEM((2, bk, W), v_pages_NPKD.dtype),
                        pltpu.SemaphoreType.DMA((2, 2)),
                        pltpu.VMEM((hp, br, LANES), jnp.float32),
                        pltpu.VMEM((hp, br, LANES), jnp.float32),
                        pltpu.VMEM((hp, br, W), jnp.float32)],
    )
    acc, m, l = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, table_len=Mp, n_row_blocks=n_rb),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((num_splits, B, KG, hp, Rp, W), jnp.float32),
                   jax.ShapeDtypeStruct((num_splits, B, KG, hp, Rp, LANES), jnp.float32),
                   jax.ShapeDtypeStruct((num_splits, B, KG, hp, Rp, LANES), jnp.float32)],
        # The block axis carries the running softmax and the DMA double buffer: sequential.
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="paged_attention",
    )(table_BM.reshape(B * Mp), last_block, q, k_NPW, v_NPW, pos_BR128)
    # Keep each head's own lanes: [S, B, KG, hp, Rp, hp, D] -> diagonal over the two hp axes.
    acc = acc.reshape(num_splits, B, KG, hp, Rp, hp, D)
    acc = jnp.einsum("sbgirjd,ij->sbgird", acc, jnp.eye(hp, dtype=acc.dtype))
    return (acc.reshape(num_splits, B, K, Rp, D), m[..., 0].reshape(num_splits, B, K, Rp),
            l[..., 0].reshape(num_splits, B, K, Rp))
