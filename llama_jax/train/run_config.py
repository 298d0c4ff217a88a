"""TrainConfig: every setting of a training run, checked before OUT is touched (the CLI's flags)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llama_jax.train import lora as lora_lib

DEFAULT_MODEL = "tiny-bytes"  # the byte-level demo preset (config.PRESETS says why)
OBJECTIVES = ("lm", "dpo", "reward")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    out: str = "out"
    config: str | None = None  # preset name or config.json path; default DEFAULT_MODEL
    init_from: str | None = None  # a llama_jax checkpoint to start from
    data: tuple[str, ...] = ()  # files / directories; empty: the built-in corpus
    tokenizer: str | None = None  # 'bytes', 'llama3' or a path; default: see setup.resolve_tokenizer
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
    objective: str = "lm"  # "lm": next-token loss (pre-training, SFT); "dpo" (dpo.py) or "reward" (reward.py): pairs
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
        if self.objective != "lm" and not self.data:
            raise ValueError(f"--objective {self.objective} needs --data: JSONL preference records (prompt or "
                             f"messages, chosen, rejected)")
        if self.objective != "lm" and self.z_loss:
            raise ValueError(f"--z-loss belongs to the next-token objective, not to --objective {self.objective}")
        if self.lora_rank is not None:  # bad LoRA flags fail here, before OUT is touched
            from llama_jax.lora import TARGETS, LoraConfig

            LoraConfig(self.lora_rank, self.lora_alpha, self.lora_targets if self.lora_targets is not None else TARGETS)
            if self.quantize_base not in (None, *lora_lib.QUANTIZE_BASE):
                raise ValueError(f"--quantize-base {self.quantize_base!r}: choose one of {lora_lib.QUANTIZE_BASE}")
            if not self.init_from and not (Path(self.out) / lora_lib.RUN_FILE).is_file():
                raise ValueError("--lora-rank needs --init-from CHECKPOINT: the base model the adapters are trained on")
