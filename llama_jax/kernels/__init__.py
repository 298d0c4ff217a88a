"""Attention entry points; `impl` picks the implementation, one dispatch per function.

- `attention`: causal self-attention for training and whole-sequence forward passes.
- `cached_attention`: queries at absolute positions against a preallocated KV cache (prefill
  into the cache and decode steps).
- `paged_attention`: the same against keys and values in fixed-size pages named by a page table
  (the continuous-batching engine): "xla" is paged_attention_xla.py (the pages up to the batch's
  furthest position, block by block), "pallas" paged_attention.py (Triton only); no "cudnn".

impl: "xla" (plain XLA, any backend), "pallas" (our kernels: flash_attention.py and
decode_attention.py, Triton on GPU / Mosaic on TPU), "cudnn" (`jax.nn.dot_product_attention`'s
cuDNN fused attention, NVIDIA GPUs only), "auto" (pallas on GPU / TPU, xla on CPU). On CPU
"pallas" runs only with interpret=True (the Pallas interpreter: exact, slow, for tests);
"pallas_interpret" is the same as an impl name, so a model config can ask for it.

Under a multi-device mesh (the model's activation_sharding context) the Pallas kernels run per
shard of batch rows and heads (sharded.py); XLA and cuDNN attention are partitioned by XLA.
"""

import functools

import jax
import jax.numpy as jnp

from llama_jax.kernels.decode_attention import decode_attention
from llama_jax.kernels.flash_attention import default_lowering, flash_attention
from llama_jax.kernels.paged_attention import paged_attention as paged_attention_pallas
from llama_jax.kernels.paged_attention_xla import paged_attention_xla
from llama_jax.kernels.reference import attention_reference, cached_attention_reference, paged_attention_reference
from llama_jax.kernels.sharded import on_page_shards, on_shards
from llama_jax.sharding import axes

IMPLS = ("xla", "pallas", "cudnn", "auto", "pallas_interpret")


def _is_cuda() -> bool:
    if jax.default_backend() != "gpu":
        return False
    return "rocm" not in jax.devices()[0].client.platform_version.lower()


def resolve_impl(impl: str, *, interpret: bool = False) -> str:
    """The implementation `impl` names on the current backend; ValueError if there is none."""
    backend = jax.default_backend()
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    if impl == "pallas_interpret":
        return "pallas_interpret"
    if impl == "auto":
        return "pallas" if default_lowering(backend) else "xla"
    if impl == "pallas" and default_lowering(backend) is None and not interpret:
        raise ValueError(f"attention impl 'pallas' has no lowering on backend {backend!r} (GPU and "
                         "TPU only); use 'xla', or interpret=True to run the kernels in the "
                         "Pallas interpreter")
    if impl == "cudnn" and not _is_cuda():
        raise ValueError(f"attention impl 'cudnn' needs an NVIDIA GPU backend, not {backend!r}")
    return impl


def attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, impl: str = "xla",
              interpret: bool = False):
    impl = resolve_impl(impl, interpret=interpret)
    if impl == "xla":
        return attention_reference(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT)
    if impl in ("pallas", "pallas_interpret"):
        kernel = functools.partial(flash_attention, interpret=interpret or impl == "pallas_interpret")
        return on_shards(kernel, q_BTHD, k_BTKD, v_BTKD, segment_ids_BT)
    # cudnn takes packed documents only as a dense [B, 1, T, T] mask.
    mask = None
    if segment_ids_BT is not None:
        mask = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_BTHD, k_BTKD, v_BTKD, mask=mask, is_causal=True,
                                        implementation="cudnn")


def cached_attention(q_BTHD, k_BSKD, v_BSKD, q_positions_BT, *, impl: str = "xla",
                     interpret: bool = False):
    impl = resolve_impl(impl, interpret=interpret)
    if impl == "xla":
        return cached_attention_reference(q_BTHD, k_BSKD, v_BSKD, q_positions_BT)
    if impl in ("pallas", "pallas_interpret"):
        kernel = functools.partial(decode_attention, interpret=interpret or impl == "pallas_interpret")
        return on_shards(kernel, q_BTHD, k_BSKD, v_BSKD, q_positions_BT, batch_axis=axes.CACHE_BATCH)
    S = k_BSKD.shape[1]
    mask = (jnp.arange(S)[None, None, :] <= q_positions_BT[:, :, None])[:, None]
    return jax.nn.dot_product_attention(q_BTHD, k_BSKD, v_BSKD, mask=mask,
                                        implementation="cudnn")


def paged_attention(q_BTHD, k_pages_NPKD, v_pages_NPKD, page_table_BM, q_positions_BT, *, impl: str = "xla",
                    interpret: bool = False):
    impl = resolve_impl(impl, interpret=interpret)
    operands = (q_BTHD, k_pages_NPKD, v_pages_NPKD, page_table_BM, q_positions_BT)
    if impl == "xla":
        return paged_attention_xla(*operands)
    if impl in ("pallas", "pallas_interpret"):
        kernel = functools.partial(paged_attention_pallas, interpret=interpret or impl == "pallas_interpret")
        return on_page_shards(kernel, *operands)
    raise ValueError(f"paged attention has no {impl!r} implementation; use 'xla' or 'pallas'")


__all__ = ["IMPLS", "attention", "cached_attention", "paged_attention", "resolve_impl", "attention_reference",
           "cached_attention_reference", "paged_attention_reference", "paged_attention_xla", "paged_attention_pallas",
           "flash_attention", "decode_attention"]
