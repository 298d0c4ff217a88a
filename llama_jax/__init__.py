"""llama_jax: Llama 3 text models in JAX/Flax.

    import llama_jax
    cfg = llama_jax.LlamaConfig.preset("llama3.2-1b")
    logits = llama_jax.Llama(cfg).apply({"params": params}, tokens)
"""

from llama_jax.sharding.mesh import size_cpu_thread_pool

# Before jax creates its CPU client: fake-device meshes (XLA_FLAGS' host device count) need a thread
# pool deeper than XLA's default or their collectives can starve each other (sharding/mesh.py says why).
size_cpu_thread_pool()

from llama_jax.config import PRESETS, LlamaConfig, RopeScaling  # noqa: E402

# The model, its parameters and checkpoints bring flax, orbax and the attention kernels: imported on
# first use, so that `import llama_jax.config` (a CLI reading its flags, a test of a config) does not.
_LAZY = {"Llama": "llama_jax.model", "init_params": "llama_jax.params", "param_logical_axes": "llama_jax.params",
         "param_shapes": "llama_jax.params", "load": "llama_jax.checkpoint", "save": "llama_jax.checkpoint"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'llama_jax' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = ["LlamaConfig", "RopeScaling", "PRESETS", "Llama", "init_params", "param_logical_axes", "param_shapes",
           "load", "save"]
