"""Read and write safetensors files one tensor at a time.

The format: an 8-byte little-endian header length N, N bytes of JSON (name -> dtype, shape and
[begin, end) byte offsets into the data that follows; "__metadata__" -> string map), then the data.
Reading a tensor is one positioned read into a fresh array (no file-wide mmap whose touched pages
stay resident); writing lays out the header from the shapes first, so tensors can then be produced
and written one after another.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32)}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 << 20
_BLOCK_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """name -> TensorInfo of every tensor in the file; raises ValueError naming the file if it is damaged."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file, or truncated (header of {n} bytes in a file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: damaged safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: damaged safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    tensors, data_start, data_end = {}, 8 + n, 0
    for name, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: damaged safetensors header entry for {name!r}") from None
        if dtype_name not in DTYPES:
            raise ValueError(f"{path}: {name} has dtype {dtype_name}; only {', '.join(DTYPES)} are supported "
                             f"(quantized checkpoints are not)")
        dtype = DTYPES[dtype_name]
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if end - begin != nbytes or begin < 0:
            raise ValueError(f"{path}: damaged safetensors header: {name} spans {end - begin} bytes, its shape "
                             f"{list(shape)} needs {nbytes}")
        tensors[name] = TensorInfo(path, dtype, shape, data_start + begin, nbytes)
        data_end = max(data_end, end)
    if data_start + data_end > size:
        raise ValueError(f"{path}: truncated: its header describes {data_start + data_end} bytes, the file has {size}")
    return tensors


def read_tensor(info: TensorInfo) -> np.ndarray:
    with open(info.path, "rb") as f:
        f.seek(info.offset)
        buffer = bytearray(info.nbytes)
        if f.readinto(buffer) != info.nbytes:
            raise ValueError(f"{info.path}: truncated while reading a tensor")
    return np.frombuffer(buffer, info.dtype).reshape(info.shape)


def write_file(path: str | os.PathLike, tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]],
               produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (name, shape, dtype), in order, calling `produce(name)` for each one's data."""
    entries, offset = {}, 0
    for name, shape, dtype in tensors:
        nbytes = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
        entries[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps({"__metadata__": metadata or {}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for name, shape, dtype in tensors:
            value = produce(name)
            if value.shape != tuple(shape) or value.dtype != np.dtype(dtype):
                raise ValueError(f"{name}: produced {value.dtype}{list(value.shape)}, expected "
                                 f"{np.dtype(dtype)}{list(shape)}")
            # Row blocks: a transposed view is made contiguous a block at a time, not all at once.
            rows = max(1, _BLOCK_BYTES // max(value[:1].nbytes, 1))
            for start in range(0, value.shape[0], rows):
                f.write(np.ascontiguousarray(value[start:start + rows]).reshape(-1).view(np.uint8).data)
