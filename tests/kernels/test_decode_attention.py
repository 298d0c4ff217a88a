"""Decode attention kernels (both lowerings, Pallas interpreter) against the XLA reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.kernels.decode_attention import DecodeBlockSizes, combine_splits, decode_attention
from llama_jax.kernels.reference import cached_attention_reference
from tests.kernels.lowering import FAST_COMPILE, KERNEL_CALL, export_mlir

TEST_BLOCKS = {"triton": DecodeBlockSizes(block_k=16, block_rows=16, num_splits=3),
               "mosaic": DecodeBlockSizes(block_k=128, block_rows=8, num_splits=2)}


def _inputs(rng, B, T, H, K, D, S, dtype):
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((B, S, K, D)), dtype) for _ in range(2))
    # Ragged: each sequence ends somewhere else in the cache, some in its very first block.
    last = rng.integers(T - 1, S, size=B)
    last[0] = T - 1
    positions = jnp.asarray(last[:, None] - (T - 1) + np.arange(T)[None], jnp.int32)
    return q, k, v, positions


def _decode(lowering, q, k, v, positions, block_sizes=None):
    f = lambda q, k, v, p: decode_attention(q, k, v, p, lowering=lowering, interpret=True,
                                            block_sizes=block_sizes or TEST_BLOCKS[lowering])
    return jax.jit(f).lower(q, k, v, positions).compile(FAST_COMPILE)(q, k, v, positions)


def _poison_past_the_end(cache_BSKD, positions, block_k):
    """NaN in every cache block past each sequence's last position: a kernel that computes on
    one, even to mask it, returns NaN (0 * NaN). Triton never loads them; Mosaic's clamped index
    map (no DMA) is invisible to the interpreter, but its skipped compute is checked."""
    S = cache_BSKD.shape[1]
    first_unread = -(-(positions.max(axis=1) + 1) // block_k) * block_k
    unread = jnp.arange(S)[None, :] >= first_unread[:, None]
    return jnp.where(unread[:, :, None, None], jnp.nan, cache_BSKD)


# (batch, positions per sequence, q heads, kv heads, head_dim, cache slots)
CASES = [
    pytest.param(4, 1, 8, 2, 128, 384, id="decode-gqa4-d128"),
    pytest.param(3, 1, 8, 1, 64, 256, id="decode-gqa8-d64"),
    pytest.param(2, 3, 4, 4, 64, 512, id="speculative3-mha-d64"),
]


@pytest.mark.parametrize("lowering", ["triton", "mosaic"])
@pytest.mark.parametrize("B,T,H,K,D,S", CASES)
def test_float32_matches_reference_ragged(lowering, B, T, H, K, D, S):
    rng = np.random.default_rng(B * 100 + S)
    q, k, v, positions = _inputs(rng, B, T, H, K, D, S, jnp.float32)
    want = cached_attention_reference(q, k, v, positions)
    bk = TEST_BLOCKS[lowering].block_k
    k, v = (_poison_past_the_end(c, positions, bk) for c in (k, v))
    assert np.isnan(k).any()
    got = _decode(lowering, q, k, v, positions)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lowering", ["triton", "mosaic"])
def test_bfloat16_and_masked_rows(lowering):
    """bf16 within 2e-2; a query with no visible slot (position -1, a padding row) gives 0."""
    rng = np.random.default_rng(11)
    q, k, v, positions = _inputs(rng, 3, 2, 8, 2, 128, 256, jnp.bfloat16)
    positions = positions.at[1, 0].set(-1)
    got = np.asarray(_decode(lowering, q, k, v, positions), np.float32)
    want = np.asarray(cached_attention_reference(q, k, v, positions), np.float32)
    assert np.isfinite(got).all()
    assert (got[1, 0] == 0).all()
    seen = np.asarray(positions >= 0)
    err = np.abs(got[seen] - want[seen]).max() / np.abs(want[seen]).max()
    assert err < 2e-2, err


def test_split_count_does_not_change_the_result():
    rng = np.random.default_rng(5)
    q, k, v, positions = _inputs(rng, 2, 1, 4, 2, 64, 256, jnp.float32)
    outs = [_decode("triton", q, k, v, positions,
                    DecodeBlockSizes(block_k=32, block_rows=16, num_splits=n)) for n in (1, 8)]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6, rtol=1e-6)


def test_combine_splits_of_an_empty_split():
    """A split past the end of a sequence contributes (acc 0, max floor, sum 0): no effect."""
    acc = jnp.array([[[[[2.0, 4.0]]]], [[[[0.0, 0.0]]]]])  # [P=2, B, K, R, D]
    m = jnp.array([[[[1.0]]], [[[-3e38]]]])
    l = jnp.array([[[[2.0]]], [[[0.0]]]])
    np.testing.assert_allclose(combine_splits(acc, m, l), [[[[1.0, 2.0]]]])


def test_input_errors():
    q = jnp.zeros((2, 1, 8, 64))
    cache = jnp.zeros((2, 256, 2, 64))
    pos = jnp.zeros((2, 1), jnp.int32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode_attention(q, jnp.zeros((2, 256, 3, 64)), jnp.zeros((2, 256, 3, 64)), pos,
                         interpret=True)
    with pytest.raises(ValueError, match="q_positions"):
        decode_attention(q, cache, cache, jnp.zeros((2,), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="block_k dividing it"):
        odd = jnp.zeros((2, 200, 2, 64))
        decode_attention(q, odd, odd, pos, lowering="mosaic", interpret=True)


@pytest.mark.parametrize("platform,lowering", [("cuda", "triton"), ("tpu", "mosaic")])
@pytest.mark.parametrize("B,T,H,K,D,S", [
    pytest.param(8, 1, 32, 8, 128, 32768, id="decode-32k"),
    pytest.param(2, 4, 32, 8, 64, 8192, id="speculative-d64"),
])
def test_kernel_lowers_for_device(platform, lowering, B, T, H, K, D, S):
    mlir = export_mlir(lambda q, k, v, p: decode_attention(q, k, v, p, lowering=lowering),
                       platform,
                       jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16),
                       jax.ShapeDtypeStruct((B, S, K, D), jnp.bfloat16),
                       jax.ShapeDtypeStruct((B, S, K, D), jnp.bfloat16),
                       jax.ShapeDtypeStruct((B, T), jnp.int32))
    assert mlir.count(f"@{KERNEL_CALL[platform]}") == 1
