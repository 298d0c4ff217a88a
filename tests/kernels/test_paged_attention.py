"""Paged attention (the gather reference, the blocked XLA path, both Pallas kernels in the
interpreter) against attention over the same keys and values laid out contiguously; the kernels'
lowering for cuda (Triton) and tpu (Mosaic)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.kernels.paged_attention import PagedBlockSizes, combine_splits, paged_attention
from llama_jax.kernels.paged_attention_xla import paged_attention_xla
from llama_jax.kernels.reference import cached_attention_reference, paged_attention_reference
from tests.kernels.lowering import FAST_COMPILE, KERNEL_CALL, export_mlir

B, H, K, D, P, M = 4, 8, 2, 16, 4, 12  # GQA 4:1; up to 48 positions per row in pages of 4


def _inputs(rng, T, H=H, K=K, D=D):
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


def _poison_unread_pages(pages, page_table, positions, pages_per_block):
    """NaN in every page of a block past each row's last position (all of a padding row's): a
    kernel that computes on one, even to mask it, returns NaN (0 * NaN). Triton never loads them;
    Mosaic never DMAs them, which the interpreter sees too."""
    bk = pages_per_block * P
    last = np.asarray(positions).max(axis=1)
    first_unread = np.where(last < 0, 0, (last // bk + 1) * pages_per_block)
    unread = [p for b in range(B) for p in np.asarray(page_table)[b, first_unread[b]:]]
    return pages.at[np.asarray(unread, np.int32)].set(jnp.nan)


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


def _kernel(lowering, block_sizes):
    f = functools.partial(paged_attention, lowering=lowering, block_sizes=block_sizes, interpret=True)
    return lambda *args: jax.jit(f).lower(*args).compile(FAST_COMPILE)(*args)


# (lowering, positions per row, pages per block, splits, heads H / K / D): Mosaic's lanes are one
# full-width tile of both kv heads at D 16, two tiles of two heads each (a lane offset) at D 64.
KERNEL_CASES = [
    pytest.param("triton", 1, 1, None, (H, K, D), id="triton-decode-j1"),
    pytest.param("triton", 5, 2, 3, (H, K, D), id="triton-chunk5-j2-split3"),
    pytest.param("triton", 5, 4, 1, (H, K, D), id="triton-chunk5-j4-split1"),
    pytest.param("mosaic", 1, 2, 3, (H, K, D), id="mosaic-decode-j2-split3"),
    pytest.param("mosaic", 5, 4, 1, (H, K, D), id="mosaic-chunk5-j4-split1"),
    pytest.param("mosaic", 1, 3, None, (8, 4, 64), id="mosaic-decode-j3-gqa2-d64-two-tiles"),
]


@pytest.mark.parametrize("lowering, T, pages_per_block, num_splits, heads", KERNEL_CASES)
def test_pallas_kernel_in_the_interpreter_equals_the_reference(lowering, T, pages_per_block, num_splits, heads):
    q, _, (k_pages, v_pages), page_table, positions = _inputs(np.random.default_rng(10 + T), T, *heads)
    expected = paged_attention_reference(q, k_pages, v_pages, page_table, positions)
    k_pages, v_pages = (_poison_unread_pages(x, page_table, positions, pages_per_block) for x in (k_pages, v_pages))
    assert np.isnan(np.asarray(k_pages)).any()
    sizes = PagedBlockSizes(pages_per_block=pages_per_block, block_rows=8, num_splits=num_splits)
    out = _kernel(lowering, sizes)(q, k_pages, v_pages, page_table, positions)
    real = np.asarray(positions[:, 0] >= 0)
    np.testing.assert_allclose(out[real], expected[real], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(out[~real], 0)  # a padding row sees nothing


def test_mosaic_kernel_in_the_tpu_interpreter_equals_the_reference():
    """The TPU interpreter runs the DMAs and semaphore waits as a TPU orders them (each page copy
    into the buffer it is read from, the next block's copies in flight during this block's
    compute) and checks for races between them."""
    from jax.experimental.pallas import tpu as pltpu

    q, _, (k_pages, v_pages), page_table, positions = _inputs(np.random.default_rng(3), 2, 8, 4, 64)
    expected = paged_attention_reference(q, k_pages, v_pages, page_table, positions)
    k_pages, v_pages = (_poison_unread_pages(x, page_table, positions, 3) for x in (k_pages, v_pages))
    out = paged_attention(q, k_pages, v_pages, page_table, positions, lowering="mosaic",
                          block_sizes=PagedBlockSizes(pages_per_block=3, block_rows=8, num_splits=2),
                          interpret=pltpu.InterpretParams(detect_races=True))
    real = np.asarray(positions[:, 0] >= 0)
    np.testing.assert_allclose(out[real], expected[real], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(out[~real], 0)


def test_combine_splits_of_an_empty_split():
    """A split past the end of a row contributes (acc 0, max floor, sum 0): no effect."""
    acc = jnp.array([[[[[2.0, 4.0]]]], [[[[0.0, 0.0]]]]])  # [S=2, B, K, R, D]
    m = jnp.array([[[[1.0]]], [[[-3e38]]]])
    l = jnp.array([[[[2.0]]], [[[0.0]]]])
    np.testing.assert_allclose(combine_splits(acc, m, l), [[[[1.0, 2.0]]]])


def test_input_errors():
    q, _, (k_pages, v_pages), page_table, positions = _inputs(np.random.default_rng(0), 1)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_attention(q[:, :, :3], k_pages, v_pages, page_table, positions, interpret=True)
    with pytest.raises(ValueError, match="must have q's batch"):
        paged_attention(q, k_pages, v_pages, page_table[:2], positions, interpret=True)
    with pytest.raises(ValueError, match="whole vregs"):
        paged_attention(q, k_pages, v_pages, page_table, positions, lowering="mosaic", interpret=True,
                        block_sizes=PagedBlockSizes(pages_per_block=40, block_rows=8))


@pytest.mark.parametrize("platform, lowering", [("cuda", "triton"), ("tpu", "mosaic")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("T, H, K, D", [pytest.param(1, 32, 8, 128, id="decode-gqa4-d128"),
                                        pytest.param(16, 32, 8, 64, id="chunk16-gqa4-d64")])
def test_pallas_kernel_lowers_for_device(platform, lowering, dtype, T, H, K, D):
    args = (jax.ShapeDtypeStruct((8, T, H, D), dtype), jax.ShapeDtypeStruct((1024, 16, K, D), dtype),
            jax.ShapeDtypeStruct((1024, 16, K, D), dtype), jax.ShapeDtypeStruct((8, 130), jnp.int32),
            jax.ShapeDtypeStruct((8, T), jnp.int32))
    kernel = functools.partial(paged_attention, lowering=lowering)
    assert export_mlir(kernel, platform, *args).count(f"@{KERNEL_CALL[platform]}") == 1
