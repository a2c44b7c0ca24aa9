"""The heterogeneous Slurm job: what the rendered script says, and a real job on a local cluster in
which the learners reach the fleet only through the addresses the job discovered."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_vespo.config import ConfigError, build, load_config
from megatron_vespo.slurm import SlurmConfig, render_sbatch, slurm_submit, submit, wait_for
from megatron_vespo.slurm.submit import TERMINAL_STATES, job_state

from tests.slurm_cluster import LocalSlurmCluster, missing_reason

REPO = Path(__file__).resolve().parents[1]
STANDINS = Path(__file__).with_name("slurm_standins.py")

# The shipped example, slurm/train_qwen3_30b_a3b.sbatch: the render of configs/qwen3_30b_a3b.yaml's
# slurm section (4 learner nodes x 8 GPUs, 2 fleet nodes with 4 servers of TP 2, in a container).
EXAMPLE = load_config(REPO / "configs" / "qwen3_30b_a3b.yaml").slurm
EXAMPLE_PATH = REPO / "slurm" / "train_qwen3_30b_a3b.sbatch"
EXAMPLE_ARGS = ("configs/qwen3_30b_a3b.yaml", "runs/qwen3_30b_a3b")


def _sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")]


# --- the rendered script --------------------------------------------------------------------------

def test_one_het_job_learners_first_then_the_fleet():
    lines = _sbatch_lines(render_sbatch(EXAMPLE, *EXAMPLE_ARGS))
    split = lines.index("hetjob")
    learners, fleet = lines[:split], lines[split + 1:]
    assert lines.count("hetjob") == 1
    assert {"--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=96",
            "--gpus-per-node=8"} <= set(learners)
    assert {"--nodes=2", "--ntasks-per-node=4", "--cpus-per-task=24", "--gpus-per-node=8"} <= set(fleet)
    for component in (learners, fleet):  # per-component options repeat in both
        assert {"--time=48:00:00", "--exclusive", "--mem=0"} <= set(component)  # whole nodes
    assert "--job-name=megatron-vespo" in learners and "--output=runs/qwen3_30b_a3b/slurm-%j.out" in learners
    # Signalled 900 s before the limit, requeued after the stop, one log across the runs.
    assert {"--signal=B:TERM@900", "--requeue", "--open-mode=append"} <= set(learners)
    assert "--signal=B:TERM@600" in _sbatch_lines(render_sbatch(SlurmConfig(), *EXAMPLE_ARGS))
    assert not any(o.startswith(("--signal", "--requeue")) for o in fleet)


def test_learners_run_torchrun_per_node_with_the_rendezvous_and_fleet_from_the_job():
    script = render_sbatch(EXAMPLE, *EXAMPLE_ARGS)
    assert 'mapfile -t learner_nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0")' in script
    assert 'mapfile -t fleet_nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1")' in script
    assert 'master_addr=$(node_addr "${learner_nodes[0]}")' in script
    assert "first_port=$((10000 + SLURM_JOB_ID % 750 * 16))" in script
    assert ("srun --het-group=0 --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=96 "
            "--gres=gpu:8 --container-image='nvcr.io#nvidia/pytorch:25.10-py3' "
            "--container-mounts=/lustre:/lustre") in script
    assert "bash -c 'exec torchrun --node-rank \"$SLURM_NODEID\" \"$@\"' torchrun" in script
    assert "--nnodes=4 --nproc-per-node=8 \\\n" in script
    assert '--master-addr="$master_addr" --master-port="$master_port"' in script
    assert "-m megatron_vespo.cli train configs/qwen3_30b_a3b.yaml --run-dir runs/qwen3_30b_a3b" in script
    assert '"rollout.fleet.attach_router_url=$router_url" "rollout.fleet.attach_worker_urls=[$worker_csv]"' in script
    assert not re.search(r"\b(127\.0\.0\.1|localhost)\b", script), "no address may be hard-coded"


def test_fleet_is_one_step_with_a_task_per_server_the_first_with_the_router():
    script = render_sbatch(EXAMPLE, *EXAMPLE_ARGS)
    assert ("srun --het-group=1 --ntasks-per-node=4 --kill-on-bad-exit=1 --cpus-per-task=24 "
            "--gpus-per-task=2 --container-image=") in script
    assert "--output=runs/qwen3_30b_a3b/fleet-%t.log" in script
    assert 'args=(--port "$(($1 + SLURM_LOCALID))" --host "${host%:*}")' in script
    assert 'if ((SLURM_PROCID == 0)); then args+=(--router-port "$2" --worker-urls "$3"); fi' in script
    assert ('fleet-task "$((first_port + 2))" "$router_port" "$worker_csv" \\\n'
            '    megatron-vespo serve configs/qwen3_30b_a3b.yaml --run-dir runs/qwen3_30b_a3b &') in script
    assert 'curl --silent --fail --max-time 5 --output /dev/null "$url/health"' in script
    assert 'scancel --signal=TERM "$SLURM_JOB_ID+1"' in script
    assert script.rstrip().endswith('exit "$learner_status"')
    # The time-limit signal reaches the batch script, which asks the learners through the stop file.
    assert "stop_file=runs/qwen3_30b_a3b/stop_request" in script and "trap on_time_limit TERM" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "if ((1)); then" in script


def test_cpu_cluster_without_containers_or_gpus():
    cfg = SlurmConfig(gpus_per_node=0, ranks_per_node=3, env=("OMP_NUM_THREADS=1",))
    script = render_sbatch(cfg, "/c.yaml", "/runs/x")
    assert "gpu" not in "\n".join(_sbatch_lines(script)) and "--gres" not in script
    assert "--container" not in script
    assert "--nproc-per-node=3" in script
    assert "\nexport OMP_NUM_THREADS=1\n" in script
    assert not any(line.startswith(("--partition", "--account", "--qos")) for line in _sbatch_lines(script))


def test_rendered_scripts_are_valid_bash():
    for cfg in (EXAMPLE, SlurmConfig(gpus_per_node=0, ranks_per_node=1)):
        script = render_sbatch(cfg, *EXAMPLE_ARGS)
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_shipped_example_is_the_render_of_its_config():
    script = render_sbatch(EXAMPLE, *EXAMPLE_ARGS)
    if os.environ.get("MEGATRON_VESPO_REGEN_EXAMPLE"):
        EXAMPLE_PATH.write_text(script)
    assert EXAMPLE_PATH.read_text() == script, (
        f"{EXAMPLE_PATH} is stale: rerun this test with MEGATRON_VESPO_REGEN_EXAMPLE=1")


@pytest.mark.parametrize("kwargs, field", [
    ({"learner_nodes": 0}, "learner_nodes"),
    ({"rollout_nodes": 0}, "rollout_nodes"),
    ({"gpus_per_node": -1}, "gpus_per_node"),
    ({"gpus_per_node": 0}, "ranks_per_node"),
    ({"servers_per_node": 3}, "servers_per_node"),
    ({"servers_per_node": 15, "gpus_per_node": 0, "ranks_per_node": 1}, "servers_per_node"),
    ({"time_limit": "2h"}, "time_limit"),
    ({"partition": "a b"}, "partition"),
    ({"container_image": ""}, "container_image"),
    ({"extra_sbatch": ("exclusive",)}, "extra_sbatch"),
    ({"env": ("1X=2",)}, "env"),
    ({"env": ("NOVALUE",)}, "env"),
    ({"port_base": 65000}, "port_base"),
    ({"time_limit": "10", "signal_grace_s": 600}, "signal_grace_s"),
    ({"signal_grace_s": -1}, "signal_grace_s"),
    ({"signal_grace_s": 0, "requeue": True}, "requeue"),
])
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SlurmConfig(**kwargs)


def test_as_a_config_section_errors_name_the_dotted_key():
    with pytest.raises(ConfigError, match=r"^slurm: learner_nodes must be >= 1"):
        build(SlurmConfig, {"learner_nodes": 0}, "slurm")
    with pytest.raises(ConfigError, match=r"^slurm\.nodes: unknown key"):
        build(SlurmConfig, {"nodes": 2}, "slurm")


def test_submit_refuses_paths_it_cannot_see_and_mounts_the_ones_it_can(tmp_path, capsys):
    """The shipped config's /path/to/... placeholders used to be queued and fail on the nodes; the
    container could not see the run directory, model or data."""
    from megatron_vespo import cli

    config = str(REPO / "configs" / "qwen3_30b_a3b.yaml")
    run = tmp_path / "run"
    assert cli.main(["slurm", "submit", config, "--run-dir", str(run), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.init_hf_checkpoint='/path/to/Qwen3-30B-A3B' does not exist on this host" in err
    model, data = tmp_path / "models" / "qwen", tmp_path / "data"
    model.mkdir(parents=True), data.mkdir()
    for name in ("train.parquet", "eval.parquet"):
        (data / name).write_text("")
    assert cli.main(["slurm", "submit", config, "--run-dir", str(run), "--dry-run",
                     f"train.init_hf_checkpoint={model}", f"task.data.path={data / 'train.parquet'}",
                     f"task.data.eval_path={data / 'eval.parquet'}"]) == 0
    script = (run / "job.sbatch").read_text()
    mounts = re.search(r"--container-mounts='?([^ ']+)", script).group(1).split(",")
    assert mounts == ["/lustre:/lustre", f"{run}:{run}", f"{model}:{model}", f"{data}:{data}"]
    assert f"--run-dir {run} --resume" in script  # a resubmitted job continues the run


def test_dry_run_writes_the_script_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("train.yaml").write_text("{}\n")
    script_path, job_id = slurm_submit("train.yaml", SlurmConfig(), "runs/a", dry_run=True)
    assert job_id is None and script_path == tmp_path / "runs" / "a" / "job.sbatch"
    assert f"train {tmp_path}/train.yaml --run-dir {tmp_path}/runs/a" in script_path.read_text()
    with pytest.raises(ValueError, match="missing.yaml: no such file"):
        slurm_submit("missing.yaml", SlurmConfig(), "runs/b", dry_run=True)


# --- a real heterogeneous job on a local cluster ---------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three emulated nodes: two for the learners (so torchrun's node ranks are exercised), one for
    the fleet. SLURM_CONF points sbatch/scontrol at it for the module's tests."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=("node1", "node2", "node3")) as c:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(c.conf))
            yield c


TINY = SlurmConfig(learner_nodes=2, gpus_per_node=0, ranks_per_node=1, cpus_per_task=1,
                   rollout_nodes=1, servers_per_node=2, cpus_per_server=1, time_limit="5", signal_grace_s=60,
                   port_base=12100, port_slots=50, fleet_timeout_s=30,
                   env=(f"PATH={Path(sys.executable).parent}:$PATH",))


def _run_job(run: Path, server_command: tuple[str, ...]) -> tuple[str, str, str]:
    """Render TINY with the stand-ins, submit it, wait; (job id, final state, job output)."""
    run.mkdir()
    script = render_sbatch(TINY, "/unused.yaml", str(run), server_command=server_command,
                           learner_program=(str(STANDINS), "learn", str(run)))
    (run / "job.sbatch").write_text(script)
    job_id = submit(run / "job.sbatch")
    state = wait_for(job_id, timeout=60, poll=0.5)
    return job_id, state, (run / f"slurm-{job_id}.out").read_text()


def test_learners_reach_the_fleet_through_discovered_addresses(cluster, tmp_path):
    run = tmp_path / "run"
    job_id, state, log = _run_job(run, (sys.executable, str(STANDINS), "serve", "--out", str(run)))
    assert state == "COMPLETED", log
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    first_port = 12100 + int(job_id) % 50 * 16
    # torchrun: one agent per learner node, node rank = the node's index, one rendezvous.
    assert [r["env"]["GROUP_RANK"] for r in ranks] == ["0", "1"]
    assert [r["env"]["WORLD_SIZE"] for r in ranks] == ["2", "2"]
    learner_nodes = {r["env"]["SLURMD_NODENAME"] for r in ranks}
    assert len(learner_nodes) == 2
    assert {r["env"]["MASTER_PORT"] for r in ranks} == {str(first_port)}
    # The fleet: router and both servers answered, all on the one fleet node, at the job's ports.
    rank0 = ranks[0]
    assert rank0["router"]["role"] == "router" and rank0["router"]["port"] == first_port + 1
    assert rank0["router"]["worker_urls"] == rank0["worker_urls"]  # the router got the same list
    assert [w["port"] for w in rank0["workers"]] == [first_port + 2, first_port + 3]
    assert {w["host"] for w in rank0["workers"]} == {"127.0.0.1"}  # its node's address, not 0.0.0.0
    fleet_nodes = {rank0["router"]["node"]} | {w["node"] for w in rank0["workers"]}
    assert len(fleet_nodes) == 1 and not fleet_nodes & learner_nodes
    # After the learners, every server was stopped with SIGTERM (not killed).
    (fleet_node,) = fleet_nodes
    assert {p.name for p in run.glob("stopped-*")} == {f"stopped-{fleet_node}-{first_port + 2}",
                                                        f"stopped-{fleet_node}-{first_port + 3}"}


def test_a_fleet_that_dies_fails_the_job_before_the_learners_start(cluster, tmp_path):
    run = tmp_path / "run"
    _, state, log = _run_job(run, ("false",))
    assert state == "FAILED", log
    assert "the fleet step ended before" in log
    assert not list(run.glob("rank*.json"))


def test_real_job_trains_tiny_moe_and_logs_to_mlflow(cluster, tmp_path):
    """`megatron-vespo slurm submit` with the tiny CPU config: the fleet component runs a real
    SGLang server and router (`megatron-vespo serve`), the learner component `megatron-vespo train`
    attached to it; the job completes and its MLflow run holds every step."""
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    repo = Path(__file__).resolve().parent.parent
    overrides = ["slurm.gpus_per_node=0", "slurm.ranks_per_node=1", "slurm.cpus_per_task=1",
                 "slurm.learner_nodes=1", "slurm.rollout_nodes=1", "slurm.servers_per_node=1",
                 "slurm.cpus_per_server=1", "slurm.time_limit=00:15:00", "slurm.port_base=13000",
                 "slurm.port_slots=40", "slurm.fleet_timeout_s=600",
                 f"slurm.env=[PATH={Path(sys.executable).parent}:$PATH]",
                 "train.max_steps=2", "train.rollout_batch_size=16", "train.micro_batch_size=4",
                 "train.eval_interval=0", "train.save_interval=0", "task.eval_size=4",
                 "rollout.sampling.max_new_tokens=8"]
    done = subprocess.run([sys.executable, "-m", "megatron_vespo.cli", "slurm", "submit",
                           str(repo / "configs" / "tiny_moe_cpu.yaml"), "--run-dir", str(run), *overrides],
                          capture_output=True, text=True, cwd=repo, env=cluster.env, timeout=60)
    assert done.returncode == 0, done.stderr
    job_id = re.search(r"submitted job (\d+)", done.stdout).group(1)
    state = wait_for(job_id, timeout=900, poll=2)
    log = (run / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED"
    assert info.data.params["slurm.job_id"] == job_id
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "rollout/tokens_per_s"))


def _job_fields(job_id: str) -> dict:
    """Component 0's `scontrol show job` fields."""
    out = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True,
                         text=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.splitlines()[0].split() if "=" in item)


def test_a_job_cut_by_its_time_limit_checkpoints_requeues_and_continues(cluster, tmp_path):
    """A real offline trainer under a 2-minute limit: the signal 110 s before it reaches the batch
    script, the learners stop after their step with a checkpoint, the job requeues itself, and the
    requeued run resumes at the next step; every step is logged once."""
    from megatron_vespo.learner.samples import write_samples
    from megatron_vespo.tracking.jsonl import read_metrics
    from tests.test_learner import make_samples

    run = tmp_path / "run"
    run.mkdir()
    rollouts = tmp_path / "rollouts.jsonl"
    write_samples(rollouts, make_samples(n=64, vocab=64))
    # ~15 steps/s here: long enough that the first run is still training when the signal comes.
    steps = 600
    slurm = SlurmConfig(learner_nodes=1, gpus_per_node=0, ranks_per_node=1, cpus_per_task=1,
                        rollout_nodes=1, servers_per_node=1, cpus_per_server=1, time_limit="2",
                        signal_grace_s=110, requeue=True, port_base=14000, port_slots=40,
                        fleet_timeout_s=30, env=(f"PATH={Path(sys.executable).parent}:$PATH",))
    learner = ("-m", "megatron_vespo.cli", "train", "--rollouts", str(rollouts), "--run-dir", str(run),
               "--resume", str(REPO / "configs" / "tiny_moe_cpu.yaml"), "train.world_size=1",
               "train.rollout_batch_size=8", "train.staleness=2", "train.micro_batch_size=4",
               "train.epochs=100", f"train.max_steps={steps}", "train.save_interval=0",
               "train.eval_interval=0")
    script = render_sbatch(slurm, "/unused.yaml", str(run), learner_program=learner,
                           server_command=(sys.executable, str(STANDINS), "serve", "--out", str(run)))
    (run / "job.sbatch").write_text(script)
    job_id = submit(run / "job.sbatch")
    log_path = run / f"slurm-{job_id}.out"
    deadline = time.monotonic() + 300
    while _job_fields(job_id).get("Restarts", "0") == "0":
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        assert job_state(job_id) not in TERMINAL_STATES, log_path.read_text()[-3000:]
        time.sleep(1)
    # Requeued (held for the cluster's cred_expire, 10 s): give the next run the time it needs.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True,
                   capture_output=True)
    state = wait_for(job_id, timeout=600, poll=1)
    log = log_path.read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "the time limit is 110 s away: asking the learners to stop" in log
    assert "stop_request (Slurm job" in log
    assert f"requeueing job {job_id}" in log
    stopped_at = int(re.search(r"resumed at step (\d+) from", log).group(1))
    assert 1 <= stopped_at < steps, log[-4000:]
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert not (run / "stop_request").exists()
