"""Two processes of 4 CPU devices each (jax.distributed over localhost, gloo collectives) train like
one process of 8 devices, stop together on SIGTERM, and their checkpoint resumes in one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llama_jax.train.loop import TrainConfig, train

STEPS = 6
FLAGS = dict(config="tiny", seq_len=32, batch_size=8, steps=STEPS, save_every=2, log_every=1, mesh="dp2,fsdp2,tp2")


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_and_resume_in_one(tmp_path):
    out = tmp_path / "two"
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               LLAMA_JAX_TEST_FAULT="sigterm:3")
    args = [sys.executable, "-m", "llama_jax.train", "--out", str(out), "--no-progress",
            "--coordinator", f"localhost:{port}", "--num-processes", "2"]
    for k, v in FLAGS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    procs = [subprocess.Popen(args + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    assert "stopped by SIGTERM after step 2: step 3" in results[0][0]
    assert "stopped by SIGTERM" not in results[1][0]  # only process 0 reports

    reference = tmp_path / "one"
    train(TrainConfig(out=str(reference), progress=False, **FLAGS))
    want = losses(reference)
    got = losses(out)
    assert sorted(got) == [0, 1, 2]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step

    # The two-process checkpoint (step 3, data iterator included) resumes in this one process.
    resumed = train(TrainConfig(out=str(out), progress=False, **FLAGS))
    assert resumed["resumed_from"] == 3 and resumed["steps"] == STEPS
    got = losses(out)
    for step in range(STEPS):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
