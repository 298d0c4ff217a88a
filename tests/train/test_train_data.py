"""A run's data read by global index: two processes read disjoint rows that make up the global batch,
each only its own; a run stopped on dp4 resumes on dp2 to the same weights;
data prepared for another seq_len or tokenizer, or damaged, stops the run before it trains."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llama_jax.data import GlobalBatches, PreparedData
from llama_jax.tokenizer import write_byte_tokenizer
from llama_jax.train.__main__ import main
from llama_jax.train.loop import TrainConfig, train
from tests.processes import free_port
from tests.train.conftest import BASE, STEPS, assert_same_weights, cli_args, losses, params_of, saved_steps
from tests.train.faults import sigterm_at


@pytest.fixture(scope="module")
def prepared(uninterrupted_run):
    """The built-in corpus as the uninterrupted run prepared it into OUT/data (byte tokenizer, rows of 32)."""
    assert (uninterrupted_run / "data" / "manifest.json").is_file()
    return uninterrupted_run / "data"


def test_two_processes_read_disjoint_rows_that_make_up_the_global_batch(prepared, uninterrupted_run, tmp_path):
    tokenizer = str(uninterrupted_run / "tokenizer.model")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "tests.train.read_rows", str(prepared), tokenizer,
                               str(tmp_path / f"{i}.npz"), port, str(i)], stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
    held = [dict(np.load(tmp_path / f"{i}.npz")) for i in range(2)]
    # dp2 x fsdp2 rows: each process's devices hold one half of every batch, the halves disjoint.
    assert held[0]["rows"].tolist() == [0, 1, 2, 3] and held[1]["rows"].tolist() == [4, 5, 6, 7]
    assert [int(h["rows_read"]) for h in held] == [3 * 4, 3 * 4]  # each read only its own rows, once per step
    everything = GlobalBatches(PreparedData(prepared), 8, seed=0)
    for step in range(3):
        want = everything.read(step)["inputs"]
        covered = np.zeros(8, bool)
        for h in held:
            for key, got in h.items():
                if key.startswith(f"{step}_"):
                    _, start, stop = map(int, key.split("_"))
                    np.testing.assert_array_equal(got, want[start:stop])
                    covered[start:stop] = True
        assert covered.all()


def test_a_dp4_run_resumes_on_dp2_to_the_same_weights(prepared, uninterrupted_run, uninterrupted, tmp_path):
    # (A two-process run resuming in one process: tests/train/test_multiprocess.py.)
    stopped = tmp_path / "stopped"
    summary = train(TrainConfig(out=str(stopped), mesh="dp4,tp2", data=(str(prepared),), **BASE), sigterm_at(3))
    assert summary["steps"] == 3 and saved_steps(stopped) == [2, 3]

    # dp2,cp2,tp2: the step test_train_loop's resume chain compiles too (the run's compilation cache has it).
    resumed = train(TrainConfig(out=str(stopped), mesh="dp2,cp2,tp2", data=(str(prepared),), **BASE))
    assert resumed["resumed_from"] == 3 and resumed["steps"] == STEPS
    got = losses(stopped)
    for step in range(STEPS):
        assert got[step] == pytest.approx(uninterrupted[step], rel=1e-5), step
    assert_same_weights(params_of(stopped), params_of(uninterrupted_run))


def _other_tokenizer(path):
    """A 512-token byte tokenizer whose ids for 'a' and 'b' are swapped: same shape, other token ids."""
    write_byte_tokenizer(path)
    lines = path.read_text().splitlines()
    lines[97], lines[98] = lines[97].replace(" 97", " 98"), lines[98].replace(" 98", " 97")
    path.write_text("\n".join(lines[:97] + [lines[98], lines[97]] + lines[99:]) + "\n")
    return str(path)


def _corrupted(prepared, copy):
    shutil.copytree(prepared, copy)
    for shard in json.loads((copy / "manifest.json").read_text())["shards"]:
        raw = bytearray((copy / shard["file"]).read_bytes())
        for i in range(1000, len(raw) // 2, 4096):  # through the rows of the whole first half of each shard
            raw[i] ^= 0xFF
        (copy / shard["file"]).write_bytes(bytes(raw))
    return copy


@pytest.mark.parametrize("bad, message", [
    ("seq_len", "was prepared with seq_len 32, this run asks for --seq-len 16"),
    ("tokenizer", "was tokenized by .*tokenizer.model, not by this run's tokenizer"),
    ("corrupted", "rows-00000.array_record: its sha256 is not the manifest.s: the dataset is damaged"),
])
def test_bad_data_stops_the_run_in_one_line_before_it_trains(prepared, tmp_path, capsys, bad, message):
    import re

    data = _corrupted(prepared, tmp_path / "damaged") if bad == "corrupted" else prepared
    out = tmp_path / "run"
    flags = {"data": str(data)}
    if bad == "seq_len":
        flags["seq_len"] = 16
    if bad == "tokenizer":
        flags["tokenizer"] = _other_tokenizer(tmp_path / "other.model")
    rc = main(cli_args(out, **flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and re.search(message, err[-1]), err[-3:]
    assert "Traceback" not in "\n".join(err)
    # Nothing trained: no step logged, no checkpoint, no model (a damaged row shows when it is first read,
    # here the first batch, before the first step).
    assert not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").read_text() == ""
    assert not (out / "model").exists() and (not (out / "checkpoints").exists() or saved_steps(out) == [])


def test_data_prepared_with_the_bytes_tokenizer_trains_the_default_model(tmp_path, monkeypatch):
    """`data prepare --tokenizer bytes` then `train --data DATA` with no --config and no --tokenizer: the default
    tiny-bytes model's own tokenizer, so the run accepts the data and trains."""
    from llama_jax.data.__main__ import main as data_main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    data = tmp_path / "data"
    assert data_main(["prepare", "--data", str(corpus), "--tokenizer", "bytes", "--seq-len", "32", "--out", str(data),
                      "--no-progress"]) == 0
    out = tmp_path / "run"
    assert main(["--out", str(out), "--data", str(data), "--seq-len", "32", "--batch-size", "8", "--steps", "1",
                 "--mesh", "fsdp8", "--no-progress"]) == 0
    assert len(losses(out)) == 1 and (out / "model" / "config.json").is_file()
