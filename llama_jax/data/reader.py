"""Global batches by index: the batch at step s is rows order(s*B) .. order(s*B + B - 1), where
`order` is grain's seeded shuffle of all rows, a new permutation each epoch.

Nothing but the step number says where the data stands, so a run resumes exactly on any number of
devices and processes. Each process reads only `rows`, the positions in the global batch that its
own devices hold: on N hosts each row is read once, by the host that trains on it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from llama_jax.data.store import PreparedData


class GlobalBatches:
    def __init__(self, data: PreparedData, batch_size: int, seed: int, rows: Sequence[int] | None = None):
        import grain

        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rows = list(range(batch_size)) if rows is None else [int(r) for r in rows]
        if any(not 0 <= r < batch_size for r in self.rows):
            raise ValueError(f"rows {self.rows} are not positions in a batch of {batch_size}")
        # Stateless: order[i] is computed from (seed, i // N) and i % N, never by iterating.
        self._order = grain.MapDataset.range(data.rows).shuffle(seed=seed).repeat()
        self.seconds = 0.0  # spent reading, for rows/s

    def row_ids(self, step: int) -> list[int]:
        """The dataset rows this process reads for `step` (global batch positions `self.rows`)."""
        first = step * self.batch_size
        return [self._order[first + r] for r in self.rows]

    def read(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch at `step`: dict of [len(rows), seq_len] arrays."""
        start = time.perf_counter()
        batch = self.data.read(self.row_ids(step))
        self.seconds += time.perf_counter() - start
        return batch

    @property
    def rows_per_s(self) -> float | None:
        return self.data.rows_read / self.seconds if self.seconds else None
