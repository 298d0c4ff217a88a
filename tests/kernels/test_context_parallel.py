"""Attention with the sequence split over cp: on load-balanced (permuted) rows of packed documents,
outputs and gradients equal the unsplit XLA attention's, with the blocked XLA path and with the
Pallas flash kernel (interpreted) per device; cuDNN and splash, which mask by index, are refused."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import kernels
from llama_jax.kernels.reference import attention_reference, positional_attention_reference
from llama_jax.sharding import activation_sharding, axes, logical_to_sharding, make_mesh
from llama_jax.sharding.context import load_balance, restore_order
from tests.kernels.lowering import FAST_COMPILE, KERNEL_CALL, export_mlir

B, T, H, K, E = 2, 32, 4, 2, 16


def packed_rows():
    """q, k, v and two rows of documents [1..] whose boundaries fall inside cp chunks."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T, H, E), np.float32)
    k, v = (rng.standard_normal((B, T, K, E), np.float32) for _ in range(2))
    segment_ids = np.stack([np.repeat([1, 2, 3], [5, 14, 13]), np.repeat([1, 2], [23, 9])]).astype(np.int32)
    positions = np.zeros((B, T), np.int32)
    for b in range(B):
        for s in np.unique(segment_ids[b]):
            positions[b, segment_ids[b] == s] = np.arange((segment_ids[b] == s).sum())
    return q, k, v, positions, segment_ids


def test_positional_mask_equals_the_index_mask_in_row_order():
    q, k, v, positions, segment_ids = packed_rows()
    want = attention_reference(q, k, v, segment_ids)
    got = positional_attention_reference(q, k, v, positions, positions, segment_ids, segment_ids)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec, cp, impl", [("cp8", 8, "xla"), ("dp2,cp2,tp2", 2, "xla"), ("cp2", 2, "pallas"),
                                             ("dp2,cp2", 2, "pallas")])
def test_context_parallel_attention_and_grads_equal_the_unsplit_attention(spec, cp, impl):
    q, k, v, positions, segment_ids = packed_rows()

    def loss(q, k, v, positions, segment_ids, impl="xla"):
        out = kernels.attention(q, k, v, segment_ids, positions, impl=impl, interpret=True)
        return jnp.sum(jnp.sin(out)), out

    want_grads, want = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, positions, segment_ids)
    devices = math.prod(int(item.lstrip("dpct")) for item in spec.split(","))
    mesh = make_mesh(spec, devices=jax.devices()[:devices])

    @jax.jit
    def split(*args):
        with activation_sharding(mesh):
            return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(*args, impl=impl)

    # Rows over dp, tokens over cp, as the train step feeds them.
    balanced = [jax.device_put(load_balance(x, cp), logical_to_sharding(
        (axes.ACTIVATION_BATCH, axes.ACTIVATION_LENGTH) + (None,) * (x.ndim - 2), mesh, x.shape))
        for x in (q, k, v, positions, segment_ids)]
    compiled = split.lower(*balanced).compile(FAST_COMPILE)  # interpreted kernels: mostly compile time
    grads, out = compiled(*balanced)
    np.testing.assert_allclose(restore_order(np.asarray(out), cp), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(restore_order(np.asarray(g), cp), w, rtol=1e-5, atol=1e-5)
    # K/V gathered over cp going forward; their gradients reduce-scattered back to their owners.
    assert ("pallas_call" in str(jax.make_jaxpr(split)(*balanced))) == (impl == "pallas")
    hlo = compiled.as_text()
    assert "all-gather" in hlo and "reduce-scatter" in hlo


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_kernels_which_mask_by_index_are_refused_under_cp(impl):
    q, k, v, positions, segment_ids = packed_rows()
    with activation_sharding(make_mesh("cp8")), pytest.raises(ValueError, match=f"'{impl}' cannot run with the "
                                                                                 "sequence split over a context"):
        kernels.attention(q, k, v, segment_ids, positions, impl=impl)


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
@pytest.mark.parametrize("impl", ["auto", "xla", "flash_xla"])
def test_auto_and_xla_are_the_blocked_xla_path_under_cp_on_every_platform(impl, platform, monkeypatch):
    q, k, v, positions, segment_ids = packed_rows()
    seen = []
    monkeypatch.setattr(kernels, "platform", lambda: platform)
    monkeypatch.setattr(kernels.context_parallel, "attention", lambda *a, impl, interpret: seen.append(impl))
    with activation_sharding(make_mesh("cp8")):
        kernels.attention(q, k, v, segment_ids, positions, impl=impl)
    assert seen == ["flash_xla"]


@pytest.mark.parametrize("platform, lowering", [("cuda", "triton"), ("tpu", "mosaic")])
def test_cp_flash_path_lowers_for_device(platform, lowering, monkeypatch):
    """impl 'pallas' on cp4 with the backend's kernel (forward, dQ, dK/dV) inside the shard_map,
    exported for the device from this CPU: 1K queries per device against 4K gathered keys."""
    for where in ("llama_jax.kernels", "llama_jax.kernels.common"):  # as if this were the device's backend
        monkeypatch.setattr(f"{where}.default_lowering", lambda platform=None: lowering)
    mesh = make_mesh("cp4", devices=jax.devices()[:4])
    B, T, H, K, D = 1, 4096, 8, 2, 128

    def loss(q, k, v, positions, segment_ids):
        with activation_sharding(mesh):
            out = kernels.attention(q, k, v, segment_ids, positions, impl="pallas")
        return out.astype(jnp.float32).sum()

    rows = jax.ShapeDtypeStruct((B, T), jnp.int32)
    mlir = export_mlir(jax.value_and_grad(loss, argnums=(0, 1, 2)), platform,
                       jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16),
                       *[jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16)] * 2, rows, rows)
    assert mlir.count(f"@{KERNEL_CALL[platform]}") == 3
