"""Read a PyTorch checkpoint (torch.save's zip format, torch >= 1.6) as numpy arrays, without torch.

The format: a zip archive whose members sit under one directory, `<archive>/data.pkl` (a pickle of
the saved object) and `<archive>/data/<key>` (the raw bytes of each storage, stored uncompressed
and 64-byte aligned so they can be memory-mapped). In the pickle every tensor is a call to
`torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`, and every storage a
persistent id `('storage', torch.<Type>Storage, key, location, numel)`; dicts of tensors are plain
dicts or `collections.OrderedDict`.

A pickle can call any importable function, so the unpickler resolves only the globals above (each
to a stand-in of our own) and refuses every other one: loading a .pth never runs its code. Each
tensor is a read-only numpy view of the memory-mapped file, strided as torch saved it, so nothing
is read until a tensor is used, and two tensors saved from one storage share its bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import mmap
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
from numpy.lib.array_utils import byte_bounds

# torch's legacy (pre-1.6, non-zip) format starts with this number, pickled.
_LEGACY_MAGIC = struct.pack("<BB", 0x8A, 10) + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then file name and extra field lengths
_LOCAL_SIGNATURE = b"PK\x03\x04"


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """What the pickle's `torch.<Type>Storage` global resolves to: a dtype, and nothing callable."""
    dtype: np.dtype


# Every storage type torch.save writes for a tensor of a plain numeric dtype. They carry only data;
# which dtypes a caller accepts is its own business (the Meta converter wants floats, and says so).
_STORAGE_TYPES = {name: _StorageType(np.dtype(dtype)) for name, dtype in {
    "BFloat16Storage": ml_dtypes.bfloat16, "HalfStorage": np.float16, "FloatStorage": np.float32,
    "DoubleStorage": np.float64, "ByteStorage": np.uint8, "CharStorage": np.int8, "ShortStorage": np.int16,
    "IntStorage": np.int32, "LongStorage": np.int64, "BoolStorage": np.bool_}.items()}


class _Refused(Exception):
    """The pickle asked for a global outside the tensor vocabulary (args[0]: its dotted name)."""


class _Damaged(Exception):
    """The file is not a well-formed torch zip checkpoint (args[0]: what is wrong)."""


class _Unsupported(Exception):
    """A well-formed checkpoint this reader does not read (args[0]: which, and what to do)."""


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2, as a strided read-only view of the storage's bytes. The autograd
    flag, hooks (only empty ones get past find_class) and Python attributes mean nothing to numpy."""
    if not isinstance(storage, np.ndarray):
        raise _Damaged(f"a tensor built from {type(storage).__name__}, not a storage")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or not all(isinstance(n, int) and n >= 0 for n in (storage_offset, *size, *stride)):
        raise _Damaged(f"a tensor of size {size}, stride {stride} at storage offset {storage_offset}")
    needed = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else storage_offset
    if needed > storage.size:
        raise _Damaged(f"a tensor of size {size}, stride {stride} at storage offset {storage_offset} needs "
                       f"{needed} elements of a storage that holds {storage.size}")
    return np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=[s * storage.itemsize for s in stride], writeable=False)


_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("collections", "OrderedDict"): collections.OrderedDict} | {
    ("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storage):
        super().__init__(io.BytesIO(data))
        self._storage = storage

    def find_class(self, module, name):
        try:
            return _GLOBALS[module, name]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int) and pid[4] >= 0):
            raise _Damaged(f"an unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid  # every storage is read onto the host
        return self._storage(key, storage_type.dtype, numel)


class PthFile:
    """One torch.save file, memory-mapped. `state` is the object that was saved, every tensor in it a
    read-only numpy array viewing the file; `release(array)` drops the array's pages from memory.

    Raises ValueError naming the file, in one line, if it is not such a file, if it is damaged, or if
    its pickle asks for anything but tensors and containers.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._open(f)
        except _Refused as e:
            raise ValueError(f"{self.path}: refused to load: its pickle calls {e.args[0]}, which a weights file "
                             f"never needs; it may be malicious") from None
        except _Damaged as e:
            raise ValueError(f"{self.path}: not a readable PyTorch checkpoint, truncated or damaged "
                             f"({e.args[0]})") from None
        except _Unsupported as e:
            raise ValueError(f"{self.path}: {e.args[0]}") from None

    def _open(self, f) -> None:
        try:
            archive = zipfile.ZipFile(f)
        except zipfile.BadZipFile:
            f.seek(0)
            if _LEGACY_MAGIC in f.read(32):
                raise _Unsupported("a PyTorch checkpoint in the legacy format of torch < 1.6, which only torch "
                                   "itself reads: re-save it with torch>=1.6 (torch.save(torch.load(path), path))"
                                   ) from None
            raise _Damaged("not a zip archive") from None
        pickles = [name for name in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", name)]
        if len(pickles) != 1:
            raise _Damaged(f"{len(pickles)} */data.pkl members in its zip archive, not one")
        self._prefix = pickles[0][: -len("data.pkl")]
        byteorder = self._prefix + "byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
            raise _Unsupported("saved on a big-endian machine; only little-endian checkpoints are read")
        try:
            data = archive.read(pickles[0])
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise _Damaged(f"{pickles[0]}: {e}") from None
        self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._bytes = np.frombuffer(self._mmap, np.uint8)
        self._storages: dict[str, np.ndarray] = {}
        try:
            self.state = _Unpickler(data, functools.partial(self._storage, archive)).load()
        except (_Refused, _Damaged, _Unsupported):
            raise
        except Exception as e:  # a damaged pickle can fail in any of the unpickler's opcodes
            raise _Damaged(f"{pickles[0]}: {type(e).__name__}: {e}") from None

    def _storage(self, archive: zipfile.ZipFile, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        """Storage `key` as a 1-D array viewing the file (one view per key, however many tensors use it)."""
        if key in self._storages:
            return self._storages[key]
        name = f"{self._prefix}data/{key}"
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise _Damaged(f"no storage member {name}") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Unsupported(f"storage {name} is compressed; torch.save stores tensors uncompressed so they can "
                               f"be memory-mapped: re-save the checkpoint with torch.save")
        header = self._mmap[info.header_offset: info.header_offset + _LOCAL_HEADER.size]
        if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
            raise _Damaged(f"no zip header for {name} at byte {info.header_offset}")
        _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        nbytes = numel * dtype.itemsize
        if nbytes > info.file_size:
            raise _Damaged(f"storage {name} holds {info.file_size} bytes, its tensors need {nbytes}")
        if start + nbytes > self._bytes.size:
            raise _Damaged(f"storage {name} ends at byte {start + nbytes} of a {self._bytes.size}-byte file")
        storage = self._storages[key] = self._bytes[start: start + nbytes].view(dtype)
        return storage

    def release(self, array: np.ndarray) -> None:
        """Hands the file pages under `array` back to the kernel.

        Touched pages of a mapping stay in the process's resident set until it is unmapped, which
        would grow to the whole file; madvise(DONTNEED) drops them, and a later read faults them in
        again from the file. The mapping is read-only, so the whole pages around `array`, however
        much of them it covers, can be dropped. Where the platform has no madvise this does nothing.
        """
        lo, hi = (bound - self._bytes.ctypes.data for bound in byte_bounds(array))
        if not 0 <= lo <= hi <= self._bytes.size:
            raise ValueError(f"release: the array is not a view of {self.path}")
        first = lo // mmap.PAGESIZE * mmap.PAGESIZE
        if hasattr(mmap, "MADV_DONTNEED") and hi > first:
            self._mmap.madvise(mmap.MADV_DONTNEED, first, hi - first)
