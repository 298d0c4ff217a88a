"""THE rules table: the only place that names mesh axes, and the helpers that apply it.

The mesh always has the four axes below, outermost first (absent ones have size 1), so one
table serves every mesh:

    dp    pure data parallel: params replicated, batch split.
    fsdp  fully sharded data parallel: batch split, and params + optimizer state split along
          `embed`, gathered per layer on use (ZeRO-3).
    cp    context parallel: each row's tokens split along the sequence (load-balanced, see
          context.py), keys and values all-gathered inside attention (kernels/context_parallel.py).
          Params and optimizer state are split over cp as over fsdp: the devices of a cp group
          hold different tokens of the same rows, so, exactly like fsdp's, they can each keep a
          slice of the weights and gather it per layer. torchtitan shards FSDP over
          dp_shard x cp and MaxText maps `embed` to its context axis for the same reason: at
          long context a layer's tokens cost far more compute than gathering its weights, and
          the optimizer state (12 bytes per parameter) would otherwise be whole on every cp rank.
    tp    tensor parallel (Megatron): heads, kv heads, MLP width and vocab split; innermost so its
          per-layer collectives stay on the fastest links (NVLink / ICI neighbours).
"""

from __future__ import annotations

import contextlib
import logging
import math

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.sharding import axes

DATA = "dp"
FSDP = "fsdp"
CONTEXT = "cp"
TENSOR = "tp"
MESH_AXES = (DATA, FSDP, CONTEXT, TENSOR)

# Logical axis -> mesh axis (or axes, major first), each logical name once.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Parameters.
    (axes.VOCAB, TENSOR),
    (axes.EMBED, (FSDP, CONTEXT)),
    (axes.HEADS, TENSOR),
    (axes.KV_HEADS, TENSOR),
    (axes.HEAD_DIM, None),
    (axes.MLP, TENSOR),
    (axes.LAYERS, None),
    (axes.LORA_RANK, None),  # r is small: every shard of an adapter holds all of it
    # Activations at block boundaries, and the batches fed to the step.
    (axes.ACTIVATION_BATCH, (DATA, FSDP)),
    (axes.ACTIVATION_LENGTH, CONTEXT),
    (axes.ACTIVATION_EMBED, None),
    (axes.ACTIVATION_VOCAB, TENSOR),
)

BATCH_AXES = (axes.ACTIVATION_BATCH, axes.ACTIVATION_LENGTH)  # tokens, targets, masks: [B, T]

log = logging.getLogger(__name__)
# (logical axis, mesh axis) pairs already reported as replicated: a model has many arrays with the
# same undivisible dim (every layer's wk and wv, each KV cache), and one line says it for all.
_reported_replications: set[tuple[str, str]] = set()


def _check_rules(rules) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for name, mesh_axes in rules:
        if name in table:
            raise ValueError(f"logical axis {name!r} appears twice in the rules table")
        mesh_axes = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        unknown = [a for a in mesh_axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"rule for {name!r} names unknown mesh axes {unknown} (mesh axes: {MESH_AXES})")
        table[name] = mesh_axes
    return table


_TABLE = _check_rules(RULES)


def logical_to_spec(logical: tuple[str | None, ...] | PartitionSpec, shape: tuple[int, ...] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """The mesh PartitionSpec of an array whose dims carry these logical names.

    Raises if two dims would land on the same mesh axis. With a `mesh`, axes of size 1 are left
    out; with a `shape` too, a dim that a mesh axis does not divide is replicated over that axis
    (e.g. 2 kv heads on tp8: each tp rank then holds both kv heads, the usual GQA fallback).
    """
    logical = tuple(logical)
    if shape is not None and len(shape) != len(logical):
        raise ValueError(f"logical axes {logical} do not match the array's rank {len(shape)} (shape {shape})")
    dims: list[tuple[str, ...]] = []
    owner: dict[str, str] = {}
    for name in logical:
        if name is None:
            dims.append(())
            continue
        if name not in _TABLE:
            raise ValueError(f"no sharding rule for logical axis {name!r}")
        for mesh_axis in _TABLE[name]:
            if mesh_axis in owner:
                raise ValueError(f"logical axes {logical}: {owner[mesh_axis]!r} and {name!r} both map to mesh axis "
                                 f"{mesh_axis!r}; one array cannot be split twice over one mesh axis")
            owner[mesh_axis] = name
        dims.append(_TABLE[name])

    spec = []
    for i, mesh_axes in enumerate(dims):
        kept: list[str] = []
        if mesh is not None:
            for a in mesh_axes:
                size = mesh.shape[a]
                if size == 1:
                    continue
                if shape is not None and shape[i] % (math.prod(mesh.shape[k] for k in kept) * size):
                    if (logical[i], a) not in _reported_replications:
                        _reported_replications.add((logical[i], a))
                        log.info("%s (size %d) is not divisible over mesh axis %s=%d: replicated over it "
                                 "in every array", logical[i], shape[i], a, size)
                    continue
                kept.append(a)
        else:
            kept = list(mesh_axes)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def batch_split(mesh: Mesh | None) -> int:
    """How many ways the rules split a batch's rows on `mesh` (the mesh axes of ACTIVATION_BATCH:
    dp x fsdp), so a batch, or a microbatch, must be a multiple of it; 1 without a mesh."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in _TABLE[axes.ACTIVATION_BATCH])


def logical_to_sharding(logical, mesh: Mesh, shape: tuple[int, ...] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh))


def tree_shardings(logical_tree, shapes_tree, mesh: Mesh):
    """Tree of NamedSharding from a tree of logical PartitionSpecs and a matching tree of shapes."""
    return jax.tree.map(lambda logical, s: logical_to_sharding(logical, mesh, tuple(s.shape)),
                        logical_tree, shapes_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
    """Make the model's `nn.with_logical_constraint` calls bite: the rules plus the (abstract) mesh.

    Usable inside a jitted function, so a step carries its own context wherever it is traced.
    """
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(RULES):
        yield
