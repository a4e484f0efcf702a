"""Writing files and folders so that a crash never leaves half of one: a temporary beside the target, then a rename.

`os.replace` within one folder is atomic on POSIX: a reader sees the old file or the new one, never a
mix. Every writer of the project goes through the two context managers here:

    with atomic_file(path) as tmp:      # write tmp; on success it becomes path
        image.save(tmp, format="PNG")
    with atomic_folder(out) as tmp:     # fill the folder tmp; on success it becomes out
        ...

The temporary's name is unique and the project's own: `.<target name>.tinylllite-tmp-<pid>-<random>`,
created by this process (`tempfile.mkstemp` / `mkdtemp`), so it never collides with a user's file or
with another process writing the same target, and only what this process created is ever removed. A
process killed by SIGKILL cannot clean up: the next write of the same target removes the temporaries
whose owner is dead, and says so on stderr. Left out: fsync of every file (only folders written as a
whole are flushed before their rename, as a checkpoint must survive a power cut).
"""
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tinylllite.errors import InputError

TEMP_MARK = "tinylllite-tmp"


class WriteError(InputError, OSError):
    """A file or folder could not be written (no space, no permission, read-only): one line naming the path."""


_swept: set[Path] = set()  # folders whose stale temporaries this process has already removed


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{TEMP_MARK}-{os.getpid()}-"


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temporaries(target) -> list[Path]:
    """Remove the temporaries beside `target` left by processes that no longer run; return what was removed."""
    target = Path(target).absolute()
    if target.parent in _swept:  # once per folder and process: a folder of 50,000 images is listed once
        return []
    _swept.add(target.parent)
    pattern = re.compile(rf"^\..+\.{TEMP_MARK}-(\d+)-")
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or _owner_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        print(f"removed {entry}, a temporary left by process {match.group(1)}, which no longer runs",
              file=sys.stderr)
        removed.append(entry)
    return removed


def refuse_unwritable(path, what: str = "output", inside: bool = False) -> None:
    """Refuse, before any slow work, an output `path` that could not be written: one that lies under a file,
    or whose nearest existing folder is not writable (read-only, no permission). Nothing is created.

    `inside`: `path` is a folder whose files are written in place, so it must be writable itself if it exists
    (otherwise the folder beside which `path` is written, atomically, is what must be writable).
    """
    path = Path(path)
    absolute = Path(os.path.abspath(path))
    for parent in [absolute, *absolute.parents] if inside else absolute.parents:
        if not parent.exists():
            continue
        shown = parent if path.is_absolute() else Path(os.path.relpath(parent))
        if not parent.is_dir():
            raise InputError(f"the {what} {path} lies under {shown}, which is a file, not a folder; give a path in "
                             f"a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"the {what} {path} cannot be written: the folder {shown} is not writable (read-only or "
                             f"no permission); give a folder you can write to")
        return


def writable_folder(folder, what: str = "output") -> Path:
    """`folder` exists (made if needed) as a writable folder; anything else is refused naming the path."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"the {what} path {folder} is a file, not a folder; give a folder")
    refuse_unwritable(folder, what, inside=True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the {what} folder {folder} ({error.strerror or error}); "
                         "give a folder you can write to") from None
    return folder


def _write_error(path: Path, error: OSError) -> WriteError:
    reason = error.strerror or str(error)
    return WriteError(f"cannot write {path} ({reason}); check that its folder is writable and the disk has space")


@contextmanager
def atomic_file(path) -> Iterator[Path]:
    """`with atomic_file(path) as tmp:` write tmp; on success it replaces `path` in one rename, else vanishes."""
    path = Path(path)
    writable_folder(path.parent)
    remove_stale_temporaries(path)
    try:
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    except OSError as error:
        raise _write_error(path, error) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes its files 0600, readable by their owner only
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as error:
        raise _write_error(path, error) from None
    finally:
        tmp.unlink(missing_ok=True)


def fsync(path: Path) -> None:
    """Flush a file's or a folder's entry to disk, so a rename is durable across a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(path, replace: bool = False, durable: bool = True) -> Iterator[Path]:
    """`with atomic_folder(out) as tmp:` fill the folder tmp; on success it becomes `out`, else vanishes.

    With `replace`, an existing `out` (which the caller has checked holds only what it may replace) is
    moved aside first and deleted after the swap; without it, an existing `out` is an error. `durable`
    flushes every file before the rename (a checkpoint); a data set that can be made again skips it.
    """
    path = Path(path)
    writable_folder(path.parent)
    remove_stale_temporaries(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    except OSError as error:
        raise _write_error(path, error) from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes its folders 0700
    try:
        yield tmp
        for file in tmp.rglob("*") if durable else ():
            fsync(file)
        if path.exists() and replace:
            aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
            os.replace(path, aside / path.name)
            os.replace(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
        elif path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite it (delete it or choose another name)")
        else:
            os.replace(tmp, path)
        fsync(path.parent)
    except (WriteError, FileExistsError):
        raise
    except OSError as error:
        raise _write_error(path, error) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return umask
