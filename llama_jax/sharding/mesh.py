"""Mesh strings (`dp4,tp8`, `dp2,fsdp4,tp2`, `fsdp2,cp4`, `fsdp-1`) -> jax Mesh, and multi-process start-up."""

from __future__ import annotations

import math
import os
import re

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from llama_jax.cpu_threads import DEVICE_COUNT_FLAG, flagged_device_count, size_cpu_thread_pool
from llama_jax.sharding.rules import MESH_AXES

_ITEM = re.compile(r"([a-z]+)(-?\d+)")

def use_cpu_devices(count: int) -> None:
    """Let the CPU backend expose `count` fake devices (for meshes on one host), with a thread pool
    deep enough for their collectives; a device count XLA_FLAGS already sets is left as it is.
    Call before jax first touches a device (importing jax is fine)."""
    if flagged_device_count() is None:
        flags = os.environ.get("XLA_FLAGS", "").split()
        os.environ["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={count}"])
    size_cpu_thread_pool()


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """`'dp2,fsdp4,tp2'` -> {'dp': 2, 'fsdp': 4, 'tp': 2}, every mesh axis present (absent ones 1).

    Sizes must multiply to `num_devices`; one axis may be `-1`, meaning all remaining devices.
    """
    where = f"mesh {spec!r}"
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{where}: empty; write e.g. 'fsdp8', 'dp4,tp8' or 'dp2,fsdp-1,tp2' (axes: {MESH_AXES})")
    sizes: dict[str, int] = {}
    for item in spec.replace(" ", "").split(","):
        m = _ITEM.fullmatch(item)
        if not m:
            raise ValueError(f"{where}: cannot read {item!r}; each item is an axis name and a size, like 'tp8'")
        name, size = m.group(1), int(m.group(2))
        if name not in MESH_AXES:
            raise ValueError(f"{where}: unknown axis {name!r}; the axes are {', '.join(MESH_AXES)}")
        if name in sizes:
            raise ValueError(f"{where}: axis {name!r} is given twice")
        if size == 0 or size < -1:
            raise ValueError(f"{where}: axis {name!r} has size {size}; sizes are positive, or -1 for the rest")
        sizes[name] = size
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"{where}: only one axis may be -1, got {', '.join(rest)}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if num_devices % known:
            raise ValueError(f"{where}: the other axes use {known} devices, which does not divide the "
                             f"{num_devices} devices there are")
        sizes[rest[0]] = num_devices // known
    elif known != num_devices:
        there = "is 1 device" if num_devices == 1 else f"are {num_devices} devices"
        raise ValueError(f"{where}: sizes multiply to {known}, but there {there} "
                         f"(use -1 on one axis for 'the rest')")
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def make_mesh(spec: str | dict[str, int], devices=None) -> Mesh:
    """A Mesh with axes (dp, fsdp, cp, tp), tp innermost so it spans the most closely linked devices,
    cp next: its per-layer key/value all-gathers are the next heaviest traffic."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = parse_mesh(spec, len(devices)) if isinstance(spec, str) else {a: spec.get(a, 1) for a in MESH_AXES}
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(shape)} devices, got {len(devices)}")
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_str(mesh: Mesh) -> str:
    """The canonical spec of a mesh, e.g. 'dp2,fsdp2,tp2' (size-1 axes omitted)."""
    items = [f"{a}{mesh.shape[a]}" for a in MESH_AXES if mesh.shape[a] > 1]
    return ",".join(items) or "dp1"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, auto: bool = False) -> None:
    """Join a multi-process job before any device is touched.

    Explicit flags win; otherwise JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID from
    the environment; `auto` lets jax detect the cluster itself (SLURM, Open MPI, TPU pods). With
    none of these this is a single-process run and nothing happens.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator is None and not auto:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("--num-processes / --process-id need --coordinator HOST:PORT")
        return
    if coordinator is not None and (num_processes is None or process_id is None):
        raise ValueError("--coordinator needs --num-processes and --process-id as well")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
