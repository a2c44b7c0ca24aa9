"""`python -m megatron_vespo.cli ...` as a subprocess of an end-to-end test.

A run still going at its time limit is a hang to diagnose, not only a timeout: every process of ours
it started prints its Python stacks (`launch.STACKS_SIGNAL`), all of them are then killed (none is
left to disturb the next test), and the failure shows the launcher's stderr, which holds the ranks',
and the end of every service log under the run directory, which holds the servers'.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from megatron_vespo.launch import STACKS_SIGNAL

REPO = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], run_dir: Optional[Path] = None,
            timeout: float = 600.0) -> subprocess.CompletedProcess:
    """`megatron-vespo ARGS` from the repository root; its output, or the test fails with the stacks
    of a run that outlived `timeout` seconds."""
    cmd = [sys.executable, "-m", "megatron_vespo.cli", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        err = _stop_with_stacks(proc)
        pytest.fail(f"`{' '.join(args)}` still running after {timeout:g} s; stacks, stderr:\n"
                    f"{err[-30000:]}\n{_service_logs(run_dir)}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (Linux: the SigCgt mask in /proc)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _stop_with_stacks(proc: subprocess.Popen) -> str:
    """Stacks from every process of the run that prints them (the launcher, its ranks, the SGLang
    servers with their schedulers; not the router or the watchdogs, which the signal would end),
    then SIGKILL to all of them; the launcher's stderr."""
    import psutil

    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:
        if _catches(p.pid, STACKS_SIGNAL):
            with contextlib.suppress(psutil.Error):
                p.send_signal(STACKS_SIGNAL)
            time.sleep(0.5)  # one at a time: the launcher and its ranks share one stderr
    time.sleep(2)
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    return proc.communicate()[1]


def _service_logs(run_dir: Optional[Path], chars: int = 20000) -> str:
    if run_dir is None:
        return ""
    return "\n".join(f"--- {path} ---\n{path.read_text(errors='replace')[-chars:]}"
                     for path in sorted(Path(run_dir).glob("**/*.log")))
