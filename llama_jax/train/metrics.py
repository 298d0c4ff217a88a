"""Throughput accounting and metric files: chip peak FLOP/s, MFU, JSONL and TensorBoard scalars.

TensorBoard is not a dependency: `EventWriter` writes its event-file format directly (a TFRecord
stream of `Event` protos holding scalar `Summary` values), which `tensorboard --logdir OUT` reads.
"""

from __future__ import annotations

import json
import os
import socket
import struct
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


# Event files -----------------------------------------------------------------------------------

def _crc32c_table():
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def encode_event(wall_time: float, step: int = 0, *, file_version: str | None = None,
                 scalars: dict[str, float] | None = None) -> bytes:
    """tensorflow.Event: wall_time (1, double), step (2, int64), file_version (3) or summary (5),
    where Summary.value (1) holds Value{tag (1), simple_value (2, float)}."""
    event = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        event += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
            for tag, value in scalars.items())
        event += _length_delimited(5, values)
    return event


class EventWriter:
    """Scalars to `DIR/events.out.tfevents.<time>.<host>` (TFRecord framing, masked CRC32C)."""

    def __init__(self, directory: str | os.PathLike):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        self._file = open(self.path, "ab")
        self._write(encode_event(time.time(), file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + record
                         + struct.pack("<I", _masked_crc(record)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._write(encode_event(time.time(), step, scalars=values))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricsLog:
    """One JSON object per logged step in OUT/metrics.jsonl, and the same scalars for TensorBoard."""

    def __init__(self, directory: str | os.PathLike):
        self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")
        self._events = EventWriter(directory)

    def write(self, step: int, values: dict[str, float]) -> None:
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        self._events.scalars(step, {f"train/{k}": v for k, v in values.items()})

    def close(self) -> None:
        self._jsonl.close()
        self._events.close()
