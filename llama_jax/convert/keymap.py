"""One declarative map between our parameter tree and Meta's / Hugging Face's tensor names.

Each entry: source name template -> (our param path, its shape in the checkpoint, layout transforms).
Layer tensors of the checkpoints are per layer (`{i}` in the name); ours are stacked on a leading
layers axis, so the entry for layer i reads or writes slice [i] of the stacked array.

Layouts (torch Linear weights are [out, in]):
    ours wq [D, H, E]  <->  Meta wq.weight [H*E, D]  <->  HF q_proj.weight [H*E, D], rows permuted
HF's checkpoints reorder each head's q/k rows from Meta's interleaved pairs (x0,x1),(x2,x3)... to
two halves (x0,x2,...),(x1,x3,...) so that HF's rotate-half rotary is equivalent; converters
undo that on import and redo it on export (getting it wrong gives a model that loads and babbles).

A reward model (model.HEADS "score") maps like the causal LM less lm_head, plus HF's
LlamaForSequenceClassification head `score.weight` [1, D] <-> ours `score` [D] (HF_REWARD_KEYS).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping

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
    shape: Callable[[LlamaConfig], tuple[int, ...]]  # the checkpoint tensor's shape (one layer)
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

# Checkpoint shapes, torch Linear layout [out, in].
_Q_ROWS = lambda cfg: (cfg.n_heads * cfg.head_dim, cfg.dim)  # noqa: E731
_KV_ROWS = lambda cfg: (cfg.n_kv_heads * cfg.head_dim, cfg.dim)  # noqa: E731
_WO = lambda cfg: (cfg.dim, cfg.n_heads * cfg.head_dim)  # noqa: E731
_MLP_IN = lambda cfg: (cfg.hidden_dim, cfg.dim)  # noqa: E731
_MLP_OUT = lambda cfg: (cfg.dim, cfg.hidden_dim)  # noqa: E731
_VOCAB = lambda cfg: (cfg.vocab_size, cfg.dim)  # noqa: E731
_NORM = lambda cfg: (cfg.dim,)  # noqa: E731


def _block_entries(hf: bool) -> dict[str, Entry]:
    return {
        "wq": Entry(("layers", "attention", "wq"), _Q_ROWS, _heads_in(_Q, hf), _heads_out(_Q, hf)),
        "wk": Entry(("layers", "attention", "wk"), _KV_ROWS, _heads_in(_KV, hf), _heads_out(_KV, hf)),
        "wv": Entry(("layers", "attention", "wv"), _KV_ROWS, _heads_in(_KV, False), _heads_out(_KV, False)),
        "wo": Entry(("layers", "attention", "wo"), _WO, _wo_in, _wo_out),
        "w1": Entry(("layers", "feed_forward", "w1"), _MLP_IN, _transpose, _transpose),
        "w2": Entry(("layers", "feed_forward", "w2"), _MLP_OUT, _transpose, _transpose),
        "w3": Entry(("layers", "feed_forward", "w3"), _MLP_IN, _transpose, _transpose),
        "attention_norm": Entry(("layers", "attention_norm", "scale"), _NORM, _same, _same),
        "ffn_norm": Entry(("layers", "ffn_norm", "scale"), _NORM, _same, _same),
    }


_META_BLOCK, _HF_BLOCK = _block_entries(hf=False), _block_entries(hf=True)
_EMBEDDINGS = Entry(("tok_embeddings",), _VOCAB, _same, _same, per_layer=False)
_FINAL_NORM = Entry(("norm", "scale"), _NORM, _same, _same, per_layer=False)
_OUTPUT = Entry(("output",), _VOCAB, _transpose, _transpose, per_layer=False)
_SCORE = Entry(("score",), lambda cfg: (1, cfg.dim), lambda w, cfg: w.reshape(cfg.dim),
               lambda w, cfg: w.reshape(1, cfg.dim), per_layer=False)

META_KEYS: dict[str, Entry] = {
    "tok_embeddings.weight": _EMBEDDINGS,
    "norm.weight": _FINAL_NORM,
    "output.weight": _OUTPUT,
    **{f"layers.{{i}}.attention.{k}.weight": _META_BLOCK[k] for k in ("wq", "wk", "wv", "wo")},
    **{f"layers.{{i}}.feed_forward.{k}.weight": _META_BLOCK[k] for k in ("w1", "w2", "w3")},
    "layers.{i}.attention_norm.weight": _META_BLOCK["attention_norm"],
    "layers.{i}.ffn_norm.weight": _META_BLOCK["ffn_norm"],
}

# How Meta's model-parallel shards (consolidated.NN.pth) split each tensor, as llama_models'
# `reshard_mp` and the fairscale layers of its llama3 model define it: column-parallel weights and
# the vocab-parallel embedding on dim 0, row-parallel weights on dim 1, norms replicated. wk / wv
# rows are whole kv heads; with more shards than kv heads each head is repeated across shards.
META_SPLIT_DIM: dict[str, int | None] = {
    "tok_embeddings.weight": 0,
    "norm.weight": None,
    "output.weight": 0,
    "layers.{i}.attention.wq.weight": 0,
    "layers.{i}.attention.wk.weight": 0,
    "layers.{i}.attention.wv.weight": 0,
    "layers.{i}.attention.wo.weight": 1,
    "layers.{i}.feed_forward.w1.weight": 0,
    "layers.{i}.feed_forward.w2.weight": 1,
    "layers.{i}.feed_forward.w3.weight": 0,
    "layers.{i}.attention_norm.weight": None,
    "layers.{i}.ffn_norm.weight": None,
}
META_KV_KEYS = ("layers.{i}.attention.wk.weight", "layers.{i}.attention.wv.weight")
assert META_SPLIT_DIM.keys() == META_KEYS.keys()

_HF_BLOCK_NAMES = {
    "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
    "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
HF_KEYS: dict[str, Entry] = {
    "model.embed_tokens.weight": _EMBEDDINGS,
    "model.norm.weight": _FINAL_NORM,
    "lm_head.weight": _OUTPUT,
    **{f"model.layers.{{i}}.{hf}.weight": _HF_BLOCK[ours] for ours, hf in _HF_BLOCK_NAMES.items()},
}
# HF's LlamaForSequenceClassification with num_labels=1: the same model less lm_head, plus its score head.
HF_REWARD_KEYS: dict[str, Entry] = {**{k: e for k, e in HF_KEYS.items() if e is not _OUTPUT}, "score.weight": _SCORE}
for _keys in (META_KEYS, HF_KEYS, HF_REWARD_KEYS):  # each of our params comes from exactly one checkpoint tensor
    assert len({entry.path for entry in _keys.values()}) == len(_keys)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor: its name, key-map entry and layer (None for unstacked params)."""

    name: str
    entry: Entry
    layer: int | None


def checkpoint_tensors(keys: dict[str, Entry], cfg: LlamaConfig) -> list[Tensor]:
    """Every tensor a checkpoint of `cfg` holds, in file order: embeddings, layer by layer, the rest."""
    out = []
    for template, entry in keys.items():
        if entry is _OUTPUT and cfg.tie_embeddings:
            continue  # tied models have no output projection of their own
        if entry.per_layer:
            out += [Tensor(template.format(i=i), entry, i) for i in range(cfg.n_layers)]
        else:
            out.append(Tensor(template, entry, None))
    rank = lambda t: (-1 if t.entry is _EMBEDDINGS else cfg.n_layers) if t.layer is None else t.layer  # noqa: E731
    return sorted(out, key=rank)


def template_of(keys: dict[str, Entry], cfg: LlamaConfig) -> dict[str, str]:
    """Every tensor name of a (tie-agnostic) checkpoint of `cfg` -> its template in `keys`."""
    return {name.format(i=i): name for name, entry in keys.items()
            for i in (range(cfg.n_layers) if entry.per_layer else [None])}


def hf_keys(head: str) -> dict[str, Entry]:
    """The HF key map of a causal LM ("lm") or a reward model ("score")."""
    return HF_REWARD_KEYS if head == "score" else HF_KEYS


def output_name(keys: dict[str, Entry]) -> str:
    """The name of the output projection in `keys` (absent from tied checkpoints)."""
    return next(name for name, entry in keys.items() if entry is _OUTPUT)


def embedding_name(keys: dict[str, Entry]) -> str:
    return next(name for name, entry in keys.items() if entry is _EMBEDDINGS)


def match_tensors(keys: dict[str, Entry], cfg: LlamaConfig, found: Mapping[str, tuple[int, ...]], *,
                  where: Callable[[str], str], source: str, config_file: str,
                  ignore: tuple[str, ...] = ()) -> list[Tensor]:
    """Check a checkpoint's tensor names and shapes against `cfg`; return the tensors to convert.

    `found`: name -> shape of every tensor the checkpoint holds; `where(name)`: the file to name in
    an error about that tensor; `source`: the checkpoint as a whole (for missing tensors); `ignore`:
    names present but deliberately skipped. Raises ValueError on the first unknown, missing or
    misshapen tensor.
    """
    tensors = checkpoint_tensors(keys, cfg)
    expected = {t.name for t in tensors}
    unknown = sorted(set(found) - expected - set(ignore))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ValueError(f"{where(unknown[0])}: unknown tensor {unknown[0]!r}{more}: not part of a Llama 3 "
                         f"model shaped like {config_file}")
    missing = [t.name for t in tensors if t.name not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{source}: missing tensor {missing[0]!r}{more}")
    for t in tensors:
        want = t.entry.shape(cfg)
        if tuple(found[t.name]) != want:
            raise ValueError(f"{where(t.name)}: {t.name} has shape {tuple(found[t.name])}, "
                             f"{config_file} implies {want}")
    return tensors


def export_tensors(keys: dict[str, Entry], cfg: LlamaConfig, params) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (checkpoint name, numpy array) one tensor at a time, from our params tree."""
    def read(path, layer):
        value = params
        for key in path:
            value = value[key]
        return np.asarray(value if layer is None else value[layer])
    for t in checkpoint_tensors(keys, cfg):
        yield t.name, t.entry.to_theirs(read(t.entry.path, t.layer), cfg)
