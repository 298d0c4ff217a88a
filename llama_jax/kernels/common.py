"""What every attention kernel shares: the Pallas lowering of a backend, block arithmetic, masks,
the f32 matmul and the online-softmax step. `i` indexes query blocks, `j` key blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


# Running-max start: finite, so exp(m_prev - m_next) is never exp(-inf + inf) = NaN for a row
# whose keys so far were all masked (-inf).
M_FLOOR = -0.7 * float(jnp.finfo(jnp.float32).max)
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


def cdiv(a, b):
    return lax.div(a + b - 1, b)


def key_blocks(i, bq, bk, num_k_blocks, cfg):
    """Key blocks [0, hi) that query block i sees; those below `full` need no mask at all."""
    if cfg.causal:
        hi = cdiv((i + 1) * bq, bk)
        full = lax.div(i * bq + 1, bk)  # key block j fits under the diagonal: (j+1)*bk-1 <= i*bq
    else:
        hi = num_k_blocks
        full = cfg.kv_len // bk  # keys past kv_len are padding
    return (0 if cfg.has_segments else full), hi


def query_blocks(j, bq, bk, num_q_blocks, cfg):
    """Query blocks [lo, num_q_blocks) that see key block j; those from `full` on need no mask.
    Key padding needs no mask here: a padded key's column only feeds its own discarded dK/dV."""
    if not cfg.causal:
        return 0, (num_q_blocks if cfg.has_segments else 0)
    lo = lax.div(j * bk, bq)
    full = jnp.minimum(cdiv((j + 1) * bk - 1, bq), num_q_blocks)
    return lo, (num_q_blocks if cfg.has_segments else full)


def visible(q_pos, k_pos, q_seg, k_seg, cfg, *, key_padding=True):
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


def mask(s, visible):
    return s if visible is None else jnp.where(visible, s, -jnp.inf)


def dot(a, b, contract):
    """f32-accumulated matmul; float32 operands at full precision (Triton would pick tf32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


NN, NT = ((1,), (0,)), ((1,), (1,))


def online_softmax_step(acc, m, l, s, v):
    """Fold one block of scores s [rows, bk] and values v [bk, D] into the running output acc,
    row max m and row sum l (Triton layout: statistics are [rows] vectors)."""
    m_next = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_next)
    p = jnp.exp(s - m_next[:, None])
    l = alpha * l + p.sum(axis=1)
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, NN)
    return acc, m_next, l


def fit_lanes(x_R128, n):
    """A lane-broadcast [rows, 128] statistic widened / narrowed to [rows, n]."""
    if n == LANES:
        return x_R128
    if n < LANES:
        return x_R128[:, :n]
    return jnp.tile(x_R128, (1, n // LANES))


def split_refs(refs, n_inputs: int, cfg):
    """(input refs, qs_ref, ks_ref, output and scratch refs) of a kernel: the segment-id refs come
    right after the `n_inputs` inputs when the call has segments, and are None when it has none."""
    if cfg.has_segments:
        return refs[:n_inputs], refs[n_inputs], refs[n_inputs + 1], refs[n_inputs + 2:]
    return refs[:n_inputs], None, None, refs[n_inputs:]
