"""Answer checks in killable worker processes: a verifier can run for minutes (or exhaust memory) on a
hostile expression, and a thread cannot be stopped, but a process can be killed.

A worker is a script that reads one JSON request per line and writes one JSON answer per line,
after a first line {"ready": true} once its imports are done (so that the per-request timeout does
not count them). `WorkerPool` keeps `workers` of them alive: each request goes to an idle one and
must be answered within `timeout_s`, else that worker is killed (a fresh one starts on its next
use) and the answer is None, counted in `stats`. Thread-safe; `ask_many` spreads a list of
requests over all workers.
"""

from __future__ import annotations

import json
import logging
import queue
import select
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger(__name__)


@dataclass
class PoolStats:
    """answered: requests answered in time; timeouts: requests whose worker was killed for it;
    failures: workers that died or would not start (the request answered None)."""

    answered: int = 0
    timeouts: int = 0
    failures: int = 0


class _Worker:
    def __init__(self, script: Path, startup_timeout_s: float):
        self.proc = subprocess.Popen([sys.executable, "-u", str(script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if self.read(startup_timeout_s) is None:
            self.kill()
            raise OSError(f"the worker {script.name} did not start within {startup_timeout_s} s")

    def read(self, timeout_s: float) -> Optional[dict]:
        """The next line, or None if nothing comes within timeout_s or the worker died. Requests
        and answers alternate, so nothing waits in the pipe's read buffer where select() misses it."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        return json.loads(line) if line else None

    def ask(self, request: dict, timeout_s: float) -> Optional[dict]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.read(timeout_s)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()


class WorkerPool:
    """`workers` processes of `script`, started on first use. timeout_s bounds one request;
    startup_timeout_s a worker's imports."""

    def __init__(self, script: Path, workers: int = 1, timeout_s: float = 5.0,
                 startup_timeout_s: float = 60.0):
        if workers < 1 or not timeout_s > 0:
            raise ValueError(f"workers ({workers}) must be >= 1 and timeout_s ({timeout_s}) > 0")
        self.script, self.workers = Path(script), workers
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
        self.stats = PoolStats()
        # A slot is None until its worker is started (lazily, by the thread that takes the slot).
        self._idle: queue.Queue[Optional[_Worker]] = queue.Queue()
        for _ in range(workers):
            self._idle.put(None)
        self._lock = threading.Lock()
        self._fanout: Optional[ThreadPoolExecutor] = None

    def ask(self, request: dict) -> Optional[dict]:
        """The answer to one request; None when the worker timed out, died or did not start."""
        worker = self._idle.get()
        answer, timed_out = None, False
        try:
            if worker is None:
                worker = _Worker(self.script, self.startup_timeout_s)
            answer = worker.ask(request, self.timeout_s)
        except (OSError, ValueError) as exc:  # would not start, or died mid-request
            logger.warning("%s: %s", self.script.name, exc)
        finally:  # the slot always goes back; a worker without an answer is in an unknown state
            if answer is None and worker is not None:
                timed_out = worker.proc.poll() is None
                worker.kill()
                worker = None
            self._idle.put(worker)
        if timed_out:
            logger.warning("%s: a request took over %.1f s; its worker was killed (%s)",
                           self.script.name, self.timeout_s, str(request)[:200])
        with self._lock:
            if answer is not None:
                self.stats.answered += 1
            elif timed_out:
                self.stats.timeouts += 1
            else:
                self.stats.failures += 1
        return answer

    def ask_many(self, requests: Sequence[dict]) -> list[Optional[dict]]:
        """The answers in order, the requests spread over every worker."""
        if len(requests) <= 1 or self.workers == 1:
            return [self.ask(r) for r in requests]
        with self._lock:
            if self._fanout is None:
                self._fanout = ThreadPoolExecutor(self.workers, thread_name_prefix=self.script.stem)
        return list(self._fanout.map(self.ask, requests))

    def close(self) -> None:
        """Stop every worker (a later request starts new ones)."""
        with self._lock:
            fanout, self._fanout = self._fanout, None
        if fanout is not None:
            fanout.shutdown()
        slots = [self._idle.get() for _ in range(self.workers)]
        for worker in slots:
            if worker is not None:
                worker.kill()
            self._idle.put(None)
