"""Sharding: logical axis names (axes.py), THE rules table (rules.py), mesh strings and multi-process
start-up (mesh.py), context parallelism's load-balanced token order (context.py). The model's
parameters on a mesh are llama_jax/params.py's (it needs the model; nothing here does).

    mesh = make_mesh("dp2,fsdp2,tp2")
    params = llama_jax.params.init_sharded_params(cfg, mesh, seed=0)
"""

from llama_jax.sharding.mesh import initialize_distributed, make_mesh, mesh_str, parse_mesh
from llama_jax.sharding.rules import (
    BATCH_AXES, CONTEXT, DATA, FSDP, MESH_AXES, RULES, TENSOR, activation_sharding, batch_split,
    logical_to_sharding, logical_to_spec, tree_shardings,
)

__all__ = ["RULES", "MESH_AXES", "DATA", "FSDP", "CONTEXT", "TENSOR", "BATCH_AXES", "logical_to_spec", "logical_to_sharding",
           "tree_shardings", "activation_sharding", "batch_split", "parse_mesh", "make_mesh", "mesh_str",
           "initialize_distributed"]
