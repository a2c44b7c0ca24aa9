"""Step metrics as JSON lines in the run directory: readable with `jq`, replayable into any tracker."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class JsonlMetrics:
    """Appends one line per step: {"step": N, name: value, ...}; flushed every line so a killed run
    keeps everything it logged. Non-finite values are written as null (JSON has no NaN)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
