"""The decoding engine's weight layout: the model's parameters with each layer in buffers of its own.

The model stacks its layers on a leading `layers` axis (one layout for scan and unrolled training).
The engine applies `Block` layer by layer instead, and XLA's CPU backend copies a layer's slice out
of a stacked weight at every step, so `decode_params` splits the stack once, on the device(s) the
weights already are on (bench/RESULTS.md, "Numbers moved from docstrings", has the measurement).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax

from llama_jax.config import LlamaConfig
from llama_jax.params import param_shardings


class DecodeParams(NamedTuple):
    """Layer i's weights are `layers[i]`, its slice of the model's stacked `layers` subtree; the rest
    as the model holds them."""

    tok_embeddings: Any  # [V, D]
    layers: tuple[dict, ...]
    norm: dict
    output: Any = None  # [D, V]; None with tied embeddings


def decode_params(cfg: LlamaConfig, params, mesh=None, *, donate: bool = False) -> tuple[LlamaConfig, DecodeParams]:
    """(cfg, DecodeParams): the model's params placed on `mesh` as the rules table says, each layer
    split into buffers of its own (kept on the mesh: the layer axis is never split). DecodeParams
    (already placed) pass through unchanged. donate: each stacked weight is deleted once split (the
    tree passed in is unusable afterwards), so the peak is the model plus one stacked weight, not
    twice the layers."""
    if isinstance(params, DecodeParams):
        return cfg, params
    if mesh is not None:
        params = jax.device_put(params, param_shardings(cfg, mesh, params))
    leaves, treedef = jax.tree_util.tree_flatten(params["layers"])
    per_layer = [[] for _ in range(cfg.n_layers)]
    for leaf in leaves:
        for i, piece in enumerate(_unstack(leaf)):
            per_layer[i].append(piece)
        if donate and isinstance(leaf, jax.Array):
            leaf.delete()
    layers = tuple(jax.tree_util.tree_unflatten(treedef, leaves) for leaves in per_layer)
    return cfg, DecodeParams(params["tok_embeddings"], layers, params["norm"], params.get("output"))


def _unstack(leaf) -> list:
    if not isinstance(leaf, jax.Array):
        return list(leaf)
    sharding = leaf.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
        if spec[0] is not None:
            raise ValueError("decode_params: the stacked layer axis is sharded; it must be replicated")
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    else:
        sharding = None
    return list(_unstack_jit(leaf.shape[0], sharding)(leaf))


@functools.lru_cache
def _unstack_jit(n: int, sharding):
    """One jitted split per layer count and sharding, so a second `decode_params` compiles nothing."""
    return jax.jit(tuple, out_shardings=None if sharding is None else (sharding,) * n)


def weights_device(params: DecodeParams):
    """The device the (unsharded) weights are on, where the engine's pages go too."""
    return next((next(iter(x.devices())) for x in jax.tree.leaves(params) if isinstance(x, jax.Array)),
                jax.devices()[0])


__all__ = ["DecodeParams", "decode_params", "weights_device"]
