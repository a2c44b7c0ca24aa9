"""MoE routing metrics inside the train step: drift between the old-policy and the training forward,
engine vs old-policy routes, expert load; exact over data-parallel ranks; the offline heat-map."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from megatron_vespo.learner.samples import write_samples
from megatron_vespo.tracking.jsonl import read_metrics
from tests.cli_process import run_cli
from tests.distributed import run_ranks
from tests.test_learner import MOE, full_state, make_samples, micro_batches

CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny_moe_cpu.yaml")


def with_engine_routes(samples, seed=1):
    """The samples with random engine routes ([num_tokens - 1, layers, k], distinct ids per row)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in samples:
        rows = s.num_tokens - 1
        routes = torch.stack([torch.randperm(MOE.num_experts, generator=g)[:MOE.num_experts_per_tok]
                              for _ in range(rows * MOE.num_hidden_layers)])
        out.append(dataclasses.replace(
            s, routed_experts=routes.view(rows, MOE.num_hidden_layers, -1).tolist()))
    return out


def routing_learner(layout, state, replay, lr):
    from megatron.core import tensor_parallel

    from megatron_vespo.learner.learner import Learner, LossSettings, OptimConfig
    from megatron_vespo.learner.state_adapter import canonical_state
    from megatron_vespo.parallel.sharded_state import load_full_state

    groups = layout.initialize()
    torch.manual_seed(1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    learner = Learner(MOE, layout, groups, OptimConfig(lr=lr),
                      LossSettings(loss="vespo", routing_replay=replay, routing_metrics=True))
    load_full_state(learner.chunks, state, canonical_state(MOE), layout)
    learner.optimizer.reload_model_params()
    return learner


def two_steps(rank, world_size, cases, samples, state):
    """Per case (replay mode, micro-batches per rank, engine routes?): recompute the old policy,
    then two train steps on the same micro-batches; returns both steps' moe/ metrics."""
    from megatron_vespo.learner.batching import micro_batch_plan
    from megatron_vespo.moe.replay import attach_engine_routes
    from megatron_vespo.parallel.layout import ParallelLayout
    from megatron_vespo.parallel.step_reduce import global_denominators

    out = {}
    for replay, per_rank_mb, engine in cases:
        learner = routing_learner(ParallelLayout(), state, replay, lr=3e-2)
        batches = micro_batches(learner, samples, per_rank_mb)
        if engine:
            g = learner.groups
            batches = attach_engine_routes(samples, batches, micro_batch_plan(
                [s.num_tokens for s in samples], dp_rank=g.dp_rank, dp_size=g.dp_size,
                micro_batch_size=len(samples) // g.dp_size // per_rank_mb))
        batches = learner.recompute_old_logprobs(batches)
        denom = global_denominators(batches, learner.groups.dp)
        steps = [learner.train_step(batches, denom) for _ in range(2)]
        out[(replay, per_rank_mb, engine)] = [
            {k: v for k, v in s.items() if k.startswith("moe/") and not k.startswith("moe/load_bal")}
            for s in steps]
    return out


CASES = [("off", 2, True), ("R2", 2, False), ("R3", 2, True)]


@pytest.fixture(scope="module")
def single():
    samples = with_engine_routes(make_samples())
    state = full_state(MOE)
    return samples, state, run_ranks(two_steps, 1, CASES, samples, state)[0]


@pytest.mark.slow
def test_drift_is_zero_before_and_positive_after_an_update(single):
    _, _, out = single
    first, second = out[("off", 2, True)]
    assert first["moe/drift_topk_mismatch_frac"] == 0.0
    assert abs(first["moe/router_kl"]) < 1e-9
    assert second["moe/drift_topk_mismatch_frac"] > 0
    assert second["moe/router_kl"] > 0
    assert second["moe/router_kl_max"] >= second["moe/router_kl"]
    for key in ("moe/expert_load_cv", "moe/expert_load_max_violation", "moe/routing_confidence",
                "moe/router_entropy", "moe/selected_mass_abs_change", "moe/drift_overlap_mean",
                "moe/expert_load_cv/layer_1"):
        assert math.isfinite(second[key]), key
    assert 0 < second["moe/routing_confidence"] <= 1
    # random engine routes disagree with the model's
    assert second["moe/route_topk_mismatch_frac"] > 0


@pytest.mark.slow
def test_replayed_routes_show_no_drift_in_the_route_sets(single):
    _, _, out = single
    second = out[("R2", 2, False)][1]
    assert second["moe/drift_topk_mismatch_frac"] == 0.0  # captured ids are the replayed ones
    assert second["moe/router_kl"] > 0  # the router itself did move
    assert "moe/route_topk_mismatch_frac" not in second  # no engine routes given
    r3 = out[("R3", 2, True)]
    assert all(s["moe/route_topk_mismatch_frac"] == 0.0 for s in r3)  # old forward replayed them
    assert r3[1]["moe/drift_topk_mismatch_frac"] == 0.0


@pytest.mark.slow
def test_metrics_are_identical_over_data_parallel_ranks(single):
    samples, state, out = single
    ref = out[("off", 2, True)]
    per_rank = run_ranks(two_steps, 2, [("off", 1, True)], samples, state)
    for rank, res in enumerate(per_rank):
        for step, (got, want) in enumerate(zip(res[("off", 1, True)], ref), 1):
            assert set(got) == set(want)
            for key in want:
                if math.isnan(want[key]):
                    assert math.isnan(got[key]), key
                    continue
                assert math.isclose(got[key], want[key], rel_tol=1e-6, abs_tol=1e-12), (
                    f"rank {rank} step {step} {key}: {got[key]} != {want[key]}")


@pytest.mark.slow
def test_offline_training_writes_load_heatmaps(tmp_path):
    rollouts = tmp_path / "rollouts.jsonl"
    write_samples(rollouts, with_engine_routes(make_samples(n=8, vocab=64)))
    run = tmp_path / "run"
    done = run_cli(["train", CONFIG, f"train.output_dir={run}", "train.rollout_batch_size=8",
                    "train.staleness=2", "train.micro_batch_size=2", "train.world_size=1",
                    "algorithm.routing_metrics=true", "train.heatmap_interval=2", "--rollouts",
                    str(rollouts)], run)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (run / "routing").iterdir()) == ["step_00000002.png"]
    rows = read_metrics(run / "metrics.jsonl")
    assert all("moe/drift_topk_mismatch_frac" in r and "moe/route_topk_mismatch_frac" in r
               and "moe/expert_load_cv" in r for r in rows)


def test_routing_metrics_are_refused_for_dense_models_and_pipelines():
    from megatron_vespo.config import load_config

    dense = str(Path(__file__).parent.parent / "configs" / "tiny_dense_cpu.yaml")
    with pytest.raises(ValueError, match="routing_metrics"):
        load_config(dense, ["algorithm.routing_metrics=true"])
    with pytest.raises(ValueError, match="routing_metrics"):
        load_config(CONFIG, ["algorithm.routing_metrics=true", "parallel.pp=2", "train.world_size=2"])
    with pytest.raises(ValueError, match="heatmap_interval"):
        load_config(CONFIG, ["algorithm.routing_metrics=false", "train.heatmap_interval=1"])
    assert load_config(CONFIG, ["algorithm.routing_metrics=true",
                                "train.heatmap_interval=3"]).train.heatmap_interval == 3
