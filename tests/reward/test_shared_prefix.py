"""SharedPrefixScorer: the scores of many answers to a few prompts equal reward.model's whole-row
scores, with every prompt's full pages read from the prefix cache after its first answer."""

import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import LlamaConfig
from llama_jax.reward.model import from_causal_lm, score_sequences
from llama_jax.reward.shared_prefix import SharedPrefixScorer
from tests.infer.common import random_params


def test_scores_equal_whole_row_scores_and_prompts_are_read_once():
    cfg = LlamaConfig.preset("tiny")
    rm = {**from_causal_lm(cfg, random_params(cfg, 1)),
          "score": jnp.asarray(np.random.default_rng(0).normal(0, 1, cfg.dim), jnp.float32)}
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 500, n).tolist() for n in (40, 7, 17)]
    groups = [[p + rng.integers(3, 500, rng.integers(1, 20)).tolist() for _ in range(5)] for p in prompts]
    scorer = SharedPrefixScorer(cfg, rm, max_seq_len=64, max_batch=4, page_size=8, chunk=(2, 16))
    got = scorer(groups)
    want = score_sequences(cfg, rm, [s for g in groups for s in g], batch_size=4)
    np.testing.assert_allclose([s for g in got for s in g], want, rtol=1e-5, atol=1e-5)
    # 4 of each group's 5 answers found its prompt's full pages: 40 -> 5 pages, 7 -> 0, 17 -> 2.
    assert scorer.scheduler.counters["cached_tokens"] == 4 * 8 * (5 + 0 + 2)
    assert scorer.scheduler.allocator.used == 0
    with pytest.raises(ValueError, match="a 'score' head"):
        SharedPrefixScorer(cfg, random_params(cfg, 0))
