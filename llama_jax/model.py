"""The Llama 3 transformer in Flax Linen, read top to bottom: norm, rotary, attention, MLP, block, model.

    logits = Llama(cfg).apply({"params": params}, tokens)                         # [B, T, V] float32
    logits, cache = Llama(cfg).apply({"params": params}, tokens, positions=p, cache=cache)

Shape letters: B batch, T tokens in this call, S KV-cache length, D model dim, H query heads,
K kv heads, E head dim, F MLP hidden dim, V vocab, L layers.

Parameter names follow Meta's checkpoints (tok_embeddings, wq wk wv wo, w1 w2 w3, attention_norm,
ffn_norm, norm, output) so converters are thin key maps. Layer parameters are stacked on a leading
`layers` axis (training, checkpoints); `cfg.scan_layers` only decides whether the layer loop is a
lax.scan or unrolled, so one checkpoint layout serves both. Decoding uses `cfg.per_layer_params`:
one subtree per layer (`layers_0`, ...), made by `split_layers`, so each layer's weights and cache
are their own buffers (see LlamaConfig.per_layer_params).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import kernels
from llama_jax.config import LlamaConfig
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


class KVCache(NamedTuple):
    """Preallocated keys and values of every layer; slot s of a sequence holds its position s.

    Stacked: k and v are arrays [L, B, S, K, E]. With cfg.per_layer_params: tuples of L arrays
    [B, S, K, E], one buffer per layer, which a donated decode step updates in place."""

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]

    LOGICAL_AXES = (axes.LAYERS, axes.CACHE_BATCH, axes.CACHE_LENGTH, axes.KV_HEADS, axes.HEAD_DIM)

    @classmethod
    def init(cls, cfg: LlamaConfig, batch_size: int, max_len: int, dtype=None) -> "KVCache":
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        layer_shape = (batch_size, max_len, cfg.n_kv_heads, cfg.head_dim)
        dtype = cfg.compute_dtype if dtype is None else dtype
        if cfg.per_layer_params:
            zeros = lambda: tuple(jnp.zeros(layer_shape, dtype) for _ in range(cfg.n_layers))  # noqa: E731
            return cls(zeros(), zeros())
        shape = (cfg.n_layers,) + layer_shape
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """(B, S, K, E)"""
        return tuple(self.k[0].shape if self.per_layer else self.k.shape[1:])

    @property
    def logical_axes(self) -> tuple[str, ...]:
        """The logical axes of each array: without the layer axis when per layer."""
        return self.LOGICAL_AXES[1:] if self.per_layer else self.LOGICAL_AXES

    @property
    def max_len(self) -> int:
        return self.layer_shape[1]


class PagedKV(NamedTuple):
    """One layer's keys and values in fixed-size pages shared by every sequence of a batch (the
    continuous-batching engine's layout, infer/batching.py): page_table[b, i] names the pool page
    that holds sequence b's positions i*P .. i*P+P-1. A token at a negative position is padding:
    it writes nothing."""

    k_pages: jax.Array  # [N, P, K, E]
    v_pages: jax.Array  # [N, P, K, E]
    page_table: jax.Array  # [B, M] int32

    def write(self, k_BTKE, v_BTKE, positions_BT) -> "PagedKV":
        N, P = self.k_pages.shape[:2]
        page_BT = jnp.take_along_axis(self.page_table, jnp.maximum(positions_BT, 0) // P, axis=1)
        page_BT = jnp.where(positions_BT >= 0, page_BT, N)  # past the pool: dropped by the scatter
        slot_BT = positions_BT % P
        put = lambda pages, new: pages.at[page_BT, slot_BT].set(new.astype(pages.dtype), mode="drop")  # noqa: E731
        return self._replace(k_pages=put(self.k_pages, k_BTKE), v_pages=put(self.v_pages, v_BTKE))


def _write_cache(cache_BSKE, new_BTKE, start_B):
    """Write each sequence's new entries at its own start slot (prompts of unequal lengths)."""
    write = lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (s, 0, 0))  # noqa: E731
    return jax.vmap(write)(cache_BSKE, new_BTKE.astype(cache_BSKE.dtype), start_B)


def contract(subscripts: str, x, w, dtype):
    """jnp.einsum(subscripts, x, w) in `dtype`. A weight that is not an array may bring its own
    contraction (`w.contract`: a LoRA-adapted weight, llama_jax/lora.py); any other converts itself
    (`w.astype`: int8 weights, infer/quantize.py)."""
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
            new_cache_kv = None
        elif isinstance(cache_kv, PagedKV):
            new_cache_kv = cache_kv.write(k_BTKE, v_BTKE, positions_BT)
            out_BTHE = kernels.paged_attention(q_BTHE, new_cache_kv.k_pages, new_cache_kv.v_pages,
                                               new_cache_kv.page_table, positions_BT, **which)
        else:
            # The chunk's tokens occupy consecutive slots starting at each sequence's first position.
            k_BSKE, v_BSKE = cache_kv
            start_B = positions_BT[:, 0]
            k_BSKE = _write_cache(k_BSKE, k_BTKE, start_B)
            v_BSKE = _write_cache(v_BSKE, v_BTKE, start_B)
            out_BTHE = kernels.cached_attention(q_BTHE, k_BSKE.astype(dt), v_BSKE.astype(dt), positions_BT, **which)
            new_cache_kv = (k_BSKE, v_BSKE)
        return contract("bthe,hed->btd", out_BTHE.astype(dt), wo, dt), new_cache_kv


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
    """Pre-norm residual block; the scan carries x, and each layer's cache slice is scanned over."""

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


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _block_class(cfg: LlamaConfig, in_scan: bool):
    if cfg.remat == "none":
        return Block
    # prevent_cse is only needed outside scan, where XLA could merge the recomputation away.
    return nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not in_scan)


def _layer_stack(cfg: LlamaConfig):
    return nn.scan(
        _block_class(cfg, in_scan=cfg.scan_layers),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, 0),
        length=cfg.n_layers,
        unroll=1 if cfg.scan_layers else cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: axes.LAYERS},
    )(cfg, name="layers")


class Llama(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None, logits_at=None):
        """Logits [B, T, V] in float32; with `cache`, also the updated cache.

        positions: absolute positions (default 0..T-1); with a cache, each row's tokens are written
        at slots positions[b, 0] onward. segment_ids: packed documents (no cache), attention never
        crosses a document boundary; positions should then restart at 0 for each document.
        logits_at: [B] int, an index into each row's T tokens: only that token's logits are made,
        [B, 1, V] (a prefill needs one position per row, not a [B, T, V] block).
        """
        cfg, dt = self.cfg, self.cfg.compute_dtype
        B, T = _check_inputs(cfg, tokens, positions, segment_ids, cache, logits_at)
        tokens_BT, positions_BT, segment_ids_BT = tokens, positions, segment_ids  # [B, T] each
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

        embedding_VD = _param(self, "tok_embeddings", (cfg.vocab_size, cfg.dim), (axes.VOCAB, axes.EMBED), cfg)
        # Gather rows from a table split on vocab only: with its embed dim also split (fsdp), XLA
        # replicates the whole [B, T, D] result on every device instead.
        table_VD = nn.with_logical_constraint(embedding_VD, (axes.VOCAB, None))
        x_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(dt)

        if cfg.per_layer_params:
            x_BTD, cache = _per_layer_loop(cfg, x_BTD, positions_BT, segment_ids_BT, cache)
        else:
            cache_kv = None if cache is None else (cache.k, cache.v)
            x_BTD, cache_kv = _layer_stack(cfg)(x_BTD, positions_BT, segment_ids_BT, cache_kv)
            cache = None if cache is None else KVCache(*cache_kv)
        if logits_at is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logits_at.astype(jnp.int32)[:, None, None], axis=1)
        x_BTD = RMSNorm(cfg, name="norm")(x_BTD)

        if cfg.tie_embeddings:
            logits_BTV = jnp.einsum("btd,vd->btv", x_BTD, embedding_VD.astype(dt),
                                    preferred_element_type=jnp.float32)
        else:
            output_DV = _param(self, "output", (cfg.dim, cfg.vocab_size), (axes.EMBED, axes.VOCAB), cfg)
            logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, output_DV.astype(dt), preferred_element_type=jnp.float32)
        logits_BTV = nn.with_logical_constraint(
            logits_BTV, (axes.ACTIVATION_BATCH, axes.ACTIVATION_LENGTH, axes.ACTIVATION_VOCAB))
        if cache is None:
            return logits_BTV
        return logits_BTV, cache


def _per_layer_loop(cfg: LlamaConfig, x_BTD, positions_BT, segment_ids_BT, cache: KVCache | None):
    """The unrolled layer loop over per-layer parameters `layers_i` and per-layer cache buffers."""
    if cache is not None and not cache.per_layer:
        raise ValueError("per_layer_params needs a per-layer KVCache (KVCache.init with the same config)")
    block = _block_class(cfg, in_scan=False)
    new_k, new_v = [], []
    for i in range(cfg.n_layers):
        layer_kv = None if cache is None else (cache.k[i], cache.v[i])
        x_BTD, layer_kv = block(cfg, name=f"layers_{i}")(x_BTD, positions_BT, segment_ids_BT, layer_kv)
        if cache is not None:
            new_k.append(layer_kv[0])
            new_v.append(layer_kv[1])
    return x_BTD, None if cache is None else KVCache(tuple(new_k), tuple(new_v))


def _check_inputs(cfg, tokens, positions, segment_ids, cache, logits_at):
    """Shape checks always; value checks when the tokens are concrete (not under jit)."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array [batch, seq], got {tokens.dtype}{list(tokens.shape)}")
    B, T = tokens.shape
    for name, value in (("positions", positions), ("segment_ids", segment_ids)):
        if value is not None and tuple(value.shape) != (B, T):
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected tokens' shape {(B, T)}")
    if logits_at is not None and tuple(logits_at.shape) != (B,):
        raise ValueError(f"logits_at has shape {tuple(logits_at.shape)}, expected ({B},): one index per row")
    if cache is None and T > cfg.max_seq_len:
        raise ValueError(f"sequence length {T} exceeds max_seq_len {cfg.max_seq_len}")
    if cache is not None:
        if segment_ids is not None:
            raise ValueError("segment_ids are for packed training sequences; they cannot be used with a KV cache")
        if positions is None:
            raise ValueError("positions are required with a KV cache (they say which cache slots to write)")
        if cache.layer_shape[0] != B or T > cache.max_len:
            raise ValueError(f"cache of batch {cache.layer_shape[0]} and length {cache.max_len} cannot hold tokens "
                             f"of shape {(B, T)}")
    if not isinstance(tokens, jax.core.Tracer):
        values = np.asarray(tokens)
        if values.size and (values.min() < 0 or values.max() >= cfg.vocab_size):
            bad = values[(values < 0) | (values >= cfg.vocab_size)].flat[0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {cfg.vocab_size})")
    if cache is not None and positions is not None and not isinstance(positions, jax.core.Tracer):
        end = int(np.max(np.asarray(positions))) + 1
        if end > cache.max_len:
            raise ValueError(f"position {end - 1} does not fit in a KV cache of length {cache.max_len}")
    return B, T


# Parameters --------------------------------------------------------------------------------

def _boxed_shapes(cfg: LlamaConfig):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), tokens))["params"]


def param_logical_axes(cfg: LlamaConfig):
    """The tree of logical axis names (a PartitionSpec per parameter), without allocating anything."""
    return nn.get_partition_spec(_boxed_shapes(cfg))


def param_shapes(cfg: LlamaConfig):
    """The tree of jax.ShapeDtypeStruct of every parameter, without allocating anything."""
    return nn.meta.unbox(_boxed_shapes(cfg))


def init_params(cfg: LlamaConfig, rng: jax.Array | int = 0):
    """Random parameters (plain arrays, in cfg.param_dtype) on the default device."""
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(lambda r: nn.meta.unbox(Llama(cfg).init(r, tokens)["params"]))
    return init(rng)


# Layer layouts ------------------------------------------------------------------------------

def split_layers(cfg: LlamaConfig, params, *, donate: bool = False) -> tuple[LlamaConfig, dict]:
    """(cfg, params) with the stacked `layers` subtree split into `layers_0` .. `layers_{L-1}`.

    The split copies the layer weights. With `donate`, each stacked leaf is deleted once split (the
    tree passed in is unusable afterwards), so the peak is the model plus one stacked leaf instead
    of twice the layers. A leaf sharded over a mesh keeps its sharding on the remaining dims (the
    layer axis is never split)."""
    if cfg.per_layer_params:
        return cfg, params
    params = dict(params)
    leaves, treedef = jax.tree_util.tree_flatten(params.pop("layers"))
    per_layer = [[] for _ in range(cfg.n_layers)]
    for leaf in leaves:
        for i, piece in enumerate(_unstack(leaf)):
            per_layer[i].append(piece)
        if donate and isinstance(leaf, jax.Array):
            leaf.delete()
    for i, leaves in enumerate(per_layer):
        params[f"layers_{i}"] = jax.tree_util.tree_unflatten(treedef, leaves)
    return dataclasses.replace(cfg, per_layer_params=True), params


def stack_layers(cfg: LlamaConfig, params) -> tuple[LlamaConfig, dict]:
    """The inverse of split_layers: one stacked `layers` subtree (the checkpoint layout)."""
    if not cfg.per_layer_params:
        return cfg, params
    params = dict(params)
    layers = [params.pop(f"layers_{i}") for i in range(cfg.n_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return dataclasses.replace(cfg, per_layer_params=False), params


def _unstack(leaf) -> list:
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
        if spec[0] is not None:
            raise ValueError("split_layers: the stacked layer axis is sharded; it must be replicated")
        out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
        return list(jax.jit(lambda a: tuple(a), out_shardings=(out,) * leaf.shape[0])(leaf))
    return list(jax.jit(lambda a: tuple(a))(leaf)) if isinstance(leaf, jax.Array) else list(leaf)
