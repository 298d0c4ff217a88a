"""Attention with each row's tokens split over the context-parallel mesh axis (`cp`).

Each device holds T/cp of a row's tokens (in the load-balanced order of sharding/context.py) and
their queries, keys and values. Inside a shard_map over the batch, sequence and head axes, every
device all-gathers the keys, values, positions and segment ids of its row over `cp`, then attends
its own queries to all T keys, masked by positions and segment ids (a key is visible iff its
position is <= the query's and it is in the same document), never by index, since the order is
permuted. The backward pass needs nothing written by hand: the transpose of the all-gather is a
reduce-scatter, so each device gets back dK and dV of exactly its own tokens.

All-gather rather than a ring of ppermutes (ring attention): this is what Meta describes for
Llama 3's long-context training, and grouped-query attention makes it cheap. Llama 3.1-8B has 8
kv heads for 32 query heads, so one layer's gathered K and V of a 128K-token row are
2 x 128K x 8 x 128 x 2 bytes = 0.5 GiB in bf16, half the size of that row's queries or hidden
states (1 GiB each at D=4096), and a device already holds 1/cp of it. A ring would hide the
transfer behind compute, but in cp steps, each with its own partially masked block and its own
load-balance bookkeeping; the gather is one collective that XLA schedules, and what each device
then solves (its query chunks against all keys) is one ordinary attention call. Not measured
against a ring here: the argument is the kv-head count above.

On CPU (and with impl 'xla' anywhere) the attention itself is positional_attention_reference in
plain XLA, whose [T/cp, T] scores per head bound the row length; on GPU/TPU the flash kernels
would need the same positional masks, which they do not take yet (they mask by index), so
impl 'pallas' or 'cudnn' with cp > 1 is an error rather than a silently wrong mask.
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


def attention(q_BTHE, k_BTKE, v_BTKE, positions_BT, segment_ids_BT=None, *, impl: str = "xla",
              interpret: bool = False):
    """Causal attention of a row split over the active mesh's sequence axes -> [B, T, H, E].

    impl: "pallas" (flash_attention, the backend's kernel or, with `interpret`, the interpreter)
    or "xla" (flash_attention_xla)."""
    if impl not in ("pallas", "xla"):
        raise ValueError(f"context-parallel attention runs 'pallas' or 'xla', not {impl!r}")
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
