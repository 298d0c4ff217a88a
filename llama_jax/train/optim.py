"""The optimizer: AdamW on float32 master weights, linear warmup then cosine decay, global-norm clipping."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # peak learning rate, reached at the end of warmup
    warmup_steps: int = 100
    total_steps: int = 1000  # the cosine reaches min_lr_ratio * lr here
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices and embeddings only, not on norm scales
    clip_norm: float = 1.0  # global gradient norm; 0 disables clipping

    def __post_init__(self):
        if self.lr <= 0 or self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"need lr > 0, total_steps >= 1, warmup_steps >= 0; got {self}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, cfg.total_steps)
    if warmup == 0:
        return optax.cosine_decay_schedule(cfg.lr, cfg.total_steps, alpha=cfg.min_lr_ratio)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=max(cfg.total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio)


def _decay_mask(params):
    # Norm scales are [layers, dim] once stacked, so name them rather than count dims.
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=_decay_mask)
    # The same chain either way, so a run may resume with clipping turned on or off.
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
    return optax.chain(clip, adamw)
