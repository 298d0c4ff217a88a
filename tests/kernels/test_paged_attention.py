"""Paged attention (the gather reference, the blocked XLA path, the Pallas kernel in the
interpreter) against attention over the same keys and values laid out contiguously; the kernel's
lowering for cuda."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.kernels.paged_attention import PagedBlockSizes, paged_attention
from llama_jax.kernels.paged_attention_xla import paged_attention_xla
from llama_jax.kernels.reference import cached_attention_reference, paged_attention_reference
from tests.kernels.lowering import KERNEL_CALL, export_mlir

B, H, K, D, P, M = 4, 8, 2, 16, 4, 12  # GQA 4:1; up to 48 positions per row in pages of 4


def _inputs(rng, T):
    """A contiguous cache [B, M*P, K, D], the same scattered over a pool of pages in a shuffled
    order (more pages than the rows need), and ragged query positions (row 1 a padding row)."""
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    k, v = (rng.standard_normal((B, M * P, K, D)).astype(np.float32) for _ in range(2))
    page_table = rng.permutation(B * M + 5)[:B * M].reshape(B, M).astype(np.int32)
    pool = lambda x: np.zeros((B * M + 5, P, K, D), np.float32)  # noqa: E731
    k_pages, v_pages = pool(k), pool(v)
    k_pages[page_table] = k.reshape(B, M, P, K, D)
    v_pages[page_table] = v.reshape(B, M, P, K, D)
    last = np.array([T - 1, T - 1, 20, M * P - 1])  # in the first page, ..., in the last slot
    positions = last[:, None] - (T - 1) + np.arange(T)[None]
    positions[1] = -1
    return q, (jnp.asarray(k), jnp.asarray(v)), (jnp.asarray(k_pages), jnp.asarray(v_pages)), \
        jnp.asarray(page_table), jnp.asarray(positions, jnp.int32)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("pages_per_block", [1, 5, 16])
def test_paged_attention_equals_contiguous_attention(T, pages_per_block):
    q, (k, v), (k_pages, v_pages), page_table, positions = _inputs(np.random.default_rng(T), T)
    expected = cached_attention_reference(q, k, v, positions)
    real = np.asarray(positions[:, 0] >= 0)  # a padding row's output is arbitrary
    reference = paged_attention_reference(q, k_pages, v_pages, page_table, positions)
    np.testing.assert_allclose(reference[real], expected[real], atol=1e-5, rtol=1e-5)
    blocked = jax.jit(functools.partial(paged_attention_xla, pages_per_block=pages_per_block))
    out = blocked(q, k_pages, v_pages, page_table, positions)
    np.testing.assert_allclose(out[real], expected[real], atol=1e-5, rtol=1e-5)
    assert np.isfinite(np.asarray(out)).all()


def test_blocked_path_reads_only_the_blocks_up_to_the_furthest_position():
    # NaN in every page past position 20 of each row: the furthest query (20) needs pages 0..5.
    q, _, (k_pages, v_pages), page_table, positions = _inputs(np.random.default_rng(0), 1)
    positions = positions.at[3].set(20)
    expected = paged_attention_reference(q, k_pages, v_pages, page_table, positions)
    unread = np.asarray(page_table[:, 6:]).ravel()
    k_pages, v_pages = (x.at[unread].set(jnp.nan) for x in (k_pages, v_pages))
    out = paged_attention_xla(q, k_pages, v_pages, page_table, positions, pages_per_block=2)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out[np.array([0, 2, 3])], expected[np.array([0, 2, 3])], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("pages_per_block, num_splits", [(1, None), (2, 3), (4, 1)])
def test_pallas_kernel_in_the_interpreter_equals_the_reference(T, pages_per_block, num_splits):
    q, _, (k_pages, v_pages), page_table, positions = _inputs(np.random.default_rng(10 + T), T)
    expected = paged_attention_reference(q, k_pages, v_pages, page_table, positions)
    sizes = PagedBlockSizes(pages_per_block=pages_per_block, num_splits=num_splits)
    kernel = jax.jit(functools.partial(paged_attention, block_sizes=sizes, interpret=True))
    out = kernel(q, k_pages, v_pages, page_table, positions)
    real = np.asarray(positions[:, 0] >= 0)
    np.testing.assert_allclose(out[real], expected[real], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(out[~real], 0)  # a padding row sees nothing


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_kernel_lowers_for_cuda(dtype):
    args = (jax.ShapeDtypeStruct((8, 1, 32, 128), dtype), jax.ShapeDtypeStruct((1024, 16, 8, 128), dtype),
            jax.ShapeDtypeStruct((1024, 16, 8, 128), dtype), jax.ShapeDtypeStruct((8, 130), jnp.int32),
            jax.ShapeDtypeStruct((8, 1), jnp.int32))
    assert KERNEL_CALL["cuda"] in export_mlir(paged_attention, "cuda", *args)
