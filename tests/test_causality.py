"""Gradient causality (nanodo): the loss at position t has zero gradient w.r.t. the embeddings of
later tokens, and of tokens in other packed documents; and a nonzero one w.r.t. every token it may see."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llama_jax.config import LlamaConfig
from llama_jax.model import Llama

CFG = LlamaConfig.preset("tiny")  # float32, the default attention_impl ("auto": the blocked XLA path on CPU)
T = 16


def embedding_gradients(cfg, segment_ids=None):
    """g[t, s] = |d loss_t / d x_s|: loss_t the NLL of a fixed target at position t, x_s the input
    embedding of token s. Every token of the row is a different vocabulary id and the output projection is
    not tied, so the gradient w.r.t. row tokens[s] of the embedding table is exactly that w.r.t. x_s."""
    assert not cfg.tie_embeddings
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), jnp.zeros((1, T), jnp.int32)))["params"]
    params = nn.unbox(jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype), shapes))  # O(1) logits
    tokens = jnp.asarray(rng.permutation(cfg.vocab_size)[:T][None], jnp.int32)
    targets = jnp.roll(tokens, -1, axis=1)

    def losses(table):
        p = {**params, "tok_embeddings": table}
        logits = Llama(cfg).apply({"params": p}, tokens, segment_ids=segment_ids)[0]  # [T, V]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[0][:, None], axis=-1)[:, 0]  # [T]

    grad_t = jax.jit(jax.grad(lambda table, t: losses(table)[t]))  # one program for every t
    rows = [grad_t(params["tok_embeddings"], t)[np.asarray(tokens[0])] for t in range(T)]  # [T (input), D] each
    return np.linalg.norm(np.stack(rows), axis=-1)  # [T (loss), T (input)]


def test_no_gradient_flows_from_later_tokens():
    g = embedding_gradients(CFG)
    later = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(g[later] == 0), np.argwhere(later & (g != 0))
    assert np.all(g[~later] > 1e-6)  # every earlier token (and the token itself) does reach the loss


def test_no_gradient_flows_across_packed_documents():
    segment_ids = jnp.asarray([[0] * 5 + [1] * 7 + [2] * 4], jnp.int32)
    g = embedding_gradients(CFG, segment_ids)
    seg = np.asarray(segment_ids[0])
    visible = np.tril(np.ones((T, T), bool)) & (seg[:, None] == seg[None, :])
    assert np.all(g[~visible] == 0), np.argwhere(~visible & (g != 0))
    assert np.all(g[visible] > 1e-6)
