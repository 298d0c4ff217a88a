"""The decoding engine's device step: one jitted call that feeds a batch of token rows through the
model, writing their keys and values into the paged cache, and samples the next tokens.

    pages, out = model_step_jit(params, pages, inputs, cfg=cfg, mesh=mesh)   # StepInputs -> StepOutputs

One layout serves every step (the scheduler's plan, scheduler.py): B = b * T + R * C rows of one
token, the first b * T the decode rows (b running sequences, page tables decode_table_bM, T tokens
each: T = 1, or with speculative decoding the sequence's last token and its guesses to verify,
proposals_bK), the rest a chunk of R rows of C tokens (chunk_table_RM): the next pieces of prompts
being prefilled, a prompt possibly spread over several rows. Without a chunk (chunk_table_RM None)
the call is the decode rows alone. Every row writes before any row attends (kv_cache.MixedPagedKV),
so a piece sees the pieces before it. Only the L rows named by sample_at_L go through the final
norm and the vocabulary projection (on CPU a row of a 128k vocabulary costs about what a token row
through a small model's layers costs): decode rows (every position of a verified one), and the
last token of each prompt finishing here.

Hooks the step applies before sampling, each None when no row of the batch uses it (a separate
compiled program only then), in this order: the repetition penalty on the raw logits of a sparse
list of tokens per row, sparse additive logit biases (logit_bias, presence / frequency penalties,
and -inf on the stop tokens while a request is short of its min_tokens), allowed-token bitmasks
per sampled row (grammars, JSON schemas); then temperature, top-k and top-p. Page copies are done
before any write (copy-on-write of a prompt's last partial page that several samples share).
With proposals, sampling is speculative.verify's: each decode row keeps a prefix of its guesses and
one token of the model's, the hooks applied at every position as the host built them for it.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig
from llama_jax.infer import sampling
from llama_jax.infer.speculative import verify
from llama_jax.infer.kv_cache import MixedPagedKV, PagedKV, copy_pages, page_shardings
from llama_jax.infer.weights import DecodeParams
from llama_jax.model import Block, embed, rms_norm, unembed
from llama_jax.sharding import activation_sharding


class StepInputs(NamedTuple):
    tokens_B1: jax.Array  # [B, 1] int32, B = b decode rows + R * C chunk tokens
    positions_B1: jax.Array  # [B, 1] int32; negative: padding (writes nothing)
    decode_table_bM: jax.Array  # [b, M] int32: each decode row's page table
    chunk_table_RM: jax.Array | None  # [R, M] int32, each chunk row's page table; None: no chunk (B = b)
    sample_at_L: jax.Array  # [L] int32: the token (index into the B rows) each sample row reads its logits at
    seeds_L: jax.Array  # [L] uint32
    streams_L: jax.Array  # [L] uint32
    temperature_L: jax.Array  # [L] float32; 0: greedy
    top_k_L: jax.Array  # [L] int32; 0: off
    top_p_L: jax.Array  # [L] float32; 1: off
    top_logprobs_L: jax.Array  # [L] int32: how many alternatives a row wants reported (0: none)
    allowed_LW: jax.Array | None = None  # [L, ceil(V / 32)] uint32 bitmask (sampling.apply_token_mask)
    bias_ids_LN: jax.Array | None = None  # [L, N] int32 (negative: unused), with bias_LN [L, N] float32
    bias_LN: jax.Array | None = None
    page_copies_C2: jax.Array | None = None  # [C, 2] int32 (source, destination) pages (kv_cache.copy_pages)
    # With bias_ids_LN: whether the repetition penalty repetition_L [L] float32 (1: off) applies to each
    # listed token (sampling.apply_repetition_penalty); the ids of a row are then distinct.
    penalized_LN: jax.Array | None = None  # [L, N] bool
    repetition_L: jax.Array | None = None  # [L] float32
    # Speculative verification: decode row r holds its last token and then its proposals_bK[r] (-1:
    # none after them), b rows of T = K + 1 tokens; L = b * T sample rows, row r * T + j reading the
    # logits after the row's j-th token (speculative.verify keeps a prefix of the proposals).
    proposals_bK: jax.Array | None = None  # [b, K] int32


class StepOutputs(NamedTuple):
    tokens_L: jax.Array  # [L] int32
    logprobs_L: jax.Array  # [L] float32: the sampled token's log-probability under the model
    top_ids_LK: jax.Array  # [L, MAX_LOGPROBS] int32 (zeros unless a row wants them)
    top_logprobs_LK: jax.Array  # [L, MAX_LOGPROBS] float32
    # With proposals: the proposals each decode row kept; its new tokens are tokens_L[r * T: r * T + accepted + 1].
    accepted_b: jax.Array | None = None  # [b] int32


def model_step(params: DecodeParams, pages, inputs: StepInputs, *, cfg: LlamaConfig, mesh=None):
    """(pages, StepOutputs): pages is a tuple per layer of (k, v) [N, P, K, E] (donated by the jit)."""
    pages, logits_LV = model_logits(params, pages, inputs, cfg=cfg, mesh=mesh)
    return pages, sample_step(logits_LV, inputs)


def model_logits(params: DecodeParams, pages, inputs: StepInputs, *, cfg: LlamaConfig, mesh=None):
    """(pages, logits_LV): the step up to its sample rows' logits. The engine runs it apart from
    sample_step when a row's grammar mask is still being computed on the host: the device runs
    the model meanwhile, and the mask joins at sampling."""
    dt = cfg.compute_dtype
    with contextlib.nullcontext() if mesh is None else activation_sharding(mesh):
        if inputs.page_copies_C2 is not None:
            pages = copy_pages(pages, inputs.page_copies_C2)
        x_BTD = embed(params.tok_embeddings, inputs.tokens_B1, dt)
        width = 1 if inputs.proposals_bK is None else inputs.proposals_bK.shape[1] + 1
        new_pages = []
        for layer, (k_pages, v_pages) in zip(params.layers, pages):
            kv = (PagedKV(k_pages, v_pages, inputs.decode_table_bM) if inputs.chunk_table_RM is None and width == 1
                  else MixedPagedKV(k_pages, v_pages, inputs.decode_table_bM, inputs.chunk_table_RM, width))
            x_BTD, kv = Block(cfg).apply({"params": layer}, x_BTD, inputs.positions_B1, None, kv)
            new_pages.append((kv.k_pages, kv.v_pages))
        B, T, D = x_BTD.shape
        x_L1D = jnp.take(x_BTD.reshape(B * T, 1, D), inputs.sample_at_L, axis=0)
        x_L1D = rms_norm(x_L1D, params.norm["scale"], cfg.norm_eps, dt)
        logits_LV = unembed(x_L1D, params.tok_embeddings, params.output, cfg)[:, 0]
    new_pages = tuple(new_pages)
    if mesh is not None:
        new_pages = jax.lax.with_sharding_constraint(new_pages, page_shardings(new_pages, mesh))
    return new_pages, logits_LV


def sample_step(logits_LV, inputs: StepInputs) -> StepOutputs:
    """The step's sampling: hooks, then each row's own settings and key, then the log-probabilities
    (of the raw logits: the model's distribution, whatever the hooks did)."""
    logits_LV = logits_LV.astype(jnp.float32)
    shaped_LV = logits_LV
    if inputs.repetition_L is not None:
        shaped_LV = sampling.apply_repetition_penalty(shaped_LV, inputs.bias_ids_LN, inputs.penalized_LN,
                                                      inputs.repetition_L)
    if inputs.bias_ids_LN is not None:
        shaped_LV = sampling.apply_logit_bias(shaped_LV, inputs.bias_ids_LN, inputs.bias_LN)
    if inputs.allowed_LW is not None:
        shaped_LV = sampling.apply_token_mask(shaped_LV, inputs.allowed_LW)
    # The drawn token's position: one past the token whose logits it comes from.
    drawn_at_L = jnp.take(inputs.positions_B1.reshape(-1), inputs.sample_at_L) + 1
    keys_L = sampling.sampling_keys(inputs.seeds_L, inputs.streams_L, drawn_at_L)
    accepted_b = None
    if inputs.proposals_bK is None:
        tokens_L = sampling.sample_rows(shaped_LV, keys_L, inputs.temperature_L, inputs.top_k_L, inputs.top_p_L)
    else:
        b, T = inputs.proposals_bK.shape[0], inputs.proposals_bK.shape[1] + 1
        first = lambda x_L: x_L.reshape(b, T)[:, 0]  # noqa: E731 (a row's setting: the same at each position)
        accepted_b, tokens_bT = verify(shaped_LV.reshape(b, T, -1), inputs.proposals_bK,
                                       jnp.sum(inputs.proposals_bK >= 0, axis=1), keys_L.reshape(b, T),
                                       first(inputs.temperature_L), first(inputs.top_k_L), first(inputs.top_p_L))
        tokens_L = tokens_bT.reshape(-1)
    top_logprobs_LK, top_ids_LK = sampling.top_logprobs(logits_LV, inputs.top_logprobs_L)
    chosen_L = sampling.chosen_logprobs(logits_LV, jnp.maximum(tokens_L, 0))
    return StepOutputs(tokens_L, chosen_L, top_ids_LK, top_logprobs_LK, accepted_b)


model_step_jit = jax.jit(model_step, static_argnames=("cfg", "mesh"), donate_argnames=("pages",))
model_logits_jit = jax.jit(model_logits, static_argnames=("cfg", "mesh"), donate_argnames=("pages",))
sample_step_jit = jax.jit(sample_step)


__all__ = ["StepInputs", "StepOutputs", "model_step", "model_step_jit", "model_logits", "model_logits_jit",
           "sample_step", "sample_step_jit"]
