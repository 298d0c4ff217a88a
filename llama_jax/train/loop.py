"""The training loop: set up (or resume) a run in OUT, step, log, checkpoint, export.

    OUT/config.json          the model's LlamaConfig (a resumed run reads it back)
    OUT/tokenizer.model      the tokenizer the data was encoded with (or another model's tokenizer.json
                             and its sibling files, as an --init-from checkpoint carries them)
    OUT/data/                raw --data files (or the built-in corpus) prepared on first use (train/data.py)
    OUT/checkpoints/<step>/  Orbax: train state (params, Adam moments, step) + the data iterator (its step)
    OUT/metrics.jsonl        logged scalars; OUT/events.out.tfevents.* the same for TensorBoard
    OUT/reference_logprobs.npz  --objective dpo: the initial model's log-probs of every pair (dpo.py)
    OUT/model/               the final model, a `llama_jax.save` checkpoint that infer reads
    OUT/lora.json, OUT/adapters/   LoRA runs only (--lora-rank): see train/lora.py

Rerunning the same command resumes from the newest complete checkpoint, exactly: the same
batches in the same order, so losses continue as if never stopped, on any mesh. Orbax writes each
checkpoint into a temporary directory and renames it when complete, so a process killed mid-save
leaves the previous checkpoint as the newest. SIGTERM saves and exits cleanly; a non-finite loss
stops the run, naming the step, without saving the diverged state.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llama_jax import checkpoint
from llama_jax.config import PRESETS, LlamaConfig, compute_dtype
from llama_jax.sharding import make_mesh, mesh_str
from llama_jax.sharding.params import load_params
from llama_jax.train import data as data_lib
from llama_jax.train import lora as lora_lib
from llama_jax.train.dpo import DPO, prepare_reference
from llama_jax.train.metrics import MetricsLog, peak_flops
from llama_jax.train.optim import OptimConfig, lr_schedule, make_optimizer
from llama_jax.train.preferences import PreferenceBatches, PreferenceDataConfig
from llama_jax.train.step import LanguageModeling, Objective, check_batch_shape, init_state, make_train_step, \
    put_batch, sharded_abstract_state

log = logging.getLogger("llama_jax.train")

# The default model: the `tiny` preset widened to 0.87M parameters, over a byte-level vocabulary
# (256 bytes + Meta's 256 special tokens = 512), so it learns visible structure on a laptop CPU in
# minutes. With Llama 3's 128k-token vocabulary, 98% of a model this size would be embeddings and
# each step would cost ~18x the FLOPs.
DEFAULT_MODEL = "tiny-bytes"
DEFAULT_MODEL_OVERRIDES = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=1024)


class NonFiniteLoss(RuntimeError):
    """args: (step, message)."""

    def __str__(self) -> str:
        return self.args[1]


OBJECTIVES = ("lm", "dpo")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    out: str = "out"
    config: str | None = None  # preset name or config.json path; default DEFAULT_MODEL
    init_from: str | None = None  # a llama_jax checkpoint to start from
    data: tuple[str, ...] = ()  # files / directories; empty: the built-in corpus
    tokenizer: str | None = None  # 'bytes', 'llama3' or a path; default: see resolve_tokenizer
    mesh: str = "fsdp-1"
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    z_loss: float = 0.0
    objective: str = "lm"  # "lm": next-token loss (pre-training, SFT); "dpo": preference pairs (see dpo.py)
    dpo_beta: float = 0.1
    dtype: str | None = None  # compute dtype; default bfloat16 on accelerators, float32 on CPU
    remat: str | None = None
    attention_impl: str | None = None
    save_every: int = 100
    keep: int = 3
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    # LoRA / QLoRA (train/lora.py): adapters of this rank on a frozen --init-from base; None: full fine-tuning.
    lora_rank: int | None = None
    lora_alpha: float | None = None  # default 2 * rank
    lora_targets: tuple[str, ...] | None = None  # default all of lora.TARGETS
    quantize_base: str | None = None  # 'int8': hold the frozen base quantized (QLoRA)

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "save_every", "keep", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "dpo" and not self.data:
            raise ValueError("--objective dpo needs --data: JSONL preference records (prompt or messages, chosen, "
                             "rejected)")
        if self.objective == "dpo" and self.z_loss:
            raise ValueError("--z-loss belongs to the next-token objective, not to --objective dpo")
        if self.lora_rank is not None:  # bad LoRA flags fail here, before OUT is touched
            from llama_jax.lora import TARGETS, LoraConfig

            LoraConfig(self.lora_rank, self.lora_alpha, self.lora_targets if self.lora_targets is not None else TARGETS)
            if self.quantize_base not in (None, *lora_lib.QUANTIZE_BASE):
                raise ValueError(f"--quantize-base {self.quantize_base!r}: choose one of {lora_lib.QUANTIZE_BASE}")
            if not self.init_from and not (Path(self.out) / lora_lib.RUN_FILE).is_file():
                raise ValueError("--lora-rank needs --init-from CHECKPOINT: the base model the adapters are trained on")


# Setting up ------------------------------------------------------------------------------------

def _is_primary() -> bool:
    return jax.process_index() == 0


def default_model_config() -> LlamaConfig:
    return LlamaConfig.preset("tiny", **DEFAULT_MODEL_OVERRIDES, bos_id=256, eos_id=257)


def _model_config(tc: TrainConfig, out: Path) -> tuple[LlamaConfig, str]:
    """The config and where it came from: the run being resumed, --init-from, or --config."""
    if (out / "config.json").is_file():
        if tc.config or tc.init_from:
            log.warning("%s already holds a run: continuing it with its own config.json; --config and "
                        "--init-from are ignored (use a new --out to start afresh)", out)
        return LlamaConfig.from_json(out / "config.json"), f"resumed run {out}"
    if tc.init_from:
        return checkpoint.load_config(tc.init_from), f"checkpoint {tc.init_from}"
    if tc.config is None or tc.config == DEFAULT_MODEL:
        return default_model_config(), DEFAULT_MODEL
    if tc.config in PRESETS:
        return PRESETS[tc.config], f"preset {tc.config}"
    if os.path.isfile(tc.config):
        return LlamaConfig.from_json(tc.config), tc.config
    raise ValueError(f"--config {tc.config!r} is neither a preset ({', '.join([DEFAULT_MODEL, *PRESETS])}) "
                     f"nor a config.json file")


def resolve_tokenizer(tc: TrainConfig, cfg: LlamaConfig, out: Path) -> str:
    """The tokenizer file: --tokenizer; else the run's own copy (resume), the --init-from checkpoint's,
    the real Llama 3 one for a 128k-vocabulary model, or the byte-level one."""
    from llama_jax.tokenizer import default_tokenizer_path

    choice = tc.tokenizer
    if choice is None:
        if checkpoint.tokenizer_path(out):
            return str(checkpoint.tokenizer_path(out))
        if tc.init_from and checkpoint.tokenizer_path(tc.init_from):
            return str(checkpoint.tokenizer_path(tc.init_from))
        choice = "llama3" if cfg.vocab_size >= 128256 else "bytes"
    if choice == "llama3":
        return default_tokenizer_path()
    if choice == "bytes":
        path = out / checkpoint.TOKENIZER_FILE
        staging = out / f".{checkpoint.TOKENIZER_FILE}.{jax.process_index()}"
        data_lib.write_byte_tokenizer(staging)
        os.replace(staging, path)  # atomic: processes sharing OUT never see a half-written file
        return str(path)
    if not os.path.isfile(choice):
        raise ValueError(f"--tokenizer {choice!r}: no such file (or use 'bytes' / 'llama3')")
    return choice


def _check_tokenizer(cfg: LlamaConfig, tokenizer, fresh: bool) -> LlamaConfig:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    if (cfg.bos_id, cfg.eos_id) != (tokenizer.bos_id, tokenizer.eos_id):
        if not fresh:
            raise ValueError(f"the model was trained with bos/eos ids {cfg.bos_id}/{cfg.eos_id}, the tokenizer has "
                             f"{tokenizer.bos_id}/{tokenizer.eos_id}")
        cfg = dataclasses.replace(cfg, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    return cfg


def _runtime_overrides(tc: TrainConfig) -> dict[str, Any]:
    """Settings that change how the model runs, not its shapes (so a resumed run may change them).
    Master weights are float32; compute is bfloat16 unless on CPU or told (config.compute_dtype)."""
    overrides = {"dtype": compute_dtype(tc.dtype, "bfloat16"), "param_dtype": "float32"}
    if tc.remat:
        overrides["remat"] = tc.remat
    if tc.attention_impl:
        overrides["attention_impl"] = tc.attention_impl
    return overrides


def checkpoint_manager(directory: Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def export_model(path: Path, cfg: LlamaConfig, params, tokenizer_path: str) -> Path:
    """Write the final `llama_jax.save` checkpoint (float32 master weights); every process calls it."""
    return checkpoint.save(path, cfg, params, tokenizer_path, overwrite=True)


# The loop --------------------------------------------------------------------------------------

class _StopFlag:
    """Set by SIGTERM; with several processes, any one's signal stops them all at the same step."""

    def __init__(self):
        self.signalled = False
        self._previous = None

    def install(self):
        if hasattr(signal, "SIGTERM"):
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.signalled = True

    def uninstall(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int, every: int) -> bool:
        if jax.process_count() == 1:
            return self.signalled
        if step % every:  # agreeing is a collective, which waits for the device: not every step
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array([self.signalled]))))


@functools.lru_cache(maxsize=4)
def _optimizer_and_step(cfg: LlamaConfig, optim: OptimConfig, mesh, batch_shape: tuple[int, int], grad_accum: int,
                        objective: Objective, lora_spec=None):
    """One optimizer and jitted step per setting, so a process that calls `train` again (a resumed
    run in a notebook, the tests) reuses the compiled step instead of tracing it anew. With a LoRA
    spec the step trains adapters and takes the frozen base: step(state, batch, base)."""
    optimizer = make_optimizer(optim)
    lora_args = {} if lora_spec is None else dict(trained=_trained(cfg, lora_spec, mesh),
                                                  adapt=lora_lib.adapted(lora_spec))
    return optimizer, make_train_step(cfg, optimizer, mesh, batch_shape=batch_shape, grad_accum=grad_accum,
                                      objective=objective, schedule=lr_schedule(optim), **lora_args)


def _trained(cfg: LlamaConfig, lora_spec, mesh):
    """What the state's params are: the model's own (None), or LoRA adapters on `mesh`."""
    from llama_jax.lora import sharded_adapter_shapes

    return None if lora_spec is None else sharded_adapter_shapes(cfg, lora_spec, mesh)


def _test_fault() -> tuple[str, int] | None:
    """LLAMA_JAX_TEST_FAULT='sigterm:3' sends SIGTERM once the 3rd step is dispatched;
    'sigkill-after-save:4' kills the process as checkpoint 4 starts writing. For crash tests."""
    spec = os.environ.get("LLAMA_JAX_TEST_FAULT")
    if not spec:
        return None
    kind, _, step = spec.partition(":")
    return kind, int(step)


@dataclasses.dataclass
class _Setup:
    """Everything a run needs, checked before any checkpoint is touched."""

    out: Path
    mesh: Any
    cfg: LlamaConfig
    source: str  # where cfg came from, for the log
    tokenizer_path: str
    optimizer: Any
    step_fn: Any
    data: data_lib.TrainData | PreferenceBatches
    lora: lora_lib.LoraRun | None = None


def _prepare(tc: TrainConfig) -> _Setup:
    from llama_jax.tokenizer import load_tokenizer

    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(tc.mesh)
    lora_run = lora_lib.resolve(out, rank=tc.lora_rank, alpha=tc.lora_alpha, targets=tc.lora_targets,
                                quantize_base=tc.quantize_base, init_from=tc.init_from)
    cfg, source = _model_config(tc, out)
    fresh = not (out / "config.json").is_file() and not tc.init_from  # written before any checkpoint
    tokenizer_path = resolve_tokenizer(tc, cfg, out)
    tokenizer = load_tokenizer(tokenizer_path)
    cfg = _check_tokenizer(cfg, tokenizer, fresh)
    cfg = dataclasses.replace(cfg, **_runtime_overrides(tc))
    if tc.seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len {tc.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    check_batch_shape(mesh, (tc.batch_size, tc.seq_len), tc.grad_accum)
    if tc.objective != "dpo":  # checked before anything is written: bad data trains nothing
        data_path = data_lib.data_dir(tuple(tc.data), tokenizer_path, tc.seq_len, out, tc.progress)
        data = data_lib.TrainData(data_path, tokenizer_path, tc.seq_len, tc.batch_size, tc.seed, mesh)
    if _is_primary():
        (out / "config.json").write_text(cfg.to_json() + "\n")
        checkpoint.copy_tokenizer(tokenizer_path, out)
        if lora_run is not None:
            lora_lib.write_run_file(out, lora_run)
    optim = OptimConfig(lr=tc.lr, warmup_steps=tc.warmup_steps, total_steps=tc.steps, min_lr_ratio=tc.min_lr_ratio,
                        b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, clip_norm=tc.clip_norm)
    if tc.objective == "dpo":
        objective = DPO(tc.dpo_beta)
        data = PreferenceBatches(PreferenceDataConfig(tuple(tc.data), tc.seq_len, tc.batch_size, tc.seed), tokenizer)
    else:
        objective = LanguageModeling(tc.z_loss)
    optimizer, step_fn = _optimizer_and_step(cfg, optim, mesh, (tc.batch_size, tc.seq_len), tc.grad_accum, objective,
                                             lora_run and lora_run.spec)
    return _Setup(out, mesh, cfg, source, tokenizer_path, optimizer, step_fn, data, lora_run)


def train(tc: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training as `tc` says; returns the summary that the CLI prints."""
    created = not Path(tc.out).exists()
    try:
        setup = _prepare(tc)
    except Exception:
        if created and _is_primary():  # bad input never leaves a half-made run directory behind
            shutil.rmtree(tc.out, ignore_errors=True)
        raise
    manager = checkpoint_manager(setup.out / checkpoint.TRAIN_STATES_DIR, tc.keep)
    try:
        return _run(tc, setup, manager)
    finally:
        manager.close()


def _run(tc: TrainConfig, setup: _Setup, manager) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    out, mesh, cfg, optimizer, step_fn, data = (setup.out, setup.mesh, setup.cfg, setup.optimizer, setup.step_fn,
                                               setup.data)
    reads_rows = isinstance(data, data_lib.TrainData)  # else DPO's preference pairs, global numpy batches
    primary = _is_primary()
    latest = manager.latest_step()
    lora_run = setup.lora
    trained = _trained(cfg, lora_run and lora_run.spec, mesh)
    if lora_run is not None:  # the frozen base, at every start: the step reads it, checkpoints do not hold it
        from llama_jax.lora import init_adapters

        base = lora_lib.load_base(lora_run, cfg, mesh)
        lora_step = step_fn

        def step_fn(state, batch):
            return lora_step(state, batch, base)
    if latest is not None:
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(sharded_abstract_state(cfg, optimizer, mesh, trained)),
            data=ocp.args.JsonRestore()))
        state = restored["state"]
        data.restore(restored["data"])
        log.info("resumed from %s at step %d", out / checkpoint.TRAIN_STATES_DIR, latest)
    else:
        params = None
        if lora_run is not None:
            params = init_adapters(cfg, lora_run.spec, tc.seed, mesh)
        elif tc.init_from:
            _, params = load_params(tc.init_from, mesh, **_runtime_overrides(tc))
        state = init_state(cfg, optimizer, mesh, seed=tc.seed, params=params, trained=trained)
    if isinstance(data, PreferenceBatches):  # the reference log-probs: of the initial model, once
        reference = state.params if lora_run is None else base  # with LoRA: the base without adapters
        prepare_reference(data, out, cfg, reference, mesh, resumed=latest is not None, primary=primary)
    start = int(state.step)

    T, B = tc.seq_len, tc.batch_size
    flops_per_step = cfg.flops_per_token(T) * B * T
    peak, peak_source = peak_flops(jax.devices(), cfg.compute_dtype)
    if primary:
        log.info("model %s: %.2fM params, %s; mesh %s over %d %s devices; tokenizer %s; peak %s",
                 setup.source, cfg.num_params() / 1e6, cfg.dtype, mesh_str(mesh), mesh.size, jax.devices()[0].platform,
                 setup.tokenizer_path, f"{peak / 1e12:.2f} TFLOP/s ({peak_source})" if peak else peak_source)

    if lora_run is not None:
        peak = None  # a LoRA step does fewer FLOPs than the model's 6N per token: no MFU to report
    metrics_log = MetricsLog(out) if primary else None
    bar = None
    if primary and tc.progress:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    stop = _StopFlag()
    stop.install()
    fault = _test_fault()
    history: list[tuple[int, float]] = []
    timing = {"t0": None, "step0": None, "last_t": None, "last_step": None}
    status = "completed"

    def report(step: int, metrics) -> dict[str, float]:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            raise NonFiniteLoss(step, f"loss is {values['loss']} (grad norm {values['grad_norm']}) at step {step}")
        now = time.perf_counter()
        history.append((step, values["loss"]))
        if timing["t0"] is None:  # the first step compiled; measure from its end
            timing.update(t0=now, step0=step, last_t=now, last_step=step)
        elif step > timing["last_step"]:
            dt = now - timing["last_t"]
            tps = (step - timing["last_step"]) * B * T / dt
            values["tokens_per_s"] = tps
            if peak:
                values["mfu"] = tps / (B * T) * flops_per_step / peak
            timing.update(last_t=now, last_step=step)
        if reads_rows and data.batches.rows_per_s:
            values["read_rows_per_s"] = data.batches.rows_per_s  # this process's rate, idle time excluded
        if primary:
            if bar is not None:
                postfix = {"loss": f"{values['loss']:.3f}"}
                if "tokens_per_s" in values:
                    postfix["tok/s"] = f"{values['tokens_per_s']:.0f}"
                if "mfu" in values:
                    postfix["mfu"] = f"{100 * values['mfu']:.1f}%"
                bar.set_postfix(postfix, refresh=False)
                bar.update(step + 1 - bar.n)
            if step % tc.log_every == 0 or step + 1 == tc.steps:
                metrics_log.write(step, values)
                if bar is None:
                    log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
        return values

    def save(done: int, state, data_state, force: bool = False):
        manager.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data_state)), force=force)
        if fault == ("sigkill-after-save", done):  # the async write is still in flight
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        pending = None
        if start < tc.steps:
            host_batch = next(data)
            data_state = data.state()
        for step in range(start, tc.steps):
            # dispatched, not waited for; TrainData's batches are on the mesh already (each process put its rows)
            state, metrics = step_fn(state, host_batch if reads_rows else put_batch(host_batch, mesh))
            done = step + 1
            if fault == ("sigterm", done):
                os.kill(os.getpid(), signal.SIGTERM)
            if done < tc.steps:  # load the next batch while the device works on this one
                host_batch = next(data)
                next_data_state = data.state()
            if pending is not None:
                report(*pending)
            pending = (step, metrics)
            stopping = stop.should_stop(step, tc.log_every)
            if stopping or done % tc.save_every == 0 or done == tc.steps:
                report(*pending)  # never save a state whose step diverged
                pending = None
                save(done, state, data_state, force=stopping)
            if stopping:
                status = f"stopped by SIGTERM after step {step}"
                break
            if done < tc.steps:
                data_state = next_data_state
        if pending is not None:
            report(*pending)
        manager.wait_until_finished()
        if reads_rows:
            log.info("data: %s", data.throughput_line())  # every process: an input-bound host shows here
    except NonFiniteLoss as e:
        manager.wait_until_finished()
        bad_step = e.args[0]
        # Checkpoint n holds the weights that step n's loss was computed from: if that loss is not
        # finite, neither is the checkpoint good. Earlier ones are: their steps' losses were checked.
        for saved in manager.all_steps():
            if saved >= bad_step:
                manager.delete(saved)
        good = manager.latest_step()
        where = (f"last good checkpoint: step {good} in {out / checkpoint.TRAIN_STATES_DIR}" if good is not None
                 else "no good checkpoint was saved before it")
        raise NonFiniteLoss(bad_step, f"{e.args[1]}; stopping, {where}") from None
    finally:
        stop.uninstall()
        if bar is not None:
            bar.close()
        if metrics_log is not None:
            metrics_log.close()

    final_step = int(jax.device_get(state.step))
    model_path = None
    if final_step >= tc.steps and lora_run is not None:
        model_path = lora_lib.export(out, lora_run, cfg, base, state.params, setup.tokenizer_path)
    elif final_step >= tc.steps:
        model_path = export_model(out / checkpoint.TRAINED_MODEL_DIR, cfg, state.params, setup.tokenizer_path)
    summary = {
        "status": status,
        "steps": final_step,
        "resumed_from": latest,
        "first_loss": history[0][1] if history else None,
        "final_loss": history[-1][1] if history else None,
        "losses": history,
        "mesh": mesh_str(mesh),
        "params": cfg.num_params(),
        "model": str(model_path) if model_path else None,
    }
    if lora_run is not None:
        summary["trained_params"] = sum(x.size for x in jax.tree.leaves(state.params))
        summary["adapters"] = str((out / lora_lib.ADAPTERS_DIR).absolute()) if model_path else None
    if timing["t0"] is not None and timing["last_step"] > timing["step0"]:
        elapsed = timing["last_t"] - timing["t0"]
        summary["tokens_per_s"] = (timing["last_step"] - timing["step0"]) * B * T / elapsed
        summary["mfu"] = summary["tokens_per_s"] * flops_per_step / (B * T) / peak if peak else None
    if primary:
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    parts = [f"{summary['status']}: step {summary['steps']}"]
    if summary["first_loss"] is not None:
        parts.append(f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}")
    if summary.get("tokens_per_s"):
        parts.append(f"{summary['tokens_per_s']:.0f} tokens/s")
    if summary.get("mfu"):
        parts.append(f"MFU {100 * summary['mfu']:.1f}%")
    parts.append(f"mesh {summary['mesh']}, {summary['params'] / 1e6:.2f}M params")
    if summary["model"]:
        parts.append(f"model -> {summary['model']}")
    return "; ".join(parts)
