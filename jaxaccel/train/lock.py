"""One live training run per output folder: an OS advisory lock on `OUTPUT_DIR/train.lock`.

Two trainers on one folder would both write `checkpoints/<step>/`, `metrics.jsonl` and
`model/`, each overwriting the other. The trainer takes an exclusive `fcntl.flock` on the
lock file for the whole run, and a second run on the same folder is refused with
`OutputDirInUseError` (one line, naming the folder and the pid and host that hold it).

The kernel drops a flock when the holding process exits for any reason, SIGKILL and
crashes included, so a killed run never leaves a stale lock: rerunning the command resumes.
The file itself stays (it only records the last holder); deleting it while a run holds it
would let a second run lock a fresh file, so it is never removed — except by a new run that
made the folder and is refused before it writes anything else there (its data, a budget):
it removes that folder (not any parent folders made with it) rather than leave one holding
only this file. A run that locks the file just as such a run unlinks it checks that the file
it locked is still the one at the path, and locks again if not.

flock is per open file description, not per process: a second `train()` in the same
process (a thread, a notebook cell) is refused too. The descriptor is not inheritable,
so programs the trainer starts do not hold the lock after it exits.
"""
from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path

from jaxaccel.errors import JaxaccelError

LOCK_FILE = "train.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are unguarded
    fcntl = None


class OutputDirInUseError(JaxaccelError):
    """Another live training run holds this output folder."""


class OutputDirLock:
    """Exclusive, non-blocking lock on `folder/train.lock`; `release()` (or process exit) frees it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "OutputDirLock":
        if fcntl is None:
            return self
        for _ in range(100):
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was removed (by such a run) since the mkdir
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                self._refused(fd, e)
                return self
            if _same_file(fd, self.path):
                break
            # Locked a file a refused new run had just unlinked (with its folder): a run
            # locking the path now would get another file. Lock the one at the path.
            os.close(fd)
        else:
            raise OutputDirInUseError(f"output_dir {str(self.folder)!r}: {self.path.name} keeps being replaced "
                                      f"while it is locked; is another program removing it?")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def _refused(self, fd: int, e: OSError) -> None:
        """Close `fd`, whose flock failed with `e`: raise when another run holds the lock, else
        (a file system without flock) warn that this run is unguarded."""
        holder = _read_holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            held_by = f" by {holder}" if holder else ""
            raise OutputDirInUseError(
                f"output_dir {str(self.folder)!r} is in use{held_by} (another training run holds {self.path.name}); "
                f"wait for it to finish or stop it, or choose another output_dir") from None
        # A file system without flock (some NFS setups say ENOLCK): run unguarded rather than not at all.
        print(f"warning: cannot lock {self.path} ({e.strerror}); nothing stops a second run on this output_dir",
              file=sys.stderr)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether `fd` is the file now at `path` (not one unlinked, or replaced, since it was opened)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _read_holder(fd: int) -> str:
    """The holder's `pid N on host H` line; empty while it is still being written."""
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip().splitlines()[0]
    except (OSError, IndexError):
        return ""
