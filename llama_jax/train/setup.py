"""Setting a run up in OUT: its model config, tokenizer, mesh, data, optimizer and compiled step,
all checked before any checkpoint is touched; then the state it starts from (fresh or restored)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable

import jax

from llama_jax import checkpoint
from llama_jax.config import PRESETS, LlamaConfig, compute_dtype
from llama_jax.sharding import make_mesh
from llama_jax.train import data as data_lib
from llama_jax.train import lora as lora_lib
from llama_jax.train.dpo import DPO, prepare_reference
from llama_jax.train.optim import OptimConfig, lr_schedule, make_optimizer
from llama_jax.train.preferences import PreferenceBatches, PreferenceDataConfig
from llama_jax.train.reward import RewardModeling, initial_params as initial_reward_params
from llama_jax.train.run_config import DEFAULT_MODEL, TrainConfig
from llama_jax.train.step import LanguageModeling, Objective, check_batch_shape, init_state, make_train_step, \
    put_batch, sharded_abstract_state

log = logging.getLogger("llama_jax.train")


def is_primary() -> bool:
    return jax.process_index() == 0


def model_config(tc: TrainConfig, out: Path) -> tuple[LlamaConfig, str]:
    """The config and where it came from: the run being resumed, --init-from, or --config."""
    if (out / "config.json").is_file():
        if tc.config or tc.init_from:
            log.warning("%s already holds a run: continuing it with its own config.json; --config and "
                        "--init-from are ignored (use a new --out to start afresh)", out)
        return LlamaConfig.from_json(out / "config.json"), f"resumed run {out}"
    if tc.init_from:
        return checkpoint.load_config(tc.init_from), f"checkpoint {tc.init_from}"
    name = tc.config or DEFAULT_MODEL
    if name in PRESETS:
        return PRESETS[name], f"preset {name}"
    if os.path.isfile(name):
        return LlamaConfig.from_json(name), name
    raise ValueError(f"--config {name!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file")


def resolve_tokenizer(tc: TrainConfig, cfg: LlamaConfig, out: Path) -> str:
    """The tokenizer file: --tokenizer (`tokenizer.resolve_tokenizer`, 'bytes' written into OUT); else the
    run's own copy (resume), the --init-from checkpoint's, the real Llama 3 one for a 128k-vocabulary
    model, or the byte-level one."""
    from llama_jax.tokenizer import resolve_tokenizer as resolve

    choice = tc.tokenizer
    if choice is None:
        if checkpoint.tokenizer_path(out):
            return str(checkpoint.tokenizer_path(out))
        if tc.init_from and checkpoint.tokenizer_path(tc.init_from):
            return str(checkpoint.tokenizer_path(tc.init_from))
        choice = "llama3" if cfg.vocab_size >= 128256 else "bytes"
    return resolve(choice, bytes_dir=out)


def _check_tokenizer(cfg: LlamaConfig, tokenizer, fresh: bool) -> LlamaConfig:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    if (cfg.bos_id, cfg.eos_id) != (tokenizer.bos_id, tokenizer.eos_id):
        if not fresh:
            raise ValueError(f"the model was trained with bos/eos ids {cfg.bos_id}/{cfg.eos_id}, the tokenizer has "
                             f"{tokenizer.bos_id}/{tokenizer.eos_id}")
        cfg = dataclasses.replace(cfg, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    return cfg


def runtime_overrides(tc: TrainConfig) -> dict[str, Any]:
    """Settings that change how the model runs, not its shapes (so a resumed run may change them).
    Master weights are float32; compute is bfloat16 unless on CPU or told (config.compute_dtype)."""
    overrides = {"dtype": compute_dtype(tc.dtype, "bfloat16"), "param_dtype": "float32"}
    if tc.remat:
        overrides["remat"] = tc.remat
    if tc.attention_impl:
        overrides["attention_impl"] = tc.attention_impl
    return overrides


@functools.lru_cache(maxsize=4)
def _optimizer_and_step(cfg: LlamaConfig, optim: OptimConfig, mesh, batch_shape: tuple[int, int], grad_accum: int,
                        objective: Objective, lora_spec=None, head: str = "lm"):
    """One optimizer and jitted step per setting, so a process that calls `train` again (a resumed
    run in a notebook, the tests) reuses the compiled step instead of tracing it anew. With a LoRA
    spec the step trains adapters and takes the frozen base: step(state, batch, base)."""
    optimizer = make_optimizer(optim)
    lora_args = {} if lora_spec is None else dict(adapt=lora_lib.adapted(lora_spec, head))
    return optimizer, make_train_step(cfg, optimizer, mesh, batch_shape=batch_shape, grad_accum=grad_accum,
                                      objective=objective, schedule=lr_schedule(optim),
                                      trained=_trained(cfg, lora_spec, mesh, head), **lora_args)


def _trained(cfg: LlamaConfig, lora_spec, mesh, head: str = "lm"):
    """What the state's params are on `mesh`: the causal LM's own (None), a reward model's (head
    "score"), or LoRA adapters, beside which a reward model trains its score head whole."""
    from llama_jax.lora import sharded_adapter_shapes
    from llama_jax.params import sharded_param_shapes

    if head == "lm":
        return None if lora_spec is None else sharded_adapter_shapes(cfg, lora_spec, mesh)
    model = sharded_param_shapes(cfg, mesh, head)
    return model if lora_spec is None else {**sharded_adapter_shapes(cfg, lora_spec, mesh), "score": model["score"]}


@dataclasses.dataclass
class Run:
    """Everything a run needs, checked before any checkpoint is touched."""

    tc: TrainConfig
    out: Path
    mesh: Any
    cfg: LlamaConfig
    source: str  # where cfg came from, for the log
    tokenizer_path: str
    optimizer: Any
    step: Callable  # step(state, batch) -> (state, metrics), jitted; with LoRA the frozen base is bound in
    data: data_lib.TrainData | PreferenceBatches
    lora: lora_lib.LoraRun | None = None
    base: Any = None  # LoRA: the frozen base params, as the step reads them
    head: str = "lm"  # the model trained: a causal LM, or a reward model ("score", --objective reward)

    @property
    def reads_rows(self) -> bool:
        """TrainData: each process reads its own rows, placed on the mesh already; else preference
        pairs (DPO, reward models), global numpy batches."""
        return isinstance(self.data, data_lib.TrainData)

    def next_batch(self):
        batch = next(self.data)
        return batch if self.reads_rows else put_batch(batch, self.mesh)

    @property
    def trained(self):
        return _trained(self.cfg, self.lora and self.lora.spec, self.mesh, self.head)


def build_run(tc: TrainConfig) -> Run:
    from llama_jax.tokenizer import load_tokenizer

    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    head = "score" if tc.objective == "reward" else "lm"
    if tc.init_from and head == "lm":  # a reward model may start from either kind; the others need a causal LM
        checkpoint.check_head(tc.init_from, checkpoint.stored_head(tc.init_from), head)
    mesh = make_mesh(tc.mesh)
    lora_run = lora_lib.resolve(out, rank=tc.lora_rank, alpha=tc.lora_alpha, targets=tc.lora_targets,
                                quantize_base=tc.quantize_base, init_from=tc.init_from)
    cfg, source = model_config(tc, out)
    fresh = not (out / "config.json").is_file() and not tc.init_from  # written before any checkpoint
    tokenizer_path = resolve_tokenizer(tc, cfg, out)
    tokenizer = load_tokenizer(tokenizer_path)
    cfg = _check_tokenizer(cfg, tokenizer, fresh)
    cfg = dataclasses.replace(cfg, **runtime_overrides(tc))
    if tc.seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len {tc.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    check_batch_shape(mesh, (tc.batch_size, tc.seq_len), tc.grad_accum)
    if tc.objective == "dpo":
        objective = DPO(tc.dpo_beta)
    elif tc.objective == "reward":
        objective = RewardModeling()
    else:  # checked before anything is written: bad data trains nothing
        objective = LanguageModeling(tc.z_loss)
        data_path = data_lib.data_dir(tuple(tc.data), tokenizer_path, tc.seq_len, out, tc.progress)
        data = data_lib.TrainData(data_path, tokenizer_path, tc.seq_len, tc.batch_size, tc.seed, mesh)
    if is_primary():
        (out / "config.json").write_text(cfg.to_json() + "\n")
        checkpoint.copy_tokenizer(tokenizer_path, out)
        if lora_run is not None:
            lora_lib.write_run_file(out, lora_run)
    if tc.objective in ("dpo", "reward"):
        data = PreferenceBatches(PreferenceDataConfig(tuple(tc.data), tc.seq_len, tc.batch_size, tc.seed,
                                                      scored=head == "score"), tokenizer)
    optim = OptimConfig(lr=tc.lr, warmup_steps=tc.warmup_steps, total_steps=tc.steps, min_lr_ratio=tc.min_lr_ratio,
                        b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, clip_norm=tc.clip_norm)
    optimizer, step = _optimizer_and_step(cfg, optim, mesh, (tc.batch_size, tc.seq_len), tc.grad_accum, objective,
                                          lora_run and lora_run.spec, head)
    run = Run(tc, out, mesh, cfg, source, tokenizer_path, optimizer, step, data, lora_run, head=head)
    if lora_run is not None:  # the frozen base, at every start: the step reads it, checkpoints do not hold it
        run.base = lora_lib.load_base(lora_run, cfg, mesh, head)
        run.step = functools.partial(_with_base, step, run.base)
    return run


def _with_base(lora_step, base, state, batch):
    return lora_step(state, batch, base)


# Checkpoints -----------------------------------------------------------------------------------

def checkpoint_manager(directory: Path, keep: int, save_every: int):
    """Orbax decides when to save: every `save_every` steps (not also at the first step, its default),
    and at the step that jax's preemption service agrees on once any process is told to stop."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as policies

    when = policies.AnySavePolicy([policies.FixedIntervalPolicy(save_every),
                                   policies.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True, save_decision_policy=when)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def checkpoint_args(state, data_state: dict[str, Any]):
    """One checkpoint: the train state (params, Adam moments, step) and where the data continues."""
    import orbax.checkpoint as ocp

    return ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))


def start_state(run: Run, manager):
    """(state, the step it was restored from or None): the newest checkpoint, with the data iterator
    moved to where it stopped; else fresh weights (or --init-from's, or new LoRA adapters)."""
    import orbax.checkpoint as ocp

    tc, cfg, mesh = run.tc, run.cfg, run.mesh
    latest = manager.latest_step()
    if latest is not None:
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(sharded_abstract_state(cfg, run.optimizer, mesh, run.trained)),
            data=ocp.args.JsonRestore()))
        state = restored["state"]
        run.data.restore(restored["data"])
        log.info("resumed from %s at step %d", manager.directory, latest)
    else:
        params = None
        if run.lora is not None:
            from llama_jax.lora import init_adapters

            params = init_adapters(cfg, run.lora.spec, tc.seed, mesh)
            if run.head == "score":  # trained whole, from the base's head (zero for a causal LM's)
                params["score"] = lora_lib.initial_score(run.base, run.trained["score"].sharding)
        elif run.head == "score":
            params = initial_reward_params(cfg, mesh, init_from=tc.init_from, seed=tc.seed, **runtime_overrides(tc))
        elif tc.init_from:
            _, params = checkpoint.load(tc.init_from, mesh, **runtime_overrides(tc))
        state = init_state(cfg, run.optimizer, mesh, seed=tc.seed, params=params, trained=run.trained)
    if tc.objective == "dpo":  # the reference log-probs: of the initial model, once
        reference = state.params if run.lora is None else run.base  # with LoRA: the base without adapters
        prepare_reference(run.data, run.out, cfg, reference, mesh, resumed=latest is not None, primary=is_primary())
    return state, latest


def export_model(path: Path, cfg: LlamaConfig, params, tokenizer_path: str) -> Path:
    """Write the final `llama_jax.save` checkpoint (float32 master weights); every process calls it."""
    return checkpoint.save(path, cfg, params, tokenizer_path, overwrite=True)
