"""The staleness-bounded sample buffer of fully asynchronous training.

The fleet keeps generating while the learners train. Every optimizer step consumes `groups_per_step`
groups (a group = the n responses to one prompt) in the order they were accepted. A group admitted
as the j-th group overall (counting accepted and running ones) is therefore trained at policy version
floor(j / groups_per_step) at the latest. Admission control starts a new group at trainer version v
only while

    accepted + running < (max_staleness + v + 1) * groups_per_step,

so floor(j / groups_per_step) <= max_staleness + v: when groups finish in the order they started,
none is trained more than `max_staleness` versions after the version it started under. Groups that
fail or are dropped free their slot, which only moves later groups earlier. A straggler that finishes
long after the groups admitted behind it can still arrive too late; `take` re-checks the bound and
drops (and counts, `dropped_stale`) any such group, so the guarantee holds for every trained group;
a dropped group frees its slot too (else a run whose groups all come back stale, as after a resume
against servers that report an old weight version, would fill its capacity and wait forever).

The buffer holds no I/O: the producer (an asyncio task generating through the fleet) and the
trainer (the learner loop) share it across threads, under one condition variable.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Group:
    """One prompt's responses (`samples`, opaque to the buffer), started at `version`."""

    samples: list[Any]
    version: int
    accepted_at: float = field(default_factory=time.monotonic)


@dataclass
class BufferStats:
    """Counters since the buffer was made; `lag_histogram` maps lag in versions -> groups trained."""

    admitted: int = 0
    accepted: int = 0
    released: int = 0  # admitted but never accepted (failed, aborted or dropped partial rollouts)
    dropped_stale: int = 0
    lag_histogram: Counter = field(default_factory=Counter)


class BufferClosed(RuntimeError):
    """`take` was waiting when the buffer was closed."""


class StalenessBuffer:
    """Admission control plus the FIFO of accepted groups (see the module docstring)."""

    def __init__(self, groups_per_step: int, max_staleness: int):
        if groups_per_step < 1:
            raise ValueError(f"groups_per_step must be >= 1, got {groups_per_step}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.groups_per_step = groups_per_step
        self.max_staleness = max_staleness
        self.version = 0  # the trainer's policy version: optimizer steps taken
        self.stats = BufferStats()
        self._running = 0
        self._filled = 0  # slots of accepted groups: trained or waiting (dropped ones are freed)
        self._ready: deque[Group] = deque()
        self._cond = threading.Condition()
        self._closed = False

    # -- producer side -------------------------------------------------------------------------
    def _capacity(self) -> int:
        return (self.max_staleness + self.version + 1) * self.groups_per_step

    def try_admit(self) -> Optional[int]:
        """Reserve a slot for one new group; returns the version it starts under, or None if
        admission control says wait (or the buffer is closed)."""
        with self._cond:
            if self._closed or self._filled + self._running >= self._capacity():
                return None
            self._running += 1
            self.stats.admitted += 1
            return self.version

    def wait_admit(self, timeout: Optional[float] = None) -> Optional[int]:
        """Like try_admit, but wait (up to timeout seconds) for the trainer to free capacity."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                version = self.try_admit()
                if version is not None or self._closed:
                    return version
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)

    def accept(self, samples: list[Any], version: int) -> None:
        """A running group finished: queue it for training."""
        with self._cond:
            self._check_running()
            self._running -= 1
            self.stats.accepted += 1
            self._filled += 1
            self._ready.append(Group(samples, version))
            self._cond.notify_all()

    def release(self) -> None:
        """A running group will never be accepted (failed, aborted, or dropped): free its slot."""
        with self._cond:
            self._check_running()
            self._running -= 1
            self.stats.released += 1
            self.stats.admitted -= 1  # its slot is reusable: admission counts accepted + running
            self._cond.notify_all()

    def _check_running(self) -> None:
        if self._running <= 0:
            raise RuntimeError("no group is running: accept/release without a matching admit")

    # -- trainer side --------------------------------------------------------------------------
    def take(self, timeout: Optional[float] = None) -> Optional[list[Group]]:
        """The next `groups_per_step` groups for the step at the current version (oldest first), or
        None on timeout. Groups older than max_staleness are dropped and counted."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                while self._ready and self.version - self._ready[0].version > self.max_staleness:
                    self._ready.popleft()
                    self.stats.dropped_stale += 1
                    self._filled -= 1
                    self._cond.notify_all()  # its slot admits a new group
                if len(self._ready) >= self.groups_per_step:
                    batch = [self._ready.popleft() for _ in range(self.groups_per_step)]
                    for g in batch:
                        self.stats.lag_histogram[self.version - g.version] += 1
                    return batch
                if self._closed:
                    raise BufferClosed("the staleness buffer was closed while the trainer waited")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)

    def advance(self) -> int:
        """The trainer finished an optimizer step: the policy version goes up by one (this is what
        admits the next groups)."""
        with self._cond:
            self.version += 1
            self._cond.notify_all()
            return self.version

    def close(self) -> None:
        """Wake every waiter; no more admissions."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- observation ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def running(self) -> int:
        with self._cond:
            return self._running

    def describe(self) -> str:
        """The state a stalled trainer needs to see."""
        with self._cond:
            return (f"policy version {self.version}, {len(self._ready)} of {self.groups_per_step} "
                    f"groups ready, {self._running} running, capacity {self._capacity()} slots "
                    f"({self._filled} filled), {self.stats.accepted} accepted, "
                    f"{self.stats.dropped_stale} dropped as stale, {self.stats.released} released"
                    + (", closed" if self._closed else ""))

    @property
    def queue_depth(self) -> int:
        """Accepted groups waiting to be trained."""
        with self._cond:
            return len(self._ready)
