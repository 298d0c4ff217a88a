"""Paged attention in plain XLA, reading only the pages up to the batch's last query position.

Shapes: B batch, T query positions per row, H query heads, K kv heads, G = H // K, D head dim,
N pages in the pool, P slots per page, M page-table entries per row, J pages per block.

The reference (reference.py) gathers all M pages of every row, so a decode step costs the
longest sequence the engine allows whatever the batch holds. Here a while loop walks blocks of J
pages with an online softmax, for as many blocks as the batch's furthest query position needs:
the cost follows the sequences actually running, and the trip count is data, so one compiled
program serves every length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.kernels.common import MASK_VALUE

PAGES_PER_BLOCK = 8


def paged_attention_xla(q_BTHD, k_pages_NPKD, v_pages_NPKD, page_table_BM, q_positions_BT, *,
                        pages_per_block: int = PAGES_PER_BLOCK, scale=None):
    """Equal to `paged_attention_reference`: a query at position p sees its row's positions 0..p
    (a row whose positions are all negative, padding, gets an arbitrary finite output)."""
    B, T, H, D = q_BTHD.shape
    _, P, K, _ = k_pages_NPKD.shape
    G, J = H // K, min(pages_per_block, page_table_BM.shape[1])
    scale = D ** -0.5 if scale is None else scale
    M = -(-page_table_BM.shape[1] // J) * J
    page_table_BM = jnp.pad(page_table_BM, ((0, 0), (0, M - page_table_BM.shape[1])))
    q_BKGTD = (q_BTHD.reshape(B, T, K, G, D) * scale).transpose(0, 2, 3, 1, 4)
    S = J * P  # slots per block

    def gather(pages_NPKD, pages_BJ):
        return jnp.take(pages_NPKD, pages_BJ, axis=0).reshape(B, S, K, D)

    def block(i, carry):
        m_BKGT, l_BKGT, acc_BKGTD = carry
        pages_BJ = jax.lax.dynamic_slice_in_dim(page_table_BM, i * J, J, axis=1)
        k_BSKD = gather(k_pages_NPKD, pages_BJ)
        v_BSKD = gather(v_pages_NPKD, pages_BJ)
        s_BKGTS = jnp.einsum("bkgtd,bskd->bkgts", q_BKGTD, k_BSKD, preferred_element_type=jnp.float32)
        visible_BTS = i * S + jnp.arange(S)[None, None, :] <= q_positions_BT[:, :, None]
        s_BKGTS = jnp.where(visible_BTS[:, None, None], s_BKGTS, MASK_VALUE)
        m_new_BKGT = jnp.maximum(m_BKGT, s_BKGTS.max(axis=-1))
        p_BKGTS = jnp.exp(s_BKGTS - m_new_BKGT[..., None])
        correction_BKGT = jnp.exp(m_BKGT - m_new_BKGT)
        l_BKGT = l_BKGT * correction_BKGT + p_BKGTS.sum(axis=-1)
        pv_BKGTD = jnp.einsum("bkgts,bskd->bkgtd", p_BKGTS.astype(v_BSKD.dtype), v_BSKD,
                              preferred_element_type=jnp.float32)
        return m_new_BKGT, l_BKGT, acc_BKGTD * correction_BKGT[..., None] + pv_BKGTD

    # MASK_VALUE, not -inf, as the running max: a block with no visible key then adds nothing
    # (exp(MASK_VALUE - a real max) is 0) without ever computing inf - inf.
    init = (jnp.full((B, K, G, T), MASK_VALUE, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
            jnp.zeros((B, K, G, T, D), jnp.float32))
    blocks = jnp.clip(jnp.max(q_positions_BT) // S + 1, 1, M // J)
    _, l_BKGT, acc_BKGTD = jax.lax.fori_loop(0, blocks, block, init)
    out_BKGTD = acc_BKGTD / l_BKGT[..., None]
    return out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q_BTHD.dtype)


__all__ = ["paged_attention_xla", "PAGES_PER_BLOCK"]
