"""Ordered, disk-backed queue of tracking requests that the tracking store has not yet accepted.

A tracker appends every request (create run, params, metrics, artifacts, end run) here and sends
from the front, so requests reach the store in the order they were made even across an outage or a
restart of the training process. Invariant after `settle()`: every unsent request is in
`pending.jsonl`, and the file holds nothing else. While the store is healthy the queue empties
within the call and the file is never touched; during an outage each new request costs one
appended line; the file is rewritten only after part of it was sent.

Replaying a request twice is harmless (a crash between send and settle): MLflow keys a metric by
(key, timestamp, step, value), params are only added when missing, and artifacts overwrite.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Outbox:
    """FIFO of JSON-serialisable request records, mirrored to `<directory>/pending.jsonl`.

    Artifact records (`{"kind": "artifact", "path": ...}`) get a private copy of their file under
    `<directory>/files/` the first time they are written to disk, so the upload sent after an
    outage is the file as it was when logged, even if the original is overwritten or deleted.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "pending.jsonl"
        self._files = self.directory / "files"
        self._records: deque[dict[str, Any]] = deque()
        self._in_file = 0  # leading records of the queue that are already in the file
        self._rewrite = False  # the file holds lines already sent: rewrite instead of append
        self.unreadable = 0  # lines of a previous file that could not be parsed (torn write)
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        with open(self.path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    self._records.append(json.loads(line))
                except json.JSONDecodeError:
                    self.unreadable += 1
        self._in_file = len(self._records)
        self._rewrite = self.unreadable > 0
        if self.unreadable:
            log.warning("tracking buffer %s: %d unreadable line(s) skipped (torn write)",
                        self.path, self.unreadable)

    def __len__(self) -> int:
        return len(self._records)

    def append(self, record: dict[str, Any]) -> None:
        self._records.append(record)

    def head(self, max_metrics: int, merge: bool = True) -> list[dict[str, Any]]:
        """The next request to send: the front record, extended (when `merge`) by the metrics
        records right behind a metrics record while their values total at most `max_metrics`."""
        if not self._records:
            return []
        first = self._records[0]
        batch = [first]
        if not merge or first["kind"] != "metrics":
            return batch
        total = len(first["values"])
        for record in islice(self._records, 1, None):
            if record["kind"] != "metrics" or total + len(record["values"]) > max_metrics:
                break
            batch.append(record)
            total += len(record["values"])
        return batch

    def pop(self, n: int) -> None:
        """Drop the first `n` records (sent, or rejected for good) and their private copies."""
        for _ in range(n):
            record = self._records.popleft()
            if self._in_file:
                self._in_file -= 1
                self._rewrite = True
            if record.get("owned"):
                shutil.rmtree(Path(record["path"]).parent, ignore_errors=True)

    def settle(self) -> None:
        """Make the file hold exactly the unsent records (called at the end of every public call)."""
        if not self._records:
            if self.path.exists():
                self.path.unlink()
            self._in_file, self._rewrite = 0, False
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for record in islice(self._records, self._in_file, None):
            self._own(record)
        if self._rewrite:
            tmp = self.path.with_suffix(".jsonl.tmp")
            self._write(tmp, self._records, "w")
            os.replace(tmp, self.path)
        else:
            self._write(self.path, islice(self._records, self._in_file, None), "a")
        self._in_file, self._rewrite = len(self._records), False

    @staticmethod
    def _write(path: Path, records: Any, mode: str) -> None:
        with open(path, mode) as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a buffered request must survive a node crash, not just ours

    def _own(self, record: dict[str, Any]) -> None:
        if record["kind"] != "artifact" or record.get("owned"):
            return
        source = Path(record["path"])
        if not source.exists():
            return  # sending it reports the missing file; nothing to preserve
        target = self._files / uuid.uuid4().hex / source.name
        target.parent.mkdir(parents=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        record["path"], record["owned"] = str(target), True
