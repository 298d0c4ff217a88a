"""What every attention kernel shares: the Pallas lowering of a backend, block arithmetic, masks,
the f32 matmul and the online-softmax step.

`i` indexes query blocks of bq rows, `j` key blocks of bk keys. A per-row statistic (running max
m, sum l, lse) is a [rows] vector on Triton and a [rows, 128] array broadcast over the lanes on
Mosaic (`lanes=True`), where a vector only lives in whole vregs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# A masked score (the XLA paths) and the online softmax's running-max start (every kernel). Finite,
# so a row whose keys are all masked gives a uniform softmax instead of NaN, and exp(m_prev - m_next)
# is never exp(-inf + inf) = NaN for a row whose keys so far were all masked (the Pallas kernels mask
# with -inf); far below any real score, so a masked key never contributes once a row has a visible one.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES, SUBLANES = 128, 8
LOWERINGS = ("triton", "mosaic")


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


# ---------------------------------------------------------------------------------------------
# Block arithmetic and masks.


def cdiv(a, b):
    return lax.div(a + b - 1, b)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def key_blocks(i, bq, bk, num_k_blocks, cfg):
    """(full, hi): query block i sees key blocks [0, hi); those below `full` need no mask at all."""
    if cfg.causal:
        hi = cdiv((i + 1) * bq, bk)
        full = lax.div(i * bq + 1, bk)  # key block j fits under the diagonal: (j+1)*bk-1 <= i*bq
    else:
        hi = num_k_blocks
        full = cfg.kv_len // bk  # keys past kv_len are padding
    return (0 if cfg.has_segments else full), hi


def query_blocks(j, bq, bk, num_q_blocks, cfg):
    """(lo, full): query blocks [lo, num_q_blocks) see key block j; those from `full` on need no
    mask. Key padding needs no mask here: a padded key's column only feeds its own discarded
    dK/dV."""
    if not cfg.causal:
        return 0, (num_q_blocks if cfg.has_segments else 0)
    lo = lax.div(j * bk, bq)
    full = jnp.minimum(cdiv((j + 1) * bk - 1, bq), num_q_blocks)
    return lo, (num_q_blocks if cfg.has_segments else full)


def visible(q_pos, k_pos, q_seg, k_seg, cfg, *, key_padding=True):
    """Which (query, key) pairs attend; positions / ids broadcast to [bq, bk]. Positions are the
    token indices, or the tokens' own positions when the call has them (cfg.has_positions): then
    padded keys sit past every query, so causal masking covers them."""
    ok = None
    if cfg.causal:
        ok = k_pos <= q_pos
    elif key_padding:
        ok = k_pos < cfg.kv_len
    if q_seg is not None:
        same = q_seg == k_seg
        ok = same if ok is None else ok & same
    return ok


def mask(s, visible_pairs):
    return s if visible_pairs is None else jnp.where(visible_pairs, s, -jnp.inf)


# ---------------------------------------------------------------------------------------------
# Per-token int operands of a kernel call: segment ids and positions, each a (query, key) pair.


class Rows(NamedTuple):
    """Per-token ids of the queries and the keys (arrays, or a kernel's refs); None if absent."""

    q_seg: Any = None
    k_seg: Any = None
    q_pos: Any = None
    k_pos: Any = None


def with_rows(in_specs, args, rows: Rows, q_spec, k_spec):
    """in_specs and args followed by each present (query ids, key ids) pair of `rows`, with the
    query ids' spec and the key ids' spec."""
    present = [ids for ids in rows if ids is not None]
    return in_specs + [q_spec, k_spec] * (len(present) // 2), args + present


def split_refs(refs, n_inputs: int, cfg):
    """(input refs, Rows, the refs after them) of a kernel whose call took `n_inputs` inputs and
    then the row operands `with_rows` appended: segment ids if it has them, then positions."""
    rest = list(refs[n_inputs:])
    rows = {}
    if cfg.has_segments:
        rows["q_seg"], rows["k_seg"] = rest.pop(0), rest.pop(0)
    if cfg.has_positions:
        rows["q_pos"], rows["k_pos"] = rest.pop(0), rest.pop(0)
    return refs[:n_inputs], Rows(**rows), rest


# ---------------------------------------------------------------------------------------------
# Matmul and softmax.


def dot(a, b, contract):
    """f32-accumulated matmul; float32 operands at full precision (Triton would pick tf32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


NN, NT = ((1,), (0,)), ((1,), (1,))


def fit_lanes(x_R128, n):
    """A lane-broadcast [rows, 128] statistic widened / narrowed to [rows, n]."""
    if n == LANES:
        return x_R128
    if n < LANES:
        return x_R128[:, :n]
    return jnp.tile(x_R128, (1, n // LANES))


def columns(stat, n, *, lanes):
    """A per-row statistic in a shape that broadcasts against [rows, n]."""
    return fit_lanes(stat, n) if lanes else stat[:, None]


def online_softmax_step(acc, m, l, s, v, *, lanes=False):
    """Fold one block of scores s [rows, bk] and values v [bk, D] into the running output acc
    [rows, D], row max m and row sum l; returns the new (acc, m, l)."""
    m_next = jnp.maximum(m, s.max(axis=1, keepdims=lanes))
    alpha = jnp.exp(m - m_next)
    p = jnp.exp(s - columns(m_next, s.shape[1], lanes=lanes))
    l = alpha * l + p.sum(axis=1, keepdims=lanes)
    acc = acc * columns(alpha, acc.shape[1], lanes=lanes) + dot(p.astype(v.dtype), v, NN)
    return acc, m_next, l


def finish_softmax(acc, m, l, *, lanes=False):
    """(output acc / l in f32, lse = m + log l) of the running statistics; a row that saw no key
    (l = 0) gets output 0 and lse 0, never NaN."""
    seen = l > 0.0
    l = jnp.where(seen, l, 1.0)
    return acc / columns(l, acc.shape[1], lanes=lanes), jnp.where(seen, m + jnp.log(l), 0.0)
