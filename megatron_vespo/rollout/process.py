"""A service subprocess of the fleet (an SGLang server, the router) in its own session.

Its own session (process group), so that stopping it also stops the children it starts (sglang's
scheduler and detokenizer); output appended to a log file whose tail goes into every error.

A service never outlives the process that started it: a watchdog process holds the read end of a
pipe whose write end only the owner has. When the owner dies, however it dies (kill -9 included),
the pipe closes and the watchdog stops the service's process group (SIGTERM, SIGKILL after 10 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence


# Waits for EOF on stdin (the owner died or released it), then stops process group argv[1].
_WATCHDOG = """
import os, signal, sys, time
sys.stdin.buffer.read()
group = int(sys.argv[1])
for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        break
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            sys.exit(0)
        time.sleep(0.2)
"""


class SessionProcess:
    """Start `argv` with output to `log_path`; wait until ready; stop (SIGTERM, then SIGKILL)."""

    def __init__(self, argv: Sequence[str], url: str, log_path: Path, env: Optional[dict] = None):
        self.argv = list(argv)
        self.url = url
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._env = {**os.environ, **(env or {})}
        self._spawn()

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=self._env, start_new_session=True)
        self._watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(self.proc.pid)],
                                          stdin=subprocess.PIPE, start_new_session=True)

    def restart(self) -> None:
        """Start the same command again, at the same address and log, once whatever is left of the
        last run (children that outlived it, its port) is stopped. Returns at once."""
        self.stop(grace_s=5.0)
        self._spawn()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str,
                   error: type[Exception]) -> None:
        """Poll `ready()` until it holds; `error` (naming `what`, with the log tail) if the process
        exits first or the timeout passes (then the process is stopped)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive:
                raise error(f"{what} {self.url} exited with code {self.proc.returncode} during "
                            f"start-up; log {self.log_path}:\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.5)
        self.stop()
        raise error(f"{what} {self.url} not ready after {timeout_s:.0f}s; log {self.log_path}:\n"
                    f"{self.log_tail()}")

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _release_watchdog(self) -> None:
        """The service is stopped: the watchdog exits (it finds nothing left to stop)."""
        if self._watchdog.stdin is not None and not self._watchdog.stdin.closed:
            self._watchdog.stdin.close()
        self._watchdog.wait()

    def kill(self) -> None:
        """SIGKILL the process group at once (what a crash looks like to the fleet)."""
        self._signal(signal.SIGKILL)
        self.proc.wait()
        self._release_watchdog()

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group; SIGKILL whatever is left after grace_s (children may outlive
        their parent)."""
        if self.alive:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)
        self.proc.wait()
        self._release_watchdog()
