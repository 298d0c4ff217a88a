"""The training loop: set up (or resume) a run in OUT, step, report, checkpoint, export.

    OUT/config.json          the model's LlamaConfig (a resumed run reads it back)
    OUT/tokenizer.model      the tokenizer the data was encoded with (or another model's tokenizer.json
                             and its sibling files, as an --init-from checkpoint carries them)
    OUT/data/                raw --data files (or the built-in corpus) prepared on first use (train/data.py)
    OUT/checkpoints/<step>/  Orbax: train state (params, Adam moments, step) + the data iterator (its step)
    OUT/metrics.jsonl        logged scalars; OUT/events.out.tfevents.* the same for TensorBoard
    OUT/reference_logprobs.npz  --objective dpo: the initial model's log-probs of every pair (dpo.py)
    OUT/model/               the final model, a `llama_jax.save` checkpoint that infer reads (with
                             --objective reward a reward model's, which llama_jax.reward reads)
    OUT/lora.json, OUT/adapters/   LoRA runs only (--lora-rank): see train/lora.py

Rerunning the same command resumes from the newest complete checkpoint, exactly: the same
batches in the same order, so losses continue as if never stopped, on any mesh. Orbax writes each
checkpoint into a temporary directory and renames it when complete, so a process killed mid-save
leaves the previous checkpoint as the newest. SIGTERM saves and exits cleanly, every process at the
same step (preemption.py); a non-finite loss stops the run, naming the step, without saving the
diverged state. Setting up is setup.py, reporting report.py: what is left here is the loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import jax

from llama_jax import checkpoint
from llama_jax.sharding import mesh_str
from llama_jax.train import lora as lora_lib
from llama_jax.train.metrics import peak_flops
from llama_jax.train.preemption import Preemption
from llama_jax.train.report import NonFiniteLoss, Reporter
from llama_jax.train.reward import flops_per_token as reward_flops_per_token, param_count
from llama_jax.train.run_config import TrainConfig
from llama_jax.train.setup import Run, build_run, checkpoint_args, checkpoint_manager, export_model, is_primary, \
    start_state

log = logging.getLogger("llama_jax.train")


def _nothing(step: int) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Calls the loop makes at fixed points, with the step number; for callers that watch a run or,
    as the tests do, disturb it (a signal once a step is dispatched, a kill while a save is written)."""

    # step n's update is dispatched (the state is at step n), before the loop asks whether to stop after it
    step_dispatched: Callable[[int], None] = _nothing
    checkpoint_started: Callable[[int], None] = _nothing  # checkpoint n's write has started, not finished


def train(tc: TrainConfig, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run (or resume) training as `tc` says; returns the summary that the CLI prints."""
    created = not Path(tc.out).exists()
    try:
        run = build_run(tc)
    except Exception:
        if created and is_primary():  # bad input never leaves a half-made run directory behind
            shutil.rmtree(tc.out, ignore_errors=True)
        raise
    manager = checkpoint_manager(run.out / checkpoint.TRAIN_STATES_DIR, tc.keep, tc.save_every)
    try:
        return _run(run, manager, hooks or Hooks())
    finally:
        manager.close()


def _run(run: Run, manager, hooks: Hooks) -> dict[str, Any]:
    tc = run.tc
    state, resumed_from = start_state(run, manager)
    start = int(state.step)
    status = "completed"
    with _reporter(run, start) as reporter, Preemption(manager) as preemption:
        try:
            pending = None  # the newest step's metrics, read once the next step is dispatched
            batch = run.next_batch() if start < tc.steps else None
            for step in range(start, tc.steps):
                state, metrics = run.step(state, batch)  # dispatched, not waited for
                done = step + 1
                data_state = run.data.state()  # where a run resumed from checkpoint `done` reads on
                hooks.step_dispatched(done)
                if done < tc.steps:
                    batch = run.next_batch()  # read while the device works on this step
                if pending is not None:
                    reporter.report(*pending)
                pending = (step, metrics)
                preempted = preemption.reached(done)
                if preempted or done == tc.steps or manager.should_save(done):
                    reporter.report(*pending)  # never save a state whose step diverged
                    pending = None
                    manager.save(done, args=checkpoint_args(state, data_state), force=True)
                    hooks.checkpoint_started(done)
                if preempted:
                    status = f"stopped by SIGTERM after step {step}"
                    break
            manager.wait_until_finished()
        except NonFiniteLoss as e:
            raise _keep_good_checkpoints(manager, e, run.out / checkpoint.TRAIN_STATES_DIR) from None
    if run.reads_rows:
        log.info("data: %s", run.data.throughput_line())  # every process: an input-bound host shows here
    return _finish(run, state, status, resumed_from, reporter)


def _reporter(run: Run, start: int) -> Reporter:
    tc, cfg, mesh = run.tc, run.cfg, run.mesh
    peak, peak_source = peak_flops(jax.devices(), cfg.compute_dtype)
    if is_primary():
        log.info("model %s: %.2fM params, %s; mesh %s over %d %s devices; tokenizer %s; peak %s",
                 run.source, param_count(cfg, run.head) / 1e6, cfg.dtype, mesh_str(mesh), mesh.size,
                 jax.devices()[0].platform, run.tokenizer_path, f"{peak / 1e12:.2f} TFLOP/s ({peak_source})" if peak else peak_source)
    per_token = cfg.flops_per_token(tc.seq_len) if run.head == "lm" else reward_flops_per_token(cfg, tc.seq_len)
    return Reporter(run.out, steps=tc.steps, start=start, tokens_per_step=tc.batch_size * tc.seq_len,
                    flops_per_step=per_token * tc.batch_size * tc.seq_len,
                    # a LoRA step does fewer FLOPs than the model's 6N per token: no MFU to report
                    peak_flops=None if run.lora is not None else peak,
                    log_every=tc.log_every, progress=tc.progress,
                    read_rate=(lambda: run.data.batches.rows_per_s) if run.reads_rows else lambda: None)


def _keep_good_checkpoints(manager, error: NonFiniteLoss, directory: Path) -> NonFiniteLoss:
    """Checkpoint n holds the weights that step n's loss was computed from: if that loss is not
    finite, neither is the checkpoint good. Earlier ones are: their steps' losses were checked."""
    manager.wait_until_finished()
    bad_step = error.args[0]
    for saved in manager.all_steps():
        if saved >= bad_step:
            manager.delete(saved)
    good = manager.latest_step()
    where = (f"last good checkpoint: step {good} in {directory}" if good is not None
             else "no good checkpoint was saved before it")
    return NonFiniteLoss(bad_step, f"{error.args[1]}; stopping, {where}")


def _finish(run: Run, state, status: str, resumed_from: int | None, reporter: Reporter) -> dict[str, Any]:
    """Export the model of a completed run; the summary (also OUT/summary.json, less the losses)."""
    tc, cfg, out = run.tc, run.cfg, run.out
    final_step = int(jax.device_get(state.step))
    model_path = None
    if final_step >= tc.steps and run.lora is not None:
        model_path = lora_lib.export(out, run.lora, cfg, run.base, state.params, run.tokenizer_path)
    elif final_step >= tc.steps:
        model_path = export_model(out / checkpoint.TRAINED_MODEL_DIR, cfg, state.params, run.tokenizer_path)
    told = reporter.summary()
    summary = {"status": status, "steps": final_step, "resumed_from": resumed_from, "first_loss": told["first_loss"],
               "final_loss": told["final_loss"], "losses": told["losses"], "mesh": mesh_str(run.mesh),
               "params": param_count(cfg, run.head), "model": str(model_path) if model_path else None}
    if run.lora is not None:
        summary["trained_params"] = sum(x.size for x in jax.tree.leaves(state.params))
        adapters = out / lora_lib.ADAPTERS_DIR
        summary["adapters"] = str(adapters.absolute()) if model_path and adapters.is_dir() else None
    if "tokens_per_s" in told:
        summary.update(tokens_per_s=told["tokens_per_s"], mfu=told["mfu"])
    if is_primary():
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
    return summary
