"""When a training run stops: after --max-steps, on Ctrl-C, or before --max-minutes would be passed.

The tiny default job promises a result within 10 minutes of typing the command, so its clock starts
when the process started (imports included), read from the operating system rather than from a line
placed above the imports, and everything counts against it: filling the cache, every evaluation and
the final checkpoint (`deadline` is what those plan with). The first Ctrl-C asks the loop to finish the
step it is in, save and exit; a second one stops at once. With several processes (torchrun) every rank
stops at the same step: the wish to stop is summed over ranks at the steps that write a log line, the
only steps whose collective the GPU waits for anyway. How far the run is through its budget (steps or
minutes, whichever ends it first) is agreed on at the same steps; the learning rate's decay reads it.
"""
import os
import signal
import time

import torch
import torch.distributed as dist


def process_start_time() -> float:
    """Wall-clock time at which this process started (Linux: /proc; elsewhere: the first import of this file)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, "starttime": clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


_IMPORTED_AT = time.time()


class StopRule:
    """Decides, after each optimizer step, whether the run ends there. Use as a context manager (Ctrl-C handler)."""

    def __init__(self, max_steps: int | None, max_minutes: float | None, started: float | None = None):
        self.max_steps, self.max_minutes = max_steps, max_minutes
        self.started = process_start_time() if started is None else started
        self.interrupted = False
        self.out_of_time = False  # set when a part of the run (the cache fill) used up the time
        self.time_used = 0.0  # fraction of the minutes spent, as of the last agreed step

    @property
    def deadline(self) -> float | None:
        """The time.time() by which the run must have ended, or None without --max-minutes."""
        return None if self.max_minutes is None else self.started + 60 * self.max_minutes

    def minutes(self) -> float:
        return (time.time() - self.started) / 60

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        print("\nCtrl-C: finishing this step, saving a checkpoint, then exiting (Ctrl-C again to abort)", flush=True)

    def __enter__(self) -> "StopRule":
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def progress(self, step: int) -> float:
        """How much of the budget is used, 0 to 1: the larger of steps / max_steps and the minutes' fraction (to
        the moment the final work must begin), the same on every process."""
        steps = step / self.max_steps if self.max_steps else 0.0
        return min(max(steps, self.time_used), 1.0)

    def should_stop(self, step: int, seconds_of_final_work: float = 0.0, device=None, agree: bool = True) -> bool:
        """True when step reached max_steps, Ctrl-C was pressed, or the final work (one more evaluation) would
        end past max_minutes. With several processes the time and Ctrl-C are agreed on only where `agree`."""
        now = time.time()
        over_time = self.out_of_time or (self.deadline is not None and now + seconds_of_final_work > self.deadline)
        reached = self.max_steps is not None and step >= self.max_steps  # the same step on every rank
        wish = self.interrupted or over_time
        if dist.is_initialized() and not agree:
            return reached
        used = 0.0
        if self.deadline is not None:
            span = self.deadline - seconds_of_final_work - self.started
            used = (now - self.started) / span if span > 0 else 1.0
        if dist.is_initialized():  # any process asking to stop stops them all; the furthest clock counts
            agreed = torch.tensor([float(wish), used], device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            wish, used = bool(agreed[0] > 0), float(agreed[1])
        self.time_used = max(self.time_used, used)
        return reached or wish
