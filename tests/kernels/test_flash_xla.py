"""flash_xla: the blocked plain-XLA attention by positions equals the positional reference (GQA,
packed documents, tokens in any order, ragged blocks), skips the key blocks no query sees, and
keeps its temporaries to blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.kernels.flash_xla import flash_attention_xla
from llama_jax.kernels.reference import positional_attention_reference

from tests.kernels.test_context_parallel import B, H, K, T, E, packed_rows

BLOCKS = dict(block_q=6, block_k=12)  # T = 32 a multiple of neither


def out_and_grads(f, q, k, v, do):
    def run(q, k, v):
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(do))

    return jax.jit(run)(q, k, v)


@pytest.mark.parametrize("segments", [True, False])
def test_equals_the_positional_reference_on_shuffled_tokens(segments):
    """20 queries in shuffled order against all 32 keys in another order: output, dQ, dK, dV."""
    rng = np.random.default_rng(0)
    q, k, v, positions, segment_ids = packed_rows()
    if not segments:
        positions, segment_ids = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)), None
    q_idx, k_idx = rng.permutation(T)[:20], rng.permutation(T)
    rows = lambda x, idx: None if x is None else x[:, idx]  # noqa: E731
    args = (rows(positions, q_idx), rows(positions, k_idx), rows(segment_ids, q_idx), rows(segment_ids, k_idx))
    do = rng.standard_normal((B, 20, H, E)).astype(np.float32)
    got = out_and_grads(lambda q, k, v: flash_attention_xla(q[:, q_idx], k[:, k_idx], v[:, k_idx], *args, **BLOCKS),
                        q, k, v, do)
    want = out_and_grads(lambda q, k, v: positional_attention_reference(q[:, q_idx], k[:, k_idx], v[:, k_idx], *args),
                         q, k, v, do)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_key_blocks_after_every_query_are_never_computed_on():
    """Queries at positions 0..31, keys 0..63 in blocks of 16: the last two key blocks hold NaN,
    which any visit would spread (0 * NaN), forward or backward."""
    blocks = dict(block_q=8, block_k=16)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 32, H, E), np.float32)
    k, v = (rng.standard_normal((1, 64, K, E), np.float32) for _ in range(2))
    k[:, 32:], v[:, 32:] = np.nan, np.nan
    positions = np.arange(64, dtype=np.int32)[None]
    do = rng.standard_normal(q.shape).astype(np.float32)
    out, dq, dk, dv = out_and_grads(
        lambda q, k, v: flash_attention_xla(q, k, v, positions[:, :32], positions, **blocks), q, k, v, do)
    want = out_and_grads(lambda q, k, v: positional_attention_reference(q, k, v, positions[:, :32], positions[:, :32]),
                         q, k[:, :32], v[:, :32], do)
    for g, w in zip((out, dq, dk[:, :32], dv[:, :32]), want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(dk[:, 32:]) == 0) and np.all(np.asarray(dv[:, 32:]) == 0)


@pytest.mark.parametrize("in_scan", [False, True])
def test_temporaries_stay_blocks_not_scores(in_scan):
    """Forward and backward at 4K tokens: the compiled temporaries are a small fraction of the
    reference's [T, T] scores per head (compiled only, nothing run). in_scan: inside a scan over
    layers, whose loop-invariant hoisting would otherwise stack every block's mask (the positions
    are the same in every layer)."""
    T = 4096
    q = jax.ShapeDtypeStruct((1, T, H, E), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, T, K, E), jnp.float32)
    positions = jnp.arange(T, dtype=jnp.int32)[None]

    def temp_bytes(attend):
        def layers(q, k, v):
            if not in_scan:
                return attend(q, k, v, positions, positions)
            layer = lambda x, _: (attend(x, k, v, positions, positions), None)  # noqa: E731
            return jax.lax.scan(layer, q, None, length=2)[0]

        loss = lambda q, k, v: layers(q, k, v).sum()  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = T * T * H * 4
    blocked, dense = temp_bytes(flash_attention_xla), temp_bytes(positional_attention_reference)
    assert dense >= scores and blocked < scores / 8, (blocked, dense, scores)
