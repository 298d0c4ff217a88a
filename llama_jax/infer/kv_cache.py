"""The decoding engine's KV cache on the device: per-layer page pools and the views attention writes
to and reads from (host-side page bookkeeping is pages.py's).

Each layer's keys and values live in pools [N, P, K, E] of N pages of P positions, shared by every
sequence: row b's page_table[b, i] names the page holding its positions i*P .. i*P+P-1. A token at
a negative position is padding and writes nothing. Each layer has buffers of its own rather than
one stacked [L, N, ...] pool because XLA's CPU backend copies a layer's slice out of a stacked
array at every step (the same reason the engine splits the weights per layer, weights.py).

A view is what `model.Block` takes as `cache_kv`: `attend(q, k, v, positions)` writes the call's
keys and values, then attends to every position up to each query's, and returns the updated view.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama_jax import kernels
from llama_jax.config import LlamaConfig
from llama_jax.sharding import axes, logical_to_sharding

PAGE_AXES = (None, None, axes.KV_HEADS, axes.HEAD_DIM)  # [N, P, K, E]: split over tp on kv heads


class PagedKV(NamedTuple):
    """One layer's pages seen by B rows of T tokens, row b through page_table[b]."""

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

    def attend(self, q_BTHE, k_BTKE, v_BTKE, positions_BT, **which) -> tuple[jax.Array, "PagedKV"]:
        """Write the rows' keys and values, then attend to every position up to each query's, so a
        row sees what the rows before it in its sequence write in the same call."""
        kv = self.write(k_BTKE, v_BTKE, positions_BT)
        return kernels.paged_attention(q_BTHE, kv.k_pages, kv.v_pages, kv.page_table, positions_BT, **which), kv


class MixedPagedKV(NamedTuple):
    """One layer's pages seen by the engine's one-call step: B = b * T + R * C rows of one token, the
    first b * T the decode rows (b rows of T tokens, page tables decode_table_bM: T = 1, or a
    sequence's last token and its proposals to verify, speculative decoding), then a chunk of R rows
    of C tokens each (chunk_table_RM; None: no chunk), several rows possibly holding consecutive
    pieces of one prompt. Every row's keys and values are written before any row attends, so a piece
    sees the pieces before it and a proposal the ones before it."""

    k_pages: jax.Array  # [N, P, K, E]
    v_pages: jax.Array  # [N, P, K, E]
    decode_table_bM: jax.Array  # [b, M] int32
    chunk_table_RM: jax.Array | None  # [R, M] int32
    decode_width: int = 1  # T

    def attend(self, q_BTHE, k_BTKE, v_BTKE, positions_BT, **which):
        b, T = self.decode_table_bM.shape[0], self.decode_width
        tables = [self.decode_table_bM] + ([] if self.chunk_table_RM is None else [self.chunk_table_RM])
        R = 0 if self.chunk_table_RM is None else self.chunk_table_RM.shape[0]
        C = (q_BTHE.shape[0] - b * T) // max(R, 1)

        def split(x_B1Z):
            groups = [x_B1Z[:b * T].reshape(b, T, *x_B1Z.shape[2:])]
            return groups + ([x_B1Z[b * T:].reshape(R, C, *x_B1Z.shape[2:])] if R else [])

        q, k, v, pos = map(split, (q_BTHE, k_BTKE, v_BTKE, positions_BT))
        kv = PagedKV(self.k_pages, self.v_pages, self.decode_table_bM)
        for table, k_g, v_g, pos_g in zip(tables, k, v, pos):
            kv = kv._replace(page_table=table).write(k_g, v_g, pos_g)
        outs = [kernels.paged_attention(q_g, kv.k_pages, kv.v_pages, table, pos_g, **which).reshape(
            -1, 1, *q_BTHE.shape[2:]) for table, q_g, pos_g in zip(tables, q, pos)]
        return jnp.concatenate(outs), self._replace(k_pages=kv.k_pages, v_pages=kv.v_pages)


def empty_pages(cfg: LlamaConfig, num_pages: int, page_size: int, *, mesh=None, device=None):
    """Zeroed pools, a (k, v) pair per layer, committed to `device` or placed on `mesh` as the step's
    outputs that replace them are: the step's programs are compiled per input sharding, so pools
    placed otherwise would compile a program at warm-up that no request runs."""
    shape = (num_pages, page_size, cfg.n_kv_heads, cfg.head_dim)
    if mesh is None:
        zeros = lambda: jnp.zeros(shape, cfg.compute_dtype, device=device or jax.devices()[0])  # noqa: E731
    else:
        zeros = jax.jit(lambda: jnp.zeros(shape, cfg.compute_dtype),
                        out_shardings=logical_to_sharding(PAGE_AXES, mesh, shape))
    return tuple((zeros(), zeros()) for _ in range(cfg.n_layers))


def grow_pages(pages, extra, *, mesh=None):
    """The pools with the pages of `extra` (empty_pages of the same layout) appended."""
    grown = jax.tree.map(lambda old, new: jnp.concatenate([old, new]), pages, extra)
    return grown if mesh is None else jax.device_put(grown, page_shardings(grown, mesh))


def page_shardings(pages, mesh):
    """The pools' shardings as PAGE_AXES says, a tree like `pages`."""
    sharding = logical_to_sharding(PAGE_AXES, mesh, pages[0][0].shape)
    return jax.tree.map(lambda _: sharding, pages)


def copy_pages(pages, copies_C2):
    """Every layer's page copies_C2[i, 0] copied to page copies_C2[i, 1] (rows with a negative source
    copy nothing): copy-on-write of a partial page that several sequences share (n > 1 samples of one
    prompt), done in the step before any row writes."""
    src_C, dst_C = copies_C2[:, 0], copies_C2[:, 1]
    N = pages[0][0].shape[0]
    dst_C = jnp.where(src_C >= 0, dst_C, N)  # past the pool: dropped

    def copy(pool):
        return pool.at[dst_C].set(pool[jnp.maximum(src_C, 0)], mode="drop")

    return tuple((copy(k), copy(v)) for k, v in pages)


__all__ = ["PagedKV", "MixedPagedKV", "PAGE_AXES", "empty_pages", "grow_pages", "page_shardings", "copy_pages"]
