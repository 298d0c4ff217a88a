"""Run an attention kernel on each device's own shard of a mesh (shard_map over batch and heads).

A pallas_call is opaque to XLA's SPMD partitioner: inside a sharded, jitted model it would gather
its operands and run the whole attention on every device. Attention is independent across batch
rows and across kv-head groups, so under the active mesh (`sharding.activation_sharding`) each
device runs the kernel on its own rows and heads, with no communication. Sequence and cache
length stay whole on every device: the kernels need every key of a row.

Which mesh axes split the batch and the heads comes from the rules table, like every other array.
When the kv heads do not divide over the tensor-parallel axis (2 kv heads on tp8) the rules keep
them whole, and then the query heads stay whole too: a shard must hold each of its query heads'
kv head.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from llama_jax.sharding import axes
from llama_jax.sharding.rules import logical_to_spec


def mesh_axes_of(logical: str, size: int, mesh):
    """The mesh axis (or axes) the rules split a dim of this logical name and size over; None if whole."""
    spec = logical_to_spec((logical,), (size,), mesh)
    return spec[0] if len(spec) else None


def on_shards(kernel, q_BTHE, k_BSKE, v_BSKE, rows_BT=None):
    """kernel(q, k, v[, rows]) -> [B, T, H, E], per shard when a multi-device mesh is active.

    rows_BT: a per-row [B, T] operand (segment ids, or query positions), split like the batch.
    """
    operands = (q_BTHE, k_BSKE, v_BSKE) + (() if rows_BT is None else (rows_BT,))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(*operands)
    B, _, H, _ = q_BTHE.shape
    K = k_BSKE.shape[2]
    batch = mesh_axes_of(axes.ACTIVATION_BATCH, B, mesh)
    heads, kv_heads = mesh_axes_of(axes.HEADS, H, mesh), mesh_axes_of(axes.KV_HEADS, K, mesh)
    if heads != kv_heads:
        heads = kv_heads = None
    q_spec, kv_spec = P(batch, None, heads, None), P(batch, None, kv_heads, None)
    in_specs = (q_spec, kv_spec, kv_spec) + (() if rows_BT is None else (P(batch, None),))
    # check_vma off: pallas_call does not state how its outputs vary over the mesh axes.
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=q_spec, check_vma=False)(*operands)


def on_page_shards(kernel, q_BTHE, k_pages_NPKE, v_pages_NPKE, page_table_BM, q_positions_BT):
    """kernel(q, k_pages, v_pages, page_table, positions) -> [B, T, H, E], per shard when a
    multi-device mesh is active: rows split like the batch, heads like the kv heads; every device
    holds the whole page axis of its kv heads (a row's pages may lie anywhere in the pool)."""
    operands = (q_BTHE, k_pages_NPKE, v_pages_NPKE, page_table_BM, q_positions_BT)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(*operands)
    B, _, H, _ = q_BTHE.shape
    K = k_pages_NPKE.shape[2]
    batch = mesh_axes_of(axes.ACTIVATION_BATCH, B, mesh)
    heads, kv_heads = mesh_axes_of(axes.HEADS, H, mesh), mesh_axes_of(axes.KV_HEADS, K, mesh)
    if heads != kv_heads:
        heads = kv_heads = None
    q_spec, pages_spec, rows_spec = P(batch, None, heads, None), P(None, None, kv_heads, None), P(batch, None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, pages_spec, pages_spec, rows_spec, rows_spec),
                         out_specs=q_spec, check_vma=False)(*operands)


__all__ = ["on_shards", "on_page_shards", "mesh_axes_of"]
