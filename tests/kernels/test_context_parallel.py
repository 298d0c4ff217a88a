"""Attention with the sequence split over cp: on load-balanced (permuted) rows of packed documents,
outputs and gradients equal the unsplit XLA attention's; the flash kernels are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import kernels
from llama_jax.kernels.reference import attention_reference, positional_attention_reference
from llama_jax.sharding import activation_sharding, axes, logical_to_sharding, make_mesh
from llama_jax.sharding.context import load_balance, restore_order

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


@pytest.mark.parametrize("spec, cp", [("cp8", 8), ("dp2,cp2,tp2", 2)])
def test_context_parallel_attention_and_grads_equal_the_unsplit_attention(spec, cp):
    q, k, v, positions, segment_ids = packed_rows()

    def loss(q, k, v, positions, segment_ids):
        out = kernels.attention(q, k, v, segment_ids, positions, impl="xla")
        return jnp.sum(jnp.sin(out)), out

    want_grads, want = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, positions, segment_ids)
    mesh = make_mesh(spec)

    @jax.jit
    def split(*args):
        with activation_sharding(mesh):
            return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(*args)

    # Rows over dp, tokens over cp, as the train step feeds them.
    balanced = [jax.device_put(load_balance(x, cp), logical_to_sharding(
        (axes.ACTIVATION_BATCH, axes.ACTIVATION_LENGTH) + (None,) * (x.ndim - 2), mesh, x.shape))
        for x in (q, k, v, positions, segment_ids)]
    grads, out = split(*balanced)
    np.testing.assert_allclose(restore_order(np.asarray(out), cp), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(restore_order(np.asarray(g), cp), w, rtol=1e-5, atol=1e-5)
    # K/V gathered over cp going forward; their gradients reduce-scattered back to their owners.
    hlo = split.lower(*balanced).compile().as_text()
    assert "all-gather" in hlo and "reduce-scatter" in hlo


@pytest.mark.parametrize("impl", ["pallas", "cudnn"])
def test_kernels_that_mask_by_index_are_refused_under_cp(impl):
    q, k, v, positions, segment_ids = packed_rows()
    with activation_sharding(make_mesh("cp8")), pytest.raises(ValueError, match="context-parallel"):
        kernels.attention(q, k, v, segment_ids, positions, impl=impl)
