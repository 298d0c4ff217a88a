"""llama_jax: Llama 3 text models in JAX/Flax.

    import llama_jax
    cfg = llama_jax.LlamaConfig.preset("llama3.2-1b")
    logits = llama_jax.Llama(cfg).apply({"params": params}, tokens)

The names below are imported on first use, so the plain-Python parts (the engine's scheduler, the
server's protocol, a CLI's --help) load without jax.
"""

from llama_jax.cpu_threads import size_cpu_thread_pool
from llama_jax.lazy import lazy_getattr

# Before jax creates its CPU client: fake-device meshes (XLA_FLAGS' host device count) need a thread
# pool deeper than XLA's default or their collectives can starve each other (cpu_threads.py says why).
size_cpu_thread_pool()

_EXPORTS = {
    "load": "checkpoint", "save": "checkpoint",
    "LlamaConfig": "config", "RopeScaling": "config", "PRESETS": "config",
    "Llama": "model",
    "init_params": "params", "param_logical_axes": "params", "param_shapes": "params",
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
