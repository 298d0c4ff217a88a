"""Flash attention kernels (both lowerings, Pallas interpreter) against the XLA reference."""

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.kernels.flash_attention import BlockSizes, flash_attention
from llama_jax.kernels.common import MASK_VALUE
from llama_jax.kernels.reference import attention_reference
from tests.kernels.lowering import FAST_COMPILE, KERNEL_CALL, export_mlir

# Small blocks so a short sequence spans several of them, with a ragged tail; query and key
# blocks differ so the block arithmetic cannot hide behind bq == bk. Mosaic key blocks are
# whole 128-lane vregs.
TEST_BLOCKS = {"triton": BlockSizes(block_q=16, block_k=32, block_q_bwd=32, block_k_bwd=16),
               "mosaic": BlockSizes(block_q=32, block_k=128, block_q_bwd=64, block_k_bwd=128)}
SEQ_RANGE = {"triton": (33, 100), "mosaic": (130, 260)}


def _segments(rng, B, T, max_doc=12):
    """Packed documents of 1..max_doc tokens: many short segments per row."""
    lengths = rng.integers(1, max_doc + 1, size=(B, T))
    starts = np.cumsum(lengths, axis=1)
    return jnp.asarray(np.stack([np.searchsorted(s, np.arange(T), side="right") for s in starts]),
                       jnp.int32)


def _inputs(rng, lowering, B, H, K, D, dtype, segments, T=None):
    if T is None:
        lo, hi = SEQ_RANGE[lowering]
        T = int(rng.integers(lo, hi))
        T += T % 16 == 0  # never a block multiple
    q, k, v, do = (jnp.asarray(rng.standard_normal(shape), dtype)
                   for shape in [(B, T, H, D), (B, T, K, D), (B, T, K, D), (B, T, H, D)])
    return q, k, v, do, (_segments(rng, B, T) if segments else None)


def _out_and_grads(f, q, k, v, do):
    """Output and input gradients of f under cotangent do, compiled once (interpreted kernels
    are mostly compile time)."""

    def run(q, k, v, do):
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(do))

    return jax.jit(run).lower(q, k, v, do).compile(FAST_COMPILE)(q, k, v, do)


def _max_rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a - b).max() / np.abs(b).max()


# (batch, q heads, kv heads, head_dim, causal, segments): GQA ratios 1, 4, 8 and 3 (Llama 3.2
# 3B); D 64 and 128.
CASES = [
    pytest.param(1, 4, 4, 64, True, False, id="mha-d64-causal"),
    pytest.param(2, 8, 2, 64, True, True, id="gqa4-d64-causal-docs"),
    pytest.param(1, 8, 1, 128, True, True, id="gqa8-d128-causal-docs"),
    pytest.param(1, 6, 2, 128, False, False, id="gqa3-d128-bidirectional"),
]


@pytest.mark.parametrize("lowering", ["triton", "mosaic"])
@pytest.mark.parametrize("B,H,K,D,causal,segments", CASES)
def test_float32_matches_reference(lowering, B, H, K, D, causal, segments, request):
    rng = np.random.default_rng(zlib.crc32(request.node.callspec.id.encode()))
    q, k, v, do, seg = _inputs(rng, lowering, B, H, K, D, jnp.float32, segments)
    got = _out_and_grads(lambda q, k, v: flash_attention(
        q, k, v, seg, causal=causal, block_sizes=TEST_BLOCKS[lowering], lowering=lowering,
        interpret=True), q, k, v, do)
    want = _out_and_grads(lambda q, k, v: attention_reference(q, k, v, seg, causal=causal),
                          q, k, v, do)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("lowering", ["triton", "mosaic"])
def test_bfloat16_matches_reference(lowering):
    rng = np.random.default_rng(7)
    q, k, v, do, seg = _inputs(rng, lowering, 1, 8, 2, 128, jnp.bfloat16, segments=True)
    got = _out_and_grads(lambda q, k, v: flash_attention(
        q, k, v, seg, block_sizes=TEST_BLOCKS[lowering], lowering=lowering, interpret=True),
        q, k, v, do)
    want = _out_and_grads(lambda q, k, v: attention_reference(q, k, v, seg), q, k, v, do)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        assert g.dtype == jnp.bfloat16, name
        assert _max_rel(g, w) < 2e-2, (name, _max_rel(g, w))


def _masked_reference(q, k, v, mask_BTS):
    """Grouped attention under an arbitrary mask; rows that see no key give 0 (kernel contract)."""
    B, T, H, D = q.shape
    K = k.shape[2]
    s = jnp.einsum("btkgd,bskd->bkgts", q.reshape(B, T, K, H // K, D), k) * D ** -0.5
    p = jax.nn.softmax(jnp.where(mask_BTS[:, None, None], s, MASK_VALUE), axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, H, D)
    return jnp.where(mask_BTS.any(-1)[:, :, None, None], o, 0.0)


@pytest.mark.parametrize("lowering", ["triton", "mosaic"])
def test_rows_that_see_no_key_are_zero_not_nan(lowering):
    rng = np.random.default_rng(3)
    q, k, v, do, seg = _inputs(rng, lowering, 2, 4, 2, 64, jnp.float32, segments=True)
    kv_seg = jnp.where(seg == 2, 99, seg)  # no key left in document 2: its queries see nothing
    got = _out_and_grads(lambda q, k, v: flash_attention(
        q, k, v, seg, kv_segment_ids_BS=kv_seg, block_sizes=TEST_BLOCKS[lowering],
        lowering=lowering, interpret=True), q, k, v, do)
    T = q.shape[1]
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & (seg[:, :, None] == kv_seg[:, None, :])
    want = _out_and_grads(lambda q, k, v: _masked_reference(q, k, v, mask), q, k, v, do)
    blind = seg == 2
    assert blind.any()
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)
    out, dq, dk, dv = got
    assert (out[blind] == 0).all() and (dq[blind] == 0).all()
    assert (dk[blind] == 0).all() and (dv[blind] == 0).all()  # keys nobody sees


def test_input_errors():
    q = jnp.zeros((1, 40, 4, 64))
    kv = jnp.zeros((1, 40, 2, 64))
    run = lambda *a, **kw: flash_attention(*a, interpret=True, **kw)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        run(q, jnp.zeros((1, 40, 3, 64)), jnp.zeros((1, 40, 3, 64)))
    with pytest.raises(ValueError, match=r"\[B, T, K, D\]"):
        run(q, kv, jnp.zeros((1, 40, 2, 32)))
    with pytest.raises(ValueError, match="segment ids"):
        run(q, kv, kv, jnp.zeros((1, 39), jnp.int32))
    with pytest.raises(ValueError, match="power of two"):
        run(q, kv, kv, block_sizes=BlockSizes(24, 32, 32, 32), lowering="triton")
    with pytest.raises(ValueError, match="multiple of 128"):
        run(q, kv, kv, block_sizes=BlockSizes(16, 64, 16, 128), lowering="mosaic")
    with pytest.raises(ValueError, match="unknown lowering"):
        run(q, kv, kv, lowering="cuda")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret=True"):
            flash_attention(q, kv, kv)


def _load_balanced(T, cp, device):
    """(query indices of one device, key indices of the whole gathered row) in context
    parallelism's load-balanced order: 2 * cp chunks, device d holding chunks d and 2*cp-1-d."""
    chunks = np.array_split(np.arange(T), 2 * cp)
    order = [np.concatenate([chunks[d], chunks[2 * cp - 1 - d]]) for d in range(cp)]
    return order[device], np.concatenate(order)


def _positions(idx, B):
    return jnp.broadcast_to(jnp.asarray(idx, jnp.int32), (B, len(idx)))


def _permuted(q_idx, k_idx, lowering, seg, poison_BS=None):
    """flash_attention over the tokens q_idx attending to k_idx, masked by their positions, as a
    function of q, k, v in order; keys where poison_BS is set hold NaN."""

    def f(q, k, v):
        k, v = k[:, k_idx], v[:, k_idx]
        if poison_BS is not None:
            k, v = (jnp.where(poison_BS[:, :, None, None], jnp.nan, x) for x in (k, v))
        B = q.shape[0]
        return flash_attention(q[:, q_idx], k, v, seg[:, q_idx], kv_segment_ids_BS=seg[:, k_idx],
                               q_positions_BT=_positions(q_idx, B), kv_positions_BS=_positions(k_idx, B),
                               block_sizes=TEST_BLOCKS[lowering], lowering=lowering, interpret=True)

    return f


def _check_against_reference(f, q_idx, q, k, v, seg, rng):
    do = jnp.asarray(rng.standard_normal((q.shape[0], len(q_idx), *q.shape[2:])), jnp.float32)
    got = _out_and_grads(f, q, k, v, do)
    want = _out_and_grads(lambda q, k, v: attention_reference(q, k, v, seg)[:, q_idx], q, k, v, do)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("lowering", ["triton", "mosaic"])
def test_positions_in_shuffled_order_match_the_reference(lowering):
    """Causal masking by positions: every token shuffled (GQA 4, packed documents) gives the
    reference's output and gradients on the tokens in order."""
    rng = np.random.default_rng(21)
    q, k, v, _, seg = _inputs(rng, lowering, 2, 8, 2, 64, jnp.float32, segments=True)
    order = rng.permutation(q.shape[1])
    _check_against_reference(_permuted(order, order, lowering, seg), order, q, k, v, seg, rng)


@pytest.mark.parametrize("lowering", ["triton", "mosaic"])
def test_positions_of_a_context_parallel_shard_skip_the_keys_it_never_sees(lowering):
    """One device of cp2 (chunks 1 and 2 of 4) against all keys in gathered order (0, 3, 1, 2):
    the reference's numbers, and chunk 3's key blocks, later than every query here, are never
    computed on: they hold NaN, which any visit would spread (0 * NaN)."""
    rng = np.random.default_rng(22)
    chunk = math.lcm(*dataclasses.astuple(TEST_BLOCKS[lowering])[:4])
    T = 4 * chunk
    q, k, v, _, seg = _inputs(rng, lowering, 2, 4, 1, 64, jnp.float32, segments=True, T=T)
    q_idx, k_idx = _load_balanced(T, cp=2, device=1)
    poison = jnp.broadcast_to(jnp.asarray(k_idx >= 3 * chunk), (2, T))
    f = _permuted(q_idx, k_idx, lowering, seg, poison)
    _check_against_reference(f, q_idx, q, k, v, seg, rng)


def test_position_errors():
    q = jnp.zeros((1, 40, 4, 64))
    kv = jnp.zeros((1, 40, 2, 64))
    pos = jnp.zeros((1, 40), jnp.int32)
    run = lambda *a, **kw: flash_attention(*a, interpret=True, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="positions only order causal attention"):
        run(q, kv, kv, q_positions_BT=pos, causal=False)
    with pytest.raises(ValueError, match="need the queries' positions"):
        run(q, kv, kv, kv_positions_BS=pos)
    with pytest.raises(ValueError, match="needs their positions"):
        run(q[:, :20], kv, kv)
    with pytest.raises(ValueError, match=r"positions \(1, 20\)"):
        run(q, kv, kv, q_positions_BT=pos[:, :20])


@pytest.mark.parametrize("platform,lowering", [("cuda", "triton"), ("tpu", "mosaic")])
def test_positions_lower_for_device(platform, lowering):
    """A context-parallel shard's shapes (T queries, 4T keys, by position, packed) forward and
    backward, through the real lowering."""
    B, T, S, H, K, D = 1, 1024, 4096, 32, 8, 128

    def loss(q, k, v, seg, kv_seg, pos, kv_pos):
        out = flash_attention(q, k, v, seg, kv_segment_ids_BS=kv_seg, q_positions_BT=pos,
                              kv_positions_BS=kv_pos, lowering=lowering)
        return out.astype(jnp.float32).sum()

    rows = lambda n: jax.ShapeDtypeStruct((B, n), jnp.int32)  # noqa: E731
    mlir = export_mlir(jax.value_and_grad(loss, argnums=(0, 1, 2)), platform,
                       jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16),
                       jax.ShapeDtypeStruct((B, S, K, D), jnp.bfloat16),
                       jax.ShapeDtypeStruct((B, S, K, D), jnp.bfloat16),
                       rows(T), rows(S), rows(T), rows(S))
    assert mlir.count(f"@{KERNEL_CALL[platform]}") == 3


# Real sizes and default blocks: what would run on the hardware, forward and backward.
@pytest.mark.parametrize("platform,lowering", [("cuda", "triton"), ("tpu", "mosaic")])
@pytest.mark.parametrize("D,dtype,causal,segments", [
    pytest.param(64, jnp.bfloat16, True, True, id="d64-bf16-causal-docs"),
    pytest.param(128, jnp.float32, False, False, id="d128-f32-bidirectional"),
])
def test_kernels_lower_for_device(platform, lowering, D, dtype, causal, segments):
    B, T, H, K = 2, 1000, 32, 8

    def loss(q, k, v, seg):
        out = flash_attention(q, k, v, seg if segments else None, causal=causal,
                              lowering=lowering)
        return out.astype(jnp.float32).sum()

    mlir = export_mlir(jax.value_and_grad(loss, argnums=(0, 1, 2)), platform,
                       jax.ShapeDtypeStruct((B, T, H, D), dtype),
                       jax.ShapeDtypeStruct((B, T, K, D), dtype),
                       jax.ShapeDtypeStruct((B, T, K, D), dtype),
                       jax.ShapeDtypeStruct((B, T), jnp.int32))
    assert mlir.count(f"@{KERNEL_CALL[platform]}") == 3  # forward, dQ, dK/dV
