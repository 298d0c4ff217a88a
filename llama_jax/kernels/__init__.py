"""Attention entry points; `impl` picks the implementation from one table.

- `attention`: causal self-attention for training and whole-sequence forward passes.
- `paged_attention`: queries at absolute positions against keys and values in fixed-size pages
  named by a page table (the continuous-batching engine's prefill chunks and decode steps, the one
  decode path): "xla" is paged_attention_xla.py (the pages up to the batch's furthest position,
  block by block), "pallas" paged_attention.py (Triton on GPU / Mosaic on TPU), "auto" AUTO_PAGED;
  no "cudnn", "splash" or "flash_xla".

IMPLS (config.ATTENTION_IMPLS, where a config reads it without importing the kernels) names the
implementations, the one list config validation and the CLIs use:
- "xla": the dense reference (reference.py), any backend; its [B, H, T, T] scores bound the row.
- "flash_xla": the blocked XLA path (flash_xla.py), any backend; temporaries are blocks, not T x T.
- "cudnn": `jax.nn.dot_product_attention`'s cuDNN fused attention, NVIDIA GPUs only.
- "splash": JAX's splash attention kernel (splash.py), TPU only, the one MaxText trains with.
- "pallas": our kernels (flash_attention.py, paged_attention.py; Triton on GPU / Mosaic on TPU).
- "auto": AUTO[platform], the fastest path verified on that platform (see AUTO).
`interpret=True` runs the Pallas kernels (ours and splash) in the Pallas interpreter (exact, slow,
any backend: how CPU tests run them); the other implementations ignore it.

Under a multi-device mesh (the model's activation_sharding context) the Pallas kernels run per
shard of batch rows and heads (sharded.py); the XLA paths and cuDNN are partitioned by XLA. When
the mesh splits the sequence (context parallelism), `attention` gathers keys and values over it
and masks by positions (context_parallel.py): "pallas" runs our flash kernel on each device's
queries against the gathered keys, "flash_xla" (and "xla", never the dense reference there: its
[T/cp, T] scores bound the row) the blocked XLA path; cuDNN and splash mask by index and are
refused; "auto" picks AUTO_CONTEXT_PARALLEL.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llama_jax.config import ATTENTION_IMPLS as IMPLS
from llama_jax.kernels import context_parallel
from llama_jax.kernels.common import default_lowering
from llama_jax.kernels.flash_attention import flash_attention
from llama_jax.kernels.flash_xla import flash_attention_xla
from llama_jax.kernels.paged_attention import paged_attention as paged_attention_pallas
from llama_jax.kernels.paged_attention_xla import paged_attention_xla
from llama_jax.kernels.reference import attention_reference, cached_attention_reference, \
    paged_attention_reference, positional_attention_reference
from llama_jax.kernels.sharded import on_page_shards, on_shards
from llama_jax.kernels.splash import splash_attention


def _pallas_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, interpret):
    kernel = functools.partial(flash_attention, interpret=interpret)
    return on_shards(kernel, q_BTHD, k_BTKD, v_BTKD, segment_ids_BT)


def _splash_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, interpret):
    kernel = functools.partial(splash_attention, interpret=interpret)
    return on_shards(kernel, q_BTHD, k_BTKD, v_BTKD, segment_ids_BT)


def _flash_xla_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, interpret):
    B, T = q_BTHD.shape[:2]
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))  # causal by index
    return flash_attention_xla(q_BTHD, k_BTKD, v_BTKD, positions_BT, positions_BT, segment_ids_BT)


def _cudnn_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, interpret, *, implementation="cudnn"):
    """Our layout is the function's own (B, T, heads, D), the kv heads go in unrepeated (it groups
    the query heads itself), its default scale is ours (D ** -0.5), is_causal masks by index.
    `implementation`: "xla" runs JAX's reference of the same call (how CPU tests check this mapping)."""
    D = q_BTHD.shape[-1]
    if segment_ids_BT is not None or q_BTHD.dtype not in (jnp.bfloat16, jnp.float16) or D % 8 or D > 128:
        # What cuDNN's flash kernel does not take runs the blocked XLA path instead: float32 (cuDNN
        # computes in half precision), head dims off its list, and packed documents, for which
        # jax.nn.dot_product_attention has no segment ids (jax 0.10): they would go in as a dense
        # [B, 1, T, T] mask, which cuDNN adds as a bias and differentiates (a [B, 1, T, T] dbias too),
        # quadratic in T like the scores this path exists to avoid. Packed rows are every training
        # batch: they stay on the blocked path until cuDNN's packed layout is wired and checked on a GPU.
        return _flash_xla_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, interpret)
    return jax.nn.dot_product_attention(q_BTHD, k_BTKD, v_BTKD, is_causal=True, implementation=implementation)


# impl -> its attention(q, k, v, segment_ids or None, interpret) -> [B, T, H, D]
_IMPLS = {
    "xla": lambda q, k, v, segment_ids, interpret: attention_reference(q, k, v, segment_ids),
    "flash_xla": _flash_xla_attention,
    "cudnn": _cudnn_attention,
    "splash": _splash_attention,
    "pallas": _pallas_attention,
}
if (*_IMPLS, "auto") != IMPLS:
    raise ImportError(f"kernels' dispatch table {(*_IMPLS, 'auto')} disagrees with config.ATTENTION_IMPLS {IMPLS}")

# What "auto" runs on each platform: the fastest path verified there. cuDNN's and splash's kernels
# are JAX's, tested by JAX on that hardware (our mapping onto them is checked on CPU, and by
# bench/device_check on the device). Ours ("pallas") has run only in the interpreter: it takes over
# a platform's entry once bench/device_check has passed there, recorded in bench/RESULTS.md (none
# has yet). Any other platform (ROCm, ...) runs the blocked XLA path.
AUTO = {"cuda": "cudnn", "tpu": "splash", "cpu": "flash_xla"}
AUTO_CONTEXT_PARALLEL = "flash_xla"  # masks by position, which cuDNN and splash cannot
AUTO_PAGED = "xla"  # the decode engine's paged attention: our Pallas kernel is unverified too


def platform() -> str:
    """jax's backend, with NVIDIA ("cuda") and AMD ("rocm") GPUs told apart."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"


def _is_cuda() -> bool:
    return platform() == "cuda"


def resolve_impl(impl: str, *, interpret: bool = False) -> str:
    """The implementation `impl` names on the current backend; ValueError if there is none."""
    backend = jax.default_backend()
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return AUTO.get(platform(), "flash_xla")
    if impl == "pallas" and default_lowering(backend) is None and not interpret:
        raise ValueError(f"attention impl 'pallas' has no lowering on backend {backend!r} (GPU and "
                         "TPU only); use 'flash_xla', or interpret=True to run the kernels in the "
                         "Pallas interpreter")
    if impl == "splash" and backend != "tpu" and not interpret:
        raise ValueError(f"attention impl 'splash' is a TPU kernel, not for backend {backend!r}; use 'auto', "
                         "or interpret=True to run it in the Pallas interpreter")
    if impl == "cudnn" and not _is_cuda():
        raise ValueError(f"attention impl 'cudnn' needs an NVIDIA GPU backend, not {backend!r}")
    return impl


def _context_parallel_impl(impl: str, interpret: bool) -> str:
    if impl in ("cudnn", "splash"):
        raise ValueError(f"attention impl {impl!r} cannot run with the sequence split over a context-parallel "
                         f"mesh axis: it masks by index, a shard's tokens need a mask by position; use "
                         f"'flash_xla', 'pallas' or 'auto'")
    if impl == "auto":
        return AUTO_CONTEXT_PARALLEL
    return "flash_xla" if impl == "xla" else resolve_impl(impl, interpret=interpret)


def attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, positions_BT=None, *, impl: str = "auto",
              interpret: bool = False):
    """positions_BT: each token's position, needed when the active mesh splits the sequence."""
    if context_parallel.sequence_axes(q_BTHD.shape[1]) is not None:
        impl = _context_parallel_impl(impl, interpret)
        if positions_BT is None:
            raise ValueError("context-parallel attention needs the tokens' positions (its mask is by position)")
        return context_parallel.attention(q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, impl=impl,
                                          interpret=interpret)
    impl = resolve_impl(impl, interpret=interpret)
    return _IMPLS[impl](q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, interpret)


def paged_attention(q_BTHD, k_pages_NPKD, v_pages_NPKD, page_table_BM, q_positions_BT, *, impl: str = "xla",
                    interpret: bool = False):
    impl = AUTO_PAGED if impl == "auto" else resolve_impl(impl, interpret=interpret)
    operands = (q_BTHD, k_pages_NPKD, v_pages_NPKD, page_table_BM, q_positions_BT)
    if impl == "xla":
        return paged_attention_xla(*operands)
    if impl == "pallas":
        kernel = functools.partial(paged_attention_pallas, interpret=interpret)
        return on_page_shards(kernel, *operands)
    raise ValueError(f"paged attention has no {impl!r} implementation; use 'xla' or 'pallas'")


__all__ = ["IMPLS", "AUTO", "AUTO_CONTEXT_PARALLEL", "AUTO_PAGED", "platform", "attention", "paged_attention",
           "resolve_impl", "attention_reference", "cached_attention_reference", "paged_attention_reference",
           "paged_attention_xla", "paged_attention_pallas", "positional_attention_reference", "flash_attention",
           "flash_attention_xla", "splash_attention"]
