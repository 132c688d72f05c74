"""The loop skeleton: hooks run before and after each step in their order, periodic conditions, and the
closing hooks even when a step fails."""
import pytest

from rcmae.core.engine import FinallyHook, HookBase, PeriodicHook, TrainerBase


class Recording(TrainerBase):
    """A trainer whose step records itself (and fails at ``fail_at``)."""

    def __init__(self, steps_per_epoch, events, fail_at=None):
        super().__init__(steps_per_epoch)
        self.events, self.fail_at = events, fail_at

    def run_step(self):
        if self.step == self.fail_at:
            raise RuntimeError("non-finite")
        self.events.append(("step", self.step))


class Around(HookBase):
    def __init__(self, events):
        self.events = events

    def before_train(self):
        self.events.append(("begin", self.trainer.step))

    def before_step(self):
        self.events.append(("before", self.trainer.step))


def test_hooks_run_in_order_at_their_steps():
    events = []
    trainer = Recording(3, events)
    trainer.register_hooks([
        PeriodicHook(lambda t: t.every_steps(2), lambda t: events.append(("log", t.step))),
        None,  # a hook the config switched off
        PeriodicHook(lambda t: t.every_epochs(1), lambda t: events.append(("epoch", t.epoch))),
        FinallyHook(lambda t: events.append(("end", t.step)))])
    assert trainer.train(2, 7) == 7
    # steps 2..6 run; after step k the loop has finished k + 1 steps
    assert events == [("step", 2), ("epoch", 1), ("step", 3), ("log", 4), ("step", 4), ("step", 5), ("log", 6),
                      ("epoch", 2), ("step", 6), ("end", 7)]
    assert not Recording(3, []).every_epochs(0) and not Recording(3, []).every_steps(0)


def test_before_hooks_see_the_step_about_to_run():
    events = []
    trainer = Recording(5, events)
    trainer.register_hooks([Around(events)])
    trainer.train(1, 3)
    assert events == [("begin", 1), ("before", 1), ("step", 1), ("before", 2), ("step", 2)]


def test_closing_hooks_run_when_a_step_fails():
    closed = []
    trainer = Recording(5, [], fail_at=3)
    trainer.register_hooks([FinallyHook(lambda t: closed.append(t.step))])
    with pytest.raises(RuntimeError, match="non-finite"):
        trainer.train(0, 10)
    assert closed == [3]
