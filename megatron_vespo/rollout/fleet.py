"""A fleet of SGLang servers behind one sglang-router, launched here or attached to by address.

`Fleet.launch` starts `num_servers` servers (all at once: start-up is the slow part) and a router
that lists them, and waits until the router reports every one healthy. `Fleet.attach` wraps a router
(and its workers) that someone else runs; it never stops them. Either way the fleet keeps the list
of members it believes alive; `check_health` prunes that list and the router's, so that a crashed
server stops receiving work and the client's retries land on the survivors.

A server found dead comes back: the fleet restarts the ones it launched (at most
`max_restarts` times each); the ones it attached to are restarted by whoever runs them (in a Slurm
job, the node's `megatron-vespo serve`). A server that answers again is `returning`: it gets the
current weights at the next weight sync and only then rejoins the router (`rejoin`), so no request
reaches weights nobody can name.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_vespo.ports import free_ports
from megatron_vespo.rollout.router import RouterClient, RouterError, RouterProcess
from megatron_vespo.rollout.server import ServerOptions, SGLangServer, is_healthy, seeded

logger = logging.getLogger(__name__)


class FleetError(RuntimeError):
    """The fleet cannot serve: no healthy server is left, or it could not be started or attached."""


def _valid_port(port: int) -> bool:
    return 0 <= port <= 65535


@dataclass(frozen=True)
class FleetConfig:
    """Where the rollout servers are and how requests to them are retried (the `rollout.fleet`
    config section). With `attach_router_url` set, nothing is launched and the server fields are
    unused."""

    num_servers: int = 1
    base_port: int = 0  # server i listens on base_port + i; 0 = any free ports
    router_port: int = 0  # 0 = any free port
    attach_router_url: Optional[str] = None
    attach_worker_urls: tuple[str, ...] = ()  # empty = the workers the router lists
    server: ServerOptions = field(default_factory=ServerOptions)
    router_policy: str = "round_robin"  # groups are independent prompts: spread them evenly
    router_extra_args: tuple[str, ...] = ()  # passed to launch_router verbatim (e.g. --disable-retries)
    request_timeout_s: float = 600.0  # one /generate request (a whole group of n samples)
    max_retries: int = 3  # re-sends of one group after a failed request
    health_timeout_s: float = 10.0  # a /health answer slower than this counts as dead
    max_restarts: int = 3  # relaunches of each server that dies (0: a dead server stays out)

    def __post_init__(self) -> None:
        if self.num_servers < 1:
            raise ValueError(f"num_servers must be >= 1, got {self.num_servers}")
        last_port = self.base_port + self.num_servers - 1
        if not _valid_port(self.base_port) or (self.base_port and last_port > 65535):
            raise ValueError(f"base_port must be 0 or a port with room for num_servers={self.num_servers} "
                             f"consecutive ports, got {self.base_port}")
        if not _valid_port(self.router_port):
            raise ValueError(f"router_port must be in [0, 65535], got {self.router_port}")
        if self.base_port and self.router_port and \
                self.base_port <= self.router_port < self.base_port + self.num_servers:
            raise ValueError(f"router_port {self.router_port} collides with the server ports "
                             f"base_port..base_port+num_servers-1 = {self.base_port}..."
                             f"{self.base_port + self.num_servers - 1}")
        for name, url in [("attach_router_url", self.attach_router_url)] + \
                         [("attach_worker_urls", u) for u in self.attach_worker_urls]:
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError(f"{name} must be http(s)://host:port, got {url!r}")
        if self.attach_worker_urls and self.attach_router_url is None:
            raise ValueError("attach_worker_urls needs attach_router_url (requests go through the router)")
        if self.router_policy not in ("random", "round_robin", "cache_aware", "power_of_two"):
            raise ValueError(f"router_policy must be random, round_robin, cache_aware or power_of_two, "
                             f"got {self.router_policy!r}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.health_timeout_s <= 0:
            raise ValueError(f"health_timeout_s must be > 0, got {self.health_timeout_s}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")


class Fleet:
    """SGLang servers behind a router. Built by `launch` or `attach`; the constructor takes a router
    client and the member URLs as given (no checks, nothing started)."""

    def __init__(self, cfg: FleetConfig, router: RouterClient, worker_urls: list[str],
                 servers: tuple[SGLangServer, ...] = (), router_process: Optional[RouterProcess] = None):
        self.cfg = cfg
        self.router = router
        self.servers = servers  # the processes this fleet started (empty when attached)
        self.router_process = router_process
        self._members = list(worker_urls)
        self._returning: dict[str, float] = {}  # removed as dead, awaited back: url -> since when
        self._restarts: Counter[str] = Counter()
        self._lock = threading.Lock()
        # One restart decision at a time: the async producer's health checks and the trainer's
        # weight sync both look at restarting servers.
        self._restart_lock = threading.RLock()
        self._closed = False

    @classmethod
    def launch(cls, model_path: str, cfg: FleetConfig, log_dir: Path, seed: int = 0) -> "Fleet":
        """Start cfg.num_servers servers (server i's sampler seeded with seed + i) and a router;
        return once the router lists all healthy. Anything started is stopped again if start-up
        fails."""
        log_dir = Path(log_dir)
        ports = [cfg.base_port + i for i in range(cfg.num_servers)] if cfg.base_port else []
        spare = free_ports(cfg.num_servers + 2)  # any free ports for what the config leaves open
        ports = ports or spare[:cfg.num_servers]
        router_port = cfg.router_port or spare[-2]
        metrics_port = spare[-1]
        servers: list[SGLangServer] = []
        router_process = None
        try:
            servers = [SGLangServer(model_path, p, seeded(cfg.server, seed, i),
                                    log_dir / f"server_{p}.log") for i, p in enumerate(ports)]
            # Start-up is mostly CPU-bound imports and model load: wait for all in parallel.
            with ThreadPoolExecutor(len(servers)) as pool:
                list(pool.map(lambda s: s.wait_healthy(), servers))
            urls = [s.url for s in servers]
            router_process = RouterProcess(router_port, metrics_port, log_dir / f"router_{router_port}.log",
                                           urls, host=cfg.server.host, policy=cfg.router_policy,
                                           extra_args=cfg.router_extra_args)
            router_process.wait_ready(cfg.server.startup_timeout_s)
            router_process.client.wait_workers(urls, cfg.server.startup_timeout_s)
        except BaseException:
            if router_process is not None:
                router_process.stop()
            for s in servers:
                s.stop()
            raise
        logger.info("fleet up: router %s, servers %s", router_process.url, urls)
        return cls(cfg, router_process.client, urls, tuple(servers), router_process)

    @classmethod
    def attach(cls, cfg: FleetConfig) -> "Fleet":
        """Wrap the router at cfg.attach_router_url (its listed workers, or cfg.attach_worker_urls,
        which are registered with it if missing). Shutting the fleet down leaves them running."""
        if cfg.attach_router_url is None:
            raise FleetError("Fleet.attach needs FleetConfig.attach_router_url")
        router = RouterClient(cfg.attach_router_url)
        try:
            listed = [w.url for w in router.workers()]
            urls = list(cfg.attach_worker_urls) or listed
            added = [u for u in urls if u not in listed]
            for url in added:
                router.add_worker(url)
            router.wait_workers(added, cfg.server.startup_timeout_s)
        except RouterError as e:
            raise FleetError(f"cannot attach to router {cfg.attach_router_url}: {e}") from None
        return cls(cfg, router, urls)

    @property
    def router_url(self) -> str:
        return self.router.url

    @property
    def worker_urls(self) -> list[str]:
        """The members not (yet) found dead."""
        with self._lock:
            return list(self._members)

    def _server(self, url: str) -> Optional[SGLangServer]:
        """The process behind `url` when this fleet launched it."""
        return next((s for s in self.servers if s.url == url), None)

    def _dead(self, url: str) -> bool:
        server = self._server(url)
        if server is not None and not server.alive:
            return True
        return not is_healthy(url, self.cfg.health_timeout_s)

    def check_health(self) -> list[str]:
        """Probe every member's /health; remove the dead ones from the router and the member list,
        and await them back (restarting the ones launched here). Returns the removed URLs;
        FleetError if the router is gone or no healthy member is left."""
        if not self.router.reachable():
            raise FleetError(f"router {self.router_url} is not answering")
        members = self.worker_urls
        with ThreadPoolExecutor(max(1, len(members))) as pool:
            dead = [u for u, d in zip(members, pool.map(self._dead, members)) if d]
        for url in dead:
            logger.warning("rollout server %s is not answering /health: removing it from the fleet", url)
            self.remove_worker(url)
            with self._restart_lock:
                self._bring_back(url)
        if not self.worker_urls:
            raise FleetError(f"no healthy rollout server left behind router {self.router_url} "
                             f"(removed as dead: {dead or 'none'}; members before the check: {members})")
        return dead

    def _bring_back(self, url: str) -> None:
        """Await `url` back; restart it first when this fleet launched it and restarts are left.
        The caller holds `_restart_lock`."""
        server = self._server(url)
        if server is not None:
            if self._restarts[url] >= self.cfg.max_restarts:
                logger.error("rollout server %s died after %d restarts (rollout.fleet.max_restarts): "
                             "it stays out of the fleet; log %s", url, self._restarts[url],
                             server.log_path)
                with self._lock:
                    self._returning.pop(url, None)
                server.stop()
                return
            self._restarts[url] += 1
            logger.warning("restarting rollout server %s (restart %d of at most %d); it rejoins after "
                           "the next weight sync", url, self._restarts[url], self.cfg.max_restarts)
            server.restart()
        with self._lock:
            self._returning[url] = time.monotonic()

    def returning(self) -> list[str]:
        """Servers removed as dead that answer /health again: give them the current weights, then
        `rejoin` them. A restart that failed (the process exited, or it did not answer within
        `server.startup_timeout_s`) is retried while restarts are left."""
        with self._restart_lock:
            with self._lock:
                awaited = dict(self._returning)
            back = []
            for url, since in awaited.items():
                server = self._server(url)
                failed = server is not None and (
                    not server.alive or time.monotonic() - since > self.cfg.server.startup_timeout_s)
                if failed:
                    logger.warning("restart of rollout server %s failed; log %s:\n%s", url,
                                   server.log_path, server.log_tail(10))
                    self._bring_back(url)
                elif is_healthy(url, timeout=2.0):
                    back.append(url)
            return back

    def rejoin(self, urls: list[str]) -> None:
        """Members again (`returning` servers that now hold the current weights): registered with
        the router, which gets requests to them once it lists them healthy."""
        for url in urls:
            self.router.add_worker(url)
        self.router.wait_workers(urls, self.cfg.server.startup_timeout_s)
        with self._lock:
            for url in urls:
                self._returning.pop(url, None)
                if url not in self._members:
                    self._members.append(url)
        logger.warning("rollout servers %s rejoined the fleet; %d members", urls, len(self._members))

    def remove_worker(self, url: str) -> None:
        """Drop `url` from the member list and from the router (it no longer gets requests)."""
        with self._lock:
            if url in self._members:
                self._members.remove(url)
        try:
            self.router.remove_worker(url)
        except RouterError as e:
            # The member list is what the fleet trusts; a router that cannot be told is logged, and a
            # dead router fails the next request anyway.
            logger.warning("could not remove %s from router %s: %s", url, self.router_url, e)

    def shutdown(self) -> None:
        """Stop what this fleet started (router first, so no request goes to a stopping server);
        leaves attached processes alone. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.router_process is not None:
            self.router_process.stop()
        for s in self.servers:
            s.stop()

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
