"""Submit the rendered job and follow it: sbatch, scontrol and nothing else (no accounting database
is assumed, so no sacct)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence, Union

from .config import SlurmConfig
from .render import render_sbatch

__all__ = ["render_sbatch", "submit", "job_state", "wait_for", "slurm_submit", "TERMINAL_STATES"]

# A job in one of these states will not run again.
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                             "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})
SCRIPT_NAME = "job.sbatch"


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def submit(script_path: Union[str, Path]) -> str:
    """sbatch the script; returns the job id (of the whole heterogeneous job)."""
    out = _run(["sbatch", "--parsable", str(script_path)]).strip()
    return out.split(";")[0]  # --parsable prints `id` or `id;cluster`


def job_state(job_id: str) -> Optional[str]:
    """The job's state (COMPLETED, RUNNING, ...), or None once slurmctld has forgotten it.

    A heterogeneous job is reported by its leader, component 0: it runs the batch script, so its
    state carries the script's exit status; the fleet component is cancelled when the script ends.
    """
    result = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id],
                            capture_output=True, text=True)
    if result.returncode:
        if "Invalid job id" in result.stderr:
            return None
        raise RuntimeError(f"scontrol show job {job_id} failed: {result.stderr.strip()}")
    for line in result.stdout.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if fields.get("HetJobOffset", "0") == "0" and "JobState" in fields:
            return fields["JobState"]
    raise RuntimeError(f"scontrol show job {job_id}: no JobState in {result.stdout!r}")


def wait_for(job_id: str, timeout: float, poll: float = 1.0) -> str:
    """Block until the job reaches a terminal state (returned); TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(job_id)
        if state is None:
            raise RuntimeError(f"job {job_id} is no longer known to slurmctld")
        if state in TERMINAL_STATES:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s")
        time.sleep(poll)


def slurm_submit(config_path: Union[str, Path], slurm_cfg: SlurmConfig, run_dir: Union[str, Path],
                 dry_run: bool = False, mounts: Sequence[str] = ()) -> tuple[Path, Optional[str]]:
    """Write `run_dir/job.sbatch` for training `config_path` and submit it (not when `dry_run`).

    Paths are made absolute: the job's steps run on other nodes, possibly inside a container. The
    run directory is created now because Slurm opens the job's output file in it before the script
    starts. Returns the script's path and the job id (None for a dry run).
    """
    config = Path(config_path).resolve()
    if not config.is_file():
        raise ValueError(f"config {config_path}: no such file")
    run = Path(run_dir).resolve()
    script = render_sbatch(slurm_cfg, str(config), str(run), mounts=mounts)
    run.mkdir(parents=True, exist_ok=True)
    script_path = run / SCRIPT_NAME
    script_path.write_text(script)
    return script_path, None if dry_run else submit(script_path)
