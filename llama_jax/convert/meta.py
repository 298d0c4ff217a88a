"""Meta's download (params.json, consolidated.NN.pth, tokenizer.model) -> our checkpoint directory.

Each consolidated.NN.pth is one model-parallel shard holding a slice of every split tensor
(keymap.META_SPLIT_DIM says which dim) and a copy of every norm. Shards are read by torch_zip,
without torch: each is memory-mapped, so nothing is read until a tensor is used, and its pickle
is refused if it asks for more than tensors and plain containers (a .pth is a pickle, and a
pickle can run code). Tensors are merged one at a time, written, and their file pages handed
back to the kernel, so peak memory stays near the largest single tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np

from llama_jax.checkpoint import PARAMS_DIR, TOKENIZER_FILE, staged_directory, write_metadata
from llama_jax.config import LlamaConfig, canonical_dtype_name
from llama_jax.convert.keymap import (META_KEYS, META_KV_KEYS, META_SPLIT_DIM, embedding_name, match_tensors,
                                      output_name, template_of)
from llama_jax.convert.store import check_paths, import_params, naming_file, read_tokenizer, same_bits
from llama_jax.convert.torch_zip import PthFile

PARAMS_FILE = "params.json"
_SHARD = re.compile(r"consolidated\.(\d+)\.pth")


def shard_files(src: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth, every one present."""
    found = {int(m.group(1)): p for p in src.iterdir() if (m := _SHARD.fullmatch(p.name))}
    if not found:
        raise ValueError(f"{src}: no consolidated.NN.pth shards (a Meta download holds params.json, "
                         f"consolidated.00.pth ...)")
    count = max(found) + 1
    for i in range(count):
        if i not in found:
            raise ValueError(f"{src / f'consolidated.{i:02d}.pth'}: missing shard "
                             f"({len(found)} of consolidated.00..{count - 1:02d}.pth present)")
    return [found[i] for i in range(count)]


_DTYPES = tuple(np.dtype(t) for t in (ml_dtypes.bfloat16, np.float16, np.float32))


def load_shard(path: Path) -> PthFile:
    """One shard, memory-mapped; its state must be a dict of tensors."""
    shard = PthFile(path)
    if not isinstance(shard.state, dict) or not all(isinstance(v, np.ndarray) for v in shard.state.values()):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(shard.state).__name__}")
    return shard


class MetaShards:
    """The shards of one Meta checkpoint, validated against `cfg` (from params.json) on opening."""

    def __init__(self, files: list[Path], cfg: LlamaConfig):
        self.files, self.cfg = files, cfg
        self._template = template_of(META_KEYS, cfg)
        self._output, self._embedding = output_name(META_KEYS), embedding_name(META_KEYS)
        self._pth = [load_shard(path) for path in files]
        self._shards = [pth.state for pth in self._pth]
        self._check_count()
        self._check_names()
        self.shapes = {name: META_KEYS[self._template[name]].shape(cfg) for name in self._shards[0]}
        for path, shard in zip(files, self._shards):
            for name, tensor in shard.items():
                if tensor.dtype not in _DTYPES:
                    raise ValueError(f"{path}: {name} is {tensor.dtype}; only bfloat16, float16 and float32 "
                                     f"checkpoints are read (not quantized ones)")
                want = self._piece_shape(name)
                if tuple(tensor.shape) != want:
                    raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, {PARAMS_FILE} implies "
                                     f"{want} in each of {len(files)} shards")

    # Validation ------------------------------------------------------------------------------
    def _check_count(self) -> None:
        cfg, n = self.cfg, len(self.files)
        # Shard 0's slices say how many shards there are, when their shapes otherwise fit params.json.
        wq = self._shards[0].get("layers.0.attention.wq.weight")
        embedding = self._shards[0].get(self._embedding)
        rows = cfg.n_heads * cfg.head_dim
        if (wq is not None and embedding is not None and wq.ndim == 2 and wq.shape[1] == cfg.dim
                and 0 < wq.shape[0] < rows and rows % wq.shape[0] == 0):
            implied = rows // wq.shape[0]
            if implied > n and tuple(embedding.shape) == (cfg.vocab_size // implied, cfg.dim):
                raise ValueError(f"{self.files[0].parent / f'consolidated.{n:02d}.pth'}: missing shard: "
                                 f"{self.files[0].name} holds 1/{implied} of each split weight, but only {n} "
                                 f"shard files exist")
        sizes = {"n_heads": cfg.n_heads, "vocab_size": cfg.vocab_size, "FFN hidden dim": cfg.hidden_dim}
        for what, size in sizes.items():
            if size % n:
                raise ValueError(f"{self.files[0].parent}: {n} shards cannot split {what}={size} of {PARAMS_FILE} "
                                 f"evenly (a shard or a file too many?)")
        if cfg.n_kv_heads % n and n % cfg.n_kv_heads:
            raise ValueError(f"{self.files[0].parent}: {n} shards cannot split n_kv_heads={cfg.n_kv_heads} of "
                             f"{PARAMS_FILE} (neither divides the other)")

    def _check_names(self) -> None:
        expected = set(self._template)
        first = set(self._shards[0])
        for path, shard in zip(self.files, self._shards):
            unknown = sorted(set(shard) - expected)
            if unknown:
                raise ValueError(f"{path}: unknown tensor {unknown[0]!r}: not part of a Llama 3 model shaped like "
                                 f"{PARAMS_FILE}")
            missing = sorted((expected - set(shard)) - ({self._output} - first))
            if missing:
                raise ValueError(f"{path}: missing tensor {missing[0]!r}")

    def _piece_shape(self, name: str) -> tuple[int, ...]:
        template, cfg, n = self._template[name], self.cfg, len(self.files)
        shape = list(self.shapes[name])
        dim = META_SPLIT_DIM[template]
        if dim is not None:
            if template in META_KV_KEYS and n > cfg.n_kv_heads:
                shape[dim] = cfg.head_dim  # one kv head, repeated across n / n_kv_heads shards
            else:
                shape[dim] //= n
        return tuple(shape)

    # Properties of the checkpoint --------------------------------------------------------
    def where(self, name: str) -> str:
        return str(self.files[0])

    def dtype(self) -> str:
        """The checkpoint's dtype: that of its embeddings."""
        return canonical_dtype_name(self._shards[0][self._embedding].dtype, self._embedding)

    def output_is_embedding(self) -> bool | None:
        """None without an output projection; else whether it equals the embeddings (a tied model
        written out in full, as Meta's 3.2 1B/3B downloads are). Both are split on the vocab, so
        the shards compare one by one."""
        if self._output not in self._shards[0]:
            return None
        for pth, shard in zip(self._pth, self._shards):
            output, embedding = shard[self._output], shard[self._embedding]
            same = same_bits(output, embedding)
            pth.release(output)
            pth.release(embedding)
            if not same:
                return False
        return True

    # Reading -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def tensor(self, name: str):
        """The whole tensor `name`, in Meta's layout, merged from every shard."""
        template = self._template[name]
        dim = META_SPLIT_DIM[template]
        pieces = [shard[name] for shard in self._shards]
        try:
            if dim is None:
                first = pieces[0]
                for path, piece in zip(self.files[1:], pieces[1:]):
                    if not same_bits(piece, first):
                        raise ValueError(f"{path}: {name} differs from {self.files[0].name}'s copy (shards of "
                                         f"different models?)")
                yield first
            elif len(pieces) == 1:
                yield pieces[0]
            else:
                used = range(len(pieces))
                if template in META_KV_KEYS and len(pieces) > self.cfg.n_kv_heads:
                    used = self._unique_kv_heads(name, pieces)
                # Filled piece by piece, each piece's pages released once copied: peak is the
                # merged tensor plus one piece, not twice the tensor.
                merged = np.empty(self.shapes[name], pieces[0].dtype)
                index, start = [slice(None)] * merged.ndim, 0
                for i in used:
                    index[dim] = slice(start, start + pieces[i].shape[dim])
                    merged[tuple(index)] = pieces[i]
                    self._pth[i].release(pieces[i])
                    start += pieces[i].shape[dim]
                yield merged
        finally:
            self._release(pieces)

    def _unique_kv_heads(self, name: str, heads: list[np.ndarray]) -> range:
        """Which of the shards' kv-head copies to keep, in head order."""
        n, k = len(heads), self.cfg.n_kv_heads
        r = n // k
        same = lambda a, b: same_bits(heads[a], heads[b])  # noqa: E731
        # Shard s serves query heads s*H/n onwards, whose kv head is s // r: each kv head sits in r
        # consecutive shards (Meta's layout). llama_models' reshard_mp, splitting one full shard n
        # ways, tiles the heads instead: shard s holds head s % k. The copies say which it is.
        if all(same(s, s - s % r) for s in range(n)):
            return range(0, n, r)
        if all(same(s, s % k) for s in range(n)):
            return range(k)
        raise ValueError(f"{self.files[0].parent}: {name}: with {n} shards and {k} kv heads each kv head should be "
                         f"stored {r} times, but the copies differ")

    def _release(self, pieces) -> None:
        for pth, piece in zip(self._pth, pieces):
            pth.release(piece)


def read_config(src: Path, *, rope_scaling_factor: float | None = None, **overrides) -> LlamaConfig:
    params_file = src / PARAMS_FILE
    if not params_file.is_file():
        raise ValueError(f"{params_file}: missing (a Meta download holds params.json beside its shards)")
    try:
        return LlamaConfig.from_meta_params(params_file, rope_scaling_factor=rope_scaling_factor, **overrides)
    except ValueError as e:
        raise naming_file(params_file, e) from None


def convert_meta(src: str | os.PathLike, dst: str | os.PathLike, *, rope_scaling_factor: float | None = None,
                 dtype: str | None = None, overwrite: bool = False, progress: bool = False) -> Path:
    """Convert Meta's download at `src` into our checkpoint directory `dst`; returns `dst`.

    dtype: storage dtype of the params (default: the checkpoint's own). rope_scaling_factor:
    params.json carries none; by default it comes from the released model of the same shapes.
    """
    src, dst = Path(src).absolute(), Path(dst).absolute()
    check_paths(src, dst)
    if not src.is_dir():
        raise ValueError(f"{src}: no such directory")
    with staged_directory(dst, overwrite=overwrite) as staging:
        tokenizer_file = src / TOKENIZER_FILE
        tokenizer = read_tokenizer(tokenizer_file) if tokenizer_file.is_file() else None
        ids = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id) if tokenizer is not None else {}
        cfg = read_config(src, rope_scaling_factor=rope_scaling_factor, **ids)
        if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"{tokenizer_file}: {tokenizer.vocab_size} tokens do not fit the model's vocab_size "
                             f"{cfg.vocab_size} ({PARAMS_FILE})")
        shards = MetaShards(shard_files(src), cfg)
        tied = shards.output_is_embedding()
        cfg = dataclasses.replace(cfg, tie_embeddings=tied is not False,
                                  param_dtype=canonical_dtype_name(dtype, "dtype") if dtype else shards.dtype())
        tensors = match_tensors(META_KEYS, cfg, shards.shapes, where=shards.where, source=str(src),
                                config_file=PARAMS_FILE, ignore=(output_name(META_KEYS),) if tied else ())
        import_params(staging / PARAMS_DIR, cfg, tensors, shards.tensor, progress=progress,
                      desc=f"{src.name} -> {dst.name}")
        write_metadata(staging, cfg, tokenizer_file if tokenizer is not None else None)
    if tokenizer is None:
        warnings.warn(f"{src} has no {TOKENIZER_FILE}, so neither has {dst}: pass a tokenizer when using it")
    return dst
