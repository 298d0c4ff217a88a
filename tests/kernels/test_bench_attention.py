"""bench/attention.py: the numbers its table computes from the timings (FLOPs, bytes, rates, fractions)."""

import argparse

import jax.numpy as jnp
import numpy as np
import pytest

from bench import attention as bench

SECONDS = 2e-3  # what every timing reads


@pytest.fixture
def fixed_timings(monkeypatch):
    monkeypatch.setattr(bench, "timeit", lambda fn, *args, reps: SECONDS)


def _cells(row):
    return dict(zip(bench.IMPLS, row[3:]))


def test_training_rows_count_causal_flops_per_second(fixed_timings, monkeypatch):
    # Implementations that cost nothing: only the arithmetic around the (fixed) timings is under test.
    monkeypatch.setattr(bench, "attention_impls", lambda lowering, interpret, D: {
        "pallas (ours)": (lambda q, k, v: (q, k, v), lambda q, k, v: q), "xla": (lambda q, k, v: (q, k, v), lambda q, k, v: q),
        "cudnn": "no cuDNN", "jax pallas ops": "no Pallas lowering"})
    monkeypatch.setattr(bench.jax.nn, "dot_product_attention", lambda q, k, v, **kw: q)
    H, D, tokens = 2, 128, 128
    monkeypatch.setattr(bench, "XLA_SCORES_LIMIT", 4 * 2 * H * 64 * 64)  # XLA's scores fit at T=64, not at 128
    args = argparse.Namespace(seqs=[64, 128], tokens=tokens, heads=H, kv_heads=1, reps=1)
    rows = bench.bench_training(args, "triton", True)
    assert [r[:3] for r in rows] == [[f"{m} TFLOP/s", str(T), str(tokens // T)] for T in (64, 128)
                                     for m in ("fwd", "fwd+bwd")]
    for T, fwd, fwd_bwd in zip((64, 128), rows[::2], rows[1::2]):
        B = tokens // T
        visible_pairs = B * H * T * T / 2  # the useful half of the causal square
        flops = 2 * 2 * D * visible_pairs  # QK^T and PV, a multiply and an add per element
        assert float(_cells(fwd)["pallas (ours)"]) == pytest.approx(flops / SECONDS / 1e12, rel=1e-2)
        assert float(_cells(fwd_bwd)["pallas (ours)"]) == pytest.approx(3.5 * flops / SECONDS / 1e12, rel=1e-2)
        assert _cells(fwd)["cudnn"] == "n/a (no cuDNN)"
        assert (_cells(fwd)["xla"] == "skipped (T^2 scores)") == (T == 128)


def test_decode_cells_are_page_bytes_per_second_and_their_fraction_of_the_copy_bandwidth(fixed_timings):
    B, S, K, D = 2, 1024, 2, 128
    args = argparse.Namespace(heads=4, kv_heads=K, decode_batch=B, cache=S, reps=1)
    (row,) = bench.bench_decode(args, "triton", True, bandwidth=4e9)
    assert row[:3] == ["paged decode, 1k per row", str(S), str(B)]
    kv_bytes = 2 * B * S * K * D * jnp.dtype(jnp.bfloat16).itemsize  # K and V of every position
    rate = kv_bytes / SECONDS
    assert _cells(row)["xla"] == _cells(row)["pallas (ours)"] == f"{rate / 1e9:.3g} GB/s ({100 * rate / 4e9:.0f}%)"
    assert _cells(row)["cudnn"] == "n/a (no paged path)"


def test_paged_decode_inputs_read_every_page_once():
    q, k_pages, v_pages, table, positions = bench.paged_decode_inputs(B=2, H=4, K=1, D=8, S=64, P=16)
    assert k_pages.shape == v_pages.shape == (8, 16, 1, 8) and q.shape == (2, 1, 4, 8)
    assert sorted(np.asarray(table).ravel()) == list(range(8))  # the whole pool, each page in one row
    assert np.all(np.asarray(positions) == 63)  # the last position: every page of the row is read


def test_copy_bandwidth_counts_the_read_and_the_write(fixed_timings):
    assert bench.copy_bandwidth(2**20, reps=1) == 2 * 2**20 / SECONDS
