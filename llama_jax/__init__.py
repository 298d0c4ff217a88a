"""llama_jax: Llama 3 text models in JAX/Flax.

    import llama_jax
    cfg = llama_jax.LlamaConfig.preset("llama3.2-1b")
    logits = llama_jax.Llama(cfg).apply({"params": params}, tokens)
"""

from llama_jax.checkpoint import load, save
from llama_jax.config import PRESETS, LlamaConfig, RopeScaling
from llama_jax.model import Llama, init_params, param_logical_axes, param_shapes

__all__ = ["LlamaConfig", "RopeScaling", "PRESETS", "Llama", "init_params", "param_logical_axes", "param_shapes",
           "load", "save"]
