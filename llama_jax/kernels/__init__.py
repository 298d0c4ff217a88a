"""Attention entry points; `impl` picks the implementation from one table.

- `attention`: causal self-attention for training and whole-sequence forward passes.
- `paged_attention`: queries at absolute positions against keys and values in fixed-size pages
  named by a page table (the continuous-batching engine's prefill chunks and decode steps, the one
  decode path): "xla" is paged_attention_xla.py (the pages up to the batch's furthest position,
  block by block), "pallas" paged_attention.py (Triton on GPU / Mosaic on TPU); no "cudnn".

IMPLS names the implementations, the one list config validation and the CLIs use: "xla" (plain
XLA, any backend), "pallas" (our kernels: flash_attention.py and paged_attention.py, Triton on
GPU / Mosaic on TPU), "cudnn" (`jax.nn.dot_product_attention`'s cuDNN fused attention, NVIDIA
GPUs only), "auto" (pallas on GPU / TPU, xla on CPU). `interpret=True` runs the Pallas kernels in
the Pallas interpreter (exact, slow, any backend: how CPU tests run them); the other
implementations ignore it.

Under a multi-device mesh (the model's activation_sharding context) the Pallas kernels run per
shard of batch rows and heads (sharded.py); XLA and cuDNN attention are partitioned by XLA. When
the mesh splits the sequence (context parallelism), `attention` gathers keys and values over it
and masks by positions (context_parallel.py): "pallas" runs the flash kernel on each device's
queries against the gathered keys, "xla" its plain-XLA twin flash_xla.py (never the dense
reference: its [T/cp, T] scores bound the row); "auto" picks as above; "cudnn" is refused.
"""

from __future__ import annotations

import functools

import jax

from llama_jax.kernels import context_parallel
from llama_jax.kernels.common import default_lowering
from llama_jax.kernels.flash_attention import flash_attention
from llama_jax.kernels.flash_xla import flash_attention_xla
from llama_jax.kernels.paged_attention import paged_attention as paged_attention_pallas
from llama_jax.kernels.paged_attention_xla import paged_attention_xla
from llama_jax.kernels.reference import attention_reference, cached_attention_reference, \
    paged_attention_reference, positional_attention_reference
from llama_jax.kernels.sharded import on_page_shards, on_shards


def _pallas_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, interpret):
    kernel = functools.partial(flash_attention, interpret=interpret)
    return on_shards(kernel, q_BTHD, k_BTKD, v_BTKD, segment_ids_BT)


def _cudnn_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, interpret):
    # cudnn takes packed documents only as a dense [B, 1, T, T] mask.
    mask = None
    if segment_ids_BT is not None:
        mask = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_BTHD, k_BTKD, v_BTKD, mask=mask, is_causal=True,
                                        implementation="cudnn")


# impl -> its attention(q, k, v, segment_ids or None, interpret) -> [B, T, H, D]
_IMPLS = {
    "xla": lambda q, k, v, segment_ids, interpret: attention_reference(q, k, v, segment_ids),
    "pallas": _pallas_attention,
    "cudnn": _cudnn_attention,
}
IMPLS = (*_IMPLS, "auto")


def _is_cuda() -> bool:
    if jax.default_backend() != "gpu":
        return False
    return "rocm" not in jax.devices()[0].client.platform_version.lower()


def resolve_impl(impl: str, *, interpret: bool = False) -> str:
    """The implementation `impl` names on the current backend; ValueError if there is none."""
    backend = jax.default_backend()
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "pallas" if default_lowering(backend) else "xla"
    if impl == "pallas" and default_lowering(backend) is None and not interpret:
        raise ValueError(f"attention impl 'pallas' has no lowering on backend {backend!r} (GPU and "
                         "TPU only); use 'xla', or interpret=True to run the kernels in the "
                         "Pallas interpreter")
    if impl == "cudnn" and not _is_cuda():
        raise ValueError(f"attention impl 'cudnn' needs an NVIDIA GPU backend, not {backend!r}")
    return impl


def attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, positions_BT=None, *, impl: str = "xla",
              interpret: bool = False):
    """positions_BT: each token's position, needed when the active mesh splits the sequence."""
    if context_parallel.sequence_axes(q_BTHD.shape[1]) is not None:
        if impl == "cudnn":
            raise ValueError("attention impl 'cudnn' cannot run with the sequence split over a context-parallel mesh "
                             "axis: cuDNN masks by index, a shard's tokens need a mask by position; use 'pallas' "
                             "or 'auto'")
        if positions_BT is None:
            raise ValueError("context-parallel attention needs the tokens' positions (its mask is by position)")
        return context_parallel.attention(q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT,
                                          impl=resolve_impl(impl, interpret=interpret), interpret=interpret)
    impl = resolve_impl(impl, interpret=interpret)
    return _IMPLS[impl](q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, interpret)


def paged_attention(q_BTHD, k_pages_NPKD, v_pages_NPKD, page_table_BM, q_positions_BT, *, impl: str = "xla",
                    interpret: bool = False):
    impl = resolve_impl(impl, interpret=interpret)
    operands = (q_BTHD, k_pages_NPKD, v_pages_NPKD, page_table_BM, q_positions_BT)
    if impl == "xla":
        return paged_attention_xla(*operands)
    if impl == "pallas":
        kernel = functools.partial(paged_attention_pallas, interpret=interpret)
        return on_page_shards(kernel, *operands)
    raise ValueError(f"paged attention has no {impl!r} implementation; use 'xla' or 'pallas'")


__all__ = ["IMPLS", "attention", "paged_attention", "resolve_impl", "attention_reference",
           "cached_attention_reference", "paged_attention_reference", "paged_attention_xla", "paged_attention_pallas",
           "positional_attention_reference", "flash_attention", "flash_attention_xla"]
