"""Faults the tests inject into a training run through loop.Hooks, and an entry point that runs the
CLI with one: `python -m tests.train.faults sigterm:3 --out ... (train flags)` in a subprocess.

    sigterm:N             process 0 sends itself SIGTERM once step N is dispatched
    sigkill-after-save:N  the process kills itself as checkpoint N starts writing
"""

import os
import signal
import sys
import time

import jax

from llama_jax.train.loop import Hooks


def sigterm_at(step: int) -> Hooks:
    def fault(done: int) -> None:
        if done != step:
            return
        if jax.process_index() == 0:  # the others hear of it from jax's preemption service
            os.kill(os.getpid(), signal.SIGTERM)
        if jax.process_count() > 1:
            _wait_until_all_processes_hold_their_step()
    return Hooks(step_dispatched=fault)


def _wait_until_all_processes_hold_their_step(timeout_s: float = 120) -> None:
    """Hold every process here, at the step the signal came, until jax's preemption protocol has
    collected each one's newest step (it reads them under a lock that then holds the loop's next
    `reached_preemption` until the agreed step is set): so the run saves at this step, not at
    whichever later step the fastest process had reached by then. A test's determinism, not the loop's."""
    from jax._src import distributed

    deadline = time.monotonic() + timeout_s
    while len(distributed.global_state.client.key_value_dir_get("PREEMPTION_CURRENT_COUNTER/")) < jax.process_count():
        if time.monotonic() > deadline:
            raise TimeoutError("jax's preemption service did not collect every process's step")
        time.sleep(0.05)


def sigkill_after_save(step: int) -> Hooks:
    def fault(done: int) -> None:
        if done == step:  # the asynchronous write is still in flight
            os.kill(os.getpid(), signal.SIGKILL)
    return Hooks(checkpoint_started=fault)


FAULTS = {"sigterm": sigterm_at, "sigkill-after-save": sigkill_after_save}


def hooks_for(spec: str) -> Hooks:
    kind, _, step = spec.partition(":")
    return FAULTS[kind](int(step))


if __name__ == "__main__":
    from llama_jax.train.__main__ import main

    sys.exit(main(sys.argv[2:], hooks=hooks_for(sys.argv[1])))
