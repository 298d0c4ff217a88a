"""When a run stops early and when it saves: SIGTERM in one process, jax's agreed step through
Orbax with several (faked here; test_multiprocess runs the real protocol), Orbax's save interval."""

import os
import signal

from llama_jax.train.preemption import Preemption
from llama_jax.train.setup import checkpoint_manager


class AgreedStep:
    """Stands in for a CheckpointManager whose processes agreed (through jax) to stop at `step`."""

    def __init__(self, step):
        self.step, self.asked = step, []

    def reached_preemption(self, step):
        self.asked.append(step)
        return step == self.step


def test_sigterm_in_one_process_stops_at_the_next_step_and_the_handler_is_put_back():
    before = signal.getsignal(signal.SIGTERM)
    with Preemption(AgreedStep(None)) as preemption:
        assert not preemption.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.reached(2)
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_step_the_processes_agreed_on_is_the_one_that_stops():
    manager = AgreedStep(5)
    with Preemption(manager) as preemption:
        assert [s for s in range(1, 8) if preemption.reached(s)] == [5]
    assert manager.asked == list(range(1, 8))  # asked at every step: the check is local, not a collective


def test_orbax_saves_every_save_every_steps_and_not_at_the_first(tmp_path):
    manager = checkpoint_manager(tmp_path / "checkpoints", keep=3, save_every=3)
    try:
        assert [s for s in range(1, 10) if manager.should_save(s)] == [3, 6, 9]
    finally:
        manager.close()
