"""The run's stop file: `RUN_DIR/stop_request` asks its running trainer to stop after the current
step with a checkpoint. The trainer removes the file once it has seen it, so the writer can tell
that the request was taken (a Slurm job's batch script requeues itself only then).

A file, not a signal, because under torchrun and srun a signal reaches the launcher as well as the
ranks, and torchrun answers it by terminating its ranks 30 s later, whatever they are writing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

STOP_FILE = "stop_request"


def request_stop(run_dir: Path, reason: str) -> Path:
    """Ask the trainer of `run_dir` to stop after its current step (`reason` is printed)."""
    path = Path(run_dir) / STOP_FILE
    path.write_text(reason + "\n")
    return path


def take_stop_request(path: Path) -> Optional[str]:
    """The reason of a pending request at `path`, which is removed (None when there is none)."""
    try:
        reason = path.read_text().strip()
    except FileNotFoundError:
        return None
    path.unlink(missing_ok=True)
    return reason or "no reason given"
