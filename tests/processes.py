"""What tests that start jax.distributed processes share: a free coordinator port, and the
environment of a child on fewer fake CPU devices that keeps the other XLA flags tests/conftest.py
set, so children compile the way the parent does (LLVM optimizations off, the same cache)."""

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cpu_env(device_count: int) -> dict[str, str]:
    count_flag = "--xla_force_host_platform_device_count"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count_flag)]
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([*flags, f"{count_flag}={device_count}"]))
