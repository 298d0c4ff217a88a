"""Reward scores of many answers to the same prompts, each prompt read once: the decoding engine's
paged KV cache and prefix cache (infer/) run the reward model, so the K answers of a prompt reuse the
keys and values of its full pages and only their own tokens are computed.

    scorer = SharedPrefixScorer(cfg, params, max_seq_len=1024)
    scores = scorer(groups)     # groups: [[prompt + answer ids, ...] per prompt] -> [[score, ...] per prompt]

The reward model is the causal LM with `score` [D] in place of the vocabulary projection, so the
engine's step with `output` = score[:, None] gives, at a sequence's last token, a logit row of width
one: the score (model.py's score head reads the same final-normed state). Each sequence is a request
of one token: the step that finishes its prefill is the one whose logits are read. The first
sequence of every group runs first, so its pages are in the prefix cache when the others come.

The scores equal reward.model.scores' up to float rounding (tests/reward/test_shared_prefix.py): a
paged prefill sums attention in another order than one whole-row forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.infer.engine import step_arrays
from llama_jax.infer.kv_cache import empty_pages
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.scheduler import Scheduler
from llama_jax.infer.step import model_logits_jit
from llama_jax.infer.weights import decode_params, weights_device
from llama_jax.sharding import batch_split
from llama_jax.vocab import check_token_ids

ONE_TOKEN = RequestParams(1)


class SharedPrefixScorer:
    def __init__(self, cfg: LlamaConfig, params, *, mesh=None, max_seq_len: int | None = None, max_batch: int = 16,
                 page_size: int = 16, chunk: tuple[int, int] = (4, 256)):
        """params: a reward model's (reward.model.load). max_batch: sequences in flight (a multiple of
        the mesh's dp x fsdp); chunk: (rows, tokens) of prompt fed a step."""
        if "score" not in params:
            raise ValueError("SharedPrefixScorer needs a reward model's parameters (a 'score' head)")
        multiple = batch_split(mesh)
        if max_batch % multiple or chunk[0] % multiple:
            raise ValueError(f"max_batch and the chunk's rows must be multiples of the mesh's dp x fsdp ({multiple})")
        self.max_seq_len = cfg.max_seq_len if max_seq_len is None else max_seq_len
        body = {k: v for k, v in params.items() if k != "score"}
        cfg, weights = decode_params(cfg, body, mesh)
        self.cfg, self.mesh = cfg, mesh
        self.params = weights._replace(output=jax.numpy.asarray(params["score"]).reshape(cfg.dim, 1))
        pages_per_seq = -(-self.max_seq_len // page_size)
        self.scheduler = Scheduler(max_batch=max_batch, page_size=page_size, pages_per_seq=pages_per_seq,
                                   num_pages=max_batch * pages_per_seq, decode_batches=[max_batch],
                                   chunk_shapes=[chunk], max_waiting=1 << 30)
        device = None if mesh is not None else weights_device(self.params)
        self.pages = empty_pages(cfg, max_batch * pages_per_seq, page_size, mesh=mesh, device=device)
        self._next = 0

    def __call__(self, groups: Sequence[Sequence[Sequence[int]]]) -> list[list[float]]:
        for g, group in enumerate(groups):
            for i, ids in enumerate(group):
                if not 1 <= len(ids) <= self.max_seq_len - 1:
                    raise ValueError(f"group {g} sequence {i} has {len(ids)} tokens; at most {self.max_seq_len - 1} "
                                     f"are scored here")
                check_token_ids(list(ids), self.cfg.vocab_size)
        scores = [[0.0] * len(group) for group in groups]
        keys = {}
        # The first of each group, then the rest: their prompts' full pages come from the prefix cache.
        for wave in ([(g, 0) for g in range(len(groups)) if groups[g]],
                     [(g, i) for g in range(len(groups)) for i in range(1, len(groups[g]))]):
            for g, i in wave:
                request_id = f"s{self._next}"
                self._next += 1
                keys[request_id] = (g, i)
                self.scheduler.add(request_id, list(groups[g][i]), ONE_TOKEN)
            while self.scheduler.has_work():
                plan = self.scheduler.schedule()
                inputs = step_arrays(plan, self.scheduler.page_table)
                self.pages, logits = model_logits_jit(self.params, self.pages, inputs, cfg=self.cfg, mesh=self.mesh)
                values = np.asarray(jax.device_get(logits))[:, 0]
                for row, seq in enumerate(plan.sampled):
                    g, i = keys[seq.id]
                    scores[g][i] = float(values[row])
                self.scheduler.update(plan, np.zeros(len(values), np.int32))
        return scores


__all__ = ["SharedPrefixScorer"]
