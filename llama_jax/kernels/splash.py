"""JAX's own TPU flash attention, splash attention: the "splash" impl, what "auto" runs on TPU.

It is the kernel MaxText trains with (jax.experimental.pallas.ops.tpu.splash_attention), maintained
and tested on TPUs by the JAX team, which ours (flash_mosaic.py) has not been yet. This module only
maps our arguments onto it:
- layout: ours is [B, T, H, D]; the kernel takes one row, [H, T, D], and is vmapped over the batch.
- grouped-query attention: the kv heads go in as they are, [K, S, D]; the kernel gives each kv head
  its H // K query heads, never repeating K and V in memory.
- scale: the kernel does not scale its scores, so the queries are scaled first (as MaxText does).
- packed documents: the kernel's own SegmentIds; causality is its CausalMask, by index.
- lengths: its blocks must divide T, so rows are padded at the end. A padded key comes after every
  real query and causality hides it; a padded query repeats the row's last segment id, so it sees
  at least itself (a row that sees nothing would be 0 / 0 in the kernel), and its output is dropped.

Block sizes are MaxText's defaults (512), chosen there on TPU; none has been tuned by us.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from llama_jax.kernels.common import round_up

MIN_BLOCK, MAX_BLOCK = 128, 512  # tokens: the kernel needs multiples of the TPU's 128 lanes


def block_size(T: int) -> int:
    """The kernel's block along the sequence for a row of T tokens: the whole (padded) row up to 512."""
    return min(MAX_BLOCK, round_up(T, MIN_BLOCK))


@functools.lru_cache(maxsize=32)
def _kernel(T: int, H: int, interpret: bool):
    """The kernel for rows of T tokens (a multiple of the block) and H query heads; built once per
    shape, as building it computes the mask's block structure on the host. Built outside any trace
    (it is called inside jit): its arrays must be constants, not the tracers of the first caller."""
    b = block_size(T)
    blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                               block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = splash.MultiHeadMask([splash.CausalMask((T, T))] * H)
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, interpret: bool = False):
    """Causal self-attention of q [B, T, H, D] to k, v [B, T, K, D] (within segments) -> [B, T, H, D]."""
    B, T, H, D = q_BTHD.shape
    Tp = round_up(T, block_size(T))
    pad = lambda x, **mode: jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2), **mode)  # noqa: E731
    # [B, Tp, heads, D] -> the kernel's [B, heads, Tp, D]
    q, k, v = (pad(x).transpose(0, 2, 1, 3) for x in ((q_BTHD * D ** -0.5).astype(q_BTHD.dtype), k_BTKD, v_BTKD))
    kernel = _kernel(Tp, H, interpret)
    if segment_ids_BT is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        segments = pad(segment_ids_BT.astype(jnp.int32), mode="edge")
        out = jax.vmap(kernel)(q, k, v, splash.SegmentIds(q=segments, kv=segments))
    return out.transpose(0, 2, 1, 3)[:, :T]


__all__ = ["splash_attention", "block_size"]
