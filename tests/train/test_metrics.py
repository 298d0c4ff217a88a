"""train/metrics.py: MetricsLog's JSONL and TensorBoard scalars, read back with TensorBoard's own reader."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llama_jax.train.metrics import MetricsLog


def test_metrics_log_writes_jsonl_and_tensorboard_scalars(tmp_path):
    written = {1: {"loss": 5.25, "lr": 1e-3}, 2: {"loss": 4.125, "lr": 2e-3}, 4: {"loss": 3.0625, "lr": 3e-3}}
    log = MetricsLog(tmp_path)
    for step, values in written.items():
        log.write(step, values)
    log.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": step, **values} for step, values in written.items()]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/lr"]
    for name in ("loss", "lr"):
        got = {e.step: e.value for e in events.Scalars(f"train/{name}")}
        assert got == {step: pytest.approx(values[name], rel=1e-7) for step, values in written.items()}
