"""Meta download -> our checkpoint: logits and greedy tokens against HF transformers on the same weights.

The Meta checkpoints are split by llama_models' own reshard_mp, 1, 2 and 4 ways; the tiny models
have 2 kv heads, so the 4-way split stores each kv head twice (both layouts: reshard_mp's tiling,
and Meta's grouping as in the 405B MP16 download).
"""

import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from llama_jax import checkpoint
from llama_jax.convert.meta import convert_meta
from llama_jax.model import Llama
from tests.convert import sources

TOL = 1e-4
TOKENS = np.random.default_rng(0).integers(0, sources.VOCAB, (2, 24))
PROMPT_LEN, STEPS = 16, 8


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, tokens):
    return Llama(cfg).apply({"params": params}, tokens)


def greedy(cfg, params, prompts, steps):
    """Full-forward argmax loop over a fixed-length buffer (causal: padding never reaches earlier positions)."""
    buffer = np.zeros((len(prompts), len(prompts[0]) + steps), np.int32)
    buffer[:, :len(prompts[0])] = prompts
    for t in range(len(prompts[0]), buffer.shape[1]):
        buffer[:, t] = np.asarray(forward(cfg, params, jnp.asarray(buffer)))[:, t - 1].argmax(-1)
    return buffer[:, len(prompts[0]):].tolist()


@functools.cache
def reference(version):
    model = sources.hf_model(version)
    prompts = TOKENS[:, :PROMPT_LEN]
    return model, sources.hf_logits(model, TOKENS), [sources.hf_greedy(model, p, STEPS) for p in prompts]


CASES = [(v, n, "tiled") for v in ("3.0", "3.1", "3.2") for n in (1, 2, 4)] + [("3.1", 4, "grouped"),
                                                                                ("3.2", 4, "grouped")]


@pytest.mark.parametrize("version, n_shards, kv_layout", CASES)
def test_logits_and_greedy_tokens_match_hf(tmp_path, version, n_shards, kv_layout):
    model, want_logits, want_tokens = reference(version)
    src = sources.write_meta(tmp_path / "meta", version, model, n_shards, kv_layout=kv_layout)
    if n_shards == 4:
        wk = torch.load(src / "consolidated.01.pth", weights_only=True)["layers.0.attention.wk.weight"]
        assert wk.shape[0] == 16, "each of 4 shards holds one of the 2 kv heads"
    dst = convert_meta(src, tmp_path / "ours", rope_scaling_factor=sources.ROPE_FACTOR[version])

    cfg, params = checkpoint.load(dst, dtype="float32")
    assert cfg.tie_embeddings == (version == "3.2")
    assert "output" not in params if cfg.tie_embeddings else params["output"].shape == (64, sources.VOCAB)
    assert (cfg.rope_scaling.factor if cfg.rope_scaling else None) == sources.ROPE_FACTOR[version]
    assert (cfg.param_dtype, cfg.bos_id, cfg.eos_id) == ("float32", 256, 257)
    assert (dst / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()

    logits = np.asarray(forward(cfg, params, jnp.asarray(TOKENS)))
    assert np.abs(want_logits).max() > 1, "logits far from zero, so a layout error would show"
    np.testing.assert_allclose(logits, want_logits, atol=TOL, rtol=0)
    assert np.abs(logits - want_logits).mean() < TOL / 10
    assert greedy(cfg, params, TOKENS[:, :PROMPT_LEN], STEPS) == want_tokens


def test_rope_scaling_factor_changes_the_logits(tmp_path):
    """The 3.1 cases above would fail with the factor ignored (factor 1 leaves every frequency as is)."""
    model, want_logits, _ = reference("3.1")
    src = sources.write_meta(tmp_path / "meta", "3.1", model, 1)
    cfg, params = checkpoint.load(convert_meta(src, tmp_path / "ours", rope_scaling_factor=1.0), dtype="float32")
    assert cfg.rope_scaling.factor == 1.0
    assert np.abs(np.asarray(forward(cfg, params, jnp.asarray(TOKENS))) - want_logits).max() > 20 * TOL


def test_tied_model_without_output_copy(tmp_path):
    model, want_logits, _ = reference("3.2")
    src = sources.write_meta(tmp_path / "meta", "3.2", model, 2)
    for path in src.glob("consolidated.*.pth"):
        state = torch.load(path, weights_only=True)
        del state["output.weight"]
        torch.save(state, path)
    cfg, params = checkpoint.load(convert_meta(src, tmp_path / "ours", rope_scaling_factor=32), dtype="float32")
    assert cfg.tie_embeddings
    np.testing.assert_allclose(np.asarray(forward(cfg, params, jnp.asarray(TOKENS))), want_logits, atol=TOL, rtol=0)


def _bits(tree):
    return jax.tree.map(lambda x: np.asarray(x).view(np.uint16 if x.dtype.itemsize == 2 else np.uint32), tree)


def test_bfloat16_stays_bfloat16_bit_for_bit(tmp_path):
    model, _, _ = reference("3.0")
    f32 = convert_meta(sources.write_meta(tmp_path / "f32", "3.0", model, 2), tmp_path / "from-f32")
    bf16_src = sources.write_meta(tmp_path / "bf16", "3.0", model, 2, dtype=torch.bfloat16)
    bf16 = convert_meta(bf16_src, tmp_path / "from-bf16")
    upcast = convert_meta(bf16_src, tmp_path / "from-bf16-as-f32", dtype="float32")

    cfg32, p32 = checkpoint.load(f32)
    cfg16, p16 = checkpoint.load(bf16, dtype="bfloat16")  # named: the stored bfloat16 weights stay
    cfg_up, p_up = checkpoint.load(upcast)
    assert (cfg32.param_dtype, cfg16.param_dtype, cfg_up.param_dtype) == ("float32", "bfloat16", "float32")
    assert json.loads((bf16 / "params" / "tok_embeddings" / ".zarray").read_text())["dtype"] == "bfloat16"
    # Every transform is a permutation, so bf16 in, bf16 out is exactly the f32 result rounded once.
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), p32)
    assert jax.tree.all(jax.tree.map(np.array_equal, _bits(rounded), _bits(p16)))
    widened = jax.tree.map(lambda x: np.asarray(x).astype(np.float32), p16)
    assert jax.tree.all(jax.tree.map(np.array_equal, _bits(widened), _bits(p_up)))


def test_small_chunks_and_blocks_write_the_same_params(tmp_path, monkeypatch):
    """Large tensors are written a chunk of rows at a time; tiny chunks exercise that path here."""
    from llama_jax.convert import store

    model, _, _ = reference("3.2")
    src = sources.write_meta(tmp_path / "meta", "3.2", model, 4)
    _, whole = checkpoint.load(convert_meta(src, tmp_path / "whole", rope_scaling_factor=32))
    monkeypatch.setattr(store, "CHUNK_BYTES", 1000)  # 3-7 rows of the 64-wide tensors, uneven last blocks
    _, chunked = checkpoint.load(convert_meta(src, tmp_path / "chunked", rope_scaling_factor=32))
    chunks = json.loads((tmp_path / "chunked" / "params" / "tok_embeddings" / ".zarray").read_text())["chunks"]
    assert chunks == [3, 64]
    assert jax.tree.all(jax.tree.map(np.array_equal, _bits(whole), _bits(chunked)))
