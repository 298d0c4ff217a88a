"""Llama model: logits against HF transformers, KV cache, packing, causality, layer loop options."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import PRESETS
from llama_jax.model import KVCache, Llama, param_shapes, rope_frequencies, split_layers, stack_layers
from tests.reference import hf_logits, hf_model, random_params

TOL = 1e-4


def forward(cfg, params, tokens, **kwargs):
    return np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(tokens), **kwargs))


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


def test_kv_cache_prefill_then_decode_equals_full_forward():
    cfg = PRESETS["tiny"]
    params = random_params(cfg, seed=2)
    B, prompt_len, total = 2, 7, 15
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, total))
    full = forward(cfg, params, tokens)

    model = Llama(cfg)
    cache = KVCache.init(cfg, B, 32)
    positions = np.broadcast_to(np.arange(prompt_len), (B, prompt_len))
    logits, cache = model.apply({"params": params}, tokens[:, :prompt_len], positions=positions, cache=cache)
    np.testing.assert_allclose(logits, full[:, :prompt_len], atol=TOL, rtol=0)
    step = jax.jit(lambda p, tok, pos, c: model.apply({"params": p}, tok, positions=pos, cache=c))
    for t in range(prompt_len, total):
        pos = np.full((B, 1), t)
        logits, cache = step(params, tokens[:, t:t + 1], pos, cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=TOL, rtol=0)


def test_kv_cache_chunked_prefill_and_ragged_rows():
    """Rows at different positions in one call: each row's chunk lands at its own slot."""
    cfg = PRESETS["tiny-3.2"]
    params = random_params(cfg, seed=3)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12))
    full = forward(cfg, params, tokens)
    model = Llama(cfg)
    cache = KVCache.init(cfg, 2, 16)
    # Row 0 prefills 5 tokens, row 1 prefills 8 (right-padded with whatever: its later slots are rewritten).
    _, cache = model.apply({"params": params}, tokens[:, :8], positions=np.tile(np.arange(8), (2, 1)), cache=cache)
    starts = np.array([5, 8])
    chunk = np.stack([tokens[0, 5:9], tokens[1, 8:12]])
    positions = starts[:, None] + np.arange(4)
    logits, _ = model.apply({"params": params}, chunk, positions=positions, cache=cache)
    np.testing.assert_allclose(logits[0], full[0, 5:9], atol=TOL, rtol=0)
    np.testing.assert_allclose(logits[1], full[1, 8:12], atol=TOL, rtol=0)


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
        return jax.value_and_grad(loss)(params)

    ref_loss, ref_grads = loss_and_grads(cfg)
    for variant in (dict(scan_layers=False), dict(remat="full"), dict(remat="dots", scan_layers=False)):
        loss, grads = loss_and_grads(dataclasses.replace(cfg, **variant))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads, ref_grads)


def test_per_layer_params_give_the_same_numbers_and_stack_back_exactly():
    """split_layers (decoding's layout): a subtree and a cache buffer per layer, same logits."""
    cfg = PRESETS["tiny-3.2"]
    params = random_params(cfg, seed=9)
    split_cfg, split = split_layers(cfg, params)
    assert split_cfg == dataclasses.replace(cfg, per_layer_params=True)
    assert sorted(split) == sorted([f"layers_{i}" for i in range(cfg.n_layers)] + ["norm", "tok_embeddings"])
    assert jax.tree.map(np.shape, split) == jax.tree.map(lambda s: s.shape, param_shapes(split_cfg))
    np.testing.assert_array_equal(split["layers_1"]["feed_forward"]["w2"], params["layers"]["feed_forward"]["w2"][1])

    tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, (2, 9))
    np.testing.assert_allclose(forward(split_cfg, split, tokens), forward(cfg, params, tokens), atol=TOL / 10, rtol=0)

    def prefill_and_step(c, p):
        cache = KVCache.init(c, 2, 16)
        first, cache = Llama(c).apply({"params": p}, tokens[:, :8], positions=np.tile(np.arange(8), (2, 1)),
                                      cache=cache)
        step, cache = Llama(c).apply({"params": p}, tokens[:, 8:], positions=np.full((2, 1), 8), cache=cache)
        return np.concatenate([first, step], axis=1), cache

    (ref, ref_cache), (ours, cache) = prefill_and_step(cfg, params), prefill_and_step(split_cfg, split)
    np.testing.assert_allclose(ours, ref, atol=TOL / 10, rtol=0)
    assert cache.per_layer and len(cache.k) == cfg.n_layers and cache.layer_shape == ref_cache.layer_shape
    np.testing.assert_allclose(cache.v[1], ref_cache.v[1], atol=TOL / 10, rtol=0)

    back_cfg, back = stack_layers(split_cfg, split)
    assert back_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, back, params)
    # donate: the same split, and the stacked weights are freed as they go.
    _, donated = split_layers(cfg, back, donate=True)
    jax.tree.map(np.testing.assert_array_equal, donated, split)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(back["layers"]))
    assert not back["norm"]["scale"].is_deleted()
    with pytest.raises(ValueError, match="per-layer KVCache"):
        Llama(split_cfg).apply({"params": split}, tokens[:, :1], positions=np.zeros((2, 1), np.int32),
                               cache=KVCache.init(cfg, 2, 16))


def test_logits_at_makes_one_position_per_row():
    cfg = PRESETS["tiny"]
    params = random_params(cfg, seed=10)
    tokens = np.random.default_rng(9).integers(0, cfg.vocab_size, (2, 12))
    full = forward(cfg, params, tokens)
    picked = forward(cfg, params, tokens, logits_at=np.array([3, 11]))
    assert picked.shape == (2, 1, cfg.vocab_size)
    np.testing.assert_allclose(picked[:, 0], full[[0, 1], [3, 11]], atol=TOL / 10, rtol=0)
    with pytest.raises(ValueError, match="logits_at has shape"):
        forward(cfg, params, tokens, logits_at=np.array([3]))


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
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
        forward(cfg, params, np.array([[1, 2, bad]]))


def test_bad_inputs_raise_clear_errors():
    cfg = PRESETS["tiny"]
    params = random_params(cfg)
    with pytest.raises(ValueError, match="integer array"):
        forward(cfg, params, np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="positions has shape"):
        forward(cfg, params, np.ones((1, 3), np.int32), positions=np.arange(4)[None])
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        forward(cfg, params, np.ones((1, cfg.max_seq_len + 1), np.int32))
    cache = KVCache.init(cfg, 1, 8)
    with pytest.raises(ValueError, match="does not fit in a KV cache"):
        Llama(cfg).apply({"params": params}, np.ones((1, 2), np.int32), positions=np.array([[7, 8]]), cache=cache)
    with pytest.raises(ValueError, match="positions are required"):
        Llama(cfg).apply({"params": params}, np.ones((1, 2), np.int32), cache=cache)


def test_pallas_kernels_give_the_same_logits_as_xla():
    """The model through our Pallas kernels (interpreted on CPU): flash attention for a packed
    forward pass and its gradients' inputs, the decode kernel for prefill + a step into the cache."""
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

    def prefill_and_step(c):
        model, cache = Llama(c), KVCache.init(c, 2, 64)
        pos = np.tile(np.arange(30), (2, 1))
        first, cache = model.apply({"params": params}, tokens[:, :30], positions=pos, cache=cache)
        step, _ = model.apply({"params": params}, tokens[:, 30:31], positions=np.full((2, 1), 30), cache=cache)
        return np.concatenate([first, step], axis=1)

    np.testing.assert_allclose(prefill_and_step(kernel_cfg), prefill_and_step(cfg), atol=TOL, rtol=0)
