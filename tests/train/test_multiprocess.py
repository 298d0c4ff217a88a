"""Two processes of 4 CPU devices each (jax.distributed over localhost, gloo collectives) train one
dp2,fsdp2,tp2 mesh like one process of 8 devices, each reading only its half of every batch; they
stop together on SIGTERM, and their checkpoint resumes in one process on another mesh to the
uninterrupted run's losses and weights."""

import subprocess
import sys

import pytest

from llama_jax.train.loop import TrainConfig, train
from tests.processes import cpu_env, free_port
from tests.train.conftest import BASE, MESH, STEPS, assert_same_weights, cli_args, losses, params_of, saved_steps


def test_two_processes_match_one_and_resume_in_one(tmp_path, uninterrupted_run, uninterrupted):
    # dp2 outermost: each process's devices hold one half of each batch. Process 0 alone gets
    # SIGTERM after step 3 is dispatched (tests/train/faults.py).
    args = [sys.executable, "-m", "tests.train.faults", "sigterm:3", *cli_args(tmp_path, mesh="dp2,fsdp2,tp2"),
            "--coordinator", f"localhost:{free_port()}", "--num-processes", "2"]
    procs = [subprocess.Popen(args + ["--process-id", str(i)], env=cpu_env(4), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for i, (p, (stdout, stderr)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, stderr[-3000:]
        # Its own 4 rows of each of the 4 batches read before the stop, and no other rows.
        assert f"process {i} read 16 rows (4 of each batch of 8)" in stderr, stderr[-3000:]
    # One mesh over both processes; process 0 got the signal and both stopped after the same step.
    assert "stopped by SIGTERM after step 2: step 3" in results[0][0] and "mesh dp2,fsdp2,tp2" in results[0][0]
    assert "stopped by SIGTERM" not in results[1][0]  # only process 0 reports
    assert saved_steps(tmp_path) == [2, 3]  # the regular save, and the one at the step jax had them agree on

    got = losses(tmp_path)
    assert sorted(got) == [0, 1, 2]
    for step in got:
        assert got[step] == pytest.approx(uninterrupted[step], rel=1e-5), step

    # The two-process checkpoint (step 3, data position included) resumes in this one process, on the
    # uninterrupted run's mesh (fsdp8: its compiled step is reused).
    resumed = train(TrainConfig(out=str(tmp_path), mesh=MESH, **BASE))
    assert resumed["resumed_from"] == 3 and resumed["steps"] == STEPS
    got = losses(tmp_path)
    for step in range(STEPS):
        assert got[step] == pytest.approx(uninterrupted[step], rel=1e-5), step
    assert_same_weights(params_of(tmp_path), params_of(uninterrupted_run))
