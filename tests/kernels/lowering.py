"""Cross-platform lowering: export a jitted function for cuda / tpu from a CPU-only machine.

This traces the Pallas kernels through their real Triton / Mosaic lowering (block-shape rules,
primitive support, grid and index maps), which is the only evidence CI has that the GPU and TPU
kernels compile. It stops short of Triton's PTX compile and of the Mosaic compiler proper, which
run only on the device.
"""

import functools
import importlib

import jax
import pytest

# Pallas custom calls carry no serialization-compatibility guarantee; we never serialize.
_DISABLED = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
# Interpreted kernels unroll into large CPU programs whose XLA compile dominates test time; the
# optimiser buys nothing at test sizes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# What a jaxlib needs to lower Pallas for each platform: the dialect bindings (built into jaxlib or not)
# and JAX's lowering of Pallas onto them.
LOWERING_MODULES = {"cuda": ("jaxlib.triton.dialect", "jax._src.pallas.triton.pallas_call_registration"),
                    "tpu": ("jaxlib.mosaic.python.tpu", "jax._src.pallas.mosaic.pallas_call_registration")}


@functools.cache
def missing_lowering(platform) -> str | None:
    """Why this jaxlib cannot lower Pallas for `platform` (a module it lacks), or None if it has the modules.
    Only an absent module skips: with the modules present, a kernel that fails to lower is a failure."""
    for module in LOWERING_MODULES[platform]:
        try:
            importlib.import_module(module)
        except ImportError as e:
            return f"this jaxlib cannot lower Pallas for {platform}: no {module} ({e})"[:300]
    return None


def export_mlir(f, platform, *args) -> str:
    """StableHLO text of jit(f) exported for `platform`; skips if this jaxlib has no lowering for it."""
    reason = missing_lowering(platform)
    if reason:
        pytest.skip(reason)
    exported = jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=_DISABLED)(*args)
    return exported.mlir_module()
