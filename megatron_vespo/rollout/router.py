"""The sglang-router in front of a fleet: its process, and the worker-admin calls every router answers.

sglang-router 0.3.2 (`python -m sglang_router.launch_router`) is a Rust HTTP proxy: it forwards
`/generate` to one of its workers (by `policy`) and retries on another when a worker fails. Its
worker admin API, as measured:

- `GET /workers` -> `{"workers": [{"id", "url", "is_healthy", "load", ...}], "total", "stats"}`
- `POST /workers {"url"}` -> 202 `{"status": "accepted", "worker_id", ...}`; the worker joins in the
  background (the router fetches its model info first), so callers poll `GET /workers`.
- `DELETE /workers/{id}` -> 202, also queued; an unknown id -> 400.

A router does not drop a dead worker by itself (it only marks it unhealthy, after a few seconds), so
the fleet removes dead workers explicitly (`RouterClient.remove_worker`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import requests

from .auth import api_key, api_key_args, auth_headers
from .process import SessionProcess


class RouterError(RuntimeError):
    """The router did not start, died, or answered an admin call with an error."""


@dataclass(frozen=True)
class WorkerInfo:
    """One entry of the router's `GET /workers` list."""

    id: str
    url: str
    healthy: bool
    load: int


class RouterClient:
    """Worker admin of a running router, started here or elsewhere (only HTTP, no process)."""

    def __init__(self, url: str, timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            r = requests.request(method, self.url + path, timeout=self.timeout_s,
                                 headers=auth_headers(), **kwargs)
        except requests.RequestException as e:
            raise RouterError(f"{method} {self.url}{path}: {e}") from None
        if r.status_code not in (200, 202):
            raise RouterError(f"{method} {self.url}{path}: HTTP {r.status_code}: {r.text[:500]}")
        return r

    def reachable(self) -> bool:
        try:
            self.workers()
        except RouterError:
            return False
        return True

    def workers(self) -> list[WorkerInfo]:
        body = self._call("GET", "/workers").json()
        return [WorkerInfo(w["id"], w["url"], bool(w["is_healthy"]), int(w.get("load", 0)))
                for w in body["workers"]]

    def find(self, url: str) -> Optional[WorkerInfo]:
        return next((w for w in self.workers() if w.url == url), None)

    def add_worker(self, url: str) -> None:
        """Queue `url` for registration; `wait_workers` blocks until it has joined. The router
        sends a worker the key it was registered with (none otherwise, whatever its own)."""
        key = api_key()
        self._call("POST", "/workers", json={"url": url, **({"api_key": key} if key else {})})

    def remove_worker(self, url: str, timeout_s: float = 30.0) -> bool:
        """Remove `url` from the router and wait until it is no longer listed; False if it was not
        listed to begin with."""
        worker = self.find(url)
        if worker is None:
            return False
        self._call("DELETE", f"/workers/{worker.id}")
        deadline = time.monotonic() + timeout_s
        while self.find(url) is not None:
            if time.monotonic() > deadline:
                raise RouterError(f"router {self.url} still lists {url} {timeout_s:.0f}s after DELETE")
            time.sleep(0.2)
        return True

    def wait_workers(self, urls: Sequence[str], timeout_s: float = 120.0) -> None:
        """Block until every url in `urls` is listed healthy (registration is asynchronous)."""
        deadline = time.monotonic() + timeout_s
        while True:
            healthy = {w.url for w in self.workers() if w.healthy}
            missing = [u for u in urls if u not in healthy]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise RouterError(f"router {self.url}: workers {missing} not healthy after {timeout_s:.0f}s")
            time.sleep(0.5)


def router_argv(port: int, metrics_port: int, worker_urls: Sequence[str], host: str = "127.0.0.1",
                policy: str = "round_robin", extra_args: Sequence[str] = ()) -> list[str]:
    """The router's command line. Every router also serves Prometheus metrics, on port 29000 unless
    told otherwise, and exits at start-up if that port is taken: each router gets its own."""
    argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
            "--policy", policy, "--prometheus-host", host, "--prometheus-port", str(metrics_port)]
    if worker_urls:
        argv += ["--worker-urls", *worker_urls]
    # The fleet owns worker health (`Fleet.check_health` takes dead servers out and brings them back).
    # The router's circuit breaker would instead open after 10 failed sends, and a burst of requests
    # meeting keep-alive connections the server just closed is enough for that. It then refuses
    # every request to a healthy server for 60 s; seen on CPU, where a whole evaluation was lost.
    argv.append("--disable-circuit-breaker")
    # --api-key: the router requires it on every endpoint but /health and sends it to its workers.
    return argv + api_key_args() + list(extra_args)


class RouterProcess(SessionProcess):
    """A router subprocess in its own session: start, wait until it answers, stop (SIGTERM, then
    SIGKILL). `client` is its admin API."""

    def __init__(self, port: int, metrics_port: int, log_path: Path, worker_urls: Sequence[str] = (),
                 host: str = "127.0.0.1", policy: str = "round_robin", extra_args: Sequence[str] = ()):
        url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
        super().__init__(router_argv(port, metrics_port, worker_urls, host, policy, extra_args), url,
                         log_path)
        self.client = RouterClient(self.url)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until `GET /workers` answers; RouterError (with the log tail) if the process exits
        or the timeout passes."""
        self.wait_until(self.client.reachable, timeout_s, "router", RouterError)
