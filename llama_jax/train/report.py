"""What a run tells as it goes: each step's metrics checked finite, throughput (tokens/s, MFU), the
progress bar, and OUT/metrics.jsonl + TensorBoard every --log-every steps (process 0 only).

Progress is tqdm's; when to save is Orbax's (setup.checkpoint_manager) and when to stop early is
jax's preemption service (preemption.py). clu's periodic actions (ReportProgress, PeriodicCallback)
were the candidate for the rest, but clu 0.0.12, the newest release, imports TensorFlow as
`clu.periodic_actions` loads (through clu.metric_writers' summary writer; the fix, lazy imports,
is an unmerged pull request): a TensorFlow install for a modulo and a clock is not worth it, so
those two stay here, in `Reporter`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Callable

import jax

from llama_jax.train.metrics import MetricsLog

log = logging.getLogger("llama_jax.train")


class NonFiniteLoss(RuntimeError):
    """args: (step, message)."""

    def __str__(self) -> str:
        return self.args[1]


class Reporter:
    """`report(step, metrics)` once per step, in order, after the step's result is ready (the loop
    calls it a step late, so reading the metrics does not stall the device). Raises NonFiniteLoss."""

    def __init__(self, out, *, steps: int, start: int, tokens_per_step: int, flops_per_step: float,
                 peak_flops: float | None, log_every: int, progress: bool,
                 read_rate: Callable[[], float | None] = lambda: None):
        self.steps, self.log_every = steps, log_every
        self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak_flops
        self.read_rate = read_rate
        self.losses: list[tuple[int, float]] = []
        self._first = self._last = None  # (step, time) of the first report (its step compiled) and the newest
        primary = jax.process_index() == 0
        self._log = MetricsLog(out) if primary else None
        self._bar = None
        if primary and progress:
            from tqdm import tqdm

            self._bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                             file=sys.stderr)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._log is not None:
            self._log.close()

    def report(self, step: int, metrics) -> dict[str, float]:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            raise NonFiniteLoss(step, f"loss is {values['loss']} (grad norm {values['grad_norm']}) at step {step}")
        self.losses.append((step, values["loss"]))
        values.update(self._throughput(step))
        read_rate = self.read_rate()
        if read_rate:
            values["read_rows_per_s"] = read_rate  # this process's rate, idle time excluded
        if self._bar is not None:
            self._show(step, values)
        if self._log is not None and (step % self.log_every == 0 or step + 1 == self.steps):
            self._log.write(step, values)
            if self._bar is None:
                log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
        return values

    def _throughput(self, step: int) -> dict[str, float]:
        """Tokens/s (and MFU, given a peak) since the previous report; nothing for the first, which compiled."""
        now = time.perf_counter()
        if self._first is None:
            self._first = self._last = (step, now)
            return {}
        last_step, last_t = self._last
        self._last = (step, now)
        tps = (step - last_step) * self.tokens_per_step / (now - last_t)
        values = {"tokens_per_s": tps}
        if self.peak:
            values["mfu"] = self._mfu(tps)
        return values

    def _mfu(self, tokens_per_s: float) -> float:
        return tokens_per_s / self.tokens_per_step * self.flops_per_step / self.peak

    def _show(self, step: int, values: dict[str, float]) -> None:
        postfix = {"loss": f"{values['loss']:.3f}"}
        if "tokens_per_s" in values:
            postfix["tok/s"] = f"{values['tokens_per_s']:.0f}"
        if "mfu" in values:
            postfix["mfu"] = f"{100 * values['mfu']:.1f}%"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step + 1 - self._bar.n)

    def summary(self) -> dict[str, Any]:
        """Losses and the run's mean throughput after its first (compiling) step."""
        out = {"first_loss": self.losses[0][1] if self.losses else None,
               "final_loss": self.losses[-1][1] if self.losses else None, "losses": list(self.losses)}
        if self._first is not None and self._last[0] > self._first[0]:
            (step0, t0), (step1, t1) = self._first, self._last
            out["tokens_per_s"] = (step1 - step0) * self.tokens_per_step / (t1 - t0)
            out["mfu"] = self._mfu(out["tokens_per_s"]) if self.peak else None
        return out


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
