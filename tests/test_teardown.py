"""The exit hook that ends trainers a multi-process script left running (2-process case: tests/test_multiprocess.py)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from trl_qtuning.integrations import teardown


class _Trainer:
    events: list[str] = []  # across trainers: the order of releases and ends

    def __init__(self, processes: int, fails: bool = False):
        self.accelerator = SimpleNamespace(num_processes=processes, free_memory=self._free)
        self.model = object()
        self.model_wrapped = object()
        self.ended = 0
        self.freed = 0
        self.fails = fails

    def _free(self):
        self.freed += 1
        _Trainer.events.append(f"release {id(self)}")

    def end(self):
        self.ended += 1
        _Trainer.events.append(f"end {id(self)}")
        if self.fails:
            raise RuntimeError("tracker gone")
        teardown.unregister(self)


@pytest.fixture(autouse=True)
def _no_real_hook(monkeypatch):
    monkeypatch.setattr(teardown, "_unended", teardown.weakref.WeakSet())
    registered = []
    monkeypatch.setattr(teardown.atexit, "register", registered.append)
    monkeypatch.setattr(teardown, "_hook_registered", False)
    return registered


def test_one_process_registers_nothing(_no_real_hook):
    teardown.end_at_exit(_Trainer(processes=1))
    assert _no_real_hook == [] and len(teardown._unended) == 0


def test_unended_trainers_are_ended_once_at_exit_and_ended_ones_are_not(_no_real_hook):
    left, ended = _Trainer(processes=2), _Trainer(processes=2)
    teardown.end_at_exit(left)
    teardown.end_at_exit(ended)
    assert _no_real_hook == [teardown._end_unended_trainers]  # one hook for all trainers
    ended.end()
    _no_real_hook[0]()
    assert (left.ended, ended.ended) == (1, 1)
    _no_real_hook[0]()  # a second exit pass has nothing left to end
    assert left.ended == 1


def test_every_wrapper_goes_before_the_first_end(_no_real_hook):
    """The first end() destroys the group: a second trainer's wrapper released after it would be the group's last
    holder, the hang this module avoids."""
    first, second = _Trainer(processes=2), _Trainer(processes=2)
    teardown.end_at_exit(first)
    teardown.end_at_exit(second)
    _Trainer.events.clear()
    _no_real_hook[0]()
    kinds = [event.split()[0] for event in _Trainer.events]
    assert kinds[:2] == ["release", "release"] and kinds.count("end") == 2 and kinds.index("end") == 2


def test_a_failing_end_at_exit_is_logged_not_raised(_no_real_hook, caplog):
    broken, fine = _Trainer(processes=2, fails=True), _Trainer(processes=2)
    teardown.end_at_exit(broken)
    teardown.end_at_exit(fine)
    with caplog.at_level(logging.WARNING, logger="trl_qtuning.integrations.teardown"):
        _no_real_hook[0]()
    assert broken.ended == 1 and fine.ended == 1
    assert "ending the trainer at exit failed: tracker gone" in caplog.text


def test_release_lets_go_of_the_wrapper_once():
    trainer = _Trainer(processes=2)
    teardown.release_distributed_wrapper(trainer)
    assert trainer.model_wrapped is trainer.model and trainer.freed == 1
    teardown.release_distributed_wrapper(trainer)  # nothing wrapped any more
    assert trainer.freed == 1


def test_ending_one_trainer_lets_go_of_the_others_wrappers_too(_no_real_hook):
    first, second = _Trainer(processes=2), _Trainer(processes=2)
    teardown.end_at_exit(first)
    teardown.end_at_exit(second)
    teardown.release_before_group_ends(first)  # what QTuningSFTTrainer.end() does before destroying the group
    assert first.model_wrapped is first.model and second.model_wrapped is second.model
    assert len(teardown._unended) == 2, "the other trainer is still ended at exit"
