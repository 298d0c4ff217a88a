"""When a run is told to stop early (SIGTERM, as schedulers preempt), and at which step it saves.

With several processes every one must save the same step, whichever of them got the signal. jax's
preemption service does that (jax.distributed.initialize starts it): its own SIGTERM handler tells
the coordination service, which agrees on the step after the fastest process's newest one, and
Orbax's `CheckpointManager.reached_preemption(step)` is true at that step in every process. The
check is local (the agreement runs in the background), so the loop asks at every step. A single
process has no coordination service: there a SIGTERM handler of our own sets a flag, installed
only for the duration of the run.
"""

from __future__ import annotations

import signal

import jax


class Preemption:
    """`reached(step)`: stop after this step, saving it. A context manager around the loop."""

    def __init__(self, manager):
        self._manager = manager
        self._signalled = False
        self._previous = None

    def __enter__(self) -> Preemption:
        # With several processes the signal is jax's: a handler of ours would replace its handler.
        if jax.process_count() == 1 and hasattr(signal, "SIGTERM"):
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self._signalled = True

    def reached(self, step: int) -> bool:
        return self._signalled or self._manager.reached_preemption(step)
