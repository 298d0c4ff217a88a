"""The training loop end to end: interrupted runs (SIGTERM, SIGKILL mid-save) resume to exactly the
losses of an uninterrupted run, on the same or another mesh; divergence stops at the step; the
CLI writes a model checkpoint that loads; metric files are readable."""

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llama_jax import checkpoint
from llama_jax.config import PRESETS, LlamaConfig
from llama_jax.train.loop import Hooks, NonFiniteLoss, TrainConfig, train
from tests.train.conftest import BASE, STEPS, cli_args, losses, saved_steps
from tests.train.faults import sigterm_at


def assert_same_losses(got, want, steps, rtol=1e-6):
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=rtol), (step, got[step], want[step])


def test_sigterm_saves_and_resume_continues_exactly(tmp_path, uninterrupted):
    dispatched, started = [], []  # what the loop tells its hooks: each step, each save as it starts
    fault = sigterm_at(3).step_dispatched
    hooks = Hooks(step_dispatched=lambda n: (dispatched.append(n), fault(n)), checkpoint_started=started.append)
    summary = train(TrainConfig(out=str(tmp_path), mesh="fsdp8", **BASE), hooks)
    assert summary["status"].startswith("stopped by SIGTERM") and summary["steps"] == 3
    assert saved_steps(tmp_path) == [2, 3] == started  # the regular save at 2, and one at the stop
    assert dispatched == [1, 2, 3]
    assert summary["model"] is None
    resumed = train(TrainConfig(out=str(tmp_path), mesh="fsdp8", **BASE))
    assert resumed["resumed_from"] == 3 and resumed["status"] == "completed"
    assert_same_losses(losses(tmp_path), uninterrupted, range(STEPS))


def test_resume_on_a_different_mesh(tmp_path, uninterrupted):
    """fsdp8 -> dp2,cp2,tp2 -> fsdp2,cp4: rows split over fsdp, then over dp with their tokens over cp
    and the weights over tp, then over fsdp with their tokens over another cp: the same global batches,
    re-split at each resume."""
    train(TrainConfig(out=str(tmp_path), mesh="fsdp8", **BASE), sigterm_at(3))
    resumed = train(TrainConfig(out=str(tmp_path), mesh="dp2,cp2,tp2", **BASE), sigterm_at(5))
    assert resumed["resumed_from"] == 3 and resumed["mesh"] == "dp2,cp2,tp2" and resumed["steps"] == 5
    resumed = train(TrainConfig(out=str(tmp_path), mesh="fsdp2,cp4", **BASE))
    assert resumed["resumed_from"] == 5 and resumed["mesh"] == "fsdp2,cp4" and resumed["status"] == "completed"
    assert_same_losses(losses(tmp_path), uninterrupted, range(3, STEPS), rtol=1e-5)


def test_sigkill_during_a_save_falls_back_to_the_previous_checkpoint(tmp_path, uninterrupted):
    killed = subprocess.run([sys.executable, "-m", "tests.train.faults", "sigkill-after-save:6", *cli_args(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    complete = saved_steps(tmp_path)
    assert complete[-1] in (4, 6) and complete[:2] == [2, 4]  # 6 only if its write beat the kill
    # A half-written step directory never counts as a checkpoint: make one by hand, too.
    (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    resumed = train(TrainConfig(out=str(tmp_path), mesh="fsdp8", **BASE))
    assert resumed["resumed_from"] == complete[-1] and resumed["status"] == "completed"
    assert_same_losses(losses(tmp_path), uninterrupted, range(STEPS))
    # The final model is a self-contained checkpoint that loads (infer reads OUT/model).
    assert resumed["model"] == str((tmp_path / "model").absolute())
    cfg, params = checkpoint.load(tmp_path / "model")
    assert cfg.vocab_size == 512 and (cfg.bos_id, cfg.eos_id) == (256, 257)
    assert checkpoint.tokenizer_path(tmp_path / "model") is not None
    assert np.isfinite(np.asarray(params["output"])).all()


def test_non_finite_loss_stops_naming_the_step_and_keeps_good_checkpoints(tmp_path, uninterrupted_run):
    # Continue the uninterrupted run from its step-2 checkpoint with an absurd learning rate: the
    # next update blows the weights up.
    shutil.copytree(uninterrupted_run, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model"))
    for step in saved_steps(tmp_path)[1:]:
        shutil.rmtree(tmp_path / "checkpoints" / str(step))
    cfg = TrainConfig(out=str(tmp_path), mesh="fsdp8", **{**BASE, "lr": 1e30, "warmup_steps": 0, "save_every": 1,
                                                          "clip_norm": 0.0})
    with pytest.raises(NonFiniteLoss, match=r"at step \d+; stopping, last good checkpoint: step \d+") as e:
        train(cfg)
    bad_step = e.value.args[0]
    assert 3 <= bad_step < STEPS and f"at step {bad_step};" in str(e.value)
    # Checkpoint n holds the weights step n's loss came from: none at or past the divergence is kept.
    assert saved_steps(tmp_path) == list(range(2, bad_step))
    assert f"last good checkpoint: step {bad_step - 1} " in str(e.value)


def test_init_from_a_checkpoint_starts_from_its_weights(tmp_path, uninterrupted_run):
    from llama_jax.data import GlobalBatches, PreparedData
    from llama_jax.train.step import loss_sums

    model = uninterrupted_run / "model"
    # On the mesh it was trained on (a checkpoint restores into another: tests/sharding/test_sharded_params.py).
    summary = train(TrainConfig(out=str(tmp_path), mesh="fsdp8", init_from=str(model),
                                **{**BASE, "config": None, "steps": 1}))
    cfg, params = checkpoint.load(model)
    first = GlobalBatches(PreparedData(tmp_path / "data"), 8, seed=0).read(0)
    _, sums = loss_sums(cfg, params, first)
    assert summary["first_loss"] == pytest.approx(float(sums["nll"] / sums["weight"]), rel=1e-5)
    assert summary["first_loss"] < losses(uninterrupted_run)[0] - 0.5  # trained weights, not a fresh init


def test_init_from_a_model_with_its_own_tokenizer(tmp_path, hf_chat_model):
    """A converted SmolLM2-style model trains with its own tokenizer.json: chat records through its
    chat template, and the final model carries the tokenizer files on."""
    from llama_jax.convert.hf import convert_hf
    from llama_jax.hf_tokenizer import HFTokenizer
    from llama_jax.data import GlobalBatches, PreparedData
    from llama_jax.tokenizer import load_tokenizer
    from llama_jax.train.step import loss_sums

    model = convert_hf(hf_chat_model, tmp_path / "converted")
    records = [r for i in range(20) for r in (
        {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                      {"role": "assistant", "content": f"{2 * i}."}]},
        {"text": f"Hello, world {i}!"})]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = train(TrainConfig(out=str(tmp_path / "out"), mesh="fsdp8", init_from=str(model), data=(str(data),),
                                **{**BASE, "config": None, "steps": 2}))
    cfg, params = checkpoint.load(model, dtype="float32")
    first = GlobalBatches(PreparedData(tmp_path / "out" / "data"), BASE["batch_size"], seed=0).read(0)
    _, sums = loss_sums(cfg, params, first)
    assert summary["first_loss"] == pytest.approx(float(sums["nll"] / sums["weight"]), rel=1e-5)
    assert 0 < first["weights"].sum() < first["weights"].size  # chat rows weigh only the assistant turns
    trained = tmp_path / "out" / "model"
    assert isinstance(load_tokenizer(trained), HFTokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (trained / name).read_bytes() == (hf_chat_model / name).read_bytes()


def test_default_model_metrics_files_and_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    summary = train(TrainConfig(out=str(out), **{**BASE, "config": None, "steps": 2, "seq_len": 64}))
    assert summary["params"] == 869504 and summary["mesh"] == "fsdp8"  # the default model and mesh
    trained = LlamaConfig.from_json(out / "config.json")  # the tiny-bytes preset, at the run's dtypes
    assert dataclasses.replace(trained, dtype="float32") == PRESETS["tiny-bytes"]
    events = EventAccumulator(str(out))  # TensorBoard's own reader
    events.Reload()
    assert set(events.Tags()["scalars"]) >= {"train/loss", "train/grad_norm", "train/lr", "train/accuracy"}
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert loss[1] == pytest.approx(losses(out)[1], rel=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["status"] == "completed"
