"""Reward-model training: the Bradley-Terry objective on preference pairs (the model: reward/model.py).

For a prompt x with a chosen response y_c and a rejected one y_r, and r(x, y) the reward model's
score at the last token of prompt + response:

    loss = -log sigmoid(r(x, y_c) - r(x, y_r))

averaged over pairs. Logged are the loss (log 2 at the zero head a run starts from), the accuracy
(the fraction of pairs whose chosen response scores higher), the mean margin r_c - r_r and both mean
scores.

Batches are DPO's packed pairs (preferences.py) with each sequence whole (`scored`): chosen and
rejected of pair k are segments 2k+1 and 2k+2 of a row, with weight 1 on the sequence's last token
only, so the segment sum of score x weight is that sequence's score whatever order the tokens are in
(context parallelism's load-balanced order too).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
from jax.sharding import Mesh

from llama_jax import checkpoint
from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from llama_jax.params import init_sharded_params
from llama_jax.reward.model import HEAD, bradley_terry_loss, from_causal_lm, num_params
from llama_jax.train.dpo import num_segments, segment_sums
from llama_jax.train.step import BATCH_DTYPES, Batch


@dataclasses.dataclass(frozen=True)
class RewardModeling:
    """The Bradley-Terry objective for make_train_step: sums over pairs, divided by the number of pairs."""

    batch_dtypes: ClassVar[dict[str, Any]] = BATCH_DTYPES

    def loss_sums(self, cfg: LlamaConfig, params, batch: Batch):
        seg_BT, w_BT = batch["segment_ids"], batch["weights"]
        S = num_segments(seg_BT.shape[1])
        scores_BT = Llama(cfg, head=HEAD).apply({"params": params}, batch["inputs"], positions=batch["positions"],
                                                segment_ids=seg_BT)
        scores_BS = segment_sums(scores_BT * w_BT, seg_BT, S)
        chosen_BP, rejected_BP = scores_BS[:, 1::2], scores_BS[:, 2::2]  # segments 1, 3, 5, ... and 2, 4, 6, ...
        present_BP = (segment_sums(w_BT, seg_BT, S)[:, 1::2] > 0).astype(jnp.float32)
        margin_BP = chosen_BP - rejected_BP
        sums = {
            "loss": jnp.sum(bradley_terry_loss(chosen_BP, rejected_BP) * present_BP),
            "margin": jnp.sum(margin_BP * present_BP),
            "correct": jnp.sum((margin_BP > 0) * present_BP),
            "chosen_score": jnp.sum(chosen_BP * present_BP),
            "rejected_score": jnp.sum(rejected_BP * present_BP),
            "weight": jnp.sum(present_BP),
            "tokens": jnp.sum((seg_BT > 0).astype(jnp.float32)),
        }
        return sums["loss"], sums

    def metrics(self, sums):
        pairs = jnp.maximum(sums["weight"], 1.0)
        return {"loss": sums["loss"] / pairs, "accuracy": sums["correct"] / pairs, "margin": sums["margin"] / pairs,
                "chosen_score": sums["chosen_score"] / pairs, "rejected_score": sums["rejected_score"] / pairs,
                "pairs": sums["weight"], "tokens": sums["tokens"]}


def initial_params(cfg: LlamaConfig, mesh: Mesh, *, init_from: str | None, seed: int, **load_args):
    """A reward run's first weights on `mesh`: --init-from's, a causal LM's with a zero head or a reward
    model's as they are; without --init-from, random (as a causal LM's) with a zero head."""
    if init_from is None:
        return from_causal_lm(cfg, init_sharded_params(cfg, mesh, seed), mesh)
    if checkpoint.stored_head(init_from) == HEAD:
        return checkpoint.load(init_from, mesh, head=HEAD, **load_args)[1]
    return from_causal_lm(cfg, checkpoint.load(init_from, mesh, **load_args)[1], mesh)


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token of a reward model: the causal LM's (cfg.flops_per_token) less its
    vocabulary projection, plus the score vector."""
    return cfg.flops_per_token(seq_len) - 6 * cfg.vocab_size * cfg.dim + 6 * cfg.dim


def param_count(cfg: LlamaConfig, head: str) -> int:
    """The parameters of the model a run trains (head "lm": the causal LM's, cfg.num_params)."""
    return cfg.num_params() if head == "lm" else num_params(cfg)
