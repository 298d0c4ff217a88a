"""Throughput accounting and metric files: chip peak FLOP/s, MFU, JSONL and TensorBoard scalars."""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp

# Dense bf16 matmul peak per chip, from the vendors' data sheets (no sparsity). Matched in order
# against jax's device_kind, so more specific names come first.
PEAK_FLOPS_BF16 = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def chip_peak_flops(device) -> float | None:
    for name, peak in PEAK_FLOPS_BF16:
        if name.lower() in device.device_kind.lower():
            return peak
    return None


@functools.cache  # once per process: runs after the first (tests, notebooks) skip the 1-2 s it takes on CPU
def measure_matmul_flops(dtype=jnp.float32, n: int = 1024, repeats: int = 5, device=None) -> float:
    """Best FLOP/s of an n x n x n matmul on one device: the CPU's practical peak, for CPU MFU."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops(devices, dtype=jnp.bfloat16) -> tuple[float | None, str]:
    """(FLOP/s of the whole mesh, how it was found). CPU devices share the host's cores, so their
    peak is one measured matmul using all of them, not a per-device figure times the count."""
    if devices[0].platform == "cpu":
        return measure_matmul_flops(dtype), "measured CPU matmul"
    peak = chip_peak_flops(devices[0])
    if peak is None:
        return None, f"unknown chip {devices[0].device_kind!r}"
    return peak * len(devices), f"{devices[0].device_kind} data sheet"


class MetricsLog:
    """One JSON object per logged step in OUT/metrics.jsonl, and the same scalars for TensorBoard
    (tag `train/<name>`, in OUT/events.out.tfevents.*, written by tensorboardX)."""

    def __init__(self, directory: str | os.PathLike):
        # Imported here: tensorboardX imports torch when it is installed (seconds), and only the
        # process that writes the metrics needs it.
        from tensorboardX import SummaryWriter

        self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")
        self._events = SummaryWriter(os.fspath(directory))

    def write(self, step: int, values: dict[str, float]) -> None:
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._events.add_scalar(f"train/{name}", value, step)
        self._events.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._events.close()
