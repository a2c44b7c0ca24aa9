"""The staleness study (benchmarks/staleness) runs end to end on a handful of steps, and its RL
loop has the product's staleness schedule: step k of a rollout batch is k versions stale."""

from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
