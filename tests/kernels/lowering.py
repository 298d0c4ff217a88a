"""Cross-platform lowering: export a jitted function for cuda / tpu from a CPU-only machine.

This traces the Pallas kernels through their real Triton / Mosaic lowering (block-shape rules,
primitive support, grid and index maps), which is the only evidence CI has that the GPU and TPU
kernels compile. It stops short of Triton's PTX compile and of the Mosaic compiler proper, which
run only on the device.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Pallas custom calls carry no serialization-compatibility guarantee; we never serialize.
_DISABLED = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
# Interpreted kernels unroll into large CPU programs whose XLA compile dominates test time; the
# optimiser buys nothing at test sizes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _double(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2


def _probe(platform):
    params = plgpu.CompilerParams(num_warps=4) if platform == "cuda" else None
    f = pl.pallas_call(_double, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                       compiler_params=params)
    jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=_DISABLED)(
        jax.ShapeDtypeStruct((8, 128), jnp.float32))


@functools.cache
def missing_lowering(platform) -> str | None:
    """Why this jaxlib cannot lower a trivial Pallas kernel for `platform`, or None if it can."""
    try:
        _probe(platform)
    except Exception as e:  # noqa: BLE001 - any failure of the trivial kernel means no machinery
        return f"this jaxlib cannot lower Pallas for {platform}: {type(e).__name__}: {e}"[:300]
    return None


def export_mlir(f, platform, *args) -> str:
    """StableHLO text of jit(f) exported for `platform`; skips if the machinery is absent."""
    reason = missing_lowering(platform)
    if reason:
        pytest.skip(reason)
    exported = jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=_DISABLED)(*args)
    return exported.mlir_module()
