"""llama_jax: Llama 3 text models in JAX/Flax.

    import llama_jax
    cfg = llama_jax.LlamaConfig.preset("llama3.2-1b")
    logits = llama_jax.Llama(cfg).apply({"params": params}, tokens)
"""

from llama_jax.sharding.mesh import size_cpu_thread_pool

# Before jax creates its CPU client: fake-device meshes (XLA_FLAGS' host device count) need a thread
# pool deeper than XLA's default or their collectives can starve each other (sharding/mesh.py says why).
size_cpu_thread_pool()

from llama_jax.checkpoint import load, save  # noqa: E402
from llama_jax.config import PRESETS, LlamaConfig, RopeScaling  # noqa: E402
from llama_jax.model import Llama  # noqa: E402
from llama_jax.params import init_params, param_logical_axes, param_shapes  # noqa: E402

__all__ = ["LlamaConfig", "RopeScaling", "PRESETS", "Llama", "init_params", "param_logical_axes", "param_shapes",
           "load", "save"]
