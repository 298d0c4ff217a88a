"""The engine's device step on hand-built StepInputs, against the model's full forward pass: a row of
several new tokens (speculative verification) sampled at each, the hooks applied before sampling
(allowed-token bitmasks, sparse logit biases) and page copies (copy-on-write for shared prompts)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.infer import sampling
from llama_jax.infer.kv_cache import copy_pages, empty_pages
from llama_jax.infer.step import StepInputs, model_step_jit
from llama_jax.infer.weights import decode_params
from tests.infer.common import _forward

PAGE = 8
M = 4  # page-table entries per row: 32 positions


def inputs(tokens_rows, positions_rows, tables, sample_at, *, decode_rows=1, **hooks):
    """StepInputs of `decode_rows` padding decode rows then a chunk of the given rows (equal widths);
    sample_at: indices into the chunk's tokens."""
    R, C = len(tokens_rows), len(tokens_rows[0])
    B = decode_rows + R * C
    tokens, positions = np.zeros((B, 1), np.int32), np.full((B, 1), -1, np.int32)
    tokens[decode_rows:, 0] = np.concatenate(tokens_rows)
    positions[decode_rows:, 0] = np.concatenate(positions_rows)
    L = decode_rows
    sample = np.zeros(L, np.int32)
    sample[:len(sample_at)] = np.asarray(sample_at) + decode_rows
    settings = dict(seeds_L=np.zeros(L, np.uint32), streams_L=np.zeros(L, np.uint32),
                    temperature_L=np.zeros(L, np.float32), top_k_L=np.zeros(L, np.int32),
                    top_p_L=np.ones(L, np.float32), top_logprobs_L=np.zeros(L, np.int32))
    return StepInputs(tokens, positions, np.zeros((decode_rows, M), np.int32), np.asarray(tables, np.int32), sample,
                      **settings | hooks)


@pytest.fixture(scope="module")
def model(tiny):
    cfg, params = tiny
    return cfg, params, decode_params(cfg, params)[1]


def test_a_row_of_several_new_tokens_is_sampled_at_each_like_the_full_forward(model):
    """Verification rows: after a prompt's prefill, 4 proposed tokens go in as one chunk row that
    attends to its own earlier tokens; greedy samples at each of them are the full forward's argmaxes."""
    cfg, params, split = model
    rng = np.random.default_rng(0)
    sequence = rng.integers(2, cfg.vocab_size, 13).tolist()
    prompt, proposed = sequence[:9], sequence[9:]
    pages = empty_pages(cfg, 8, PAGE)
    table = [[1, 2, 0, 0]]
    # Prefill the prompt (one row of 9), sampled at its last token.
    step = inputs([prompt], [np.arange(9)], table, [8], decode_rows=4)
    pages, _ = model_step_jit(split, pages, step, cfg=cfg)
    step = inputs([proposed], [np.arange(9, 13)], table, [0, 1, 2, 3], decode_rows=4)
    pages, out = model_step_jit(split, pages, step, cfg=cfg)
    logits = np.asarray(_forward(params, jnp.asarray([sequence]), cfg))[0]
    np.testing.assert_array_equal(np.asarray(out.tokens_L), logits[9:13].argmax(-1))
    want = jax.nn.log_softmax(logits[9:13], axis=-1)[np.arange(4), logits[9:13].argmax(-1)]
    np.testing.assert_allclose(np.asarray(out.logprobs_L), want, atol=1e-5)


def test_an_allowed_token_mask_restricts_sampling_but_not_the_logprobs(model):
    cfg, params, split = model
    logits = np.asarray(_forward(params, jnp.asarray([[1, 5, 9]]), cfg))[0, 2]
    ranked = np.argsort(-logits)
    allowed = np.zeros((2, -(-cfg.vocab_size // 32)), np.uint32)
    for token in ranked[3], ranked[7]:  # the 4th and 8th most likely only
        allowed[0, token // 32] |= np.uint32(1) << np.uint32(token % 32)
    # Row 1 allows nothing: left as it is (its argmax).
    step = inputs([[1, 5, 9]], [np.arange(3)], [[1, 0, 0, 0]], [2, 2], decode_rows=2,
                  allowed_LW=allowed)
    step = step._replace(temperature_L=np.array([0.0, 0.0], np.float32))
    _, out = model_step_jit(split, empty_pages(cfg, 4, PAGE), step, cfg=cfg)
    assert np.asarray(out.tokens_L).tolist() == [ranked[3], ranked[0]]
    np.testing.assert_allclose(out.logprobs_L[0], jax.nn.log_softmax(logits)[ranked[3]], atol=1e-5)
    # Sampled at a high temperature, a masked row still only draws allowed tokens.
    hot = step._replace(temperature_L=np.array([5.0, 5.0], np.float32), seeds_L=np.arange(2, dtype=np.uint32))
    drawn = {int(model_step_jit(split, empty_pages(cfg, 4, PAGE), hot._replace(streams_L=np.full(2, s, np.uint32)),
                                cfg=cfg)[1].tokens_L[0]) for s in range(12)}
    assert drawn <= {ranked[3], ranked[7]} and len(drawn) == 2


def test_sparse_logit_biases_add_up_before_sampling():
    logits = jnp.asarray([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    ids = jnp.asarray([[0, 0, -1], [3, 1, -1]])
    bias = jnp.asarray([[2.5, 2.5, 100.0], [1.0, -5.0, 100.0]])
    np.testing.assert_allclose(sampling.apply_logit_bias(logits, ids, bias),
                               [[5.0, 1.0, 2.0, 3.0], [3.0, -3.0, 1.0, 1.0]])


def test_a_large_bias_steers_the_step_s_greedy_token(model):
    cfg, params, split = model
    logits = np.asarray(_forward(params, jnp.asarray([[1, 5, 9]]), cfg))[0, 2]
    target = int(np.argsort(-logits)[5])
    step = inputs([[1, 5, 9]], [np.arange(3)], [[1, 0, 0, 0]], [2], decode_rows=1,
                  bias_ids_LN=np.array([[target, -1]], np.int32), bias_LN=np.array([[50.0, 0.0]], np.float32))
    _, out = model_step_jit(split, empty_pages(cfg, 4, PAGE), step, cfg=cfg)
    assert int(out.tokens_L[0]) == target


def test_page_copies_duplicate_every_layer_s_page():
    pages = tuple((jnp.arange(4 * 2 * 3, dtype=jnp.float32).reshape(4, 2, 1, 3) + 100 * layer,
                   -jnp.arange(4 * 2 * 3, dtype=jnp.float32).reshape(4, 2, 1, 3)) for layer in range(2))
    copied = copy_pages(pages, jnp.asarray([[1, 3], [-1, 0]]))  # page 1 -> 3; a negative source copies nothing
    for (k, v), (k0, v0) in zip(copied, pages):
        np.testing.assert_array_equal(k[3], k0[1])
        np.testing.assert_array_equal(v[3], v0[1])
        np.testing.assert_array_equal(k[:3], k0[:3])
