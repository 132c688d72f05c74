"""The loop skeleton: hooks run after each step in their order, periodic conditions, and the closing
hooks even when a step fails."""
import pytest

from rcmae.core.engine import FinallyHook, PeriodicHook, TrainLoop


def test_hooks_run_in_order_at_their_steps():
    events = []
    loop = TrainLoop(lambda step: events.append(("step", step)), start=2, stop=7, steps_per_epoch=3, hooks=[
        PeriodicHook(lambda loop: loop.every_steps(2), lambda loop: events.append(("log", loop.step))),
        PeriodicHook(lambda loop: loop.every_epochs(1), lambda loop: events.append(("epoch", loop.epoch))),
        FinallyHook(lambda loop: events.append(("end", loop.step)))])
    assert loop.run() == 7
    # steps 2..6 run; after step k the loop has finished k + 1 steps
    assert events == [("step", 2), ("epoch", 1), ("step", 3), ("log", 4), ("step", 4), ("step", 5), ("log", 6),
                      ("epoch", 2), ("step", 6), ("end", 7)]
    assert not TrainLoop(None, 0, 0, 3, []).every_epochs(0) and not TrainLoop(None, 0, 0, 3, []).every_steps(0)


def test_closing_hooks_run_when_a_step_fails():
    closed = []

    def step(i):
        if i == 3:
            raise RuntimeError("non-finite")

    with pytest.raises(RuntimeError, match="non-finite"):
        TrainLoop(step, 0, 10, 5, [FinallyHook(lambda loop: closed.append(loop.step))]).run()
    assert closed == [3]
