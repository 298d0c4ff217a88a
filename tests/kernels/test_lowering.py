"""tests/kernels/lowering.py: a lowering test skips only where this jaxlib lacks the Triton / Mosaic modules."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tests.kernels import lowering
from tests.kernels.lowering import KERNEL_CALL, export_mlir


def _double(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_a_trivial_kernel_lowers_or_the_module_is_missing(platform):
    params = plgpu.CompilerParams(num_warps=4) if platform == "cuda" else None
    kernel = pl.pallas_call(_double, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32), compiler_params=params)
    assert export_mlir(kernel, platform, jax.ShapeDtypeStruct((8, 128), jnp.float32)).count(
        f"@{KERNEL_CALL[platform]}") == 1


def test_only_a_missing_module_skips_and_a_lowering_error_fails(monkeypatch):
    lowering.missing_lowering.cache_clear()
    monkeypatch.setitem(lowering.LOWERING_MODULES, "cuda", ("jaxlib.no_such_dialect",))
    with pytest.raises(pytest.skip.Exception, match="cannot lower Pallas for cuda: no jaxlib.no_such_dialect"):
        export_mlir(lambda x: x, "cuda", jax.ShapeDtypeStruct((8,), jnp.float32))
    lowering.missing_lowering.cache_clear()
    monkeypatch.undo()
    if lowering.missing_lowering("tpu") is not None:
        pytest.skip(lowering.missing_lowering("tpu"))

    def bad_block(x_ref, o_ref):  # a (3, 5) block of an (8, 128) array: Mosaic's tiling refuses it
        o_ref[...] = x_ref[...]

    spec = pl.BlockSpec((3, 5), lambda i: (i, 0))
    kernel = pl.pallas_call(bad_block, out_shape=jax.ShapeDtypeStruct((9, 128), jnp.float32), grid=(3,),
                            in_specs=[spec], out_specs=spec)
    with pytest.raises(ValueError, match="Pallas TPU lowering currently requires"):  # raised, not skipped
        export_mlir(kernel, "tpu", jax.ShapeDtypeStruct((9, 128), jnp.float32))
