"""Direct Preference Optimization (Rafailov et al., 2023) as a train-step objective.

For a prompt x with a chosen response y_c and a rejected one y_r, and log pi(y|x) the sum of the
response tokens' log-probs (the prompt masked):

    loss = -log sigmoid(beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))))

averaged over pairs; ref is the frozen initial model. The reward of a response is beta * (log pi -
log ref); logged are the loss, the reward margin (chosen minus rejected), the reward accuracy (the
fraction of pairs whose chosen response has the higher reward) and both rewards.

The reference log-probs are computed once, in a pass over the preference set before the first
step, and stored per record in OUT/reference_logprobs.npz (two floats a pair), instead of running a
frozen copy of the model in every step. Memory is why: full-parameter DPO then holds one model
(float32 weights + AdamW moments) exactly like SFT, where a frozen copy would add its weights again
(+2 bytes a parameter in bf16, +17% over the 12 of weights and moments; 16 GB at 8B) and a forward
pass to every step. A resumed run reads the file back, so it needs neither the initial checkpoint
nor a copy of it in the train state. `reference_logprobs(cfg, params_ref, batch)` is the one function
that pass calls: with LoRA, `params_ref` is the base without adapters.

A batch (preferences.py) packs whole pairs into rows, chosen and rejected of pair k as segments 2k+1
and 2k+2; the reference sums ride in batch["reference"], each on its sequence's first token.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from llama_jax.sharding import activation_sharding
from llama_jax.train.preferences import PreferenceBatches, PreferencePairs, pack_pairs
from llama_jax.train.step import BATCH_DTYPES, Batch, put_batch

log = logging.getLogger("llama_jax.train")

REFERENCE_FILE = "reference_logprobs.npz"


# Log-probs per sequence --------------------------------------------------------------------------

def segment_sums(x_BT, segment_ids_BT, num_segments: int):
    """[B, num_segments]: x summed per segment id within each row."""
    return jax.vmap(functools.partial(jax.ops.segment_sum, num_segments=num_segments))(x_BT, segment_ids_BT)


def num_segments(seq_len: int) -> int:
    """Segment ids a row of pairs can hold: 0 (padding), then 2 a pair, each sequence >= 1 token."""
    return 2 * (seq_len // 2) + 1


def sequence_logprobs(cfg: LlamaConfig, params, batch: Batch):
    """[B, S] float32: per row and segment id, the sum of log p(target) over weighted targets."""
    logits_BTV = Llama(cfg).apply({"params": params}, batch["inputs"], positions=batch["positions"],
                                  segment_ids=batch["segment_ids"]).astype(jnp.float32)
    target_logit_BT = jnp.take_along_axis(logits_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    logp_BT = (target_logit_BT - jax.nn.logsumexp(logits_BTV, axis=-1)) * batch["weights"]
    return segment_sums(logp_BT, batch["segment_ids"], num_segments(batch["inputs"].shape[1]))


def reference_logprobs(cfg: LlamaConfig, params_ref, batch: Batch):
    """[B, S] log-prob sums under the reference model (see sequence_logprobs); no gradient flows."""
    return jax.lax.stop_gradient(sequence_logprobs(cfg, params_ref, batch))


# The objective -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DPO:
    """The DPO objective for make_train_step: sums over pairs, divided by the number of pairs."""

    beta: float = 0.1
    batch_dtypes: ClassVar[dict[str, Any]] = {**BATCH_DTYPES, "reference": jnp.float32}

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"--dpo-beta must be > 0, got {self.beta}")

    def loss_sums(self, cfg: LlamaConfig, params, batch: Batch):
        seg_BT = batch["segment_ids"]
        S = num_segments(seg_BT.shape[1])
        policy_BS = sequence_logprobs(cfg, params, batch)
        reference_BS = segment_sums(batch["reference"], seg_BT, S)
        chosen_BP = (policy_BS - reference_BS)[:, 1::2]  # segments 1, 3, 5, ...
        rejected_BP = (policy_BS - reference_BS)[:, 2::2]  # segments 2, 4, 6, ...
        present_BP = (segment_sums(batch["weights"], seg_BT, S)[:, 1::2] > 0).astype(jnp.float32)
        h_BP = chosen_BP - rejected_BP
        losses_BP = -jax.nn.log_sigmoid(self.beta * h_BP)
        sums = {
            "loss": jnp.sum(losses_BP * present_BP),
            "margin": jnp.sum(self.beta * h_BP * present_BP),
            "correct": jnp.sum((h_BP > 0) * present_BP),
            "chosen_reward": jnp.sum(self.beta * chosen_BP * present_BP),
            "rejected_reward": jnp.sum(self.beta * rejected_BP * present_BP),
            "weight": jnp.sum(present_BP),
            "tokens": jnp.sum(batch["weights"]),
        }
        return sums["loss"], sums

    def metrics(self, sums):
        pairs = jnp.maximum(sums["weight"], 1.0)
        return {"loss": sums["loss"] / pairs, "reward_margin": sums["margin"] / pairs,
                "reward_accuracy": sums["correct"] / pairs, "chosen_reward": sums["chosen_reward"] / pairs,
                "rejected_reward": sums["rejected_reward"] / pairs, "pairs": sums["weight"], "tokens": sums["tokens"]}


# The reference pass ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _reference_forward(cfg: LlamaConfig, mesh: Mesh, logprobs_fn):
    """Jitted once per setting, so a process that trains again (resume, tests) does not recompile."""
    def forward(params, batch):
        with activation_sharding(mesh):
            return logprobs_fn(cfg, params, batch)
    return jax.jit(forward, out_shardings=NamedSharding(mesh, PartitionSpec()))


def reference_table(cfg: LlamaConfig, params_ref, pairs: PreferencePairs, mesh: Mesh, batch_size: int,
                    logprobs_fn=reference_logprobs) -> np.ndarray:
    """[num_pairs, 2] float32: (chosen, rejected) log-prob sums of every pair under `params_ref`,
    packed in batches like training's (same rows, same shardings), in record order."""
    T = pairs.seq_len
    forward = _reference_forward(cfg, mesh, logprobs_fn)
    table = np.full((len(pairs), 2), np.nan, np.float32)
    pos = 0
    while pos < len(pairs):
        batch, placed = pack_pairs(pairs, range(pos, len(pairs)), batch_size)
        batch = {k: v for k, v in batch.items() if k in BATCH_DTYPES}
        logps_BS = np.asarray(forward(params_ref, put_batch(batch, mesh)))
        for i, row, k in placed:
            table[i] = logps_BS[row, 2 * k + 1], logps_BS[row, 2 * k + 2]
        pos += len(placed)
    assert logps_BS.shape[1] == num_segments(T) and np.isfinite(table).all()
    return table


def prepare_reference(data: PreferenceBatches, out: Path, cfg: LlamaConfig, params_ref, mesh: Mesh, *,
                      resumed: bool, primary: bool = True, logprobs_fn=reference_logprobs) -> None:
    """Give `data` its reference log-probs: computed by `logprobs_fn(cfg, params_ref, batch)` (the
    initial weights; with adapters, the base without them) and written to
    OUT/reference_logprobs.npz on a fresh run, read back from there on a resumed one."""
    path = Path(out) / REFERENCE_FILE
    if resumed:
        if not path.is_file():
            raise ValueError(f"{path} is missing: a resumed DPO run reads the reference log-probs its first run "
                             f"computed from the initial weights (start afresh with a new --out)")
        stored = np.load(path)
        if str(stored["fingerprint"]) != data.pairs.fingerprint:
            raise ValueError(f"{path} holds reference log-probs of other preference data than --data gives now; "
                             f"resume with the same --data and --seq-len")
        data.reference = stored["logprobs"]
        return
    started = time.perf_counter()
    table = reference_table(cfg, params_ref, data.pairs, mesh, data.cfg.batch_size, logprobs_fn)
    log.info("reference log-probs of %d pairs computed in %.1f s", len(table), time.perf_counter() - started)
    if primary:
        staging = path.with_name(f".{path.name}.tmp.npz")
        np.savez(staging, logprobs=table, fingerprint=np.asarray(data.pairs.fingerprint))
        os.replace(staging, path)  # atomic: a killed run never leaves half a file
    data.reference = table
