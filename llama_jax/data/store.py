"""A prepared dataset on disk: packed rows in ArrayRecord shards (grain's random-access format) and
a manifest that says what they were made from.

    DATA/manifest.json                  format, seq_len, rows, tokens, loss-bearing tokens, the
                                        tokenizer's identity, the sources (size, sha256), the shards
    DATA/rows-00000.array_record ...    one record per row (pack.encode_row), SHARD_BYTES each at most

`PreparedData(DATA)` opens it for reading rows by index, after checking that every shard the
manifest lists is there with its size; `damaged_shards` compares their sha256 (a training run
checks them all before its first step, each process a share), and a damaged row is caught on read
by ArrayRecord's own chunk hashes besides. Either way the error is one ValueError line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax.data.pack import INT_FIELDS, decode_rows, encode_rows

FORMAT = "llama_jax packed rows 1"
MANIFEST = "manifest.json"
SHARD_BYTES = 1 << 28  # a shard closes once it holds this much; a few hundred shards for a billion tokens
# One record per chunk: a row is read without decoding its neighbours. Token ids compress about 2x
# and zstd decodes at GB/s, far above what a train step consumes.
ARRAY_RECORD_OPTIONS = "group_size:1,zstd:1"


def row_bytes(seq_len: int) -> int:
    return (len(INT_FIELDS) + 1) * 4 * seq_len


def is_prepared(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise ValueError(f"{path} is not a prepared dataset (no {MANIFEST}); make one with "
                         f"`python -m llama_jax.data prepare`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / MANIFEST}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path / MANIFEST}: not a {FORMAT!r} manifest")
    return manifest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Rows -> rows-NNNNN.array_record files of at most SHARD_BYTES of rows each, in order."""

    def __init__(self, directory: Path, seq_len: int):
        self.directory, self.seq_len = directory, seq_len
        self.rows_per_shard = max(1, SHARD_BYTES // row_bytes(seq_len))
        self.shards: list[dict[str, Any]] = []
        self.tokens = self.loss_tokens = 0
        self._writer, self._rows = None, 0

    def write(self, rows: dict[str, np.ndarray]) -> None:
        """A block of rows: dict of [n, seq_len] arrays."""
        from array_record.python.array_record_module import ArrayRecordWriter

        self.tokens += int(np.count_nonzero(rows["segment_ids"]))
        self.loss_tokens += int(np.count_nonzero(rows["weights"]))
        for record in encode_rows(rows):
            if self._writer is None:
                name = f"rows-{len(self.shards):05d}.array_record"
                self.shards.append({"file": name})
                self._writer, self._rows = ArrayRecordWriter(str(self.directory / name), ARRAY_RECORD_OPTIONS), 0
            self._writer.write(record)
            self._rows += 1
            if self._rows == self.rows_per_shard:
                self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            shard = self.shards[-1]
            path = self.directory / shard["file"]
            shard.update(rows=self._rows, bytes=path.stat().st_size, sha256=file_sha256(path))
            self._writer = None

    def close(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards


class PreparedData:
    """Random access to a prepared dataset's rows: `read([i, j, ...])` -> a batch of [n, seq_len] arrays."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.seq_len: int = self.manifest["seq_len"]
        self.rows: int = self.manifest["rows"]
        if self.rows < 1:
            raise ValueError(f"{self.path} holds no rows")
        for shard in self.manifest["shards"]:
            p = self.path / shard["file"]
            size = p.stat().st_size if p.is_file() else None
            if size != shard["bytes"]:
                found = "missing" if size is None else f"{size} bytes"
                raise ValueError(f"{p}: {found}, the manifest says {shard['bytes']} bytes: the dataset is damaged; "
                                 "prepare it again")
        if sum(s["rows"] for s in self.manifest["shards"]) != self.rows:
            raise ValueError(f"{self.path / MANIFEST}: its shards' rows do not add up to its {self.rows} rows")
        self._first_rows = np.cumsum([0] + [s["rows"] for s in self.manifest["shards"]])
        self._readers: dict[int, Any] = {}  # opened on first use: a host may never touch most shards
        self.rows_read = 0  # counted here, where rows leave the disk

    def _reader(self, shard: int):
        if shard not in self._readers:
            from array_record.python.array_record_module import ArrayRecordReader

            info = self.manifest["shards"][shard]
            try:  # no readahead: rows are read at random (grain's ArrayRecordDataSource opens them alike)
                reader = ArrayRecordReader(str(self.path / info["file"]), "readahead_buffer_size:0")
            except Exception as e:  # noqa: BLE001 - the reader's errors are not typed; any means a bad shard
                raise ValueError(f"{self.path / info['file']}: cannot be opened ({_one_line(e)}); prepare it again") \
                    from None
            if reader.num_records() != info["rows"]:
                raise ValueError(f"{self.path / info['file']}: holds {reader.num_records()} rows, the manifest says "
                                 f"{info['rows']}; prepare it again")
            self._readers[shard] = reader
        return self._readers[shard]

    def damaged_shards(self, which: Sequence[int]) -> list[int]:
        """Those of the shards numbered `which` whose sha256 is not the manifest's (reads them whole)."""
        shards = self.manifest["shards"]
        return [i for i in which if file_sha256(self.path / shards[i]["file"]) != shards[i]["sha256"]]

    @property
    def fingerprint(self) -> str:
        """One hash for the rows' content: equal for byte-identical shards, wherever they are."""
        return hashlib.sha256(json.dumps([s["sha256"] for s in self.manifest["shards"]]).encode()).hexdigest()

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Rows by global index, each shard's in one call (ArrayRecord reads them in parallel)."""
        indices = np.asarray(indices, np.int64)
        if indices.size and not (0 <= indices.min() and indices.max() < self.rows):
            raise IndexError(f"row indices must be in [0, {self.rows})")
        shards = np.searchsorted(self._first_rows, indices, side="right") - 1
        records: list[bytes] = [b""] * len(indices)
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            try:
                got = self._reader(int(shard)).read((indices[where] - self._first_rows[shard]).tolist())
            except ValueError:
                raise
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{self.path / self.manifest['shards'][shard]['file']}: corrupted "
                                 f"({_one_line(e)}); prepare it again") from None
            for i, record in zip(where, got):
                records[i] = record
        self.rows_read += len(indices)
        return decode_rows(records, self.seq_len)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__
