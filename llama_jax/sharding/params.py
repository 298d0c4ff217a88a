"""Parameters placed on a mesh: shardings from the rules, sharded init, and checkpoint restore.

Weights are never materialised whole on one device: shapes come from `eval_shape`, shardings
from the rules, and init runs under `jit(..., out_shardings=...)` so each device computes only
its own shard. A checkpoint is restored straight into the target mesh, whatever mesh saved it.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llama_jax import checkpoint
from llama_jax.config import LlamaConfig
from llama_jax.model import Llama, param_logical_axes, param_shapes
from llama_jax.sharding.rules import activation_sharding, tree_shardings


def param_shardings(cfg: LlamaConfig, mesh: Mesh):
    """Tree of NamedSharding, one per parameter, as the rules table says."""
    return tree_shardings(param_logical_axes(cfg), param_shapes(cfg), mesh)


def init_params(cfg: LlamaConfig, mesh: Mesh, seed: int | jax.Array = 0):
    """Random parameters created shard by shard on `mesh`."""
    rng = jax.random.key(seed) if isinstance(seed, int) else seed
    tokens = jnp.zeros((1, 1), jnp.int32)

    def init(r):
        with activation_sharding(mesh):
            return nn.meta.unbox(Llama(cfg).init(r, tokens)["params"])

    return jax.jit(init, out_shardings=param_shardings(cfg, mesh))(rng)


def load_params(path: str | os.PathLike, mesh: Mesh, **config_overrides) -> tuple[LlamaConfig, dict]:
    """Restore a `llama_jax.save` checkpoint directly into `mesh`'s shards (any saving mesh)."""
    return checkpoint.load(path, mesh=mesh, **config_overrides)
