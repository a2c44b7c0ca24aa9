"""Render the one heterogeneous sbatch script that runs a training: learners + SGLang fleet.

At run time the script finds every address from the job itself: node names from
`scontrol show hostnames $SLURM_JOB_NODELIST_HET_GROUP_{0,1}`, each node's address from Slurm's
node table (NodeAddr: the address Slurm itself reaches the node at, so it works where a node's name
does not resolve), and a block of ports from the job id. The learners learn the fleet's addresses
as config overrides on their command line (`rollout.fleet.attach_router_url`, `rollout.fleet.attach_worker_urls`).

The two commands are parameters so that a test can run the real job mechanics around stand-ins:
`server_command` gets `--port P` appended (and `--router-port R --worker-urls U,U` for the first
server on the first fleet node); `learner_program` is what torchrun runs, followed by the overrides.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Optional, Sequence

from ..stop_request import STOP_FILE
from .config import PORTS_PER_JOB, SlurmConfig

TEMPLATE = r"""#!/bin/bash
# megatron-vespo training as one heterogeneous Slurm job (rendered by megatron_vespo.slurm).
#   config:  __CONFIG__
#   run dir: __RUN_DIR__
# Component 0: the learners, one torchrun per node. Component 1: the SGLang fleet, __SERVERS__ server(s)
# per node, the router beside the first. Hosts and ports are found from the job when it runs.
__HEADER__
set -euo pipefail
__EXPORTS__
# Node names need not resolve (emulated nodes, a management network): reach each node at the
# address Slurm itself uses for it.
node_addr() { scontrol show node "$1" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p'; }
mapfile -t learner_nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0")
mapfile -t fleet_nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1")

# This job's block of __PORTS_PER_JOB__ ports, fixed by the job id: rendezvous, router, then one per server.
first_port=$((__PORT_BASE__ + SLURM_JOB_ID % __PORT_SLOTS__ * __PORTS_PER_JOB__))
master_addr=$(node_addr "${learner_nodes[0]}")
master_port=$first_port
router_port=$((first_port + 1))
router_url="http://$(node_addr "${fleet_nodes[0]}"):$router_port"
worker_urls=()
for node in "${fleet_nodes[@]}"; do
    addr=$(node_addr "$node")
    for ((i = 0; i < __SERVERS__; i++)); do worker_urls+=("http://$addr:$((first_port + 2 + i))"); done
done
worker_csv=$(IFS=,; echo "${worker_urls[*]}")
echo "learners: ${learner_nodes[*]}, rendezvous $master_addr:$master_port"
echo "fleet: ${fleet_nodes[*]}, router $router_url, servers $worker_csv"

# Stop the fleet: SIGTERM to the servers, SIGKILL to its srun after a grace period. (A SIGTERM sent
# to srun reaches its tasks as SIGKILL; scancel --signal delivers the SIGTERM itself.)
fleet_pid=
stop_fleet() {
    [[ -n $fleet_pid ]] || return 0
    scancel --signal=TERM "$SLURM_JOB_ID+1" 2>/dev/null || true
    for ((t = 0; t < 60; t++)); do
        kill -0 "$fleet_pid" 2>/dev/null || break
        sleep 1
    done
    kill -KILL "$fleet_pid" 2>/dev/null || true
    wait "$fleet_pid" 2>/dev/null || true
    fleet_pid=
}
trap stop_fleet EXIT

# Near the time limit Slurm signals this script (`--signal=B:TERM@__GRACE__`), not the steps: a signal
# to torchrun would end its ranks 30 s later, checkpoint written or not. The script asks the
# learners through the run's stop file instead; they stop after their step with a checkpoint.
stop_file=__RUN_DIR_Q__/__STOP_FILE__
rm -f "$stop_file"  # a request older than this job is not for it
time_limit_near=0
on_time_limit() {
    time_limit_near=1
    echo "the time limit is __GRACE__ s away: asking the learners to stop with a checkpoint"
    echo "Slurm job $SLURM_JOB_ID: the time limit is __GRACE__ s away" > "$stop_file"
}
trap on_time_limit TERM

# Component 1, in the background: one step, one task per server (__SERVERS__ per node, block-distributed
# as worker_urls lists them); task 0, on the first fleet node, also runs the router. A task's port
# and address (its node's, which it binds to: nothing listens on the node's other interfaces) are
# known only inside the task, hence the bash -c. One server failing for good ends the whole step.
srun --het-group=1 --ntasks-per-node=__SERVERS__ --kill-on-bad-exit=1 __SERVER_SRUN__ \
    --output=__RUN_DIR_Q__/fleet-%t.log \
    bash -c '
        IFS=, read -ra urls <<< "$3"
        host=${urls[SLURM_PROCID]#http://}
        args=(--port "$(($1 + SLURM_LOCALID))" --host "${host%:*}")
        if ((SLURM_PROCID == 0)); then args+=(--router-port "$2" --worker-urls "$3"); fi
        shift 3
        exec "$@" "${args[@]}"' fleet-task "$((first_port + 2))" "$router_port" "$worker_csv" \
    __SERVER_COMMAND__ &
fleet_pid=$!

# The learners start once the router and every server answer /health; a fleet that ends first
# fails the job at once instead of at the timeout.
deadline=$((SECONDS + __FLEET_TIMEOUT__))
for url in "$router_url" "${worker_urls[@]}"; do
    until curl --silent --fail --max-time 5 --output /dev/null "$url/health"; do
        if ! kill -0 "$fleet_pid" 2>/dev/null; then
            echo "the fleet step ended before $url/health answered" >&2
            exit 1
        fi
        if ((SECONDS > deadline)); then
            echo "$url/health did not answer within __FLEET_TIMEOUT__ s" >&2
            exit 1
        fi
        sleep 1
    done
done

# Component 0: one torchrun per node; the node rank is the node's index in this step, known only
# inside each task, hence the bash -c. In the background, so that the trap below runs at once.
srun --het-group=0 --nodes=__LEARNER_NODES__ --ntasks-per-node=1 --kill-on-bad-exit=1 __LEARNER_SRUN__ \
    bash -c 'exec torchrun --node-rank "$SLURM_NODEID" "$@"' torchrun \
    --nnodes=__LEARNER_NODES__ --nproc-per-node=__NPROC__ \
    --master-addr="$master_addr" --master-port="$master_port" \
    __LEARNER_PROGRAM__ \
    "rollout.fleet.attach_router_url=$router_url" "rollout.fleet.attach_worker_urls=[$worker_csv]" &
learner_pid=$!
# wait returns early when a trap has run; wait again until the learners have ended.
while :; do
    learner_status=0
    wait "$learner_pid" || learner_status=$?
    kill -0 "$learner_pid" 2>/dev/null || break
done
stop_fleet
# The learners took the stop request (they remove the file once seen) and stopped with a checkpoint.
if ((time_limit_near && learner_status == 0)) && [[ ! -e $stop_file ]]; then
    if ((__REQUEUE__)); then
        echo "stopped with a checkpoint before the time limit: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "stopped with a checkpoint before the time limit: resubmit to continue"
    fi
fi
rm -f "$stop_file"
exit "$learner_status"
"""


def default_server_command(config_path: str, run_dir: str) -> tuple[str, ...]:
    """One SGLang server on this node (plus the router, given --router-port)."""
    return ("megatron-vespo", "serve", config_path, "--run-dir", run_dir)


def default_learner_program(config_path: str, run_dir: str) -> tuple[str, ...]:
    """What torchrun starts on every learner rank: a resubmitted (or requeued) job continues from
    the run's checkpoint, a first one starts fresh (`--resume` without a checkpoint)."""
    return ("-m", "megatron_vespo.cli", "train", config_path, "--run-dir", run_dir, "--resume")


def _header(slurm: SlurmConfig, run_dir: str) -> list[str]:
    """#SBATCH lines: job-wide options, component 0, `hetjob`, component 1."""
    shared = [f"--time={slurm.time_limit}", *(["--exclusive"] if slurm.exclusive else []),
              *([f"--mem={slurm.mem}"] if slurm.mem is not None else [])]
    shared += [f"--{name}={getattr(slurm, name)}" for name in ("partition", "account", "qos")
               if getattr(slurm, name) is not None]
    gpus = [f"--gpus-per-node={slurm.gpus_per_node}"] if slurm.gpus_per_node else []
    learners = [f"--nodes={slurm.learner_nodes}", "--ntasks-per-node=1",
                f"--cpus-per-task={slurm.learner_cpus}", *gpus]
    fleet = [f"--nodes={slurm.rollout_nodes}", f"--ntasks-per-node={slurm.servers_per_node}",
             f"--cpus-per-task={slurm.cpus_per_server}", *gpus]
    # A requeued job keeps its id and output file: append, so its first run's log stays.
    job = [f"--job-name={slurm.job_name}", f"--output={run_dir}/slurm-%j.out", "--open-mode=append",
           *([f"--signal=B:TERM@{slurm.signal_grace_s}"] if slurm.signal_grace_s else []),
           *(["--requeue"] if slurm.requeue else [])]
    lines = [f"#SBATCH {opt}" for opt in job + learners + shared + list(slurm.extra_sbatch)]
    lines.append("#SBATCH hetjob")
    lines += [f"#SBATCH {opt}" for opt in fleet + shared + list(slurm.extra_sbatch)]
    return lines


def _container_flags(slurm: SlurmConfig, visible: Sequence[str]) -> list[str]:
    """pyxis flags: the image, and the configured mounts plus a same-path mount of every directory
    in `visible` (the run directory, the config's, the model's and the data's) not already under
    a mounted one, so the job's steps see what the config names."""
    if not slurm.container_image:
        return []
    mounts = [m for m in (slurm.container_mounts or "").split(",") if m]
    targets = [m.split(":")[1] if ":" in m else m for m in mounts]
    for path in dict.fromkeys(visible):
        if not any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets):
            mounts.append(f"{path}:{path}")
            targets.append(path)
    flags = [f"--container-image={shlex.quote(slurm.container_image)}"]
    if mounts:
        flags.append(f"--container-mounts={shlex.quote(','.join(mounts))}")
    return flags


def render_sbatch(slurm: SlurmConfig, config_path: str, run_dir: str, *,
                  server_command: Optional[Sequence[str]] = None,
                  learner_program: Optional[Sequence[str]] = None,
                  mounts: Sequence[str] = ()) -> str:
    """The sbatch script for `slurm`, training `config_path` into `run_dir` (best absolute: the
    steps run on other nodes, in the job's working directory or a container). `mounts`: absolute
    directories the container must see besides the run directory (the model's, the data's)."""
    for name, path in (("config_path", config_path), ("run_dir", run_dir)):
        if not path or any(c.isspace() for c in path):
            raise ValueError(f"{name}={path!r}: sbatch cannot take a path with whitespace")
    server_command = server_command or default_server_command(config_path, run_dir)
    learner_program = learner_program or default_learner_program(config_path, run_dir)
    gpus = slurm.gpus_per_server
    visible = [d for d in (run_dir, str(Path(config_path).parent), *mounts) if d.startswith("/")]
    container = _container_flags(slurm, visible)
    # --gpus-per-task also binds each task to its own GPUs (its TP group).
    server_srun = [f"--cpus-per-task={slurm.cpus_per_server}",
                   *([f"--gpus-per-task={gpus}"] if gpus else []), *container]
    learner_srun = [f"--cpus-per-task={slurm.learner_cpus}",
                    *([f"--gres=gpu:{slurm.gpus_per_node}"] if slurm.gpus_per_node else []),
                    *container]
    exports = [f"export {item}" for item in slurm.env]
    values = {
        "CONFIG": config_path,
        "RUN_DIR": run_dir,
        "RUN_DIR_Q": shlex.quote(run_dir),
        "HEADER": "\n".join(_header(slurm, run_dir)),
        "EXPORTS": "\n".join(exports) + ("\n" if exports else ""),
        "SERVERS": str(slurm.servers_per_node),
        "PORT_BASE": str(slurm.port_base),
        "PORT_SLOTS": str(slurm.port_slots),
        "PORTS_PER_JOB": str(PORTS_PER_JOB),
        "FLEET_TIMEOUT": str(slurm.fleet_timeout_s),
        "SERVER_SRUN": " ".join(server_srun),
        "SERVER_COMMAND": shlex.join(server_command),
        "LEARNER_NODES": str(slurm.learner_nodes),
        "LEARNER_SRUN": " ".join(learner_srun),
        "NPROC": str(slurm.nproc_per_node),
        "LEARNER_PROGRAM": shlex.join(learner_program),
        "STOP_FILE": STOP_FILE,
        "GRACE": str(slurm.signal_grace_s),
        "REQUEUE": "1" if slurm.requeue else "0",
    }
    return re.sub(r"__([A-Z_]+)__", lambda m: values[m.group(1)], TEMPLATE)
