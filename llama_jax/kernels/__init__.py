"""Attention entry points; `impl` picks the implementation, one dispatch per function.

- `attention`: causal self-attention for training and whole-sequence forward passes.
- `cached_attention`: queries at absolute positions against a preallocated KV cache (prefill
  into the cache and decode steps).
"""

from llama_jax.kernels.reference import attention_reference, cached_attention_reference


def attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, impl: str = "xla"):
    if impl == "xla":
        return attention_reference(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT)
    raise ValueError(f"attention impl {impl!r} is not available yet (have: xla)")


def cached_attention(q_BTHD, k_BSKD, v_BSKD, q_positions_BT, *, impl: str = "xla"):
    if impl == "xla":
        return cached_attention_reference(q_BTHD, k_BSKD, v_BSKD, q_positions_BT)
    raise ValueError(f"cached attention impl {impl!r} is not available yet (have: xla)")


__all__ = ["attention", "cached_attention", "attention_reference", "cached_attention_reference"]
