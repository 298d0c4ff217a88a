"""Examples -> packed rows of seq_len: concatenate, then split.

Examples fill a row one after another; one that does not fit in the room left continues in the
next row, so no token is dropped and only the very last row has padding. In a row, each example
(or piece of one) is a segment: segment_ids 1, 2, ... (0 marks padding) keep attention inside a
document, and positions restart at 0 in each segment (rotary attention sees only distances).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

INT_FIELDS = ("inputs", "targets", "positions", "segment_ids")
ROW_FIELDS = (*INT_FIELDS, "weights")


class Packer:
    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self._new_row()

    def _new_row(self) -> None:
        T = self.seq_len
        self._ints = np.zeros((len(INT_FIELDS), T), np.int32)  # inputs, targets, positions, segment_ids
        self._weights = np.zeros(T, np.float32)
        self._fill = 0
        self._segments = 0

    def _take_row(self) -> dict[str, np.ndarray]:
        row = dict(zip(INT_FIELDS, self._ints)) | {"weights": self._weights}
        self._new_row()
        return row

    def add(self, example: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Pack one example; yields the rows it completes."""
        n, done = len(example["inputs"]), 0
        while done < n:
            take = min(n - done, self.seq_len - self._fill)
            span = slice(self._fill, self._fill + take)
            self._segments += 1
            self._ints[0, span] = example["inputs"][done:done + take]
            self._ints[1, span] = example["targets"][done:done + take]
            self._ints[2, span] = np.arange(take, dtype=np.int32)
            self._ints[3, span] = self._segments
            self._weights[span] = example["weights"][done:done + take]
            self._fill += take
            done += take
            if self._fill == self.seq_len:
                yield self._take_row()

    def finish(self) -> Iterator[dict[str, np.ndarray]]:
        """The last, partly filled row (padding: segment 0, weight 0), if any."""
        if self._fill:
            yield self._take_row()


def encode_row(row: dict[str, np.ndarray]) -> bytes:
    """One record: the four int32 fields, then the float32 weights, each [seq_len], little-endian."""
    ints = np.stack([row[k] for k in INT_FIELDS]).astype("<i4", copy=False)
    return ints.tobytes() + row["weights"].astype("<f4", copy=False).tobytes()


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
