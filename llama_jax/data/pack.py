"""Examples -> packed rows of seq_len: concatenate, then split.

Examples fill a row one after another; one that does not fit in the room left continues in the
next row, so no token is dropped and only the very last row has padding. In a row, each example
(or piece of one) is a segment: segment_ids 1, 2, ... (0 marks padding) keep attention inside a
document, and positions restart at 0 in each segment (rotary attention sees only distances).

Concatenate-then-split is a reshape of the token stream, so rows are made in blocks with numpy:
segments start where an example starts or a row does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

INT_FIELDS = ("inputs", "targets", "positions", "segment_ids")
ROW_FIELDS = (*INT_FIELDS, "weights")
STREAM_FIELDS = ("inputs", "targets", "weights")


def concatenate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Examples -> one stream: their inputs, targets and weights end to end, and `starts` (True at each
    example's first token). What a worker sends back: a few arrays, not one per document."""
    stream = {k: np.concatenate([e[k] for e in examples]) if examples else np.zeros(0, np.float32 if k == "weights"
                                                                                     else np.int32)
              for k in STREAM_FIELDS}
    starts = np.zeros(len(stream["inputs"]), bool)
    offsets = np.cumsum([0] + [len(e["inputs"]) for e in examples[:-1]])
    starts[offsets[[len(e["inputs"]) > 0 for e in examples]]] = True
    return stream | {"starts": starts}


class Packer:
    """Streams in, blocks of full rows out; the tail that does not fill a row waits for the next stream."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self._tail = concatenate([])

    def add(self, stream: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The full rows that `stream` completes, as a block of [n, seq_len] arrays (None if none)."""
        joined = {k: np.concatenate([self._tail[k], stream[k]]) for k in self._tail}
        n = len(joined["inputs"]) // self.seq_len
        cut = n * self.seq_len
        self._tail = {k: v[cut:] for k, v in joined.items()}
        return self._rows({k: v[:cut] for k, v in joined.items()}, n) if n else None

    def finish(self) -> dict[str, np.ndarray] | None:
        """The last, partly filled row (padding: zeros, segment 0), if any."""
        fill = len(self._tail["inputs"])
        if not fill:
            return None
        row = self._rows({k: np.pad(v, (0, self.seq_len - fill)) for k, v in self._tail.items()}, 1)
        row["segment_ids"][0, fill:] = 0
        row["positions"][0, fill:] = 0
        self._tail = concatenate([])
        return row

    def _rows(self, stream: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        T = self.seq_len
        starts = stream["starts"].reshape(n, T).copy()
        starts[:, 0] = True  # a row starts a segment, even mid-document
        index = np.broadcast_to(np.arange(T, dtype=np.int32), (n, T))
        segment_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
        rows = {k: stream[k].reshape(n, T) for k in STREAM_FIELDS}
        return rows | {"positions": (index - segment_start).astype(np.int32),
                       "segment_ids": np.cumsum(starts, axis=1, dtype=np.int32)}


def encode_rows(rows: dict[str, np.ndarray]) -> list[bytes]:
    """One record per row: the four int32 fields, then the float32 weights, each [seq_len], little-endian."""
    n, T = rows["inputs"].shape
    ints = np.stack([rows[k] for k in INT_FIELDS], axis=1).astype("<i4", copy=False).reshape(n, -1)
    raw = np.concatenate([ints.view(np.uint8), rows["weights"].astype("<f4", copy=False).view(np.uint8)], axis=1)
    return [r.tobytes() for r in raw]


def decode_rows(records: list[bytes], seq_len: int) -> dict[str, np.ndarray]:
    """Records -> a batch: dict of [len(records), seq_len] arrays."""
    T, n_ints = seq_len, len(INT_FIELDS)
    size = (n_ints + 1) * 4 * T
    for r in records:
        if len(r) != size:
            raise ValueError(f"a record holds {len(r)} bytes, a row of seq_len {T} has {size}")
    raw = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), size)
    ints = raw[:, :n_ints * 4 * T].view("<i4").reshape(len(records), n_ints, T)
    batch = {k: ints[:, i].astype(np.int32) for i, k in enumerate(INT_FIELDS)}
    batch["weights"] = raw[:, n_ints * 4 * T:].view("<f4").astype(np.float32)
    return batch
