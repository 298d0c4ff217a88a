"""The training loss against torch's cross entropy computed from the model's logits, padding masked."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import linen as nn

from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from llama_jax.train.step import LanguageModeling

CFG = LlamaConfig.preset("tiny")  # float32


def test_loss_is_torch_cross_entropy_of_the_logits_over_unmasked_targets():
    rng = np.random.default_rng(0)
    B, T = 2, 12
    shapes = jax.eval_shape(lambda: Llama(CFG).init(jax.random.key(0), jnp.zeros((1, T), jnp.int32)))["params"]
    params = nn.unbox(jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype), shapes))
    # Row 0: two packed documents; row 1: one document, then padding (target 0, weight 0).
    batch = {"inputs": rng.integers(3, CFG.vocab_size, (B, T)), "targets": rng.integers(3, CFG.vocab_size, (B, T)),
             "weights": np.ones((B, T), np.float32), "positions": np.tile(np.arange(T), (B, 1)),
             "segment_ids": np.ones((B, T), np.int64)}
    batch["positions"][0, 7:] = np.arange(T - 7)
    batch["segment_ids"][0, 7:] = 2
    batch["weights"][0, 6] = 0  # the end of document 1: no target across the boundary
    batch["targets"][1, 9:], batch["weights"][1, 9:], batch["segment_ids"][1, 9:] = 0, 0, 0
    batch = {k: jnp.asarray(v, jnp.float32 if k == "weights" else jnp.int32) for k, v in batch.items()}

    objective = LanguageModeling()
    step = jax.jit(lambda p, b: (objective.loss_sums(CFG, p, b)[1], Llama(CFG).apply(
        {"params": p}, b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"])))
    _, logits = step(params, batch)
    # Some targets the model's argmax, so accuracy counts hits (the logits do not depend on the targets).
    batch["targets"] = batch["targets"].at[:, ::3].set(jnp.argmax(logits[:, ::3], axis=-1))
    sums, logits = step(params, batch)
    metrics = objective.metrics(sums)

    logits = torch.from_numpy(np.asarray(logits, np.float64)).reshape(B * T, -1)
    targets = torch.from_numpy(np.asarray(batch["targets"], np.int64)).reshape(-1)
    masked = torch.from_numpy(np.asarray(batch["weights"]) == 0).reshape(-1)
    targets[masked] = -100
    kept = int((~masked).sum())
    assert kept == B * T - 1 - 3
    want_sum = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
    want_mean = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100).item()
    np.testing.assert_allclose(float(sums["nll"]), want_sum, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), want_mean, rtol=1e-5)
    assert float(sums["weight"]) == float(metrics["tokens"]) == kept
    correct = int(((logits.argmax(-1) == targets) & ~masked).sum())
    assert correct >= 6 and float(sums["correct"]) == correct and np.isclose(float(metrics["accuracy"]), correct / kept)
