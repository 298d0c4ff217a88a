"""Attention with each row's tokens split over the context-parallel mesh axis (`cp`).

Each device holds T/cp of a row's tokens (in the load-balanced order of sharding/context.py) and
their queries, keys and values. Inside a shard_map over the batch, sequence and head axes, every
device all-gathers the keys, values, positions and segment ids of its row over `cp`, then attends
its own queries to all T keys, masked by positions and segment ids (a key is visible iff its
position is <= the query's and it is in the same document), never by index, since the order is
permuted. The backward pass needs nothing written by hand: the transpose of the all-gather is a
reduce-scatter, so each device gets back dK and dV of exactly its own tokens.

Each device then runs one ordinary attention call, its queries against all T keys, masked by
positions: with impl "flash_xla" (what "auto" picks on every backend for now) the blocked XLA
path flash_xla.py, which skips the key blocks that come after a query block, so a device's
temporaries are blocks, never the [T/cp, T] scores; with "pallas" our flash kernel
(flash_attention.py, q_positions_BT / kv_positions_BS), blocked the same way. cuDNN and splash
mask by index only and are refused (kernels.attention).

All-gather rather than a ring of ppermutes (ring attention), for three reasons:
- It is what Meta describes for Llama 3's long-context training (all-gather based CP, 2 x cp
  load-balanced chunks), and grouped-query attention makes it cheap: Llama 3.1-8B has 8 kv heads
  for 32 query heads, so one layer's gathered K and V of a 128K-token row are
  2 x 131072 x 8 x 128 x 2 bytes = 0.5 GiB in bf16, half the size of that row's queries or
  hidden states (1 GiB each at D = 4096), and only the live layer's are held.
- It is not what bounds memory: with this module's XLA path, gather included, a long-context step
  needs exactly the memory that a stand-in attention with no temporaries of its own gives, and it
  grows linearly in the row length (bench/RESULTS.md: long_context_memory.py and the train.py
  --seq-len sweep).
- What a ring buys is overlap of the transfer with compute, at the price of cp partial attention
  calls per layer, each with its own mask and a softmax merge, and a ring order that must agree
  with the load balance. The gather is one collective XLA can schedule early, and the attention
  stays one kernel call whose backward needs nothing by hand (the reduce-scatter above).
No ring was built to time against it (no GPU time here): the argument is the kv-head count.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from llama_jax.kernels.flash_attention import flash_attention
from llama_jax.kernels.flash_xla import flash_attention_xla
from llama_jax.kernels.sharded import mesh_axes_of
from llama_jax.sharding import axes


def sequence_axes(seq_len: int):
    """The mesh axis (or axes) the active mesh splits a row of `seq_len` tokens over; None if whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    return mesh_axes_of(axes.ACTIVATION_LENGTH, seq_len, mesh)


def attention(q_BTHE, k_BTKE, v_BTKE, positions_BT, segment_ids_BT=None, *, impl: str = "flash_xla",
              interpret: bool = False):
    """Causal attention of a row split over the active mesh's sequence axes -> [B, T, H, E].

    impl: "pallas" (flash_attention, the backend's kernel or, with `interpret`, the interpreter)
    or "flash_xla" (flash_attention_xla)."""
    if impl not in ("pallas", "flash_xla"):
        raise ValueError(f"context-parallel attention runs 'pallas' or 'flash_xla', not {impl!r}")
    mesh = jax.sharding.get_abstract_mesh()
    B, T, H, _ = q_BTHE.shape
    K = k_BTKE.shape[2]
    seq = sequence_axes(T)
    batch = mesh_axes_of(axes.ACTIVATION_BATCH, B, mesh)
    heads, kv_heads = mesh_axes_of(axes.HEADS, H, mesh), mesh_axes_of(axes.KV_HEADS, K, mesh)
    if heads != kv_heads:  # a shard must hold each of its query heads' kv head
        heads = kv_heads = None
    q_spec, kv_spec, row_spec = P(batch, seq, heads, None), P(batch, seq, kv_heads, None), P(batch, seq)

    def attend(q, k, v, positions, segment_ids):
        gather = lambda x: jax.lax.all_gather(x, seq, axis=1, tiled=True)  # noqa: E731
        all_segments = None if segment_ids is None else gather(segment_ids)
        if impl == "pallas":
            return flash_attention(q, gather(k), gather(v), segment_ids, kv_segment_ids_BS=all_segments,
                                   q_positions_BT=positions, kv_positions_BS=gather(positions), interpret=interpret)
        return flash_attention_xla(q, gather(k), gather(v), positions, gather(positions), segment_ids, all_segments)

    in_specs = (q_spec, kv_spec, kv_spec, row_spec, None if segment_ids_BT is None else row_spec)
    # check_vma off: pallas_call does not state how its outputs vary over the mesh axes, and the
    # XLA path's loop carries start as constants that do not vary.
    return jax.shard_map(attend, mesh=mesh, in_specs=in_specs, out_specs=q_spec, check_vma=False)(
        q_BTHE, k_BTKE, v_BTKE, positions_BT, segment_ids_BT)


__all__ = ["attention", "sequence_axes"]
