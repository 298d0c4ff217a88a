"""Flash attention in Pallas: causal / packed-segment attention by index or by position, fwd and bwd.

Shapes: B batch, T queries, S keys (S = T in self-attention), Tp / Sp T / S padded to a multiple
of every block, H query heads, K kv heads, G = H // K query heads per kv head, D head_dim, bq / bk
query / key block lengths.

One entry point, `flash_attention`, over two kernels that differ where the hardware does, one file
each: `flash_triton.py` (GPU) and `flash_mosaic.py` (TPU). Both run under `interpret=True` on CPU,
which is how the tests exercise the real kernels. This module checks the inputs, pads them to
whole blocks and dispatches forward and backward through one table of lowerings.

Numerics: scores, softmax and accumulators are float32 whatever the input dtype (float32 matmuls
ask for full precision, or Triton would use tf32). The forward saves lse = m + log(l) per query
row, and the backward recomputes P = exp(S - lse) block by block (FlashAttention-2). Masked scores
are -inf while the running max starts at a finite floor, so a row that sees no key at all ends
with l = 0 and writes output 0, lse 0, gradient 0, never NaN. (The XLA reference instead averages
V uniformly over such a row; in self-attention they are only ever padding rows.)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from llama_jax.kernels import flash_mosaic, flash_triton
from llama_jax.kernels.common import LANES, SUBLANES, Rows, resolve_lowering, round_up


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile lengths along the sequence; the backward ones serve both dQ and dK/dV kernels."""

    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int | None = None  # triton only; None: 4 for D <= 64, else 8
    num_stages: int = 2  # triton only: software-pipelining depth of the key loop


# Starting points, not tuned on hardware yet: Triton's FA-2 tutorial sizes for Hopper; on TPU
# bk a multiple of the 128 lanes and large enough to amortise the ~0.35us per grid step.
DEFAULT_BLOCK_SIZES = {
    "triton": BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64),
    "mosaic": BlockSizes(block_q=256, block_k=512, block_q_bwd=256, block_k_bwd=256),
}


@dataclasses.dataclass(frozen=True)
class _Config:
    lowering: str
    causal: bool
    scale: float
    kv_len: int  # real (unpadded) number of keys S
    has_segments: bool
    has_positions: bool  # causal masking compares the tokens' positions, not their indices
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int
    num_stages: int
    interpret: bool


# ---------------------------------------------------------------------------------------------
# custom_vjp over the padded inputs: each lowering saves what its own backward needs.

# lowering -> its module: forward(q, k, v, rows, cfg) -> (o, residuals) and
# backward(residuals, do, cfg) -> (dq, dk, dv), on q [B, Tp, H, D], k, v [B, Sp, K, D].
_LOWERINGS = {"triton": flash_triton, "mosaic": flash_mosaic}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, rows, cfg):
    return _LOWERINGS[cfg.lowering].forward(q, k, v, rows, cfg)[0]


def _flash_fwd(q, k, v, rows, cfg):
    return _LOWERINGS[cfg.lowering].forward(q, k, v, rows, cfg)


def _flash_bwd(cfg, residuals, do):
    return (*_LOWERINGS[cfg.lowering].backward(residuals, do, cfg), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------
# Public API.


def _fit_blocks(bs: BlockSizes, T: int, lowering: str):
    """(blocks clamped to a sequence of T, the multiple both lengths are padded to); raises on
    blocks the lowering cannot tile."""
    blocks = dict(block_q=bs.block_q, block_k=bs.block_k, block_q_bwd=bs.block_q_bwd,
                  block_k_bwd=bs.block_k_bwd)
    if lowering == "triton":  # Triton tiles are powers of two, dots at least 16 on a side
        cap = max(16, pl.next_power_of_2(T))
        for name, b in blocks.items():
            if b < 16 or b & (b - 1):
                raise ValueError(f"triton {name}={b} must be a power of two >= 16")
        blocks = {n: min(b, cap) for n, b in blocks.items()}
    else:  # Mosaic: query blocks fill sublanes (8), key blocks fill lanes (128)
        for name, b in blocks.items():
            unit = LANES if name.startswith("block_k") else SUBLANES
            if b % unit:
                raise ValueError(f"mosaic {name}={b} must be a multiple of {unit}")
        cap_k = round_up(T, LANES)
        blocks = {n: min(b, cap_k if n.startswith("block_k") else round_up(T, SUBLANES))
                  for n, b in blocks.items()}
    return blocks, math.lcm(*blocks.values())


def flash_attention(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT=None, *, kv_segment_ids_BS=None,
                    q_positions_BT=None, kv_positions_BS=None, causal: bool = True,
                    scale: float | None = None, block_sizes: BlockSizes | None = None,
                    lowering: str | None = None, interpret: bool = False):
    """Attention of q [B, T, H, D] to k, v [B, S, K, D] -> [B, T, H, D], differentiable.

    Same contract as `attention_reference` (self-attention, S = T): query t sees key s iff s <= t
    (if causal) and both carry the same segment id. `kv_segment_ids_BS`, if given, are the keys'
    ids where they differ from the queries' (e.g. a padding id no query carries); a query that
    sees no key gets 0.

    `q_positions_BT` / `kv_positions_BS` (int32, >= 0; the keys' default to the queries'): causal
    masking compares these positions instead of the indices, so query t sees key s iff
    kv_positions[s] <= q_positions[t]. The tokens may then come in any order and S may differ from
    T: context parallelism attends one device's (load-balanced, non-contiguous) query chunks to
    all the gathered keys. Cost: no block is known to be fully visible, so every visited block is
    masked, and a key block is skipped only when its smallest position exceeds the query block's
    largest (tight when positions run in contiguous chunks of at least a block); Mosaic still
    copies the skipped K/V blocks into VMEM.

    `lowering` picks the kernel ("triton" GPU, "mosaic" TPU; default: the current backend's);
    `interpret=True` runs that kernel in the Pallas interpreter, which is the only way on CPU.
    T and S need not be multiples of any block: the wrapper pads and masks.
    """
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1:3]
    if k_BSKD.shape != (B, S, K, D) or v_BSKD.shape != k_BSKD.shape:
        raise ValueError(f"k {k_BSKD.shape} and v {v_BSKD.shape} must both be [B, S, K, D] with the B "
                         f"and D of q {q_BTHD.shape} ([B, T, K, D] in self-attention)")
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
    if not (q_BTHD.dtype == k_BSKD.dtype == v_BSKD.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q_BTHD.dtype}, {k_BSKD.dtype}, {v_BSKD.dtype}")
    segment_ids_BT, kv_segment_ids_BS = _query_and_key_rows(
        "segment ids", segment_ids_BT, kv_segment_ids_BS, (B, T), (B, S))
    q_positions_BT, kv_positions_BS = _query_and_key_rows(
        "positions", q_positions_BT, kv_positions_BS, (B, T), (B, S))
    if q_positions_BT is not None and not causal:
        raise ValueError("positions only order causal attention; pass causal=True or no positions")
    if causal and q_positions_BT is None and S != T:
        raise ValueError(f"causal attention of {T} queries to {S} keys needs their positions "
                         "(q_positions_BT, kv_positions_BS)")
    lowering = resolve_lowering(lowering, interpret)
    bs = block_sizes or DEFAULT_BLOCK_SIZES[lowering]
    blocks, multiple = _fit_blocks(bs, max(T, S), lowering)
    Tp, Sp = round_up(T, multiple), round_up(S, multiple)
    cfg = _Config(
        lowering=lowering, causal=causal, scale=float(D ** -0.5 if scale is None else scale),
        kv_len=S, has_segments=segment_ids_BT is not None,
        has_positions=q_positions_BT is not None, **blocks,
        num_warps=bs.num_warps or (4 if D <= 64 else 8), num_stages=bs.num_stages,
        interpret=interpret)

    q = jnp.pad(q_BTHD, [(0, 0), (0, Tp - T), (0, 0), (0, 0)])
    k, v = (jnp.pad(x, [(0, 0), (0, Sp - S), (0, 0), (0, 0)]) for x in (k_BSKD, v_BSKD))
    pad = lambda x, n, value: jnp.pad(x.astype(jnp.int32), [(0, 0), (0, n)], constant_values=value)  # noqa: E731
    rows = Rows()
    if segment_ids_BT is not None:  # padding gets id -1: padded queries only ever see padded keys
        rows = rows._replace(q_seg=pad(segment_ids_BT, Tp - T, -1), k_seg=pad(kv_segment_ids_BS, Sp - S, -1))
    if q_positions_BT is not None:  # padded keys come after every query, padded queries before every key
        int32 = jnp.iinfo(jnp.int32)
        rows = rows._replace(q_pos=pad(q_positions_BT, Tp - T, int32.min),
                             k_pos=pad(kv_positions_BS, Sp - S, int32.max))
    return _flash(q, k, v, rows, cfg)[:, :T]


def _query_and_key_rows(what, q_rows, kv_rows, q_shape, kv_shape):
    """(query ids, key ids) checked against [B, T] / [B, S]; the keys' default to the queries'."""
    if q_rows is None:
        if kv_rows is not None:
            raise ValueError(f"key {what} need the queries' {what} too")
        return None, None
    kv_rows = q_rows if kv_rows is None else kv_rows
    if q_rows.shape != q_shape or kv_rows.shape != kv_shape:
        raise ValueError(f"{what} {q_rows.shape}, {kv_rows.shape} must be [B, T] = {q_shape} and "
                         f"[B, S] = {kv_shape}")
    return q_rows, kv_rows
