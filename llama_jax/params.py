"""The model's parameters as a tree: shapes and logical axes read off the model without allocating,
shardings on a mesh as the rules table says, and random init, on one device or shard by shard.

Weights are never materialised whole on one device: shapes come from `eval_shape`, shardings
from the rules, and sharded init runs under `jit(..., out_shardings=...)` so each device computes
only its own shard. `checkpoint.load(path, mesh)` restores straight into the same shardings.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from llama_jax.quantize import QuantizedArray
from llama_jax.sharding.rules import activation_sharding, logical_to_sharding


@functools.lru_cache(maxsize=16)  # a trace of the whole model; train set-up asks for it ~9 times per config
def _boxed_shapes(cfg: LlamaConfig, head: str):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: Llama(cfg, head=head).init(jax.random.key(0), tokens))["params"]


def head_of(params) -> str:
    """Which model a parameter tree is (model.HEADS): a reward model's holds `score`."""
    return "score" if "score" in params else "lm"


def param_logical_axes(cfg: LlamaConfig, head: str = "lm"):
    """The tree of logical axis names (a PartitionSpec per parameter), without allocating anything.
    head: "lm" (a causal language model) or "score" (a reward model: `score` in place of `output`)."""
    return nn.get_partition_spec(_boxed_shapes(cfg, head))


def param_shapes(cfg: LlamaConfig, head: str = "lm"):
    """The tree of jax.ShapeDtypeStruct of every parameter, without allocating anything."""
    return nn.meta.unbox(_boxed_shapes(cfg, head))


def param_shardings(cfg: LlamaConfig, mesh: Mesh, params=None, head: str = "lm"):
    """Tree of NamedSharding, one per parameter, as the rules table says. `params`: the tree to match
    (arrays or anything with .shape) when it is not `param_shapes(cfg)`'s: QuantizedArrays get one for
    values and one for scale (a scale's size-1 contracted dims are replicated, as the rules do for any
    dim a mesh axis does not divide), LoRA-adapted weights one each for W, A and B (lora.adapt: A split
    like the weight's inputs, B like its outputs)."""
    def shard(logical, leaf):
        if hasattr(leaf, "map_with_axes"):  # a lora.LoraWeight (not imported: lora.py imports this module)
            return leaf.map_with_axes(shard, logical)
        if isinstance(leaf, QuantizedArray):
            return QuantizedArray(logical_to_sharding(logical, mesh, leaf.values.shape),
                                  logical_to_sharding(logical, mesh, leaf.scale.shape))
        return logical_to_sharding(logical, mesh, tuple(leaf.shape))

    return jax.tree.map(shard, param_logical_axes(cfg, head), param_shapes(cfg, head) if params is None else params,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def sharded_param_shapes(cfg: LlamaConfig, mesh: Mesh, head: str = "lm"):
    """param_shapes with their shardings on `mesh`: a restore or compile target."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        param_shapes(cfg, head), param_shardings(cfg, mesh, head=head))


def init_params(cfg: LlamaConfig, rng: jax.Array | int = 0, head: str = "lm"):
    """Random parameters (plain arrays, in cfg.param_dtype) on the default device."""
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(lambda r: nn.meta.unbox(Llama(cfg, head=head).init(r, tokens)["params"]))
    return init(rng)


def init_sharded_params(cfg: LlamaConfig, mesh: Mesh, seed: int | jax.Array = 0, head: str = "lm"):
    """Random parameters created shard by shard on `mesh` (the same values as `init_params(cfg, seed)`)."""
    rng = jax.random.key(seed) if isinstance(seed, int) else seed
    tokens = jnp.zeros((1, 1), jnp.int32)

    def init(r):
        with activation_sharding(mesh):
            return nn.meta.unbox(Llama(cfg, head=head).init(r, tokens)["params"])

    return jax.jit(init, out_shardings=param_shardings(cfg, mesh, head=head))(rng)
