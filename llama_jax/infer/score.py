"""Prompt logprobs: each prompt token's log-probability given the tokens before it, and the most
likely tokens at its place, from one causal forward pass over whole prompts (no KV cache).

    scorer = Scorer(cfg, params)                  # or Scorer.for_engine(engine): the engine's own weights
    [scored] = scorer([[128000, 791, 6864]], top_n=2)
    scored.logprobs  # [None, log p(791 | 128000), log p(6864 | 128000 791)]
    scored.top       # [None, ((id, logprob), (id, logprob)), ...]: the top_n most likely, descending

This is what `echo` with `logprobs` answers and what lm-eval's loglikelihood tasks read. It is not
a step of the batching engine: those run one token per row through the paged cache, and a score
needs every position's logits, which the engine's step projects for sampled rows only. It runs the
model's own pieces (model.embed, Block with no cache, rms_norm, unembed) on the engine's per-layer
weights (weights.DecodeParams), so it holds no second copy of the model.

Prompts are rows of one call, right-padded: causal attention keeps the padding from touching the
positions read. Lengths are padded to powers of two (at least MIN_TOKENS) and row counts to powers
of two, so a server compiles a program per (rows, tokens) pair it meets, a handful, and prompts
waiting together are scored in one call. A server's scorer compiles off the thread that runs it
(`prepare` on the request's side, batched programs on a worker of its own), so a score never holds
the engine's steps for a compile: a batch whose program is not ready yet runs one prompt at a time.
The vocabulary projection and its log-softmax run over LOGIT_CHUNK positions at a time (lax.map): a
[tokens, 128k] float32 block for a whole batch would be gigabytes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import threading
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.infer import sampling
from llama_jax.infer.requests import MAX_LOGPROBS
from llama_jax.infer.weights import DecodeParams, decode_params
from llama_jax.model import Block, embed, rms_norm, unembed
from llama_jax.sharding import activation_sharding, batch_split
from llama_jax.vocab import check_token_ids

MIN_TOKENS = 16  # the shortest padded length: fewer programs for short prompts, at little cost
LOGIT_CHUNK = 256  # positions projected onto the vocabulary at a time
DEFAULT_MAX_BATCH_TOKENS = 8192  # rows x padded length of one call at most (a longer prompt goes alone)


class PromptLogprobs(NamedTuple):
    """One prompt's scores, a list entry per token; the first token's are None (nothing precedes it)."""

    logprobs: list[float | None]
    top: list[tuple[tuple[int, float], ...] | None]  # top_n (token id, logprob) pairs, most likely first


class ScoreOutputs(NamedTuple):
    logprobs_BT: jax.Array  # [B, T] float32: log p(token t + 1 | tokens <= t); the last column is padding
    top_logprobs_BTK: jax.Array  # [B, T, MAX_LOGPROBS] float32, descending (zeros unless wanted)
    top_ids_BTK: jax.Array  # [B, T, MAX_LOGPROBS] int32


def score_step(params: DecodeParams, tokens_BT, want_top, *, cfg: LlamaConfig, mesh=None) -> ScoreOutputs:
    """Every position's next-token log-probability (and its top alternatives when `want_top`, a
    traced bool: one program either way) for B right-padded prompts of T tokens."""
    dt = cfg.compute_dtype
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    with contextlib.nullcontext() if mesh is None else activation_sharding(mesh):
        x_BTD = embed(params.tok_embeddings, tokens_BT, dt)
        for layer in params.layers:
            x_BTD, _ = Block(cfg).apply({"params": layer}, x_BTD, positions_BT, None, None)
        x_BTD = rms_norm(x_BTD, params.norm["scale"], cfg.norm_eps, dt)
    # Position t predicts token t + 1; the last position's target is padding, read by no one.
    next_BT = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros((B, 1), tokens_BT.dtype)], axis=1)
    C = math.gcd(B * T, LOGIT_CHUNK)
    x_NCD = x_BTD.reshape(B * T // C, C, x_BTD.shape[-1])
    next_NC = next_BT.reshape(B * T // C, C)

    def project(chunk):
        x_CD, next_C = chunk
        logits_CV = unembed(x_CD[:, None], params.tok_embeddings, params.output, cfg)[:, 0]
        top_CK, ids_CK = sampling.top_logprobs(logits_CV, jnp.broadcast_to(want_top.astype(jnp.int32), (C,)))
        return sampling.chosen_logprobs(logits_CV, next_C), top_CK, ids_CK

    logprobs_NC, top_NCK, ids_NCK = jax.lax.map(project, (x_NCD, next_NC))
    return ScoreOutputs(logprobs_NC.reshape(B, T), top_NCK.reshape(B, T, MAX_LOGPROBS),
                        ids_NCK.reshape(B, T, MAX_LOGPROBS))


score_step_jit = jax.jit(score_step, static_argnames=("cfg", "mesh"))


class Scorer:
    """prompt logprobs on fixed weights. Not thread-safe with the engine that shares them on a
    device: the server calls it on the engine's thread, between steps (serve/runner.py)."""

    def __init__(self, cfg: LlamaConfig, params, *, mesh=None, attention_impl: str = "auto",
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, background_compile: bool = False):
        """params: the model's (split per layer here, a copy) or DecodeParams (the engine's, shared).
        attention_impl: the whole-sequence attention (the engine's own is a paged one).
        background_compile: a call never compiles a batch's program; it scores that batch's prompts
        one at a time (their programs compiled by `prepare`, or now) while a worker thread compiles
        the batch's for later calls (the server's: its calls run between the engine's steps)."""
        cfg, self.params = decode_params(cfg, params, mesh)
        self.cfg = dataclasses.replace(cfg, attention_impl=attention_impl)
        self.mesh, self.max_batch_tokens = mesh, max_batch_tokens
        self.multiple = batch_split(mesh)
        self._programs: dict[tuple[int, int], jax.stages.Compiled] = {}  # (rows, tokens) -> compiled score_step
        self._compiling: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self._compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llama_jax-score-compile") \
            if background_compile else None

    @classmethod
    def for_engine(cls, engine, **kwargs) -> Scorer:
        """A scorer on a BatchingEngine's weights and mesh, compiling in the background."""
        return cls(engine.cfg, engine.params, mesh=engine.mesh, **{"background_compile": True, **kwargs})

    def prepare(self, lengths: Sequence[int]) -> None:
        """Compile now, on the calling thread, the programs that score a prompt of each length alone."""
        for n in lengths:
            self._check_length(n)
            self._program(self.padded_rows(1), self.padded_length(n))

    def __call__(self, prompts: Sequence[Sequence[int]], top_n: int = 0) -> list[PromptLogprobs]:
        """Each prompt's PromptLogprobs, in order. top_n: alternatives per token, in [0, MAX_LOGPROBS]."""
        if not 0 <= top_n <= MAX_LOGPROBS:
            raise ValueError(f"top_n must be in [0, {MAX_LOGPROBS}], got {top_n}")
        prompts = [[int(t) for t in prompt] for prompt in prompts]
        for prompt in prompts:
            self._check_length(len(prompt))
            check_token_ids(prompt, self.cfg.vocab_size)
        results: list[PromptLogprobs | None] = [None] * len(prompts)
        for group in self._groups([len(p) for p in prompts]):
            shape = self.padded_rows(len(group)), self.padded_length(len(prompts[group[0]]))
            calls = [group]
            if self._compiler is not None and len(group) > 1 and not self._ready(shape):
                self._compile_later(shape)
                calls = [[i] for i in group]
            for call in calls:
                for i, scored in zip(call, self._score([prompts[i] for i in call], top_n)):
                    results[i] = scored
        return results

    def _check_length(self, n: int) -> None:
        if n < 1:
            raise ValueError("a prompt to score is empty")
        if n > self.cfg.max_seq_len:
            raise ValueError(f"a prompt of {n} tokens is longer than the model's context of {self.cfg.max_seq_len}")

    def padded_length(self, n: int) -> int:
        return max(MIN_TOKENS, 1 << (n - 1).bit_length())

    def padded_rows(self, n: int) -> int:
        rows = 1 << (n - 1).bit_length()
        return -(-rows // self.multiple) * self.multiple

    def _groups(self, lengths: list[int]) -> list[list[int]]:
        """Prompt indices in calls, longest first, each call's padded rows x tokens within
        max_batch_tokens (a prompt alone may pass it)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        groups: list[list[int]] = []
        for i in order:
            if groups:
                group = groups[-1]
                T = self.padded_length(lengths[group[0]])
                if self.padded_rows(len(group) + 1) * T <= self.max_batch_tokens:
                    group.append(i)
                    continue
            groups.append([i])
        return groups

    def _ready(self, shape: tuple[int, int]) -> bool:
        with self._lock:
            return shape in self._programs

    def _compile_later(self, shape: tuple[int, int]) -> None:
        with self._lock:
            if shape in self._compiling:
                return
            self._compiling.add(shape)
        self._compiler.submit(self._program, *shape)

    def _program(self, B: int, T: int) -> jax.stages.Compiled:
        """score_step compiled for B rows of T tokens, once (two threads may both compile it: the
        first one stored is kept)."""
        with self._lock:
            program = self._programs.get((B, T))
        if program is None:
            # The arguments as _score passes them, so the program takes their placement.
            program = score_step_jit.lower(self.params, *_inputs(np.zeros((B, T), np.int32), False),
                                           cfg=self.cfg, mesh=self.mesh).compile()
            with self._lock:
                program = self._programs.setdefault((B, T), program)
        return program

    def _score(self, prompts: list[list[int]], top_n: int) -> list[PromptLogprobs]:
        B, T = self.padded_rows(len(prompts)), self.padded_length(max(len(p) for p in prompts))
        tokens_BT = np.zeros((B, T), np.int32)
        for row, prompt in enumerate(prompts):
            tokens_BT[row, :len(prompt)] = prompt
        out = jax.device_get(self._program(B, T)(self.params, *_inputs(tokens_BT, top_n > 0)))
        scored = []
        for row, prompt in enumerate(prompts):
            n = len(prompt)
            logprobs = [None] + out.logprobs_BT[row, :n - 1].tolist()
            top = [None] + [tuple(zip(ids[:top_n].tolist(), lps[:top_n].tolist())) for ids, lps in
                            zip(out.top_ids_BTK[row, :n - 1], out.top_logprobs_BTK[row, :n - 1])]
            scored.append(PromptLogprobs(logprobs, top))
        return scored


def _inputs(tokens_BT: np.ndarray, want_top: bool):
    """score_step's token and flag arguments on the device: device_put, as jnp.asarray traces a
    small program of its own for every new shape (on the engine thread, a compile like any other)."""
    return jax.device_put(tokens_BT), jax.device_put(np.asarray(want_top))


def prompt_logprobs(cfg: LlamaConfig, params, prompts: Sequence[Sequence[int]], top_n: int = 0, *,
                    mesh=None) -> list[PromptLogprobs]:
    """Scorer(cfg, params, mesh=mesh)(prompts, top_n): once, for a caller without a server."""
    return Scorer(cfg, params, mesh=mesh)(prompts, top_n)


__all__ = ["Scorer", "prompt_logprobs", "PromptLogprobs", "ScoreOutputs", "score_step", "score_step_jit", "MIN_TOKENS"]
