"""One short uninterrupted training run that the loop and multi-process tests compare against, and
how they read a run's losses, checkpoints and weights."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from llama_jax import checkpoint
from llama_jax.train.loop import TrainConfig, train

STEPS = 8
# Tiny and quick: 2 layers, D=64, 512-token byte vocabulary, rows of 32 tokens, 8-way FSDP.
BASE = dict(config="tiny", seq_len=32, batch_size=8, steps=STEPS, lr=3e-3, warmup_steps=2, save_every=2,
            keep=10, log_every=1, progress=False)
MESH = "fsdp8"


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())}


def saved_steps(out) -> list[int]:
    return sorted(int(p.name) for p in (Path(out) / "checkpoints").iterdir() if p.name.isdigit())


def cli_args(out, **overrides) -> list[str]:
    """The same run as `python -m llama_jax.train` flags."""
    flags = {**BASE, "mesh": MESH, **overrides}
    args = ["--out", str(out)]
    for k, v in flags.items():
        if k == "progress":
            args += [] if v else ["--no-progress"]
        else:
            args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def params_of(out):
    return checkpoint.load(out / "model")[1]


def assert_same_weights(got, want):
    for (path, g), w in zip(jax_leaves(got), [leaf for _, leaf in jax_leaves(want)]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5, err_msg=path)


def jax_leaves(tree):
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = train(TrainConfig(out=str(out), mesh=MESH, **BASE))
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    return out


@pytest.fixture(scope="session")
def uninterrupted(uninterrupted_run):
    return losses(uninterrupted_run)
