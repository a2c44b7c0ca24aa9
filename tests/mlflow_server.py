"""A real `mlflow server` on 127.0.0.1 for tests (sqlite store on /dev/shm), as pytest fixtures."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

MLFLOW_CLI = Path(sys.executable).parent / "mlflow"
SERVER_START_TIMEOUT_S = 90.0


def free_port() -> int:
    ports = list(range(30000, 31000))  # below the ephemeral range (32768-60999)
    random.shuffle(ports)
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 30000-30999")


class MlflowServer:
    """An `mlflow server` subprocess whose sqlite store and artifacts outlive restarts."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        cmd = [str(MLFLOW_CLI), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts"),
               "--workers", "1", "--host", "127.0.0.1", "--port", str(self.port)]
        log = open(self.root / "server.log", "ab")
        # Own session: stop() kills the CLI and its uvicorn worker together, and nothing else.
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("mlflow server did not become healthy")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def server():
    root = Path(tempfile.mkdtemp(prefix="mlflow_test_", dir="/dev/shm"))
    srv = MlflowServer(root, free_port())
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def shm_dir():
    path = Path(tempfile.mkdtemp(prefix="mvtrack_", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact path of the run (recursively)."""
    found = set()
    for entry in client.list_artifacts(run_id, path):
        found |= artifacts(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found
