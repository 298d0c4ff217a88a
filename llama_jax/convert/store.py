"""Stream a parameter tree to or from a checkpoint's params/ directory one layer slice at a time.

`checkpoint.save` hands Orbax the whole tree, which a converter cannot hold (the stacked w1 of the
405B model alone is 220 GB). `ParamsWriter` writes the same directory piecewise: Orbax writes the
tree's metadata around one-element stand-ins (so the format stays Orbax's own), then each array is
re-created at full size as a zarr array chunked one layer at a time, and filled slice by slice
with tensorstore. `checkpoint.load` restores it like any other. `ParamsReader` reads slices back
from any checkpoint, including those `checkpoint.save` writes (Orbax's OCDBT layout).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from tqdm import tqdm

from llama_jax.config import LlamaConfig
from llama_jax.convert.keymap import Tensor
from llama_jax.params import param_shapes

# Chunks of at most this many bytes (a layer slice of a large model is split along its next axis):
# bounds the encoder's buffers, and makes `load` read in parallel.
CHUNK_BYTES = 64 << 20


def _leaves(tree) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _array_name(path: tuple[str, ...]) -> str:
    return ".".join(path)  # Orbax's name for a tree path


@contextlib.contextmanager
def _absl_level(level: int):
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _is_stacked(path: tuple[str, ...]) -> bool:
    return path[0] == "layers"


def _chunk_shape(shape: tuple[int, ...], itemsize: int, stacked: bool) -> list[int]:
    chunk = list(shape)
    first = 1 if stacked else 0
    if stacked:
        chunk[0] = 1
    if len(chunk) > first:
        row_bytes = itemsize * math.prod(chunk[first + 1:])
        chunk[first] = max(1, min(chunk[first], CHUNK_BYTES // max(row_bytes, 1)))
    return chunk


class ParamsWriter:
    """Writes `cfg`'s parameter tree into `params_dir` (which must not exist), slice by slice.

        writer = ParamsWriter(dir, cfg)
        writer.write(("layers", "attention", "wq"), 3, wq_of_layer_3)   # [D, H, E]
        writer.write(("norm", "scale"), None, scale)
        writer.close()   # raises if any slice was never written
    """

    def __init__(self, params_dir: str | Path, cfg: LlamaConfig, head: str = "lm"):
        params_dir = Path(params_dir)
        shapes = param_shapes(cfg, head)
        self._leaves = _leaves(shapes)
        stand_ins = jax.tree.map(lambda s: np.zeros((1,) * len(s.shape), s.dtype), shapes)
        with _absl_level(logging.ERROR):  # Orbax warns that a non-OCDBT save has no OCDBT files to merge
            ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False)).save(
                params_dir, args=ocp.args.StandardSave(stand_ins))
        self._arrays, self._block_rows, self._pending = {}, {}, {}
        for path, leaf in self._leaves.items():
            array_dir = params_dir / _array_name(path)
            if not (array_dir / ".zarray").is_file():
                raise RuntimeError(f"Orbax did not write {array_dir}/.zarray: its on-disk layout has changed")
            dtype = np.dtype(leaf.dtype)
            spec = {
                "driver": "zarr",
                "kvstore": {"driver": "file", "path": str(array_dir)},
                "dtype": dtype.name,
                "metadata": {
                    "shape": list(leaf.shape),
                    "chunks": _chunk_shape(leaf.shape, dtype.itemsize, _is_stacked(path)),
                    "compressor": {"id": "zstd", "level": 1},  # as Orbax writes
                },
                "create": True,
                "delete_existing": True,
            }
            self._arrays[path] = ts.open(spec).result()
            self._block_rows[path] = spec["metadata"]["chunks"][1 if _is_stacked(path) else 0]
            self._pending[path] = set(range(leaf.shape[0])) if _is_stacked(path) else {None}

    def write(self, path: tuple[str, ...], layer: int | None, value: np.ndarray) -> None:
        leaf = self._leaves[path]
        want = leaf.shape[1:] if layer is not None else leaf.shape
        if tuple(value.shape) != tuple(want) or np.dtype(value.dtype) != np.dtype(leaf.dtype):
            raise ValueError(f"{_array_name(path)}[{layer}]: got {value.dtype}{list(value.shape)}, "
                             f"expected {np.dtype(leaf.dtype)}{list(want)}")
        target = self._arrays[path] if layer is None else self._arrays[path][layer]
        # A chunk's worth of rows per write: tensorstore stages each write's source in full.
        rows = self._block_rows[path]
        for start in range(0, value.shape[0], rows):
            stop = min(start + rows, value.shape[0])  # tensorstore refuses slices past the end
            target[start:stop].write(value[start:stop]).result()
        self._pending[path].discard(layer)

    def close(self) -> None:
        unwritten = [f"{_array_name(p)}{sorted(s) if s != {None} else ''}" for p, s in self._pending.items() if s]
        if unwritten:
            raise ValueError(f"params never written: {', '.join(unwritten)}")


class ParamsReader:
    """Reads one layer slice (or one unstacked param) at a time from a checkpoint's params/ dir (of a
    causal LM, or of a reward model: head "score")."""

    def __init__(self, params_dir: str | Path, cfg: LlamaConfig, head: str = "lm"):
        params_dir = Path(params_dir).absolute()
        try:
            meta = json.loads((params_dir / "_METADATA").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{params_dir}: not an Orbax checkpoint ({e})") from None
        use_ocdbt = meta.get("use_ocdbt", (params_dir / "manifest.ocdbt").exists())
        driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        self._arrays = {}
        for path, leaf in _leaves(param_shapes(cfg, head)).items():
            name = _array_name(path)
            kvstore = ({"driver": "ocdbt", "base": {"driver": "file", "path": str(params_dir)}, "path": name}
                       if use_ocdbt else {"driver": "file", "path": str(params_dir / name)})
            try:
                array = ts.open({"driver": driver, "kvstore": kvstore, "open": True}).result()
            except ValueError as e:
                raise ValueError(f"{params_dir}: cannot open param {name} ({str(e).splitlines()[0]})") from None
            if tuple(array.shape) != tuple(leaf.shape):
                raise ValueError(f"{params_dir}: param {name} has shape {tuple(array.shape)}, config.json implies "
                                 f"{tuple(leaf.shape)}")
            self._arrays[path] = array

    def read(self, path: tuple[str, ...], layer: int | None) -> np.ndarray:
        array = self._arrays[path]
        return (array if layer is None else array[layer]).read().result()


def import_params(params_dir: str | Path, cfg: LlamaConfig, tensors: list[Tensor],
                  open_tensor: Callable[[str], contextlib.AbstractContextManager[np.ndarray]], *,
                  progress: bool = False, desc: str = "convert", head: str = "lm") -> None:
    """Write every tensor of a checkpoint (in its layout, as `open_tensor(name)` yields it) into our
    params tree at `params_dir` (a causal LM's, or a reward model's: head "score"), transformed by its
    key-map entry and cast to cfg.param_dtype."""
    writer = ParamsWriter(params_dir, cfg, head)
    dtype = np.dtype(cfg.weight_dtype)
    for t in tqdm(tensors, desc=desc, unit="tensor", disable=None if progress else True):
        with open_tensor(t.name) as value:
            writer.write(t.entry.path, t.layer, t.entry.to_ours(value, cfg).astype(dtype, copy=False))
    writer.close()


def check_paths(src: Path, dst: Path) -> None:
    """Refuse a destination whose replacement would delete the source."""
    src, dst = src.resolve(), dst.resolve()
    if src == dst or dst in src.parents:
        raise ValueError(f"{dst}: the destination contains the source {src}; choose another destination")


def naming_file(path: Path, error: Exception) -> ValueError:
    """`error` as a ValueError whose message starts with the full `path` (not just its file name)."""
    message = str(error)
    if not message.startswith(str(path)):
        message = f"{path}: {message.removeprefix(path.name + ': ')}"
    return ValueError(message)


def read_tokenizer(path: Path):
    """The tokenizer at `path` (llama_jax.tokenizer.load_tokenizer); errors name the file."""
    from llama_jax.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except (ValueError, OSError) as e:
        raise naming_file(path, e) from None


def same_bits(a: np.ndarray, b: np.ndarray, block: int = 1 << 22) -> bool:
    """Whether two arrays hold identical bits; compared a block at a time, so no full-size temporary."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_uint = np.dtype(f"u{a.dtype.itemsize}")
    a, b = a.reshape(-1).view(as_uint), b.reshape(-1).view(as_uint)
    return all(np.array_equal(a[i:i + block], b[i:i + block]) for i in range(0, a.size, block))
