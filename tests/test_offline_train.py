"""`megatron-vespo train CONFIG --rollouts FILE`, end to end through the CLI, on spawned ranks."""

import json
from pathlib import Path

import pytest

from megatron_vespo.learner.samples import write_samples
from megatron_vespo.tracking.jsonl import read_metrics
from tests.cli_process import run_cli
from tests.test_learner import make_samples

CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny_moe_cpu.yaml")


def train(tmp_path, rollouts, *overrides, resume=False):
    return run_cli(["train", CONFIG, f"train.output_dir={tmp_path / 'run'}", "train.rollout_batch_size=8",
                    "train.staleness=2", "train.micro_batch_size=2", *overrides, "--rollouts",
                    str(rollouts)] + (["--resume"] if resume else []), tmp_path / "run")


@pytest.mark.slow
def test_train_writes_metrics_and_checkpoints_then_resumes(tmp_path):
    rollouts = tmp_path / "rollouts.jsonl"
    # 2 rollout batches of 16, 4 samples left over; 2 prompts per step feed the 2 DP ranks
    write_samples(rollouts, make_samples(n=36, vocab=64))
    first = train(tmp_path, rollouts, "train.world_size=2", "train.epochs=1",
                  "train.rollout_batch_size=16", "train.save_interval=2", "train.keep_checkpoints=1",
                  "model.router_aux_loss_coef=0.01")
    assert first.returncode == 0, first.stderr
    assert "4 trailing samples do not fill a rollout batch" in first.stderr
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # 2 rollout batches x staleness 2
    assert [r["staleness/versions_behind"] for r in rows] == [0, 1, 0, 1]
    for key in ("loss", "grad_norm", "lr", "phi/mean", "phi/ess", "is/log_w_mean", "reward/mean",
                "perf/tokens_per_s_per_rank", "moe/load_balancing_loss"):
        assert all(key in r for r in rows), key
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest.endswith("4")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")] == [latest]
    # a fresh run into the used directory
    again = train(tmp_path, rollouts, "train.world_size=2", "train.rollout_batch_size=16")
    assert again.returncode == 2 and "already holds a run" in again.stderr, again.stderr
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 4  # untouched
    second = train(tmp_path, rollouts, "train.world_size=2", "train.epochs=2",
                   "train.rollout_batch_size=16",
                   "model.router_aux_loss_coef=0.01", resume=True)
    assert second.returncode == 0, second.stderr
    assert "resumed at step 4 from" in second.stderr
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["data/epoch"] for r in rows[4:]] == [1, 1, 1, 1]


@pytest.mark.parametrize("bad, message", [
    ({"reward": None}, "field 'reward' must be a finite number"),
    ({"response_ids": [1, 999]}, "field 'response_ids' has token id 999 outside the vocabulary [0, 64)"),
])
def test_bad_rollout_file_is_one_clear_error_and_writes_nothing(tmp_path, bad, message):
    rollouts = tmp_path / "rollouts.jsonl"
    write_samples(rollouts, make_samples(n=8, vocab=64))
    lines = rollouts.read_text().splitlines()
    row = {**json.loads(lines[3]), **bad}
    if "response_ids" in bad:
        row["engine_logprobs"] = [-1.0, -1.0]
    lines[3] = json.dumps(row)
    rollouts.write_text("\n".join(lines) + "\n")
    result = train(tmp_path, rollouts)
    assert result.returncode == 2
    assert f"rollouts.jsonl:4: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def with_engine_routes(samples, layers=2, top_k=2, experts=4, seed=0):
    """Samples carrying SGLang-layout routed_experts: [prompt + response - 1][layers][top_k]."""
    import dataclasses

    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for s in samples:
        rows = len(s.prompt_ids) + len(s.response_ids) - 1
        routes = torch.rand(rows, layers, experts, generator=g).argsort(-1)[..., :top_k]
        out.append(dataclasses.replace(s, routed_experts=routes.tolist()))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["R2", "R3"])
def test_train_with_routing_replay(tmp_path, mode):
    # R3 reads its engine routes from Parquet (uint8 list columns), R2 from JSONL
    rollouts = tmp_path / ("rollouts.parquet" if mode == "R3" else "rollouts.jsonl")
    write_samples(rollouts, with_engine_routes(make_samples(n=16, vocab=64)))
    result = train(tmp_path, rollouts, f"algorithm.routing_replay={mode}", "train.world_size=1")
    assert result.returncode == 0, result.stderr
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] is not None and r["grad_norm"] is not None for r in rows)


def test_r3_without_engine_routes_is_a_clear_error(tmp_path):
    rollouts = tmp_path / "rollouts.jsonl"
    write_samples(rollouts, make_samples(n=8, vocab=64))
    result = train(tmp_path, rollouts, "algorithm.routing_replay=R3")
    assert result.returncode == 2
    assert "8 samples of " in result.stderr and "have no routed_experts" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_vespo_adaptive_steps_c2_and_resumes_it(tmp_path):
    """algorithm.kernel_control (vespo_adaptive): c2 moves by the dual step after every step, is
    saved with the checkpoint, and a resumed run continues from the saved c2."""
    rollouts = tmp_path / "rollouts.jsonl"
    write_samples(rollouts, make_samples(n=16, vocab=64))
    control = "algorithm.kernel_control={budget: 0.5, step_size: 2.0}"
    result = train(tmp_path, rollouts, control, "train.world_size=1", "train.max_steps=2")
    assert result.returncode == 0, result.stderr
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for row in rows:  # with budget 0.5 < E_Q[W], c2 = clip(c2 + 2 (E_Q[W] - 0.5)) rises
        assert row["phi/q_w_pos"] > 0.5
    expected = 3.0
    for row in rows:
        expected = min(expected + 2.0 * (row["phi/q_w_pos"] - 0.5), 10.0)
        assert row["kernel/c2_pos"] == pytest.approx(expected, rel=1e-9)
    result = train(tmp_path, rollouts, control, "train.world_size=1", resume=True)
    assert result.returncode == 0, result.stderr
    resumed = read_metrics(tmp_path / "run" / "metrics.jsonl")[len(rows):]
    assert resumed[0]["kernel/c2_pos"] == pytest.approx(
        min(expected + 2.0 * (resumed[0]["phi/q_w_pos"] - 0.5), 10.0), rel=1e-9)


@pytest.mark.slow
def test_expert_parallel_with_a_token_budget(tmp_path):
    """EP2 over the two DP ranks: every forward's all-to-all spans both, so they must run the same
    number of micro-batches although the token budget cuts their (token-balanced) shares apart."""
    rollouts = tmp_path / "rollouts.jsonl"
    write_samples(rollouts, make_samples(n=32, vocab=64))
    result = train(tmp_path, rollouts, "train.world_size=2", "parallel.ep=2",
                   "train.rollout_batch_size=16", "train.max_tokens_per_micro_batch=40", resume=True)
    assert result.returncode == 0, result.stderr
    assert "--resume: no checkpoint in" in result.stderr and "starting fresh" in result.stderr
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] is not None and r["grad_norm"] is not None for r in rows)
