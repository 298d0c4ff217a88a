"""A training run's data: a prepared dataset (llama_jax.data) read by global row index.

`--data DATA` names a prepared directory; raw files (or none: the built-in corpus) are prepared
into OUT/data on first use, by process 0 while the others wait, so there is one read path. The
run checks that DATA was made with its tokenizer and seq_len, then each process reads, at each
step, only the rows of the global batch that its own devices hold (GlobalBatches) and places them
on the mesh. The iterator's checkpointed state is the step number plus what must not change on
resume (the rows' fingerprint, batch size, seed); the mesh and process count are free to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from llama_jax.data import GlobalBatches, PreparedData, is_prepared, prepare
from llama_jax.data.tokens import tokenizer_identity
from llama_jax.sharding.context import context_size, load_balance
from llama_jax.train.step import batch_sharding

PREPARED_DIR = "data"  # OUT/data: raw --data files, prepared on first use
_STATE_KEYS = ("dataset", "batch_size", "seed")


def data_dir(paths: tuple[str, ...], tokenizer_path: str, seq_len: int, out: Path, progress: bool) -> Path:
    """The prepared dataset to train on: `paths` itself when it is one, else OUT/data made from it."""
    if len(paths) == 1 and is_prepared(paths[0]):
        return Path(paths[0])
    target = out / PREPARED_DIR
    error = None
    if jax.process_index() == 0:
        try:
            prepare(paths, tokenizer_path, seq_len, target, progress=progress)
        except ValueError as e:
            error = e
    if jax.process_count() > 1:  # the others wait here, and hear whether it failed
        from jax.experimental import multihost_utils

        failed = multihost_utils.process_allgather(np.array([error is not None]))
        if error is None and np.any(failed):
            raise ValueError("process 0 could not prepare the training data (its error says why)")
    if error is not None:
        raise error
    return target


def process_rows(mesh: Mesh, batch_shape: tuple[int, int]) -> list[int]:
    """Positions in the global batch that this process's devices hold, in order."""
    rows = set()
    for index in batch_sharding(mesh, batch_shape).addressable_devices_indices_map(batch_shape).values():
        rows.update(range(*index[0].indices(batch_shape[0])))
    return sorted(rows)


def put_rows(local: dict[str, np.ndarray], rows: list[int], mesh: Mesh, batch_shape: tuple[int, int]):
    """Global [B, T] arrays on `mesh` from only this process's `rows` of them (as put_batch does for
    a whole batch: context parallelism's load-balanced token order first)."""
    cp = context_size(mesh)
    sharding = batch_sharding(mesh, batch_shape)
    where = {r: i for i, r in enumerate(rows)}

    def place(x):
        x = load_balance(x, cp) if cp > 1 else x

        def shard(index):
            start, stop, _ = index[0].indices(batch_shape[0])
            return x[where[start]:where[start] + stop - start][(slice(None), *index[1:])]
        return jax.make_array_from_callback(batch_shape, sharding, shard)
    return {k: place(v) for k, v in local.items()}


class TrainData:
    """Global batches on the mesh, step after step; `state()` / `restore()` for checkpoints."""

    def __init__(self, path: Path, tokenizer_path: str, seq_len: int, batch_size: int, seed: int, mesh: Mesh):
        self.data = PreparedData(path)
        manifest = self.data.manifest
        if manifest["seq_len"] != seq_len:
            raise ValueError(f"{path} was prepared with seq_len {manifest['seq_len']}, this run asks for "
                             f"--seq-len {seq_len}")
        tokenizer = tokenizer_identity(tokenizer_path)
        if manifest["tokenizer"]["sha256"] != tokenizer["sha256"]:
            raise ValueError(f"{path} was tokenized by {manifest['tokenizer']['path']}, not by this run's tokenizer "
                             f"{tokenizer_path}: prepare it again with this one, or train with --tokenizer "
                             f"{manifest['tokenizer']['path']}")
        self._check_shards()
        self.batch_shape = (batch_size, seq_len)
        self.mesh, self.seed = mesh, seed
        self.rows = process_rows(mesh, self.batch_shape)
        self.batches = GlobalBatches(self.data, batch_size, seed, self.rows)
        self.step = 0

    def _check_shards(self) -> None:
        """Every shard's sha256, each process hashing its share, before anything trains: a damaged
        shard would otherwise show only when one of its rows is drawn, steps into the run."""
        count, index = jax.process_count(), jax.process_index()
        damaged = self.data.damaged_shards(range(index, len(self.data.manifest["shards"]), count))
        if count > 1:
            from jax.experimental import multihost_utils

            found = multihost_utils.process_allgather(np.array([damaged[0] if damaged else -1]))
            damaged = sorted(int(i) for i in np.ravel(found) if i >= 0)
        if damaged:
            shard = self.data.path / self.data.manifest["shards"][damaged[0]]["file"]
            raise ValueError(f"{shard}: its sha256 is not the manifest's: the dataset is damaged; prepare it again")

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        local = self.batches.read(self.step)
        self.step += 1
        return put_rows(local, self.rows, self.mesh, self.batch_shape)

    def _identity(self) -> dict[str, Any]:
        return {"dataset": self.data.fingerprint, "batch_size": self.batch_shape[0], "seed": self.seed}

    def state(self) -> dict[str, Any]:
        return {"step": self.step, **self._identity()}

    def restore(self, state: dict[str, Any]) -> None:
        saved, now = {k: state.get(k) for k in _STATE_KEYS}, self._identity()
        if saved != now:
            changed = ", ".join(k for k in _STATE_KEYS if saved[k] != now[k])
            raise ValueError(f"the checkpoint was trained on other batches ({changed} differ): resume with the same "
                             "--data, --seq-len, --batch-size and --seed")
        self.step = int(state["step"])

    def throughput_line(self) -> str:
        rate = self.batches.rows_per_s
        return (f"process {jax.process_index()} read {self.data.rows_read} rows ({len(self.rows)} of each batch of "
                f"{self.batch_shape[0]}) at {rate:.0f} rows/s" if rate else "no rows read")
