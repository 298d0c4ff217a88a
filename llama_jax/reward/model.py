"""A reward model: a Llama whose head gives one scalar per sequence, read at the sequence's last token.

    cfg, params = load("ckpt/rm", mesh=mesh)                                   # a reward checkpoint
    ids = sequence_ids(tokenizer, messages, {"role": "assistant", "content": answer})
    r_N = score_sequences(cfg, params, [ids, ...], batch_size=16, mesh=mesh)   # np.ndarray [N] float32
    r_B = scores(cfg, params, tokens_BT, lengths_B, mesh=mesh)                 # [B] float32, jitted

The network is the causal LM's own, `Llama(cfg, head="score")` (model.py): the same layers and final
norm, then a vector `score` [D] in place of the vocabulary projection, which is what HF's
LlamaForSequenceClassification with num_labels=1 is (`score.weight` [1, D], no bias). HF reads the
score at the last token that is not padding; rows here are right-padded and carry their lengths,
so padding needs no reserved id. A sequence is rendered exactly as training rendered its pairs
(`sequence_ids`): the prompt, the response and the token that ends it (Llama 3's eot in a chat),
which is the token scored.

Training (train/reward.py) minimises the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) from
a causal LM with a zero head (`from_causal_lm`), so every pair starts at loss log 2.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax import checkpoint
from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from llama_jax.params import param_shardings
from llama_jax.sharding import activation_sharding, batch_split
from llama_jax.train.preferences import response_ids_and_weights
from llama_jax.vocab import check_token_ids

HEAD = "score"  # model.HEADS: the head of a reward model
MIN_TOKENS = 16  # the shortest padded row of score_sequences: few programs for short sequences


def bradley_terry_loss(chosen, rejected):
    """-log sigmoid(chosen - rejected), elementwise: the negative log-likelihood that the chosen
    response is preferred, under Bradley-Terry with the scores as log-strengths."""
    return -jax.nn.log_sigmoid(chosen - rejected)


def num_params(cfg: LlamaConfig) -> int:
    """A reward model's parameter count: the causal LM's less its output projection, plus `score`."""
    return cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim) + cfg.dim


def from_causal_lm(cfg: LlamaConfig, params, mesh: Mesh | None = None):
    """A reward model's parameters from a causal LM's: the same tree less `output`, plus `score`
    set to zero (every score 0, so every pair's loss starts at log 2), sharded as the rules say on
    `mesh`. The other arrays are the LM's own, not copies."""
    out = {k: v for k, v in params.items() if k != "output"}
    sharding = param_shardings(cfg, mesh, head=HEAD)["score"] if mesh is not None else None
    out["score"] = jax.jit(lambda: jnp.zeros((cfg.dim,), cfg.weight_dtype), out_shardings=sharding)()
    return out


def load(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: str | None = None,
         **overrides) -> tuple[LlamaConfig, dict]:
    """(cfg, params) of a reward checkpoint (checkpoint.load's arguments); a causal LM's is a one-line
    ValueError."""
    return checkpoint.load(path, mesh, dtype=dtype, head=HEAD, **overrides)


def sequence_ids(tokenizer, prompt: str | list, response: str | dict) -> list[int]:
    """The ids a reward model scores for `response` to `prompt`, as training rendered its pairs: a
    plain-text prompt and response (bos, prompt, response, eos), or a chat's messages and an
    assistant message (the tokenizer's chat format, the turn closed by its end token)."""
    return response_ids_and_weights(tokenizer, prompt, response)[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _scores(cfg: LlamaConfig, mesh: Mesh | None, params, tokens_BT, lengths_B):
    with activation_sharding(mesh) if mesh is not None else contextlib.nullcontext():
        scores_BT = Llama(cfg, head=HEAD).apply({"params": params}, tokens_BT)
    return jnp.take_along_axis(scores_BT, (lengths_B - 1)[:, None], axis=1)[:, 0]


def scores(cfg: LlamaConfig, params, tokens, lengths, *, mesh: Mesh | None = None) -> jax.Array:
    """[B] float32: each row's score, at its token lengths[b] - 1. tokens [B, T] int, right-padded
    with any id (causal attention keeps padding from the positions read); lengths [B], 1..T.
    mesh: where `params` lie (the rows split over its dp x fsdp axes); compiled once per shape."""
    tokens, lengths = jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
        raise ValueError(f"tokens must be [batch, seq] and lengths [batch], got {list(tokens.shape)} and "
                         f"{list(lengths.shape)}")
    if not isinstance(lengths, jax.core.Tracer) and (lengths.min() < 1 or lengths.max() > tokens.shape[1]):
        raise ValueError(f"lengths must be 1..{tokens.shape[1]} (the row length), got {np.asarray(lengths).tolist()}")
    if not isinstance(tokens, jax.core.Tracer):
        check_token_ids(tokens, cfg.vocab_size)
    return _scores(cfg, mesh, params, tokens, lengths)


def _padded_length(n: int, cfg: LlamaConfig) -> int:
    return min(max(MIN_TOKENS, 1 << math.ceil(math.log2(n))), cfg.max_seq_len)


def score_sequences(cfg: LlamaConfig, params, sequences: Sequence[Sequence[int]], *, batch_size: int = 16,
                    mesh: Mesh | None = None) -> np.ndarray:
    """[N] float32: the score of each token sequence, in order. Sequences of similar length share a
    call of `batch_size` rows, each padded to a power of two tokens, so a handful of programs serve
    any mix. batch_size: a multiple of the mesh's dp x fsdp."""
    if batch_size % batch_split(mesh):
        raise ValueError(f"batch size {batch_size} must be a multiple of the mesh's dp x fsdp ({batch_split(mesh)})")
    for i, ids in enumerate(sequences):
        if not 0 < len(ids) <= cfg.max_seq_len:
            raise ValueError(f"sequence {i} has {len(ids)} tokens; a reward model scores 1 to max_seq_len "
                             f"({cfg.max_seq_len})")
        check_token_ids(np.asarray(ids), cfg.vocab_size, what=f"sequence {i}: token id")
    out = np.zeros(len(sequences), np.float32)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        T = _padded_length(max(len(sequences[i]) for i in chunk), cfg)
        tokens = np.zeros((batch_size, T), np.int32)
        lengths = np.ones(batch_size, np.int32)  # unused rows: one padding token, never read back
        for row, i in enumerate(chunk):
            tokens[row, :len(sequences[i])] = sequences[i]
            lengths[row] = len(sequences[i])
        out[chunk] = np.asarray(scores(cfg, params, tokens, lengths, mesh=mesh))[:len(chunk)]
    return out
