"""How many threads the CPU step uses, when other processes may be using the same cores.

PyTorch splits each CPU operator over `torch.get_num_threads()` OpenMP threads and waits for all of them
at its end. On a 2-core laptop that also runs a browser, or a CI machine running two jobs, one of those
threads is often not running: every operator then waits for it, while the waiting threads spin and take
CPU from the very thread they wait for. `bench/busy_cpu.py` measured the tiny step 5.6x slower with two
threads beside one CPU-bound process, where losing a core should cost at most 2x.

`ThreadBudget` keeps the thread count at the cores nobody else is using (never above the count the process
started with: torch's one per core, or what a caller such as the test suite set): it reads how busy this process's
cores were since its last look (`/proc/stat`, Linux), takes away this process's own CPU time, and gives
the step one thread per core left (at least one). Called at the training loop's log lines, it follows a
competitor that starts or stops during a run. A thread count given by the user (`--threads`) is kept as
it is; so is everything on a machine without `/proc/stat`.
"""
import os
import time

import torch

# another process counts as holding a core once it used more than this fraction of one over the last look
BUSY_CORE = 0.5
MIN_SECONDS = 1.0  # a look over less wall time than this says too little, and is skipped


def usable_cores() -> list[int]:
    """The CPUs this process may run on (its affinity)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def busy_seconds(cpus: list[int]) -> float | None:
    """CPU seconds the given CPUs spent not idle since boot, all processes together (None without /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
    except OSError:
        return None
    wanted = {f"cpu{i}" for i in cpus}
    ticks = 0
    for name, *fields in lines:
        if name in wanted:
            values = [int(v) for v in fields]
            ticks += sum(values[:8]) - values[3] - values[4]  # everything but idle and iowait (guest is in user)
    return ticks / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds this process (all its threads) and its children used: those that ended (e.g. the pool that
    drew Fill50K) and those still running (data workers)."""
    times = os.times()
    seconds = times.user + times.system + times.children_user + times.children_system
    try:
        children = [pid for task in os.listdir("/proc/self/task")
                    for pid in open(f"/proc/self/task/{task}/children").read().split()]
    except OSError:
        return seconds
    for pid in children:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            seconds += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except (OSError, IndexError, ValueError):
            continue  # a child that ended meanwhile
    return seconds


class ThreadBudget:
    """`update()` sets torch's thread count to the cores other processes left free; `fixed` (--threads) wins."""

    def __init__(self, fixed: int | None = None, cpus: list[int] | None = None):
        self.fixed, self.cpus = fixed, cpus or usable_cores()
        self.most = min(torch.get_num_threads(), len(self.cpus))  # never more than the process was given
        self.threads = fixed or self.most
        torch.set_num_threads(self.threads)
        self._last = self._look()

    def _look(self) -> tuple[float, float | None, float]:
        return time.monotonic(), busy_seconds(self.cpus), own_seconds()

    def others(self) -> float | None:
        """Cores' worth of CPU other processes used since the last look (None: unknown, or too short a look)."""
        now = self._look()
        (wall0, busy0, own0), (wall1, busy1, own1) = self._last, now
        if busy0 is None or busy1 is None or wall1 - wall0 < MIN_SECONDS:
            return None
        self._last = now
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)

    def update(self) -> str | None:
        """Adjust the thread count to the last look; returns a line to print when it changed."""
        if self.fixed:
            return None
        others = self.others()
        if others is None:
            return None
        taken = min(len(self.cpus) - 1, int(others + 1 - BUSY_CORE))  # cores held by others, rounded at BUSY_CORE
        threads = max(1, min(self.most, len(self.cpus) - taken))
        if threads == self.threads:
            return None
        self.threads = threads
        torch.set_num_threads(threads)
        return (f"other processes are using {others:.1f} of {len(self.cpus)} cores: the step now runs "
                f"{threads} thread{'s' if threads > 1 else ''} (--threads N fixes the count)")
