"""Reading by global index: step s's batch is rows order(s*B ..), a fresh permutation every epoch; a
reader of some batch positions reads exactly those rows; damaged shards fail in one line."""

import json
import shutil

import numpy as np
import pytest

from llama_jax.data import GlobalBatches, PreparedData

B = 4


def test_each_epoch_is_a_permutation_of_all_rows(prepared):
    data = PreparedData(prepared)
    N = data.rows
    batches = GlobalBatches(data, B, seed=7)
    steps = 3 * N // B + 1
    order = [i for s in range(steps) for i in batches.row_ids(s)]
    epochs = [order[e * N:(e + 1) * N] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(N))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(N))
    assert GlobalBatches(data, B, seed=7).row_ids(5) == batches.row_ids(5)  # stateless: from (seed, step) alone
    assert GlobalBatches(data, B, seed=8).row_ids(0) != batches.row_ids(0)


def test_a_reader_of_some_positions_reads_only_those_rows(prepared):
    everything = GlobalBatches(PreparedData(prepared), B, seed=0)
    data = PreparedData(prepared)
    mine = GlobalBatches(data, B, seed=0, rows=[1, 3])
    for step in (0, 1, 9):
        full, part = everything.read(step), mine.read(step)
        assert mine.row_ids(step) == [everything.row_ids(step)[i] for i in (1, 3)]
        for key in full:
            np.testing.assert_array_equal(part[key], full[key][[1, 3]])
    assert data.rows_read == 6 and mine.rows_per_s > 0


def test_damaged_shards_fail_in_one_line(prepared, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(prepared, copy)
    shard = copy / json.loads((copy / "manifest.json").read_text())["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    middle = np.flatnonzero(np.frombuffer(bytes(raw), np.uint8))[len(raw) // 20]  # in the rows, not the padding
    raw[middle] ^= 0xFF  # same size, one byte flipped: ArrayRecord's chunk hashes catch it on read
    shard.write_bytes(bytes(raw))
    data = PreparedData(copy)
    with pytest.raises(ValueError, match=r"rows-00000.array_record: corrupted \(.*\); prepare it again"):
        data.read(range(data.rows))
    shard.write_bytes(bytes(raw[:-100]))
    with pytest.raises(ValueError, match=r"rows-00000.array_record: \d+ bytes, the manifest says \d+ bytes: the "
                                         "dataset is damaged"):
        PreparedData(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ValueError, match="is not a prepared dataset"):
        PreparedData(copy)
