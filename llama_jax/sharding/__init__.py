"""Sharding: logical axis names (axes.py), THE rules table (rules.py), mesh strings and multi-process
start-up (mesh.py), context parallelism's load-balanced token order (context.py), and parameters
placed on a mesh (params.py; import it directly, it needs the model).

    mesh = make_mesh("dp2,fsdp2,tp2")
    params = llama_jax.sharding.params.init_params(cfg, mesh, seed=0)
"""

from llama_jax.sharding.mesh import initialize_distributed, make_mesh, mesh_str, parse_mesh
from llama_jax.sharding.rules import (
    BATCH_AXES, CONTEXT, DATA, FSDP, MESH_AXES, RULES, TENSOR, activation_sharding, logical_to_sharding,
    logical_to_spec, tree_shardings,
)

__all__ = ["RULES", "MESH_AXES", "DATA", "FSDP", "CONTEXT", "TENSOR", "BATCH_AXES", "logical_to_spec", "logical_to_sharding",
           "tree_shardings", "activation_sharding", "parse_mesh", "make_mesh", "mesh_str", "initialize_distributed"]
