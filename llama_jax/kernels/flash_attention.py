"""Flash attention in Pallas: causal / packed-segment self-attention, forward and backward.

Shapes: B batch, T sequence, Tp T padded to a multiple of every block, H query heads, K kv heads,
G = H // K query heads per kv head, D head_dim, bq / bk query / key block lengths.

One entry point, `flash_attention`, over two kernels that differ where the hardware does:
- `triton` (GPU): one program per (query block, batch, head) walks the key blocks in a
  `fori_loop`, so the running max / sum / accumulator stay in registers. Operands keep the
  model's [B, T, H, D] layout; grouped-query attention is an index map (kv head = h // G), so
  K/V are never repeated. The dK/dV program of a kv head loops over its G query heads.
- `mosaic` (TPU): the key walk is the last grid axis ("arbitrary"), so the pipeline emitter
  double-buffers K/V tiles into VMEM and the statistics live in VMEM scratch, broadcast over the
  128 lanes; blocks a causal query block never sees are skipped and their index map clamped, so
  they cost no DMA. Operands are head-major [B, H, T, D] (transposed by the wrapper), segment ids
  are lane / sublane broadcast. No scalar prefetch: the same kernel math as the GPU one.
Both run under `interpret=True` on CPU, which is how the tests exercise the real kernels.

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
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu


# Running-max start: finite, so exp(m_prev - m_next) is never exp(-inf + inf) = NaN for a row
# whose keys so far were all masked (-inf).
M_FLOOR = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES, SUBLANES = 128, 8
LOWERINGS = ("triton", "mosaic")


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


def default_lowering(platform: str | None = None) -> str | None:
    """The Pallas lowering of a JAX platform; None where there is none (CPU: interpret only)."""
    platform = platform or jax.default_backend()
    return {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "mosaic"}.get(platform)


def resolve_lowering(lowering: str | None, interpret: bool) -> str:
    """The lowering to build: as asked, else the backend's; the interpreter runs the Triton kernel."""
    if lowering is None:
        lowering = default_lowering()
        if lowering is None:
            if not interpret:
                raise ValueError(f"no Pallas lowering on backend {jax.default_backend()!r}; pass "
                                 "interpret=True to run the kernel in the interpreter")
            lowering = "triton"
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown lowering {lowering!r}; expected one of {LOWERINGS}")
    return lowering


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
# Block arithmetic and masks shared by both lowerings. `i` indexes query blocks, `j` key blocks.


def _cdiv(a, b):
    return lax.div(a + b - 1, b)


def _key_blocks(i, bq, bk, num_k_blocks, cfg):
    """Key blocks [0, hi) that query block i sees; those below `full` need no mask at all."""
    if cfg.causal:
        hi = _cdiv((i + 1) * bq, bk)
        full = lax.div(i * bq + 1, bk)  # key block j fits under the diagonal: (j+1)*bk-1 <= i*bq
    else:
        hi = num_k_blocks
        full = cfg.kv_len // bk  # keys past kv_len are padding
    return (0 if cfg.has_segments else full), hi


def _query_blocks(j, bq, bk, num_q_blocks, cfg):
    """Query blocks [lo, num_q_blocks) that see key block j; those from `full` on need no mask.
    Key padding needs no mask here: a padded key's column only feeds its own discarded dK/dV."""
    if not cfg.causal:
        return 0, (num_q_blocks if cfg.has_segments else 0)
    lo = lax.div(j * bk, bq)
    full = jnp.minimum(_cdiv((j + 1) * bk - 1, bq), num_q_blocks)
    return lo, (num_q_blocks if cfg.has_segments else full)


def _visible(q_pos, k_pos, q_seg, k_seg, cfg, *, key_padding=True):
    """Which (query, key) pairs attend; positions / ids broadcast to [bq, bk]."""
    ok = None
    if cfg.causal:
        ok = k_pos <= q_pos
    elif key_padding:
        ok = k_pos < cfg.kv_len
    if q_seg is not None:
        same = q_seg == k_seg
        ok = same if ok is None else ok & same
    return ok


def _mask(s, visible):
    return s if visible is None else jnp.where(visible, s, -jnp.inf)


def _dot(a, b, contract):
    """f32-accumulated matmul; float32 operands at full precision (Triton would pick tf32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


_NN, _NT = ((1,), (0,)), ((1,), (1,))


def online_softmax_step(acc, m, l, s, v):
    """Fold one block of scores s [rows, bk] and values v [bk, D] into the running output acc,
    row max m and row sum l (Triton layout: statistics are [rows] vectors)."""
    m_next = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_next)
    p = jnp.exp(s - m_next[:, None])
    l = alpha * l + p.sum(axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, _NN)
    return acc, m_next, l


# ---------------------------------------------------------------------------------------------
# Triton (GPU) kernels. Operands [B, Tp, H|K, D]; lse and delta [B, H, Tp].


def _split_refs(refs, n_inputs: int, cfg: _Config):
    """(input refs, qs_ref, ks_ref, output and scratch refs) of a kernel: the segment-id refs come
    right after the `n_inputs` inputs when the call has segments, and are None when it has none."""
    if cfg.has_segments:
        return refs[:n_inputs], refs[n_inputs], refs[n_inputs + 1], refs[n_inputs + 2:]
    return refs[:n_inputs], None, None, refs[n_inputs:]


def _fwd_kernel_triton(*refs, cfg: _Config):
    # q_ref [bq, D]; k_ref, v_ref [Tp, D]; qs_ref [bq]; ks_ref [Tp]; o_ref [bq, D]; lse_ref [bq]
    (q_ref, k_ref, v_ref), qs_ref, ks_ref, (o_ref, lse_ref) = _split_refs(refs, 3, cfg)
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(0)
    q = q_ref[...]
    q_pos = (i * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
    q_seg = None if qs_ref is None else qs_ref[...][:, None]

    def body(j, carry, masked):
        acc, m, l = carry
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = _dot(q, k, _NT) * cfg.scale
        if masked:
            k_pos = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
            k_seg = None if ks_ref is None else ks_ref[keys][None, :]
            s = _mask(s, _visible(q_pos, k_pos, q_seg, k_seg, cfg))
        return online_softmax_step(acc, m, l, s, v)

    full, hi = _key_blocks(i, bq, bk, k_ref.shape[0] // bk, cfg)
    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), M_FLOOR, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    carry = lax.fori_loop(0, full, functools.partial(body, masked=False), carry)
    acc, m, l = lax.fori_loop(full, hi, functools.partial(body, masked=True), carry)
    seen = l > 0.0
    l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l), 0.0)


def _dq_kernel_triton(*refs, cfg: _Config):
    # q_ref, do_ref, dq_ref [bq, D]; k_ref, v_ref [Tp, D]; lse_ref, delta_ref, qs_ref [bq];
    # ks_ref [Tp]
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, (dq_ref,) = _split_refs(refs, 6, cfg)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_pos = (i * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
    q_seg = None if qs_ref is None else qs_ref[...][:, None]

    def body(j, dq, masked):
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = _dot(q, k, _NT) * cfg.scale
        if masked:
            k_pos = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
            k_seg = None if ks_ref is None else ks_ref[keys][None, :]
            s = _mask(s, _visible(q_pos, k_pos, q_seg, k_seg, cfg))
        p = jnp.exp(s - lse)
        ds = p * (_dot(do, v, _NT) - delta)
        return dq + _dot(ds.astype(k.dtype), k, _NN)

    full, hi = _key_blocks(i, bq, bk, k_ref.shape[0] // bk, cfg)
    dq = jnp.zeros(q.shape, jnp.float32)
    dq = lax.fori_loop(0, full, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(full, hi, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel_triton(*refs, cfg: _Config):
    # q_ref, do_ref [Tp, G, D]; k_ref, v_ref, dk_ref, dv_ref [bk, D]; lse_ref, delta_ref [G, Tp];
    # qs_ref [Tp]; ks_ref [bk]
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, (dk_ref, dv_ref) = _split_refs(refs, 6, cfg)
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
        s = _dot(q, k, _NT) * cfg.scale
        if masked:
            q_pos = (i * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
            q_seg = None if qs_ref is None else qs_ref[rows][:, None]
            s = _mask(s, _visible(q_pos, k_pos, q_seg, k_seg, cfg, key_padding=False))
        p = jnp.exp(s - lse)
        dv = dv + _dot(p.astype(do.dtype).T, do, _NN)
        ds = p * (_dot(do, v, _NT) - delta)
        dk = dk + _dot(ds.astype(q.dtype).T, q, _NN)
        return dk, dv

    lo, full = _query_blocks(j, bq, bk, q_ref.shape[0] // bq, cfg)
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


def _fwd_triton(q_BTHD, k_BTKD, v_BTKD, qs_BT, ks_BT, cfg):
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


def _bwd_triton(q_BTHD, k_BTKD, v_BTKD, qs_BT, ks_BT, o_BTHD, lse_BHT, do_BTHD, cfg):
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


# ---------------------------------------------------------------------------------------------
# Mosaic (TPU) kernels. Operands [B, H|K, Tp, D]; row statistics [B, H, Tp, 128] (lane
# broadcast); query segment ids [B, Tp, 128], key segment ids [B, 8, Tp].


def fit_lanes(x_R128, n):
    """A lane-broadcast [rows, 128] statistic widened / narrowed to [rows, n]."""
    if n == LANES:
        return x_R128
    if n < LANES:
        return x_R128[:, :n]
    return jnp.tile(x_R128, (1, n // LANES))


def _mosaic_mask(i, j, bq, bk, qs_ref, ks_ref, cfg, *, key_padding=True):
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    q_seg = k_seg = None
    if qs_ref is not None:
        q_seg = fit_lanes(qs_ref[...], bk)  # [bq, bk]
        k_seg = ks_ref[pl.ds(0, 1), :]  # [1, bk]
    return _visible(q_pos, k_pos, q_seg, k_seg, cfg, key_padding=key_padding)


def _block_flags(i, j, bq, bk, cfg, *, key_padding=True):
    """(visible, needs_mask) for query block i against key block j, as traced booleans."""
    if cfg.causal:
        visible = j * bk <= i * bq + bq - 1
        needs_mask = (j + 1) * bk - 1 > i * bq
    else:
        visible = j >= 0
        needs_mask = ((j + 1) * bk > cfg.kv_len) if key_padding else j < 0
    if cfg.has_segments:
        needs_mask = j >= 0
    return visible, needs_mask


def _fwd_kernel_mosaic(*refs, cfg: _Config):
    # q_ref, o_ref, acc [bq, D]; k_ref, v_ref [bk, D]; qs_ref [bq, 128]; ks_ref [8, bk];
    # lse_ref, m_scr, l_scr [bq, 128]
    (q_ref, k_ref, v_ref), qs_ref, ks_ref, (o_ref, lse_ref, m_scr, l_scr, acc) = _split_refs(refs, 3, cfg)
    bq, bk = cfg.block_q, cfg.block_k
    D = q_ref.shape[-1]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, M_FLOOR, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    def step(masked):
        v = v_ref[...]
        s = _dot(q_ref[...], k_ref[...], _NT) * cfg.scale
        if masked:
            s = _mask(s, _mosaic_mask(i, j, bq, bk, qs_ref, ks_ref, cfg))
        m_prev = m_scr[...]
        m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - fit_lanes(m_next, bk))
        l_scr[...] = alpha * l_scr[...] + p.sum(axis=1, keepdims=True)
        m_scr[...] = m_next
        acc[...] = acc[...] * fit_lanes(alpha, D) + _dot(p.astype(v.dtype), v, _NN)

    visible, needs_mask = _block_flags(i, j, bq, bk, cfg)
    pl.when(visible & ~needs_mask)(lambda: step(False))
    pl.when(visible & needs_mask)(lambda: step(True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_scr[...]
        seen = l > 0.0
        l = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc[...] / fit_lanes(l, D)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(l), 0.0)


def _dq_kernel_mosaic(*refs, cfg: _Config):
    # q_ref, do_ref, dq_ref, acc [bq, D]; k_ref, v_ref [bk, D]; lse_ref, delta_ref, qs_ref
    # [bq, 128]; ks_ref [8, bk]
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, (dq_ref, acc) = _split_refs(refs, 6, cfg)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    def step(masked):
        k = k_ref[...]
        s = _dot(q_ref[...], k, _NT) * cfg.scale
        if masked:
            s = _mask(s, _mosaic_mask(i, j, bq, bk, qs_ref, ks_ref, cfg))
        p = jnp.exp(s - fit_lanes(lse_ref[...], bk))
        ds = p * (_dot(do_ref[...], v_ref[...], _NT) - fit_lanes(delta_ref[...], bk))
        acc[...] += _dot(ds.astype(k.dtype), k, _NN)

    visible, needs_mask = _block_flags(i, j, bq, bk, cfg)
    pl.when(visible & ~needs_mask)(lambda: step(False))
    pl.when(visible & needs_mask)(lambda: step(True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel_mosaic(*refs, cfg: _Config):
    # q_ref, do_ref [bq, D]; k_ref, v_ref, dk_ref, dv_ref, dk_acc, dv_acc [bk, D];
    # lse_ref, delta_ref, qs_ref [bq, 128]; ks_ref [8, bk]
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, (dk_ref, dv_ref, dk_acc, dv_acc) = (
        _split_refs(refs, 6, cfg))
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    first = (g == 0) & (i == 0)
    last = (g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1)

    @pl.when(first)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(masked):
        q, do = q_ref[...], do_ref[...]
        s = _dot(q, k_ref[...], _NT) * cfg.scale
        if masked:
            s = _mask(s, _mosaic_mask(i, j, bq, bk, qs_ref, ks_ref, cfg, key_padding=False))
        p = jnp.exp(s - fit_lanes(lse_ref[...], bk))
        dv_acc[...] += _dot(p.astype(do.dtype).T, do, _NN)
        ds = p * (_dot(do, v_ref[...], _NT) - fit_lanes(delta_ref[...], bk))
        dk_acc[...] += _dot(ds.astype(q.dtype).T, q, _NN)

    visible, needs_mask = _block_flags(i, j, bq, bk, cfg, key_padding=False)
    pl.when(visible & ~needs_mask)(lambda: step(False))
    pl.when(visible & needs_mask)(lambda: step(True))

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _mosaic_params(num_parallel, num_arbitrary):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * num_parallel + ("arbitrary",) * num_arbitrary)


def _fwd_mosaic(q_BHTD, k_BKTD, v_BKTD, qs_BT128, ks_B8T, cfg):
    B, H, Tp, D = q_BHTD.shape
    G = H // k_BKTD.shape[1]
    bq, bk = cfg.block_q, cfg.block_k

    def kv_map(b, h, i, j):
        if cfg.causal:  # past the diagonal: revisit the last needed block, so no new DMA
            j = jnp.minimum(j, lax.div((i + 1) * bq - 1, bk))
        return b, lax.div(h, G), j, 0

    in_specs = [pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0)),
                pl.BlockSpec((None, None, bk, D), kv_map),
                pl.BlockSpec((None, None, bk, D), kv_map)]
    args = [q_BHTD, k_BKTD, v_BKTD]
    if cfg.has_segments:
        in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
                     pl.BlockSpec((None, SUBLANES, bk),
                                  lambda b, h, i, j: (b, 0, kv_map(b, h, i, j)[2]))]
        args += [qs_BT128, ks_B8T]
    o_BHTD, lse_BHT128 = pl.pallas_call(
        functools.partial(_fwd_kernel_mosaic, cfg=cfg),
        grid=(B, H, Tp // bq, Tp // bk),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0)),
                   pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))],
        out_shape=[jax.ShapeDtypeStruct(q_BHTD.shape, q_BHTD.dtype),
                   jax.ShapeDtypeStruct((B, H, Tp, LANES), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, D), jnp.float32)],
        compiler_params=_mosaic_params(3, 1),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(*args)
    return o_BHTD, lse_BHT128[..., 0]


def _bwd_mosaic(q_BHTD, k_BKTD, v_BKTD, qs_BT128, ks_B8T, o_BHTD, lse_BHT, do_BHTD, cfg):
    B, H, Tp, D = q_BHTD.shape
    K = k_BKTD.shape[1]
    G = H // K
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    lse_BHT128 = jnp.broadcast_to(lse_BHT[..., None], (B, H, Tp, LANES))
    delta_BHT = jnp.einsum("bhtd,bhtd->bht", o_BHTD.astype(jnp.float32),
                           do_BHTD.astype(jnp.float32))
    delta_BHT128 = jnp.broadcast_to(delta_BHT[..., None], (B, H, Tp, LANES))

    def kv_map(b, h, i, j):
        if cfg.causal:
            j = jnp.minimum(j, lax.div((i + 1) * bq - 1, bk))
        return b, lax.div(h, G), j, 0

    q_block = pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0))
    rows = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))
    in_specs = [q_block, pl.BlockSpec((None, None, bk, D), kv_map),
                pl.BlockSpec((None, None, bk, D), kv_map), q_block, rows, rows]
    args = [q_BHTD, k_BKTD, v_BKTD, do_BHTD, lse_BHT128, delta_BHT128]
    if cfg.has_segments:
        in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
                     pl.BlockSpec((None, SUBLANES, bk),
                                  lambda b, h, i, j: (b, 0, kv_map(b, h, i, j)[2]))]
        args += [qs_BT128, ks_B8T]
    dq_BHTD = pl.pallas_call(
        functools.partial(_dq_kernel_mosaic, cfg=cfg),
        grid=(B, H, Tp // bq, Tp // bk),
        in_specs=in_specs,
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q_BHTD.shape, q_BHTD.dtype),
        scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)],
        compiler_params=_mosaic_params(3, 1),
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(*args)

    # Grid (B, K, key block, group head, query block): the last two accumulate into dK/dV.
    def q_map(b, k, j, g, i):
        if cfg.causal:  # above the diagonal: revisit the first needed block, so no new DMA
            i = jnp.maximum(i, lax.div(j * bk, bq))
        return b, k * G + g, i, 0

    q_block = pl.BlockSpec((None, None, bq, D), q_map)
    rows = pl.BlockSpec((None, None, bq, LANES), q_map)
    kv_block = pl.BlockSpec((None, None, bk, D), lambda b, k, j, g, i: (b, k, j, 0))
    in_specs = [q_block, kv_block, kv_block, q_block, rows, rows]
    args = [q_BHTD, k_BKTD, v_BKTD, do_BHTD, lse_BHT128, delta_BHT128]
    if cfg.has_segments:
        in_specs += [pl.BlockSpec((None, bq, LANES),
                                  lambda b, k, j, g, i: (b, q_map(b, k, j, g, i)[2], 0)),
                     pl.BlockSpec((None, SUBLANES, bk), lambda b, k, j, g, i: (b, 0, j))]
        args += [qs_BT128, ks_B8T]
    dk_BKTD, dv_BKTD = pl.pallas_call(
        functools.partial(_dkv_kernel_mosaic, cfg=cfg),
        grid=(B, K, Tp // bk, G, Tp // bq),
        in_specs=in_specs,
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k_BKTD.shape, k_BKTD.dtype),
                   jax.ShapeDtypeStruct(v_BKTD.shape, v_BKTD.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)],
        compiler_params=_mosaic_params(3, 2),
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(*args)
    return dq_BHTD, dk_BKTD, dv_BKTD


# ---------------------------------------------------------------------------------------------
# custom_vjp over the padded, lowering-specific layout.

_FORWARD = {"triton": _fwd_triton, "mosaic": _fwd_mosaic}
_BACKWARD = {"triton": _bwd_triton, "mosaic": _bwd_mosaic}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, cfg):
    return _FORWARD[cfg.lowering](q, k, v, q_seg, kv_seg, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, cfg):
    o, lse = _FORWARD[cfg.lowering](q, k, v, q_seg, kv_seg, cfg)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg, residuals, do):
    q, k, v, q_seg, kv_seg, o, lse = residuals
    dq, dk, dv = _BACKWARD[cfg.lowering](q, k, v, q_seg, kv_seg, o, lse, do, cfg)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------
# Public API.


def _round_up(x, m):
    return -(-x // m) * m


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
        cap_k = _round_up(T, LANES)
        blocks = {n: min(b, cap_k if n.startswith("block_k") else _round_up(T, SUBLANES))
                  for n, b in blocks.items()}
    Tp = _round_up(T, math.lcm(*blocks.values()))
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
    qs = ks = None
    if segment_ids_BT is not None:  # padding rows get id -1: they only ever see each other
        qs, ks = (jnp.pad(s.astype(jnp.int32), [(0, 0), (0, Tp - T)], constant_values=-1)
                  for s in (segment_ids_BT, kv_segment_ids_BT))
    if lowering == "triton":
        o = _flash(q, k, v, qs, ks, cfg)
    else:
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        if qs is not None:
            qs = jnp.broadcast_to(qs[:, :, None], (B, Tp, LANES))
            ks = jnp.broadcast_to(ks[:, None, :], (B, SUBLANES, Tp))
        o = _flash(q, k, v, qs, ks, cfg).transpose(0, 2, 1, 3)
    return o[:, :T]
