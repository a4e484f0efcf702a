"""The CPU thread count follows the cores other processes use (tinylllite/run/cores.py).

The budget reads how busy its cores were (all processes, /proc/stat) and takes away its own CPU time; the
rest is somebody else's. Here the clock and both counters are scripted, so each test says exactly how much
another process used.
"""
import pytest
import torch

from tinylllite.run import cores


class Machine:
    """Two cores; `others` cores' worth of another process's work and `own` of ours per second of wall time."""

    def __init__(self, monkeypatch):
        self.wall = self.busy = self.own = 0.0
        monkeypatch.setattr(cores.time, "monotonic", lambda: self.wall)
        monkeypatch.setattr(cores, "busy_seconds", lambda cpus: self.busy)
        monkeypatch.setattr(cores, "own_seconds", lambda: self.own)

    def run(self, seconds: float, others: float, own: float = 2.0) -> None:
        self.wall += seconds
        self.busy += seconds * min(2.0, others + own)
        self.own += seconds * own


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_process_holding_one_of_two_cores_leaves_the_step_one_thread_and_it_gets_both_back(monkeypatch, two_threads):
    machine = Machine(monkeypatch)
    budget = cores.ThreadBudget(cpus=[0, 1])
    machine.run(2.0, others=1.0, own=1.0)
    line = budget.update()
    assert torch.get_num_threads() == 1 and "using 1.0 of 2 cores" in line and "1 thread" in line
    machine.run(2.0, others=0.0, own=1.0)
    assert budget.update() is not None and torch.get_num_threads() == 2


def test_a_little_background_work_keeps_both_threads_and_a_short_look_changes_nothing(monkeypatch, two_threads):
    machine = Machine(monkeypatch)
    budget = cores.ThreadBudget(cpus=[0, 1])
    machine.run(2.0, others=0.2, own=1.8)  # a browser tab: a fifth of a core
    assert budget.update() is None and torch.get_num_threads() == 2
    machine.run(0.1, others=2.0, own=0.0)  # too short to say anything
    assert budget.update() is None and torch.get_num_threads() == 2


def test_threads_given_by_the_user_are_never_changed(monkeypatch, two_threads):
    machine = Machine(monkeypatch)
    budget = cores.ThreadBudget(fixed=2, cpus=[0, 1])
    machine.run(2.0, others=1.0, own=1.0)
    assert budget.update() is None and torch.get_num_threads() == 2


def test_the_budget_never_raises_the_count_a_caller_set(monkeypatch):
    """The test suite runs torch on one thread; an idle machine does not make a training run inside it use two."""
    machine = Machine(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        budget = cores.ThreadBudget(cpus=[0, 1])
        machine.run(2.0, others=0.0, own=1.0)
        assert budget.update() is None and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_counters_read_this_machine():
    """On Linux the busy seconds of this process's cores and its own CPU seconds are real, growing numbers."""
    first = cores.busy_seconds(cores.usable_cores())
    if first is None:
        pytest.skip("no /proc/stat on this system")
    own = cores.own_seconds()
    sum(i * i for i in range(3_000_000))  # a few tenths of a second: many clock ticks
    assert cores.busy_seconds(cores.usable_cores()) >= first and cores.own_seconds() > own


def test_the_work_of_a_finished_child_process_counts_as_this_processes_own():
    """A pool that drew the data and ended is not "another process" using the cores."""
    import subprocess
    import sys

    before = cores.own_seconds()
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    assert cores.own_seconds() - before > 0.05
