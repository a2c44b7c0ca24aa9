"""One trainer per run directory: an exclusive lock on `RUN_DIR/.lock` for the run's lifetime.

The lock is an `flock` on the file, so the kernel releases it when its holder dies, however it
dies; the file keeps the holder's pid and host, so a second trainer's error can name it, and a
trainer that finds the pid of a process that is gone says that it takes the run over.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path


class RunDirInUse(OSError):
    """Another live process holds the run directory."""


class RunDirLock:
    """`with RunDirLock(run_dir):` holds the lock (the directory is created if needed)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / ".lock"
        self._file = None

    def __enter__(self) -> "RunDirLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise OSError(f"run directory {self.path.parent} cannot be written: {e.strerror}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirInUse(f"run directory {self.path.parent} is in use by {holder} (lock "
                              f"{self.path}); use another run directory or stop that run") from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            print(f"[megatron-vespo] {previous} held {self.path.parent} and is gone; taking the "
                  f"run over", file=sys.stderr, flush=True)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()  # a clean exit leaves no holder to report
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
