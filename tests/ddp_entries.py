"""Entry points for training processes in the distributed tests: the real `train_rank`, with a fault
injected into one rank. They live in a module (not a test function) so that the launcher's spawned
processes can import them."""

from __future__ import annotations

import os
import signal

import torch

import tasks.train
from tasks.train_rank import RankJob, train_rank


def _rank() -> int:
    return int(os.environ["RANK"])


def _first_attempt() -> bool:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def _on_step(number: int, action) -> None:
    """Run `action()` before the `number`-th training step of this process (counted from 1)."""
    real, calls = tasks.train._eager_step, [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == number:
            action()
        return real(*args, **kwargs)

    tasks.train._eager_step = step


def killed_once(job: RankJob, at_step: int):
    """Rank 1 kills itself with SIGKILL before step `at_step` of the group's first attempt."""
    if _rank() == 1 and _first_attempt():
        _on_step(at_step, lambda: os.kill(os.getpid(), signal.SIGKILL))
    return train_rank(job)


def fails_on_rank_1(job: RankJob, at_step: int):
    """Rank 1 alone raises before step `at_step`; rank 0 is left waiting in a collective."""

    def fail():
        raise ValueError("the disk of rank 1 is on fire")

    if _rank() == 1:
        _on_step(at_step, fail)
    return train_rank(job)


def nan_on_rank_1(job: RankJob, at_step: int):
    """Rank 1's loss becomes NaN from step `at_step` on: every rank must stop with the same message."""
    if _rank() == 1:
        real, calls = tasks.train._eager_step, [0]

        def step(*args, **kwargs):
            calls[0] += 1
            loss = real(*args, **kwargs)
            return loss * torch.nan if calls[0] >= at_step else loss

        tasks.train._eager_step = step
    return train_rank(job)


def entry(name: str, at_step: int):
    """A picklable entry: (job) -> the fault `name` at `at_step`, then train."""
    import functools

    return functools.partial(globals()[name], at_step=at_step)
