"""LoRA and QLoRA fine-tuning: what a run adds to the full-parameter loop (loop.py) when --lora-rank is given.

    OUT/lora.json        rank, alpha, targets, --quantize-base, the base checkpoint's path and config hash
    OUT/checkpoints/N/   the train state holds the adapters and their Adam moments only (+ the data iterator)
    OUT/adapters/        the final adapters (lora.save_adapters): `infer --checkpoint BASE --lora OUT/adapters`
    OUT/model/           the merged model W + alpha/r * A @ B in the base's dtype, an ordinary checkpoint

A reward model (--objective reward) trains its score head whole beside the adapters (it starts at
zero, where the adapters alone would get no gradient), and writes OUT/model only: its adapters
without that head would score nothing.

The base is read from its checkpoint at every start (fresh or resumed) and held frozen in its stored
dtype, or as int8 with --quantize-base (QLoRA); the train step takes it as an argument that is
neither donated nor differentiated, so it has no gradient and no optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from llama_jax import checkpoint, lora
from llama_jax.config import LlamaConfig

RUN_FILE = "lora.json"
ADAPTERS_DIR = "adapters"
QUANTIZE_BASE = ("int8",)


@dataclasses.dataclass(frozen=True)
class LoraRun:
    spec: lora.LoraConfig
    base: str  # the base checkpoint directory, absolute
    base_config: LlamaConfig  # as stored there (its hash ties adapters to it)
    quantize_base: str | None = None

    def to_dict(self) -> dict:
        return {**self.spec.to_dict(), "quantize_base": self.quantize_base, "base": self.base,
                "base_config_sha256": lora.config_sha256(self.base_config)}


def resolve(out: Path, *, rank: int | None, alpha: float | None, targets: tuple[str, ...] | None,
            quantize_base: str | None, init_from: str | None) -> LoraRun | None:
    """The LoRA settings of the run in OUT: a fresh one from the flags, or the resumed one from
    OUT/lora.json (whose base must still have the config it was trained on). None: full fine-tuning."""
    run_file = out / RUN_FILE
    resuming = (out / checkpoint.CONFIG_FILE).is_file()
    if rank is None:
        if alpha is not None or targets is not None or quantize_base is not None:
            raise ValueError("--lora-alpha, --lora-targets and --quantize-base need --lora-rank")
        if run_file.is_file():
            raise ValueError(f"{out} holds a LoRA run: rerun it with its --lora-rank to resume, or use a new --out")
        return None
    spec = lora.LoraConfig(rank, alpha, targets if targets is not None else lora.TARGETS)
    if quantize_base is not None and quantize_base not in QUANTIZE_BASE:
        raise ValueError(f"--quantize-base {quantize_base!r}: choose one of {', '.join(QUANTIZE_BASE)}")
    if run_file.is_file():
        saved = json.loads(run_file.read_text())
        recorded = lora.LoraConfig(saved["rank"], saved["alpha"], tuple(saved["targets"]))
        if (recorded, saved.get("quantize_base")) != (spec, quantize_base):
            raise ValueError(f"{out} holds a LoRA run with rank {recorded.rank}, alpha {recorded.alpha}, targets "
                             f"{','.join(recorded.targets)}, --quantize-base {saved.get('quantize_base')}: resume it "
                             f"with the same flags, or use a new --out")
        base = saved["base"]
        base_config = _base_config(base)
        lora.check_base(saved, base_config, base, f"the LoRA run in {out}")
        return LoraRun(spec, base, base_config, quantize_base)
    if resuming:
        raise ValueError(f"{out} holds a full fine-tuning run: LoRA needs a new --out")
    if not init_from:
        raise ValueError("--lora-rank needs --init-from CHECKPOINT: the base model the adapters are trained on")
    base = str(checkpoint.find(init_from).absolute())
    return LoraRun(spec, base, _base_config(base), quantize_base)


def _base_config(path: str) -> LlamaConfig:
    return checkpoint.load_config(path)


def write_run_file(out: Path, run: LoraRun) -> None:
    (out / RUN_FILE).write_text(json.dumps(run.to_dict(), indent=2) + "\n")


def load_base(run: LoraRun, cfg: LlamaConfig, mesh, head: str = "lm"):
    """The frozen base on `mesh`, in the compute dtype (not float32 master weights: it is never
    updated; bfloat16 on accelerators), or int8 with --quantize-base.

    Not in its stored dtype when that differs (a bfloat16 checkpoint computed in float32 on CPU):
    XLA then converts the whole stacked base once, outside the layer loop of the backward pass,
    holding a float32 copy for the step anyway (measured: bench/train.py's memory_analysis).

    head "score": a reward model's base, from a reward checkpoint as it is or from a causal LM's
    without its output projection and with a zero score head (reward.model.from_causal_lm)."""
    from llama_jax.reward.model import HEAD, from_causal_lm

    stored = checkpoint.stored_head(run.base) if head == HEAD else head
    _, params = checkpoint.load(run.base, mesh, dtype=cfg.dtype, param_dtype=cfg.dtype,
                                attention_impl=cfg.attention_impl, remat=cfg.remat, head=stored)
    if stored != head:
        params = from_causal_lm(dataclasses.replace(cfg, param_dtype=cfg.dtype), params, mesh)
    if run.quantize_base:
        from llama_jax.quantize import QuantizedArray, quantize_params

        full, params = params, quantize_params(params, run.quantize_base)
        # Never two copies of the base past this point (norms are not quantized: they are shared).
        jax.tree.map(lambda x, q: x.delete() if isinstance(q, QuantizedArray) else None, full, params)
    return params


def _split_score(trained):
    """(the adapters, a reward model's trained score head or None)."""
    return {k: v for k, v in trained.items() if k != "score"}, trained.get("score")


def adapted(spec: lora.LoraConfig, head: str = "lm"):
    """`adapt(trained, base)` for make_train_step: the weights the model applies, the frozen base
    with each targeted weight adapted (whatever the objective: next-token, DPO or a reward model's,
    whose trained score head replaces the base's)."""
    if head == "lm":
        return lambda adapters, base: lora.adapt(base, adapters, spec)

    def adapt(trained, base):
        adapters, score = _split_score(trained)
        return {**lora.adapt(base, adapters, spec), "score": score}
    return adapt


def initial_score(base, sharding):
    """A reward model's trained score head at step 0: the base's, as float32 master weights, a copy
    (the train state is donated; the base is not)."""
    return jax.jit(lambda s: s.astype(jnp.float32), out_shardings=sharding)(base["score"])


def export(out: Path, run: LoraRun, cfg: LlamaConfig, base, trained, tokenizer_path: str) -> Path:
    """OUT/adapters (not for a reward model), then OUT/model merged in the base's dtype; every process
    calls it."""
    adapters, score = _split_score(trained)
    if score is None:
        lora.save_adapters(out / ADAPTERS_DIR, run.spec, adapters, base=run.base, base_config=run.base_config)
    merged_cfg = dataclasses.replace(cfg, dtype=run.base_config.dtype, param_dtype=run.base_config.param_dtype)
    merged = lora.merge(base, adapters, run.spec, dtype=merged_cfg.param_dtype)
    if score is not None:
        merged["score"] = score.astype(merged_cfg.param_dtype)
    return checkpoint.save(out / checkpoint.TRAINED_MODEL_DIR, merged_cfg, merged, tokenizer_path, overwrite=True)
