"""XLA:CPU's thread pool is deep enough for fake-device meshes' collectives (sharding/mesh.py)."""

import os
import subprocess
import sys

import jax

from llama_jax.cpu_threads import POOL_THREADS_PER_DEVICE


def pool_threads() -> int:
    """Threads of XLA:CPU's intra-op pool in this process ('tf_XLAEigen', as Linux names them)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{task}/comm").read().strip())
        except FileNotFoundError:  # a thread (not the pool's: they live as long as the client) that just ended
            continue
    return names.count("tf_XLAEigen")


def test_this_process_has_pool_threads_for_every_device():
    jax.devices()  # conftest's use_cpu_devices(8) ran before the client was made
    assert pool_threads() >= POOL_THREADS_PER_DEVICE * len(jax.devices())  # XLA's own default: max(cores, 8)


def test_importing_llama_jax_deepens_the_pool_that_xla_flags_ask_devices_of():
    # A user's own script: XLA_FLAGS for 8 devices, no PJRT_NPROC, llama_jax imported before jax runs.
    code = ("import llama_jax, jax, os; jax.devices(); from tests.sharding.test_cpu_pool import pool_threads; "
            "print(os.environ.get('PJRT_NPROC'), pool_threads(), len(jax.devices()))")
    env = {k: v for k, v in os.environ.items() if k != "PJRT_NPROC"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    nproc, threads, devices = out.stdout.split()
    assert int(devices) == 8 and int(threads) >= POOL_THREADS_PER_DEVICE * 8
    # Set only where the host's cores would not already give that many (XLA then sizes it by cores).
    assert nproc == (str(POOL_THREADS_PER_DEVICE * 8) if (os.cpu_count() or 1) < POOL_THREADS_PER_DEVICE * 8 else "None")
