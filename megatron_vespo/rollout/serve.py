"""One node's share of a rollout fleet, for jobs that place servers themselves (Slurm).

`megatron-vespo serve CONFIG --port P [--router-port R --worker-urls U,...]` runs one SGLang
server on this node and, on the fleet's first node, the router in front of every server of the job.
It blocks until SIGTERM/SIGINT, then stops what it started. The learners attach to the router
(`rollout.fleet.attach_router_url`) and push their weights before the first rollout, so a server may
start from any checkpoint of the right architecture: `train.init_hf_checkpoint` if set, else
placeholder weights written here. A server that dies is restarted here, at most `max_restarts`
times (the learners take it out of the router meanwhile, and give it the current weights before it
rejoins); a router that dies ends the step.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..learner.hf_files import save_hf_checkpoint
from ..learner.model import ModelConfig
from ..learner.state_adapter import hf_tensor_shapes
from ..ports import free_ports
from .router import RouterProcess
from .server import SGLangServer, ServerOptions

logger = logging.getLogger(__name__)


def placeholder_checkpoint(cfg: ModelConfig, path: Path) -> Path:
    """A HF checkpoint of `cfg`'s architecture with small random weights (norms at 1), for servers
    whose real weights arrive by weight sync. Written once; reused if present."""
    if (path / "config.json").exists():
        return path
    gen = torch.Generator().manual_seed(0)
    state = {name: torch.ones(shape) if name.endswith("norm.weight")
             else torch.randn(shape, generator=gen) * 0.02
             for name, shape in hf_tensor_shapes(cfg).items()}
    return save_hf_checkpoint(path, cfg, state, overwrite=True)


def serve_node(model: ModelConfig, model_path: Optional[str], server: ServerOptions, run_dir: Path,
               port: int, router_port: Optional[int] = None, worker_urls: Sequence[str] = (),
               max_restarts: int = 3) -> None:
    """Run this node's server (and the router when router_port is given) until SIGTERM/SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if model_path is None:
        model_path = str(placeholder_checkpoint(model, run_dir / "weights" / f"placeholder_{port}"))
    logs = run_dir / "fleet"
    proc = SGLangServer(model_path, port, server, logs / f"server_{port}.log")
    router = None
    try:
        proc.wait_healthy()
        if router_port is not None:
            # The router's Prometheus port is node-local and never addressed by the job: any free one.
            router = RouterProcess(router_port, free_ports(1)[0], logs / f"router_{router_port}.log",
                                   worker_urls, host=server.host)
            router.wait_ready(server.startup_timeout_s)
        logger.info("serving %s%s", proc.url, f", router {router.url}" if router else "")
        restarts = 0
        while not stop.wait(1.0):
            if router is not None and not router.alive:
                raise RuntimeError(f"the router {router.url} on this node exited; see {logs}")
            if not proc.alive:
                if restarts == max_restarts:
                    raise RuntimeError(f"the server {proc.url} exited after {restarts} restarts "
                                       f"(rollout.fleet.max_restarts); see {proc.log_path}")
                restarts += 1
                logger.warning("server %s exited (code %s): restart %d of at most %d", proc.url,
                               proc.proc.returncode, restarts, max_restarts)
                proc.restart()
    finally:
        if router is not None:
            router.stop()
        proc.stop()
