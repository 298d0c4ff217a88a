"""Packing against a plain per-token reference: the same rows however the stream is split into
chunks, documents longer than a row continuing in the next, and records that round-trip."""

import numpy as np
import pytest

from llama_jax.data.pack import Packer, concatenate, decode_rows, encode_rows

T = 8


def reference_rows(examples, seq_len):
    """Token by token: a new segment at each example's start and each row's start."""
    rows, row, segment, position = [], None, 0, 0
    for e in examples:
        for t in range(len(e["inputs"])):
            if row is None or row["fill"] == seq_len:
                row = {k: np.zeros(seq_len, np.float32 if k == "weights" else np.int32)
                       for k in ("inputs", "targets", "weights", "positions", "segment_ids")} | {"fill": 0}
                rows.append(row)
                segment, position = 0, None
            if t == 0 or position is None:
                segment, position = segment + 1, 0
            i = row["fill"]
            for k in ("inputs", "targets", "weights"):
                row[k][i] = e[k][t]
            row["positions"][i], row["segment_ids"][i] = position, segment
            position += 1
            row["fill"] += 1
    return {k: np.stack([r[k] for r in rows]) for k in ("inputs", "targets", "weights", "positions", "segment_ids")}


def example(rng, n):
    ids = rng.integers(1, 100, n + 1).astype(np.int32)
    return {"inputs": ids[:-1], "targets": ids[1:], "weights": rng.integers(0, 2, n).astype(np.float32)}


@pytest.mark.parametrize("chunk", [1, 3, 50])
def test_packing_matches_the_reference_whatever_the_chunks(chunk):
    rng = np.random.default_rng(0)
    lengths = [3, 5, 0, 8, 20, 1, 7, 2, 16, 4, 9]  # an empty one, exact fits, documents spanning 2-3 rows
    examples = [example(rng, n) for n in lengths]
    packer, blocks = Packer(T), []
    for i in range(0, len(examples), chunk):
        blocks.append(packer.add(concatenate(examples[i:i + chunk])))
    blocks.append(packer.finish())
    got = {k: np.concatenate([b[k] for b in blocks if b is not None]) for k in blocks[-1]}
    want = reference_rows(examples, T)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got["segment_ids"][-1, -1] == 0  # sum(lengths) = 75: the last row is padded
    back = decode_rows(encode_rows(got), T)
    for k in want:
        np.testing.assert_array_equal(back[k], got[k], err_msg=k)
