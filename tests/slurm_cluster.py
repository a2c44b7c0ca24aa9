"""A throwaway Slurm 22.05 cluster on this host, for tests that submit real jobs.

munged, slurmctld and one `slurmd -N nodeX` per emulated node run as child processes of the test
(there is no systemd), all state and logs under one directory. Every emulated node has
NodeAddr=127.0.0.1: the node names do not resolve, and jobs reach a node through the address
Slurm records for it, exactly as on a real cluster. A heterogeneous job needs each component on
a node of its own, hence several emulated nodes.

Teardown order matters: jobs first (scancel), then the slurmds, then slurmctld, then munged;
stopping slurmctld before the slurmds leaves slurmstepd processes hanging.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

REQUIRED = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
CPUS_PER_NODE = 2


def missing_reason() -> Optional[str]:
    """Why a local cluster cannot start here (None when it can)."""
    missing = [name for name in REQUIRED if shutil.which(name) is None
               and not Path("/usr/sbin", name).exists()]
    if missing:
        return f"Slurm/munge binaries not installed ({', '.join(missing)}); run `make slurm-local` as root"
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurmCluster:
    """Start with `start()` (or `with`), submit with `env` (it carries SLURM_CONF), stop with `stop()`.

    Ports: slurmctld on `port_base`, node k's slurmd on `port_base + k`. The tests keep every fixed
    port below the kernel's ephemeral range (32768-60999), where another process's outgoing
    connection can take a port between its check and the bind.
    """

    def __init__(self, root: Path, nodes: Sequence[str] = ("node1", "node2"), port_base: int = 26000):
        self.root = Path(root)
        self.nodes = tuple(nodes)
        self.port_base = port_base
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[tuple[str, subprocess.Popen]] = []

    def _slurm_conf(self) -> str:
        host = os.uname().nodename
        lines = [
            "ClusterName=vespotest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={self.port_base}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: how long a killed job's credential stays revoked, which is also how
            # long Slurm holds a requeued job (default 120 s; a job started before fails at once).
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={self.root}/state",
            f"SlurmdSpoolDir={self.root}/spool/%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid",
            f"SlurmdPidFile={self.root}/slurmd.%n.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log",
            f"SlurmdLogFile={self.root}/slurmd.%n.log",
            # No systemd and no cgroup hierarchy to delegate: track processes by parent id.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # The default backfill pass runs every 30 s; a heterogeneous job is only started by it.
            "SchedulerParameters=bf_interval=1",
            # Take node sizes from this file, not from the host (all emulated nodes share 2 cores).
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=2",
        ]
        for k, node in enumerate(self.nodes, start=1):
            lines.append(f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} "
                         f"Port={self.port_base + k} CPUs={CPUS_PER_NODE} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP OverSubscribe=NO")
        return "\n".join(lines) + "\n"

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self._procs.append((name, proc))

    def start(self, timeout: float = 30.0) -> "LocalSlurmCluster":
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        (self.root / "munge").mkdir(mode=0o700, exist_ok=True)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._slurm_conf())
        # slurmd 22.05 always loads a cgroup plugin (CgroupPlugin=disabled only exists from 23.02);
        # with task/none and proctrack/linuxproc it is loaded but never used, so nothing is mounted.
        (self.root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
        key = self.root / "munge" / "munge.key"
        subprocess.run([_binary("mungekey"), "--create", f"--keyfile={key}"], check=True,
                       capture_output=True)
        key.chmod(0o400)
        self._spawn("munged", [_binary("munged"), "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.munge_socket}",
                               f"--pid-file={self.root}/munge/munged.pid",
                               f"--log-file={self.root}/munge/munged.log",
                               f"--seed-file={self.root}/munge/munged.seed"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged socket")
        # -i: ignore any saved state; -D: stay in the foreground as our child.
        self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [_binary("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self._all_idle, timeout, f"nodes {self.nodes} idle in sinfo")
        return self

    def _all_idle(self) -> bool:
        out = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], env=self.env,
                             capture_output=True, text=True)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return all(states.get(node) == "idle" for node in self.nodes)

    def _jobs_left(self) -> bool:
        out = subprocess.run(["squeue", "--noheader", "--format=%i"], env=self.env,
                             capture_output=True, text=True)
        return out.returncode == 0 and bool(out.stdout.strip())

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [name for name, proc in self._procs if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                reason = f"{dead} exited" if dead else f"timed out after {timeout:.0f} s"
                raise RuntimeError(f"local Slurm cluster: waiting for {what}: {reason}; "
                                   f"logs in {self.root}")
            time.sleep(0.1)

    def stop(self) -> None:
        """scancel everything, then the slurmds, slurmctld and munged, in that order."""
        if not self._procs:
            return
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True)
        deadline = time.monotonic() + 15
        while self._jobs_left() and time.monotonic() < deadline:
            time.sleep(0.2)
        for name, proc in reversed(self._procs):  # started munged, slurmctld, slurmds: reverse
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self._procs.clear()

    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
