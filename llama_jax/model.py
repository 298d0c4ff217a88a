"""The Llama 3 transformer in Flax Linen, read top to bottom: norm, rotary, attention, MLP, block, model.

    logits = Llama(cfg).apply({"params": params}, tokens)                         # [B, T, V] float32

Shape letters: B batch, T tokens in this call, D model dim, H query heads, K kv heads, E head dim,
F MLP hidden dim, V vocab, L layers, N KV pages, P slots per page, M page-table entries per row.

Parameter names follow Meta's checkpoints (tok_embeddings, wq wk wv wo, w1 w2 w3, attention_norm,
ffn_norm, norm, output) so converters are thin key maps. Layer parameters are stacked on a leading
`layers` axis; `cfg.scan_layers` only decides whether the layer loop is a lax.scan or unrolled, so
one layout serves both. Decoding is the engine's (infer/step.py): it holds its own per-layer
weights and KV pages and runs `embed`, `Block` layer by layer and `unembed`, each attention writing
to and reading from its layer's pages (the `cache_kv` view, infer/kv_cache.py).

`Llama(cfg, head="score")` is a reward model: in place of `output` a `score` vector [D] gives one
scalar per position (HF's LlamaForSequenceClassification with num_labels=1, `score.weight` [1, D]);
llama_jax/reward reads it at each sequence's last token.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import kernels
from llama_jax.config import REMAT_POLICIES, LlamaConfig
from llama_jax.vocab import check_token_ids
from llama_jax.sharding import axes


# Pure functions ----------------------------------------------------------------------------

def rms_norm(x, scale, eps: float, dtype):
    # Statistics in float32 whatever the compute dtype, as Meta and HF do: bf16 sums of squares
    # lose the small components.
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(dtype) * scale.astype(dtype)


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [E/2] of the rotary embedding, with Llama 3.1's 'llama3' scaling."""
    E = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, E, 2, dtype=np.float32) / np.float32(E)))
    inv_freq = inv_freq.astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    # Long wavelengths (beyond the original context) are stretched by `factor`; short ones are kept;
    # the band between blends linearly in original_context / wavelength.
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    blended = (1 - smooth) * inv_freq / rs.factor + smooth * inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(in_band, blended, scaled).astype(np.float32)


def apply_rope(x_BTNE, positions_BT, inv_freq):
    """Rotate consecutive pairs (x[2i], x[2i+1]) by position * inv_freq[i]: Meta's complex-number
    layout (HF checkpoints permute wq/wk rows to use rotate-half instead; converters undo that)."""
    angles_BTE2 = positions_BT.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
    cos = jnp.cos(angles_BTE2)[:, :, None, :]
    sin = jnp.sin(angles_BTE2)[:, :, None, :]
    x = x_BTNE.astype(jnp.float32).reshape(*x_BTNE.shape[:-1], -1, 2)
    x_even, x_odd = x[..., 0], x[..., 1]
    rotated = jnp.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], axis=-1)
    return rotated.reshape(x_BTNE.shape).astype(x_BTNE.dtype)


def embed(table_VD, tokens_BT, dtype):
    """Token embeddings [B, T, D] in `dtype`: rows of the [V, D] table."""
    return jnp.take(table_VD, tokens_BT, axis=0).astype(dtype)


def unembed(x_BTD, embedding_VD, output_DV, cfg: LlamaConfig):
    """Logits [B, T, V] in float32 from the final-normed activations: through `output` [D, V], or the
    embedding table itself with tied embeddings (3.2 1B / 3B). Accumulated in float32 whatever the
    compute dtype: the softmax over a 128k vocabulary needs it."""
    dt = cfg.compute_dtype
    if cfg.tie_embeddings:
        return jnp.einsum("btd,vd->btv", x_BTD, embedding_VD.astype(dt), preferred_element_type=jnp.float32)
    return jnp.einsum("btd,dv->btv", x_BTD, output_DV.astype(dt), preferred_element_type=jnp.float32)


def contract(subscripts: str, x, w, dtype):
    """jnp.einsum(subscripts, x, w) in `dtype`. A weight that is not an array may bring its own
    contraction (`w.contract`: a LoRA-adapted weight, llama_jax/lora.py); any other converts itself
    (`w.astype`: int8 weights, quantize.py)."""
    if hasattr(w, "contract"):
        return w.contract(subscripts, x, dtype)
    return jnp.einsum(subscripts, x, w.astype(dtype))


# Modules -----------------------------------------------------------------------------------

def _param(module: nn.Module, name: str, shape, logical_axes, cfg: LlamaConfig, std: float = 0.02):
    init = nn.with_logical_partitioning(nn.initializers.normal(std), logical_axes)
    return module.param(name, init, shape, cfg.weight_dtype)


class RMSNorm(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD):
        init = nn.with_logical_partitioning(nn.initializers.ones, (axes.EMBED,))
        scale = self.param("scale", init, (x_BTD.shape[-1],), self.cfg.weight_dtype)
        return rms_norm(x_BTD, scale, self.cfg.norm_eps, self.cfg.compute_dtype)


class Attention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache_kv):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        D, H, K, E = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)  # residual-branch outputs scaled down by depth
        wq = _param(self, "wq", (D, H, E), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), cfg)
        wk = _param(self, "wk", (D, K, E), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), cfg)
        wv = _param(self, "wv", (D, K, E), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), cfg)
        wo = _param(self, "wo", (H, E, D), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), cfg, out_std)

        x_BTD = x_BTD.astype(dt)
        q_BTHE = contract("btd,dhe->bthe", x_BTD, wq, dt)
        k_BTKE = contract("btd,dke->btke", x_BTD, wk, dt)
        v_BTKE = contract("btd,dke->btke", x_BTD, wv, dt)
        inv_freq = rope_frequencies(cfg)
        q_BTHE = apply_rope(q_BTHE, positions_BT, inv_freq)
        k_BTKE = apply_rope(k_BTKE, positions_BT, inv_freq)

        which = dict(impl=cfg.attention_impl, interpret=cfg.attention_interpret)
        if cache_kv is None:
            out_BTHE = kernels.attention(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, positions_BT, **which)
        else:
            out_BTHE, cache_kv = cache_kv.attend(q_BTHE, k_BTKE, v_BTKE, positions_BT, **which)
        return contract("bthz,hzd->btd", out_BTHE.astype(dt), wo, dt), cache_kv


class Mlp(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        D, F = cfg.dim, cfg.hidden_dim
        w1 = _param(self, "w1", (D, F), (axes.EMBED, axes.MLP), cfg)
        w3 = _param(self, "w3", (D, F), (axes.EMBED, axes.MLP), cfg)
        w2 = _param(self, "w2", (F, D), (axes.MLP, axes.EMBED), cfg, 0.02 / math.sqrt(2 * cfg.n_layers))
        x_BTD = x_BTD.astype(dt)
        gate_BTF = jax.nn.silu(contract("btd,df->btf", x_BTD, w1, dt))
        up_BTF = contract("btd,df->btf", x_BTD, w3, dt)
        return contract("btf,fd->btd", gate_BTF * up_BTF, w2, dt)


_ACTIVATION_AXES = (axes.ACTIVATION_BATCH, axes.ACTIVATION_LENGTH, axes.ACTIVATION_EMBED)


class Block(nn.Module):
    """Pre-norm residual block. With `cache_kv` (a paged view: the engine's, one layer at a time), the
    block's keys and values are written to its pages and attention reads them; also returns it."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache_kv):
        x_BTD = nn.with_logical_constraint(x_BTD, _ACTIVATION_AXES)
        with jax.named_scope("attention"):
            attn_BTD, cache_kv = Attention(self.cfg, name="attention")(
                RMSNorm(self.cfg, name="attention_norm")(x_BTD), positions_BT, segment_ids_BT, cache_kv)
        h_BTD = x_BTD + attn_BTD
        with jax.named_scope("mlp"):
            out_BTD = h_BTD + Mlp(self.cfg, name="feed_forward")(RMSNorm(self.cfg, name="ffn_norm")(h_BTD))
        return nn.with_logical_constraint(out_BTD, _ACTIVATION_AXES), cache_kv


def _block_class(cfg: LlamaConfig, in_scan: bool):
    if cfg.remat == "none":
        return Block
    # prevent_cse is only needed outside scan, where XLA could merge the recomputation away.
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not in_scan)


def _layer_stack(cfg: LlamaConfig):
    return nn.scan(
        _block_class(cfg, in_scan=cfg.scan_layers),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.n_layers,
        unroll=1 if cfg.scan_layers else cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: axes.LAYERS},
    )(cfg, name="layers")


HEADS = ("lm", "score")  # what Llama returns: next-token logits, or a reward model's score at every position


class Llama(nn.Module):
    cfg: LlamaConfig
    head: str = "lm"

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None):
        """Logits [B, T, V] in float32; with head="score", scores [B, T] in float32.

        positions: absolute positions (default 0..T-1). segment_ids: packed documents, attention
        never crosses a document boundary; positions should then restart at 0 for each document.
        """
        cfg, dt = self.cfg, self.cfg.compute_dtype
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        B, T = _check_inputs(cfg, tokens, positions, segment_ids)
        tokens_BT, positions_BT, segment_ids_BT = tokens, positions, segment_ids  # [B, T] each
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

        embedding_VD = _param(self, "tok_embeddings", (cfg.vocab_size, cfg.dim), (axes.VOCAB, axes.EMBED), cfg)
        # Gather rows from a table split on vocab only: with its embed dim also split (fsdp), XLA
        # replicates the whole [B, T, D] result on every device instead.
        table_VD = nn.with_logical_constraint(embedding_VD, (axes.VOCAB, None))
        x_BTD = embed(table_VD, tokens_BT, dt)

        x_BTD, _ = _layer_stack(cfg)(x_BTD, positions_BT, segment_ids_BT, None)
        x_BTD = RMSNorm(cfg, name="norm")(x_BTD)
        if self.head == "score":
            score_D = _param(self, "score", (cfg.dim,), (axes.EMBED,), cfg)
            scores_BT = jnp.einsum("btd,d->bt", x_BTD, score_D.astype(dt), preferred_element_type=jnp.float32)
            return nn.with_logical_constraint(scores_BT, (axes.ACTIVATION_BATCH, axes.ACTIVATION_LENGTH))

        output_DV = None if cfg.tie_embeddings else _param(
            self, "output", (cfg.dim, cfg.vocab_size), (axes.EMBED, axes.VOCAB), cfg)
        logits_BTV = unembed(x_BTD, embedding_VD, output_DV, cfg)
        return nn.with_logical_constraint(
            logits_BTV, (axes.ACTIVATION_BATCH, axes.ACTIVATION_LENGTH, axes.ACTIVATION_VOCAB))


def _check_inputs(cfg, tokens, positions, segment_ids):
    """Shape checks always; value checks when the tokens are concrete (not under jit)."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array [batch, seq], got {tokens.dtype}{list(tokens.shape)}")
    B, T = tokens.shape
    for name, value in (("positions", positions), ("segment_ids", segment_ids)):
        if value is not None and tuple(value.shape) != (B, T):
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected tokens' shape {(B, T)}")
    if T > cfg.max_seq_len:
        raise ValueError(f"sequence length {T} exceeds max_seq_len {cfg.max_seq_len}")
    if not isinstance(tokens, jax.core.Tracer):
        check_token_ids(tokens, cfg.vocab_size)
    return B, T
