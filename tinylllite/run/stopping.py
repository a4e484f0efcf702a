"""When a training run stops: after --max-steps, on Ctrl-C, or before --max-minutes would be passed.

The tiny default job promises a result within 10 minutes of typing the command, so its clock starts
when the process started (imports included), read from the operating system rather than from a line
placed above the imports. The first Ctrl-C asks the loop to finish the step it is in, save and exit;
a second one stops at once. With several processes (torchrun) every rank stops at the same step:
the wish to stop is summed over ranks.
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

    def should_stop(self, step: int, seconds_of_final_work: float = 0.0, device=None) -> bool:
        """True when step reached max_steps, Ctrl-C was pressed, or the final work (one more evaluation) would
        end past max_minutes. Agreed on by every rank."""
        over_time = self.max_minutes is not None and self.minutes() * 60 + seconds_of_final_work > 60 * self.max_minutes
        done = (self.max_steps is not None and step >= self.max_steps) or self.interrupted or over_time
        if dist.is_initialized():  # any process asking to stop stops them all at the same step
            wish = torch.tensor(float(done), device=device)
            dist.all_reduce(wish)
            done = bool(wish > 0)
        return done
