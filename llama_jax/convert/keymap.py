"""One declarative map between our parameter tree and Meta's / Hugging Face's tensor names.

Each entry: source name template -> (our param path, layout transform). Layer tensors of the
checkpoints are per layer (`{i}` in the name); ours are stacked on a leading layers axis, so the
entry for layer i reads or writes slice [i] of the stacked array.

Layouts (torch Linear weights are [out, in]):
    ours wq [D, H, E]  <->  Meta wq.weight [H*E, D]  <->  HF q_proj.weight [H*E, D], rows permuted
HF's checkpoints reorder each head's q/k rows from Meta's interleaved pairs (x0,x1),(x2,x3)... to
two halves (x0,x2,...),(x1,x3,...) so that HF's rotate-half rotary is equivalent; converters
undo that on import and redo it on export (getting it wrong gives a model that loads and babbles).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from llama_jax.config import LlamaConfig


def interleaved_to_halves(w_RC: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's q/k row order -> HF's (per head: even rows first, then odd rows)."""
    R, C = w_RC.shape
    return w_RC.reshape(n_heads, R // n_heads // 2, 2, C).transpose(0, 2, 1, 3).reshape(R, C)


def halves_to_interleaved(w_RC: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's q/k row order -> Meta's (inverse of interleaved_to_halves)."""
    R, C = w_RC.shape
    return w_RC.reshape(n_heads, 2, R // n_heads // 2, C).transpose(0, 2, 1, 3).reshape(R, C)


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]  # our param path; a per-layer entry indexes the stacked leading axis
    to_ours: Callable[[np.ndarray, LlamaConfig], np.ndarray]  # checkpoint layout -> ours (one layer)
    to_theirs: Callable[[np.ndarray, LlamaConfig], np.ndarray]  # ours (one layer) -> checkpoint layout
    per_layer: bool = True


def _same(w, cfg):
    return w


def _transpose(w, cfg):
    return w.T


def _heads_in(n_heads_of: Callable[[LlamaConfig], int], hf: bool):
    """[N*E, D] checkpoint rows -> ours [D, N, E]."""
    def fn(w, cfg):
        n = n_heads_of(cfg)
        w = halves_to_interleaved(w, n) if hf else w
        return w.T.reshape(cfg.dim, n, cfg.head_dim)
    return fn


def _heads_out(n_heads_of: Callable[[LlamaConfig], int], hf: bool):
    """Ours [D, N, E] -> checkpoint rows [N*E, D]."""
    def fn(w, cfg):
        n = n_heads_of(cfg)
        w = w.reshape(cfg.dim, n * cfg.head_dim).T
        return interleaved_to_halves(w, n) if hf else w
    return fn


def _wo_in(w, cfg):  # [D, H*E] -> [H, E, D]
    return w.T.reshape(cfg.n_heads, cfg.head_dim, cfg.dim)


def _wo_out(w, cfg):  # [H, E, D] -> [D, H*E]
    return w.reshape(cfg.n_heads * cfg.head_dim, cfg.dim).T


_Q = lambda cfg: cfg.n_heads  # noqa: E731
_KV = lambda cfg: cfg.n_kv_heads  # noqa: E731


def _attention_entries(hf: bool) -> dict[str, Entry]:
    return {
        "wq": Entry(("layers", "attention", "wq"), _heads_in(_Q, hf), _heads_out(_Q, hf)),
        "wk": Entry(("layers", "attention", "wk"), _heads_in(_KV, hf), _heads_out(_KV, hf)),
        "wv": Entry(("layers", "attention", "wv"), _heads_in(_KV, False), _heads_out(_KV, False)),
        "wo": Entry(("layers", "attention", "wo"), _wo_in, _wo_out),
    }


def _block_entries(hf: bool) -> dict[str, Entry]:
    return _attention_entries(hf) | {
        "w1": Entry(("layers", "feed_forward", "w1"), _transpose, _transpose),
        "w2": Entry(("layers", "feed_forward", "w2"), _transpose, _transpose),
        "w3": Entry(("layers", "feed_forward", "w3"), _transpose, _transpose),
        "attention_norm": Entry(("layers", "attention_norm", "scale"), _same, _same),
        "ffn_norm": Entry(("layers", "ffn_norm", "scale"), _same, _same),
    }


_META_BLOCK, _HF_BLOCK = _block_entries(hf=False), _block_entries(hf=True)

META_KEYS: dict[str, Entry] = {
    "tok_embeddings.weight": Entry(("tok_embeddings",), _same, _same, per_layer=False),
    "norm.weight": Entry(("norm", "scale"), _same, _same, per_layer=False),
    "output.weight": Entry(("output",), _transpose, _transpose, per_layer=False),
    **{f"layers.{{i}}.attention.{k}.weight": _META_BLOCK[k] for k in ("wq", "wk", "wv", "wo")},
    **{f"layers.{{i}}.feed_forward.{k}.weight": _META_BLOCK[k] for k in ("w1", "w2", "w3")},
    "layers.{i}.attention_norm.weight": _META_BLOCK["attention_norm"],
    "layers.{i}.ffn_norm.weight": _META_BLOCK["ffn_norm"],
}

_HF_BLOCK_NAMES = {
    "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
    "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
HF_KEYS: dict[str, Entry] = {
    "model.embed_tokens.weight": Entry(("tok_embeddings",), _same, _same, per_layer=False),
    "model.norm.weight": Entry(("norm", "scale"), _same, _same, per_layer=False),
    "lm_head.weight": Entry(("output",), _transpose, _transpose, per_layer=False),
    **{f"model.layers.{{i}}.{hf}.weight": _HF_BLOCK[ours] for ours, hf in _HF_BLOCK_NAMES.items()},
}


def checkpoint_names(keys: dict[str, Entry], cfg: LlamaConfig) -> dict[str, tuple[Entry, int | None]]:
    """Every tensor name a checkpoint of `cfg` holds -> (entry, layer index or None)."""
    names = {}
    for template, entry in keys.items():
        if entry.path == ("output",) and cfg.tie_embeddings:
            continue  # tied models have no output projection of their own
        if entry.per_layer:
            names.update({template.format(i=i): (entry, i) for i in range(cfg.n_layers)})
        else:
            names[template] = (entry, None)
    return names


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def export_tensors(keys: dict[str, Entry], cfg: LlamaConfig, params):
    """Yield (checkpoint name, numpy array) one tensor at a time, from our params."""
    for name, (entry, layer) in checkpoint_names(keys, cfg).items():
        value = np.asarray(_get(params, entry.path) if layer is None else _get(params, entry.path)[layer])
        yield name, entry.to_theirs(value, cfg)
