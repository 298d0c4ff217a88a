"""Llama model: logits against HF transformers, packing, causality, layer loop options. Decoding with
a KV cache is the engine's (tests/infer: its tokens against this model's full forward pass)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import PRESETS
from llama_jax.model import Llama, rope_frequencies
from tests.reference import hf_logits, hf_model, random_params

TOL = 1e-4


@functools.partial(jax.jit, static_argnames="cfg")
def _logits(params, tokens, cfg, positions=None, segment_ids=None):
    return Llama(cfg).apply({"params": params}, tokens, positions=positions, segment_ids=segment_ids)


def forward(cfg, params, tokens, **kwargs):
    """One compiled program per config and shape (run op by op, every op compiles for each shape)."""
    return np.asarray(_logits(params, jnp.asarray(tokens), cfg, **kwargs))


@pytest.mark.parametrize("preset, seq_len", [
    ("tiny", 48),        # 3.0-like: untied, GQA 4:2, no rope scaling
    ("tiny-3.1", 160),   # llama3 rope scaling, positions well past original_max_position_embeddings=64
    ("tiny-3.2", 40),    # tied embeddings, n_kv_heads == n_heads, scaling factor 32
])
def test_logits_match_hf_transformers(preset, seq_len):
    cfg = PRESETS[preset]
    params = random_params(cfg, seed=1)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, seq_len))
    ours = forward(cfg, params, tokens)
    ref = hf_logits(hf_model(cfg, params), tokens)
    assert ours.dtype == np.float32 and ours.shape == (2, seq_len, cfg.vocab_size)
    assert np.abs(ref).max() > 1.0, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    assert np.abs(ours - ref).mean() < TOL / 10


def test_rope_scaling_changes_long_wavelengths_only():
    cfg = PRESETS["tiny-3.1"]
    scaled = rope_frequencies(cfg)
    plain = rope_frequencies(dataclasses.replace(cfg, rope_scaling=None))
    wavelen = 2 * np.pi / plain
    rs = cfg.rope_scaling
    short = wavelen < rs.original_max_position_embeddings / rs.high_freq_factor
    long = wavelen > rs.original_max_position_embeddings / rs.low_freq_factor
    assert short.any() and long.any() and (~short & ~long).any(), "tiny-3.1 must exercise all three bands"
    np.testing.assert_array_equal(scaled[short], plain[short])
    np.testing.assert_allclose(scaled[long], plain[long] / rs.factor, rtol=1e-6)
    band = ~short & ~long
    assert np.all(scaled[band] < plain[band]) and np.all(scaled[band] > plain[band] / rs.factor)


def test_packed_documents_equal_each_document_alone():
    cfg = PRESETS["tiny"]
    params = random_params(cfg, seed=4)
    rng = np.random.default_rng(3)
    lengths = [5, 9, 2, 8]
    docs = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    tokens = np.concatenate(docs)[None]
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None]
    packed = forward(cfg, params, tokens, positions=positions, segment_ids=segment_ids)
    offset = 0
    for doc in docs:
        alone = forward(cfg, params, doc[None])
        np.testing.assert_allclose(packed[0, offset:offset + len(doc)], alone[0], atol=TOL, rtol=0)
        offset += len(doc)


def test_future_tokens_never_change_past_logits():
    cfg = PRESETS["tiny"]
    params = random_params(cfg, seed=5)
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 20))
    changed = tokens.copy()
    changed[0, 12:] = (changed[0, 12:] + 7) % cfg.vocab_size
    a, b = forward(cfg, params, tokens), forward(cfg, params, changed)
    np.testing.assert_array_equal(a[0, :12], b[0, :12])
    assert np.abs(a[0, 12:] - b[0, 12:]).max() > 1e-2


def test_unrolled_and_remat_layers_match_scan():
    """scan_layers only changes the loop, remat only the backward pass: same params, same numbers."""
    cfg = PRESETS["tiny-3.1"]
    params = random_params(cfg, seed=6)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 16)))

    def loss_and_grads(c):
        loss = lambda p: jnp.mean(jax.nn.log_softmax(Llama(c).apply({"params": p}, tokens))[..., 0])  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_grads = loss_and_grads(cfg)
    for variant in (dict(scan_layers=False), dict(remat="full"), dict(remat="dots", scan_layers=False)):
        loss, grads = loss_and_grads(dataclasses.replace(cfg, **variant))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads, ref_grads)


def test_bfloat16_compute_stays_close_to_float32():
    cfg = PRESETS["tiny"]
    params = random_params(cfg, seed=7)
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (1, 24))
    ref = forward(cfg, params, tokens)
    bf16 = forward(dataclasses.replace(cfg, dtype="bfloat16"), params, tokens)
    assert bf16.dtype == np.float32
    assert np.abs(bf16 - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("bad", [-1, 512, 10**6])
def test_token_ids_outside_vocab_raise(bad):
    cfg = PRESETS["tiny"]
    params = random_params(cfg)
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):  # concrete ids only
        Llama(cfg).apply({"params": params}, jnp.array([[1, 2, bad]]))


def test_bad_inputs_raise_clear_errors():
    cfg = PRESETS["tiny"]
    params = random_params(cfg)
    with pytest.raises(ValueError, match="integer array"):
        forward(cfg, params, np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="positions has shape"):
        forward(cfg, params, np.ones((1, 3), np.int32), positions=np.arange(4)[None])
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        forward(cfg, params, np.ones((1, cfg.max_seq_len + 1), np.int32))


def test_pallas_kernels_give_the_same_logits_as_xla():
    """The model through our Pallas flash attention kernel (interpreted on CPU) for a packed forward
    pass (the paged kernel through the engine: tests/infer/test_batching.py)."""
    cfg = dataclasses.replace(PRESETS["tiny"], dim=128, n_heads=2, n_kv_heads=1)  # head_dim 64, GQA 2:1
    kernel_cfg = dataclasses.replace(cfg, attention_impl="pallas", attention_interpret=True)
    params = random_params(cfg, seed=8)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, cfg.vocab_size, (2, 40))
    segment_ids = np.repeat(np.array([[1, 2], [1, 1]]), 20, axis=1)
    positions = np.concatenate([np.arange(20), np.arange(20)])[None].repeat(2, 0)
    positions[1] = np.arange(40)
    kwargs = dict(positions=positions, segment_ids=segment_ids)
    np.testing.assert_allclose(forward(kernel_cfg, params, tokens, **kwargs), forward(cfg, params, tokens, **kwargs),
                               atol=TOL, rtol=0)
