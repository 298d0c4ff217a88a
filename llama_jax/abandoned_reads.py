"""Quiet after a damaged checkpoint: what Orbax's abandoned reads report once `checkpoint.load`
has already raised its one-line error. Plain Python (no jax), so a CLI's entry point installs it
before anything heavy is imported."""

from __future__ import annotations

import sys


def quiet_abandoned_reads() -> None:
    """For a command-line process that reports a damaged checkpoint in one line: drop what Orbax's
    abandoned reads report afterwards, for the rest of the process (each CLI entry point calls this;
    `load` itself leaves sys.unraisablehook alone). When one read of a restore fails, Orbax closes
    its event loop while the other reads are in flight: each then reports RuntimeError('Event loop
    is closed'), and their coroutines, collected later (as late as interpreter exit), report the
    failed read again, tracebacks on stderr around the one-line error. Any other unraisable
    exception still reports. Calling it again installs nothing more."""
    if getattr(sys.unraisablehook, "_drops_abandoned_reads", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        error, source = unraisable.exc_value, unraisable.object
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        abandoned_read = getattr(source, "__qualname__", "").endswith("_read_array_index_and_device_put")
        if not (closed_loop or abandoned_read):
            previous(unraisable)

    hook._drops_abandoned_reads = True
    sys.unraisablehook = hook


__all__ = ["quiet_abandoned_reads"]
