"""Plain-XLA attention: the reference every kernel is tested against, and the `xla` impl.

Shapes: B batch, T query length, S key length, H query heads, K kv heads, G = H // K query heads
per kv head, D head_dim. Grouped-query attention reshapes the queries to [B, T, K, G, D] so the
K/V heads are never repeated in memory.
"""

import jax
import jax.numpy as jnp

from llama_jax.kernels.common import MASK_VALUE


def _grouped_attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS, scale):
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
    scores_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32)
    scores_BKGTS = scores_BKGTS * scale
    scores_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], scores_BKGTS, MASK_VALUE)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
    out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS.astype(v_BSKD.dtype), v_BSKD,
                           preferred_element_type=jnp.float32)
    return out_BTKGD.reshape(B, T, H, D).astype(q_BTHD.dtype)


def attention_reference(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, causal=True, scale=None):
    """Self-attention over one sequence: query t sees key s iff s <= t (causal) and both lie in
    the same segment (packed documents never attend across their boundary)."""
    T = q_BTHD.shape[1]
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
    mask_BTS = jnp.ones((1, T, T), bool)
    if causal:
        mask_BTS = jnp.tril(mask_BTS)
    if segment_ids_BT is not None:
        mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    return _grouped_attention(q_BTHD, k_BTKD, v_BTKD, mask_BTS, scale)


def cached_attention_reference(q_BTHD, k_BSKD, v_BSKD, q_positions_BT, *, scale=None):
    """Queries at absolute positions against a KV cache whose slot s holds position s: a query
    at position p sees slots 0..p, so each sequence's valid length is implied by its positions."""
    S = k_BSKD.shape[1]
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
    mask_BTS = jnp.arange(S)[None, None, :] <= q_positions_BT[:, :, None]
    return _grouped_attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS, scale)


def positional_attention_reference(q_BTHD, k_BSKD, v_BSKD, q_positions_BT, k_positions_BS, q_segment_ids_BT=None,
                                   k_segment_ids_BS=None, *, scale=None):
    """Causal attention masked by positions, not by index: a query at position p sees a key at
    position s iff s <= p and both lie in the same segment. Tokens may come in any order (context
    parallelism's load-balanced layout) and the queries may be a subset of the keys. Positions
    must restart in each segment, or count along the row when there are no segments."""
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
    mask_BTS = k_positions_BS[:, None, :] <= q_positions_BT[:, :, None]
    if q_segment_ids_BT is not None:
        mask_BTS = mask_BTS & (q_segment_ids_BT[:, :, None] == k_segment_ids_BS[:, None, :])
    return _grouped_attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS, scale)


def paged_attention_reference(q_BTHD, k_pages_NPKD, v_pages_NPKD, page_table_BM, q_positions_BT, *, scale=None):
    """Queries at absolute positions against keys and values in pages: page_table[b, i] holds
    sequence b's positions i*P .. i*P+P-1. Each row's pages are gathered into a contiguous cache of
    M*P slots, so a query at position p sees exactly its sequence's positions 0..p; entries of the
    page table past a sequence's end point anywhere, they are masked."""
    B, M = page_table_BM.shape
    _, P, K, D = k_pages_NPKD.shape
    gather = lambda pages: pages[page_table_BM].reshape(B, M * P, K, D)  # noqa: E731
    return cached_attention_reference(q_BTHD, gather(k_pages_NPKD), gather(v_pages_NPKD), q_positions_BT,
                                      scale=scale)
