"""The staleness study (benchmarks/staleness) runs end to end on a handful of steps, and its RL
loop has the product's staleness schedule: step k of a rollout batch is k versions stale."""

from __future__ import annotations

import csv
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.staleness import run  # noqa: E402
from benchmarks.staleness.task import CipherTask  # noqa: E402
from benchmarks.staleness.trainer import ADAPTIVE, StudyConfig, train_cell, warm_up  # noqa: E402


@pytest.fixture(scope="module")
def warm():
    torch.set_num_threads(1)
    task = CipherTask()
    cfg = replace(StudyConfig(), steps=8, eval_every=4, eval_size=64, prompts_per_step=8,
                  group_size=8)
    policy, _, _ = warm_up(task, cfg, seed=0, log=lambda _: None)
    return task, cfg, policy


def test_step_k_of_a_rollout_batch_is_k_versions_stale(warm):
    task, cfg, policy = warm
    rows = [r for r in train_cell(task, cfg, policy, ADAPTIVE, 4, seed=0) if "staleness" in r]
    assert [r["staleness"] for r in rows] == [0, 1, 2, 3] * 2
    for r in rows:
        if r["staleness"] == 0:  # behaviour log-probs recorded at sampling are the trainer's own
            assert r["is/log_w_max"] == pytest.approx(0.0, abs=1e-5)
            assert r["phi/mean"] == pytest.approx(1.0, abs=1e-4)
    assert any(r["is/log_w_std"] > 0 for r in rows if r["staleness"] > 0)  # the policy moved
    assert all(0.5 <= r["c2_pos"] <= 10.0 and 0.5 <= r["c2_neg"] <= 10.0 for r in rows)


def test_same_prompts_and_steps_for_every_n(warm):
    task, cfg, policy = warm
    one = train_cell(task, cfg, policy, "grpo", 1, seed=0)
    eight = train_cell(task, cfg, policy, "grpo", 8, seed=0)
    assert [r["step"] for r in one] == [r["step"] for r in eight]
    assert one[0]["acc"] == eight[0]["acc"]  # both start from the warm-up policy
    assert sum(r["is/num_seqs"] for r in one if "staleness" in r) == sum(
        r["is/num_seqs"] for r in eight if "staleness" in r)  # same number of samples trained on


def test_run_writes_tables_plots_and_mlflow(tmp_path, capsys):
    code = run.main(["--quick", "--losses", "vespo,vespo_adaptive", "--ns", "1,4", "--steps", "8",
                     "--eval-every", "4", "--prompts-per-step", "4", "--group-size", "4",
                     "--out", str(tmp_path)])
    assert code == 0
    results = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {(r["method"], r["N"]) for r in results} == {
        ("vespo", "1"), ("vespo", "4"), ("vespo_adaptive", "1"), ("vespo_adaptive", "4")}
    steps = list(csv.DictReader((tmp_path / "steps.csv").open()))
    for column in ("method", "staleness", "acc", "loss", "phi/mean", "phi/ess", "is/log_w_std",
                   "is/w_ess", "c2_pos", "c2_neg", "eq_w_pos"):
        assert column in steps[0], column
    assert (tmp_path / "curves_N1.png").stat().st_size > 0
    assert (tmp_path / "curves_N4.png").stat().st_size > 0
    assert (tmp_path / "mlflow.db").exists()
    out = capsys.readouterr().out
    assert "final acc" in out and "vespo_adaptive" in out


def test_every_cell_of_the_full_product_study_is_a_valid_run_config(tmp_path):
    from benchmarks.staleness import product
    from megatron_vespo.config import load_config

    args = product.parse_args(["--out", str(tmp_path)])
    cells = product.study_cells(args)
    assert len(cells) == 3 * (4 * 2 + 2)  # seeds x (losses x N + R3 cells)
    assert {c.method for c in cells if c.r3} == {"vespo+R3", "grpo+R3"}
    assert all(c.n == 16 for c in cells if c.r3)
    for cell in cells:
        config = load_config(product.BASE_CONFIG, product.cell_overrides(
            args, cell, tmp_path / "warmup", "http://127.0.0.1:1", tmp_path))
        assert config.algorithm.loss == cell.loss
        assert config.algorithm.routing_replay == ("R3" if cell.r3 else "off")
        assert config.algorithm.correct_mismatch  # W against the engine: staleness and mismatch
        # every cell trains the same samples: N mini-batches per rollout batch, max_steps in all
        assert config.train.mini_batch_size == 32 and config.train.max_steps == 64
        assert config.train.rollout_batch_size == 32 * cell.n


def test_product_study_runs_the_product_loop_and_writes_its_artefacts(tmp_path):
    """The quick product study on a handful of steps: a bf16 SGLang server shared by four
    `megatron-vespo train` runs; the tables, curves, MLflow runs and the measured mismatch appear."""
    import mlflow

    out = tmp_path / "study"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "staleness" / "product.py"), "--quick",
         "--steps", "2", "--ns", "1,2", "--eval-every", "1", "--eval-prompts", "8",
         "--warmup-steps", "2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = list(csv.DictReader((out / "results.csv").open()))
    assert {(r["method"], r["N"]) for r in results} == {
        ("vespo", "1"), ("vespo", "2"), ("grpo", "1"), ("grpo", "2")}
    for r in results:
        assert 0 <= float(r["final_reward"]) <= 1 and int(r["steps"]) == 2
        assert float(r["k3_kl"]) > 0  # the bf16 engine and the fp32 learner disagree: real mismatch
        assert 0 <= float(r["route_topk_mismatch"]) <= 1
    steps = list(csv.DictReader((out / "steps.csv").open()))
    for column in ("acc", "reward/mean", "is/log_w_std", "mismatch/k3_kl",
                   "moe/route_topk_mismatch_frac"):
        assert column in steps[0], column
    for n in (1, 2):
        assert (out / f"curves_N{n}.png").stat().st_size > 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("staleness-product").experiment_id])
    names = {run.info.run_name: run for run in runs}
    assert set(names) == {"vespo_N1_s0", "vespo_N2_s0", "grpo_N1_s0", "grpo_N2_s0", "summary"}
    assert "eval/sampled/reward" in names["vespo_N2_s0"].data.metrics
    summary = {f.path for f in client.list_artifacts(names["summary"].info.run_id)}
    assert {"results.csv", "steps.csv", "curves_N1.png", "curves_N2.png"} <= summary
    assert "final reward" in done.stdout and "route mismatch" in done.stdout
