"""`megatron-vespo train CONFIG` end to end on CPU: a real SGLang server, real megatron-core
learners, MLflow (a real `mlflow server` for the synchronous run, the local sqlite store otherwise).
Synchronous N with resume, fully asynchronous with the distributed weight path and R3 routing replay,
and Ctrl-C leaving a checkpoint that `--resume` continues from."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_vespo.rollout.auth import run_api_key, use_api_key
from tests.cli_process import run_cli

# server, shm_dir: pytest fixtures (a real mlflow server with its store on /dev/shm)
from tests.mlflow_server import artifacts, server, shm_dir  # noqa: F401

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((REPO / "configs" / "tiny_moe_cpu.yaml").read_text())


def _config(tmp_path: Path, **sections) -> Path:
    tree = json.loads(json.dumps(BASE))
    tree["train"].update(rollout_batch_size=16, staleness=2, micro_batch_size=4, max_steps=4,
                         eval_interval=2, save_interval=2)
    tree["task"]["eval_size"] = 4
    tree["rollout"]["sampling"]["max_new_tokens"] = 8
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _train(config: Path, run_dir: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = run_cli(["train", str(config), "--run-dir", str(run_dir), *extra], run_dir, timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _mlflow_run(run_dir: Path, uri: str | None = None):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri or f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    return client, client.get_run(run_id)


def test_sync_training_then_resume_then_eval(tmp_path, server):
    # Two evaluation sets of the held-out prompts: greedy, and 4 samples of the first 2 prompts.
    config = _config(tmp_path, train={"heatmap_interval": 2, "histogram_interval": 2},
                     tracking={"uri": server.url},
                     task={"eval_sets": [{"name": "greedy"},
                                         {"name": "sampled", "k": 4, "temperature": 1.0, "limit": 2}]})
    run_dir = tmp_path / "run"
    _train(config, run_dir)
    rows = _metrics(run_dir)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # one row per step
    # An evaluation of the weights of steps 2 and 4, each in a row of its own once it finished.
    evals = [r for r in rows if "eval/mean_avg" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["eval/greedy/prompts"] == 4 and r["eval/sampled/prompts"] == 2
        assert 0 <= r["eval/sampled/avg@4"] <= r["eval/sampled/pass@4"] <= 1
        assert r["eval/mean_avg"] == (r["eval/greedy/avg@1"] + r["eval/sampled/avg@4"]) / 2
        assert 0 <= r["eval/sampled/truncated_frac"] <= 1 and r["eval/greedy/response_tokens"] > 0
    # N = 2: the second step of each rollout batch trains on data one version old.
    assert [r["staleness/versions_behind"] for r in steps] == [0, 1, 0, 1]
    assert [r["staleness/sample_lag_mean"] for r in steps] == [0, 1, 0, 1]
    for r in steps:
        assert 0 <= r["reward/mean"] <= 1 and r["rollout/tokens_per_s"] > 0 and r["phi/mean"] > 0
    # Read back through the tracking server: params, per-step histories, artifacts.
    client, run = _mlflow_run(run_dir, server.url)
    assert run.info.status == "FINISHED"
    assert run.data.params["rollout.mode"] == "sync" and run.data.params["train.staleness"] == "2"
    assert run.data.params["algorithm.vespo.c1_pos"] == "2.0"  # the kernel constants actually used
    for key in ("loss", "phi/mean", "grad_norm", "reward/mean", "moe/drift_topk_mismatch_frac"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3, 4], key
    # counted per logged row: the steps' and the evaluations'
    history = client.get_metric_history(run.info.run_id, "tracking/nonfinite_metrics")
    assert sorted(m.step for m in history) == [1, 2, 2, 3, 4, 4]
    # MLflow keys cannot hold '@': avg@4 is logged as avg_4.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/sampled/avg_4")] == [2, 4]
    logged = artifacts(client, run.info.run_id)
    assert {"config.yaml", "plots/phi_kernel.png", "routing/step_00000002.png",
            "routing/step_00000004.png", "histograms/step_00000002.png",
            "histograms/step_00000004.png"} <= logged, logged

    _train(config, run_dir, "--resume", "train.max_steps=6")
    steps = [r for r in _metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    # The relaunched server serves the resumed weights as version 4, not SGLang's "default" (0),
    # so the first batch after the resume is not logged as 4 versions stale.
    assert [r["staleness/sample_lag_mean"] for r in steps[4:]] == [0, 1]
    client, resumed = _mlflow_run(run_dir, server.url)
    assert resumed.info.run_id == run.info.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]

    # `eval` on a megatron checkpoint: exported by the learner ranks, served by a fleet of its own,
    # the table printed, the metrics in the run's MLflow run at the checkpoint's step.
    done = run_cli(["eval", str(config), "--run-dir", str(run_dir), "--checkpoint",
                    str(run_dir / "checkpoints" / "step_00000002")], run_dir)
    assert done.returncode == 0, done.stderr[-4000:]
    table = done.stdout.splitlines()
    assert table[0].endswith("(step 2)") and table[1].split()[:3] == ["set", "k", "avg@k"]
    assert [line.split()[:2] for line in table[2:4]] == [["greedy", "1"], ["sampled", "4"]]
    assert (run_dir / "eval" / "step_00000002" / "hf" / "config.json").is_file()
    history = client.get_metric_history(run.info.run_id, "eval/sampled/pass_4")
    assert sorted(m.step for m in history) == [2, 2, 4, 6]  # training's evaluations, then the command's


def test_async_distributed_weights_with_r3(tmp_path):
    config = _config(
        tmp_path,
        train={"staleness": 1, "rollout_batch_size": 8, "world_size": 2, "save_interval": 0},
        rollout={"mode": "async", "max_staleness": 1, "weight_sync": "distributed", "record": True,
                 "fleet": {"num_servers": 1, "server": {"enable_routed_experts": True}}},
        algorithm={"routing_replay": "R3", "correct_mismatch": True})
    run_dir = tmp_path / "run"
    _train(config, run_dir)
    steps = [r for r in _metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r["staleness/lag_max"] <= 1
        assert sum(r[f"staleness/lag_hist/{k}"] for k in (0, 1)) == 2  # 2 groups of 4 per step
        assert r["staleness/sample_lag_mean"] <= 1
        assert r["mismatch/k3_kl"] >= 0  # W is taken against the engine's log-probs
    assert (run_dir / "checkpoints").is_dir()
    # rollout.record: every trained sample, engine routes included, replayable from Parquet
    from megatron_vespo.learner.sample_files import open_rollout_file

    recorded = open_rollout_file(run_dir / "rollouts", num_experts=BASE["model"]["num_experts"])
    assert len(list((run_dir / "rollouts").glob("v*.parquet"))) == 4
    assert recorded.num_samples == 32 and recorded.rows_without_routes == 0
    consumed = [i for line in (run_dir / "samples_consumed.jsonl").read_text().splitlines()
                for i in json.loads(line)["sample_ids"]]
    assert sorted(s.sample_id for s in recorded.samples(0, 32)) == sorted(consumed)


def _start(config: Path, run_dir: Path, steps: int) -> tuple[subprocess.Popen, list[str]]:
    """`train` in its own process group, returned once it has logged `steps` steps."""
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "train", str(config), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not (metrics.exists()
                                               and metrics.read_text().count("\n") >= steps):
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        time.sleep(1)
    return proc, cmd


def _kill_server(port: int) -> None:
    """SIGKILL the SGLang server on `port` and its children (its process group): a crash."""
    import psutil

    # The server's own process leads its session (children forked by sglang share its cmdline).
    (leader,) = [p for p in psutil.process_iter(["cmdline"])
                 if "megatron_vespo.rollout.sglang_main" in (p.info["cmdline"] or [])
                 and str(port) in p.info["cmdline"] and os.getsid(p.pid) == p.pid]
    os.killpg(leader.pid, signal.SIGKILL)


def _wait_listed(router: str, url: str, listed: bool, proc: subprocess.Popen) -> None:
    from megatron_vespo.rollout.router import RouterClient

    deadline = time.monotonic() + 300
    while (RouterClient(router).find(url) is not None) != listed:
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        assert time.monotonic() < deadline, f"{url} still {'not ' if listed else ''}listed"
        time.sleep(0.5)


def test_servers_killed_mid_run_come_back_and_ctrl_c_leaves_a_resumable_checkpoint(tmp_path):
    """One of two servers SIGKILLed twice mid-run: each time it is removed, restarted, given the
    current weights at the next sync and rejoined, and the run trains on with two servers. Then
    Ctrl-C: a checkpoint after the step, MLflow KILLED, and `--resume` continues the same run. Every
    sample is trained exactly once, and never from weights older than the batch's."""
    victim, router = 15110, 15100
    config = _config(tmp_path, train={"max_steps": 1000, "save_interval": 0, "eval_interval": 0},
                     rollout={"fleet": {"num_servers": 2, "base_port": victim, "router_port": router,
                                        "server": {"enable_routed_experts": True}}})
    run_dir = tmp_path / "run"
    proc, _ = _start(config, run_dir, 2)
    router_url, victim_url = f"http://127.0.0.1:{router}", f"http://127.0.0.1:{victim}"
    use_api_key(run_api_key(run_dir))  # the router answers /workers only with the run's key
    try:
        for _ in range(2):
            _kill_server(victim)
            _wait_listed(router_url, victim_url, False, proc)  # found dead, removed
            _wait_listed(router_url, victim_url, True, proc)  # restarted, synced, rejoined
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # the run, its fleet (their watchdogs), nothing left
        raise
    finally:
        use_api_key(None)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    for k in (1, 2):
        assert f"restarting rollout server {victim_url} (restart {k} of at most 3)" in err, err[-4000:]
    assert err.count(f"rollout servers ['{victim_url}'] rejoined the fleet; 2 members") == 2
    last = max(r["step"] for r in _metrics(run_dir) if "loss" in r)
    assert 2 <= last < 1000
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{last:08d}", latest
    _, run = _mlflow_run(run_dir)
    assert run.info.status == "KILLED"
    # The checkpoint is resumable: training continues at the next step in the same run.
    _train(config, run_dir, "--resume", f"train.max_steps={last + 2}")
    steps = [r for r in _metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, last + 3))
    # N = 2: every batch's first step trains on current weights, the second one version behind.
    assert [r["staleness/sample_lag_mean"] for r in steps] == [0, 1] * ((last + 2) // 2)
    consumed = [i for line in (run_dir / "samples_consumed.jsonl").read_text().splitlines()
                for i in json.loads(line)["sample_ids"]]
    assert len(consumed) == len(set(consumed)) == 8 * (last + 2)
    _, resumed = _mlflow_run(run_dir)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"


def test_kill_9_of_the_launcher_leaves_no_process_and_the_run_resumes(tmp_path):
    """The launcher SIGKILLed mid-run: its ranks (parent-death signal) stop with a checkpoint and
    the SGLang server and router they started (a watchdog per service) are gone within 30 s; a
    second trainer into the live run directory is refused by name; `--resume` takes the run over."""
    import psutil

    # No periodic checkpoints: the one found afterwards is the stop the launcher's death asked for
    # (the kernel sent SIGTERM once per thread of the dead launcher, and the second aborted the
    # rank without one).
    config, run_dir = _config(tmp_path, train={"max_steps": 200, "save_interval": 0,
                                                "eval_interval": 0}), tmp_path / "run"
    proc, cmd = _start(config, run_dir, 1)
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and f"pid {proc.pid} on " in second.stderr, second.stderr[-2000:]
    family = psutil.Process(proc.pid).children(recursive=True)
    assert len(family) >= 4, family  # the rank, the server (and its workers), the router, watchdogs
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [(p.pid, p.cmdline()[:3]) for p in alive]
    last = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    resumed = _train(config, run_dir, "--resume", f"train.max_steps={last + 1}")
    assert "is gone; taking the run over" in resumed.stderr
    assert max(r["step"] for r in _metrics(run_dir) if "loss" in r) == last + 1


def test_two_runs_with_one_seed_train_alike(tmp_path):
    """One seed, one run: the same initial model, the same samples from the seeded SGLang server
    (before and after a weight update), the same losses. Group requests go one at a time: SGLang
    draws the tokens of every request in a decode batch from one random stream, so with
    concurrent requests the samples depend on how the scheduler happened to batch them (measured:
    equal first rollout batches, a different second one on a busy machine)."""
    config = _config(tmp_path, train={"eval_interval": 0, "save_interval": 0},
                     rollout={"max_in_flight": 1})
    runs = []
    for k in range(2):
        _train(config, tmp_path / f"run{k}")
        runs.append([(r["step"], r["reward/mean"], r["loss"], r["rollout/tokens"])
                     for r in _metrics(tmp_path / f"run{k}") if "loss" in r])
    assert [s for s, *_ in runs[0]] == [1, 2, 3, 4]
    assert runs[0] == runs[1]


def test_a_fleet_that_fails_to_start_ends_the_run_with_its_error(tmp_path):
    """Rank 0 alone fails (its SGLang server exits at start-up) while rank 1 already waits for the
    first weight sync: the run ends at once with the server's error. Before, rank 0's teardown
    entered a collective (closing the weight-update groups) that rank 1 never joined, and the run
    hung without a word."""
    config = _config(tmp_path, train={"world_size": 2},
                     rollout={"weight_sync": "distributed",
                              "fleet": {"server": {"extra_args": ["--no-such-sglang-flag"]}}})
    run_dir = tmp_path / "run"
    done = run_cli(["train", str(config), "--run-dir", str(run_dir)], run_dir, timeout=240)
    assert done.returncode != 0
    assert "--no-such-sglang-flag" in done.stderr and "SGLang server" in done.stderr, done.stderr[-4000:]
