"""The `slurm:` section: the shape of the one heterogeneous job that runs a training.

Component 0 holds the learners (`learner_nodes` nodes, one torchrun per node); component 1 holds the
SGLang fleet (`rollout_nodes` nodes, `servers_per_node` servers on each, the router beside the first
server). Nothing here names a host or a port: both are found from the job when it runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ..ports import EPHEMERAL_LOW, SGLANG_PORTS

# Every job takes a block of this many consecutive ports: rendezvous, router, then one per server.
PORTS_PER_JOB = 16
MAX_SERVERS_PER_NODE = PORTS_PER_JOB - 2

# The time formats sbatch accepts: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME_LIMIT = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def time_limit_seconds(limit: str) -> int:
    """Seconds in a Slurm time (`_TIME_LIMIT`): minutes alone, or [D-]H[:M[:S]] once there is a day
    or two colons."""
    days, _, clock = limit.rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    if not days and len(parts) < 3:  # M or M:S
        parts = [0] + parts + [0] * (2 - len(parts))
    hours, minutes, seconds = parts + [0] * (3 - len(parts))
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass(frozen=True)
class SlurmConfig:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_limit: str = "04:00:00"
    job_name: str = "megatron-vespo"
    learner_nodes: int = 1
    gpus_per_node: int = 8  # both components; 0 on a cluster without GPUs
    # torchrun ranks per learner node; 0: one per GPU (required > 0 when gpus_per_node is 0).
    ranks_per_node: int = 0
    # CPUs of each learner node's torchrun, shared by its ranks; 0: 8 per rank
    cpus_per_task: int = 0
    # Whole nodes (GPU jobs share nothing well) with all their memory; mem None: Slurm's default.
    exclusive: bool = True
    mem: Optional[str] = "0"
    rollout_nodes: int = 1
    # SGLang servers per fleet node; each gets gpus_per_node / servers_per_node GPUs (its TP group).
    servers_per_node: int = 1
    cpus_per_server: int = 8
    # pyxis/enroot: every step runs in this image, with these mounts (`src:dst[,src:dst...]`).
    container_image: Optional[str] = None
    container_mounts: Optional[str] = None
    # Verbatim sbatch options for both components, e.g. ("--exclusive", "--constraint=h100").
    extra_sbatch: tuple[str, ...] = ()
    # `NAME=VALUE` exported before any step starts; VALUE is shell text ($SCRATCH expands).
    env: tuple[str, ...] = ()
    # Each job's ports are port_base + (job id % port_slots) * 16, ... + 15: deterministic from the
    # job id, so nothing is hard-coded, and distinct for jobs sharing a node. The block stays below
    # the ephemeral range and SGLang's NCCL port band (`megatron_vespo.ports`).
    port_base: int = 10000
    port_slots: int = 750
    fleet_timeout_s: int = 1800  # how long the learners wait for the router and servers' /health
    # The batch script is signalled this many seconds before the time limit (`--signal=B:TERM@`;
    # Slurm may signal up to a minute earlier) and asks the learners to stop after their step with
    # a checkpoint: enough for a step and a checkpoint write. 0: no signal.
    signal_grace_s: int = 600
    # After such a stop the job requeues itself (same job id, Slurm delays its start by ~2 min) and
    # resumes from that checkpoint; without it, resubmitting into the run directory resumes.
    requeue: bool = False

    def __post_init__(self) -> None:
        for name in ("learner_nodes", "rollout_nodes", "servers_per_node", "cpus_per_server",
                     "port_slots", "fleet_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "ranks_per_node", "cpus_per_task"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.gpus_per_node == 0 and self.ranks_per_node == 0:
            raise ValueError("ranks_per_node must be >= 1 when gpus_per_node is 0 (no GPU to count)")
        if self.servers_per_node > MAX_SERVERS_PER_NODE:
            raise ValueError(f"servers_per_node must be <= {MAX_SERVERS_PER_NODE} (ports per job), "
                             f"got {self.servers_per_node}")
        if self.gpus_per_node and self.gpus_per_node % self.servers_per_node:
            raise ValueError(f"servers_per_node ({self.servers_per_node}) must divide gpus_per_node "
                             f"({self.gpus_per_node}): every server gets an equal TP group")
        if not _TIME_LIMIT.match(self.time_limit):
            raise ValueError(f"time_limit={self.time_limit!r} is not a Slurm time "
                             "(M, H:M:S, D-H, D-H:M:S)")
        if not 0 <= self.signal_grace_s < min(time_limit_seconds(self.time_limit), 65536):
            raise ValueError(f"signal_grace_s={self.signal_grace_s} must lie in 0 .. the time limit "
                             f"({self.time_limit}) and below 65536 s")
        if self.requeue and not self.signal_grace_s:
            raise ValueError("requeue=true needs signal_grace_s > 0: the job requeues itself when "
                             "the signal before its time limit has stopped the learners")
        top = self.port_base + self.port_slots * PORTS_PER_JOB  # one past the last port
        if not 1024 <= self.port_base or top > EPHEMERAL_LOW or (
                self.port_base < SGLANG_PORTS.stop and top > SGLANG_PORTS.start):
            raise ValueError(f"port_base ({self.port_base}) + port_slots ({self.port_slots}) * "
                             f"{PORTS_PER_JOB} = ports {self.port_base}..{top - 1} must stay within "
                             f"1024..{EPHEMERAL_LOW - 1} (the ephemeral range starts at "
                             f"{EPHEMERAL_LOW}) and outside SGLang's NCCL ports "
                             f"{SGLANG_PORTS.start}..{SGLANG_PORTS.stop - 1}")
        if self.cpus_per_task and self.cpus_per_task < self.nproc_per_node:
            raise ValueError(f"cpus_per_task ({self.cpus_per_task}) gives the {self.nproc_per_node} "
                             f"learner ranks of a node less than one CPU each")
        for name in ("partition", "account", "qos", "job_name", "container_image", "container_mounts",
                     "mem"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or any(c.isspace() for c in value)):
                raise ValueError(f"{name}={value!r} must be a non-empty word without whitespace")
        for line in self.extra_sbatch:
            if not line.startswith("-") or "\n" in line:
                raise ValueError(f"extra_sbatch: {line!r} is not one sbatch option (--name[=value])")
        for item in self.env:
            if not _ENV_NAME.match(item.partition("=")[0]) or "=" not in item or "\n" in item:
                raise ValueError(f"env: {item!r} is not NAME=VALUE")

    @property
    def nproc_per_node(self) -> int:
        """torchrun ranks on each learner node."""
        return self.ranks_per_node or self.gpus_per_node

    @property
    def learner_cpus(self) -> int:
        """CPUs of each learner node's torchrun."""
        return self.cpus_per_task or 8 * self.nproc_per_node

    @property
    def gpus_per_server(self) -> int:
        """The TP group of each SGLang server (0 without GPUs)."""
        return self.gpus_per_node // self.servers_per_node
