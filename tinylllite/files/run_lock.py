"""One writer per run folder: a lock that a second training process on the same folder is refused by.

Two processes writing one run (two `--resume-from` of it, or two fresh runs given the same `--out`)
would interleave their lines in metrics.jsonl and race for the same checkpoint names, and both could
lose their work. The process that writes a run holds an exclusive `fcntl.flock` on `<run>/.lock` for
its whole life; the operating system releases it when the process ends, however it ends (so a killed
run leaves no stale lock). The file holds the owner's process id, for the message; a run that fails
before writing anything removes the folder it created. Left out: network
file systems whose flock is not shared between machines.
"""
import fcntl
import os
from pathlib import Path

from tinylllite.errors import InputError
from tinylllite.files.atomic import writable_folder

LOCK_NAME = ".lock"


class RunLock:
    """`lock = RunLock(run_dir)` takes the lock or raises InputError naming the process that holds it."""

    LOCK_NAME = LOCK_NAME

    def __init__(self, run_dir):
        missing = [p for p in [Path(run_dir), *Path(run_dir).parents] if not p.exists()]
        self.created = missing  # the folders this lock makes, deepest first: a failed run removes them again
        self.run_dir = writable_folder(Path(run_dir), "run")
        self.path = self.run_dir / LOCK_NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise InputError(f"{self.run_dir} is being written by process {holder} (it holds {self.path}); wait "
                             f"for it to end, or write this run to another --out") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Release the lock; a run that failed before writing anything leaves no folder it created."""
        self.release()
        if exc_type is not None and self.created and [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
            self.path.unlink(missing_ok=True)
            for folder in self.created:
                if any(folder.iterdir()):
                    break
                folder.rmdir()
