"""Two processes of 4 CPU devices each (jax.distributed over localhost, gloo collectives) train like
one process of 8 devices, stop together on SIGTERM, and their checkpoint resumes in one process."""

import os
import socket
import subprocess
import sys

import pytest

from llama_jax.train.loop import TrainConfig, train
from tests.train.conftest import BASE, MESH, STEPS, cli_args, losses, saved_steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_and_resume_in_one(tmp_path, uninterrupted):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    # Process 0 alone gets SIGTERM after step 3 is dispatched (tests/train/faults.py).
    args = [sys.executable, "-m", "tests.train.faults", "sigterm:3", *cli_args(tmp_path), "--coordinator", f"localhost:{free_port()}",
            "--num-processes", "2"]
    procs = [subprocess.Popen(args + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    # One fsdp8 mesh over both processes; process 0 got the signal and both stopped after the same step.
    assert "stopped by SIGTERM after step 2: step 3" in results[0][0] and "mesh fsdp8" in results[0][0]
    assert "stopped by SIGTERM" not in results[1][0]  # only process 0 reports
    assert saved_steps(tmp_path) == [2, 3]  # the regular save, and the one at the step jax had them agree on

    got = losses(tmp_path)
    assert sorted(got) == [0, 1, 2]
    for step in got:
        assert got[step] == pytest.approx(uninterrupted[step], rel=1e-5), step

    # The two-process checkpoint (step 3, data iterator included) resumes in this one process.
    resumed = train(TrainConfig(out=str(tmp_path), mesh=MESH, **BASE))
    assert resumed["resumed_from"] == 3 and resumed["steps"] == STEPS
    got = losses(tmp_path)
    for step in range(STEPS):
        assert got[step] == pytest.approx(uninterrupted[step], rel=1e-5), step
