"""XLA:CPU's thread pool sized for fake-device meshes, before jax starts: plain Python (no jax), so
`import llama_jax` can do it without importing jax.
"""

from __future__ import annotations

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

# Why fake CPU meshes deadlocked (fsdp2,tp4 training; DPO+LoRA on fsdp4,tp2), and the setting that stops it.
#
# XLA:CPU runs a program's independent thunks concurrently on one intra-op thread pool shared by
# every device of the process, and a collective thunk holds its thread, blocked in a rendezvous,
# until all its peers arrive. Collectives are ordered on each device by scheduling edges only: the
# next one may start before the previous one finishes. The pool has max(cores, devices) threads,
# so on a 2-core host with 8 fake devices exactly 8: as soon as one device holds two blocked
# threads, another device has none left to reach the collective its peers wait in, and the
# 40 s rendezvous timeout aborts the process. The program is the same on every device (one SPMD
# module, one schedule); which meshes starve depends on how many collectives a step leaves
# independent of each other. Seen on main e93c254 (`python -m llama_jax.train --mesh fsdp2,tp4`,
# tiny-bytes): all 8 pool threads blocked, 6 in collective-permute channel 2 (kv_heads=2 over tp=4
# reshards K/V with permutes and pair all-gathers inside the layer scan), device 0 in two
# all-gathers at once (channel 5, devices {0,1}, and channel 52, {0,4}), the eighth device's
# thunks queued with no thread to run on. Turning off the concurrency-optimized scheduler (as
# 5eea4dd did for DPO+LoRA on fsdp4,tp2) only moves which mesh starves. A pool a few threads per
# device deep has room for the collectives a device has in flight: with 12 threads for 8 devices
# every mesh --help shows trained (XLA's default scheduler, which we keep), and with 16 so did the
# two runs that aborted (fsdp2,tp4 with the scheduler off, DPO+LoRA on fsdp4,tp2 with it on);
# tests/sharding/test_meshes.py trains every mesh with a core kept busy. 32 threads cost ~13%
# of the train tests' time on 2 cores (oversubscribed compute); 16 cost nothing measurable. XLA
# sizes the pool from PJRT_NPROC when set (its DefaultThreadPoolSize), read when jax creates its
# CPU client.
POOL_THREADS_PER_DEVICE = 2


def size_cpu_thread_pool() -> None:
    """Give XLA:CPU's thread pool POOL_THREADS_PER_DEVICE threads per fake device (see above), unless
    PJRT_NPROC is already set or the host has more cores than that. Call before jax first touches a
    device; llama_jax's import and `use_cpu_devices` do."""
    devices = flagged_device_count() or 1
    threads = POOL_THREADS_PER_DEVICE * devices
    if devices > 1 and "PJRT_NPROC" not in os.environ and threads > (os.cpu_count() or 1):
        os.environ["PJRT_NPROC"] = str(threads)


def flagged_device_count() -> int | None:
    """The fake CPU device count XLA_FLAGS asks for (the last one given), or None."""
    counts = [int(f.split("=", 1)[1]) for f in os.environ.get("XLA_FLAGS", "").split()
              if f.startswith(DEVICE_COUNT_FLAG + "=")]
    return counts[-1] if counts else None


__all__ = ["size_cpu_thread_pool", "flagged_device_count", "POOL_THREADS_PER_DEVICE", "DEVICE_COUNT_FLAG"]
