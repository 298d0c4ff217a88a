"""Flash attention in Pallas: causal / packed-segment self-attention, forward and backward.

Shapes: B batch, T sequence, Tp T padded to a multiple of every block, H query heads, K kv heads,
G = H // K query heads per kv head, D head_dim, bq / bk query / key block lengths.

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
    kv_len: int  # real (unpadded) sequence length
    has_segments: bool
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
# backward(residuals, do, cfg) -> (dq, dk, dv), on [B, Tp, H|K, D] inputs.
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
    """Clamp blocks to the sequence and check what each lowering can tile."""
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
    Tp = round_up(T, math.lcm(*blocks.values()))
    return blocks, Tp


def flash_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, kv_segment_ids_BT=None,
                    causal: bool = True, scale: float | None = None,
                    block_sizes: BlockSizes | None = None, lowering: str | None = None,
                    interpret: bool = False):
    """Self-attention q [B, T, H, D] x k, v [B, T, K, D] -> [B, T, H, D], differentiable.

    Same contract as `attention_reference`: query t sees key s iff s <= t (if causal) and both
    carry the same segment id. `kv_segment_ids_BT`, if given, are the keys' ids where they differ
    from the queries' (e.g. a padding id no query carries); a query that sees no key gets 0.
    `lowering` picks the kernel ("triton" GPU, "mosaic" TPU; default: the current backend's);
    `interpret=True` runs that kernel in the Pallas interpreter, which is the only way on CPU.
    T need not be a multiple of any block: the wrapper pads and masks.
    """
    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    if k_BTKD.shape != (B, T, K, D) or v_BTKD.shape != k_BTKD.shape:
        raise ValueError(f"k {k_BTKD.shape} and v {v_BTKD.shape} must be [B, T, K, D] matching "
                         f"q {q_BTHD.shape}")
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
    if not (q_BTHD.dtype == k_BTKD.dtype == v_BTKD.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q_BTHD.dtype}, {k_BTKD.dtype}, {v_BTKD.dtype}")
    if kv_segment_ids_BT is not None and segment_ids_BT is None:
        raise ValueError("kv_segment_ids_BT needs segment_ids_BT for the queries")
    if segment_ids_BT is not None:
        kv_segment_ids_BT = segment_ids_BT if kv_segment_ids_BT is None else kv_segment_ids_BT
        if segment_ids_BT.shape != (B, T) or kv_segment_ids_BT.shape != (B, T):
            raise ValueError(f"segment ids {segment_ids_BT.shape}, {kv_segment_ids_BT.shape} must "
                             f"be [B, T] = {(B, T)}")
    lowering = resolve_lowering(lowering, interpret)
    bs = block_sizes or DEFAULT_BLOCK_SIZES[lowering]
    blocks, Tp = _fit_blocks(bs, T, lowering)
    cfg = _Config(
        lowering=lowering, causal=causal, scale=float(D ** -0.5 if scale is None else scale),
        kv_len=T, has_segments=segment_ids_BT is not None, **blocks,
        num_warps=bs.num_warps or (4 if D <= 64 else 8), num_stages=bs.num_stages,
        interpret=interpret)

    pad = [(0, 0), (0, Tp - T), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad) for x in (q_BTHD, k_BTKD, v_BTKD))
    rows = Rows()
    if segment_ids_BT is not None:  # padding rows get id -1: they only ever see each other
        rows = Rows(*(jnp.pad(s.astype(jnp.int32), [(0, 0), (0, Tp - T)], constant_values=-1)
                      for s in (segment_ids_BT, kv_segment_ids_BT)))
    return _flash(q, k, v, rows, cfg)[:, :T]
