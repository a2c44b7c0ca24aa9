"""Checkpoints of the Megatron learner: a resumed run continues exactly where the saved one would
have, across layouts where megatron reshards; a checkpoint of another model shape is refused before
any tensor moves; a save that dies half-way is never picked up."""

from __future__ import annotations

import math
import os
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_vespo.learner.checkpoint import config_mismatches, latest_checkpoint
from megatron_vespo.learner.model import ModelConfig
from tests.test_learner import make_samples
from tests.distributed import run_ranks

MODELS = {
    "dense": ModelConfig(family="qwen3", spec="local"),
    "dense4": ModelConfig(family="qwen3", spec="local", num_hidden_layers=4),  # PP2 (x VPP2)
    "moe": ModelConfig(family="qwen3_moe", num_experts=4, num_experts_per_tok=2, spec="local"),
}
EXTRA = {"cursor": 16, "epoch": 1, "order": [3, 1, 2], "source": "prompts.jsonl"}

# name: (model, layout saved under, layout loaded under, distributed optimizer, pad multiple)
RESUME_CASES = {
    "dense_dp2": ("dense", {}, {}, False, None),
    "dense_tp2": ("dense", {"tp": 2, "sequence_parallel": True}, None, False, None),
    "moe_ep2": ("moe", {"ep": 2}, None, False, None),
    "dense_pp2": ("dense4", {"pp": 2}, None, False, None),
    "dense_pp2_vpp2": ("dense4", {"pp": 2, "vpp": 2}, None, False, None),
    "dense_dp2_distopt": ("dense", {}, None, True, None),
    # Resharding: other TP split; MoE experts from one optimizer into a dense + expert chain;
    # distributed optimizer state from EP2 into DP2.
    "dense_dp2_to_tp2": ("dense", {}, {"tp": 2}, False, None),
    "moe_dp2_to_ep2": ("moe", {}, {"ep": 2}, False, None),
    "moe_ep2_to_dp2_distopt": ("moe", {"ep": 2}, {}, True, None),
    # Two model chunks per rank (layers 0 and 2 on rank 0) back into one full model per rank.
    "dense_pp2_vpp2_to_dp2": ("dense4", {"pp": 2, "vpp": 2}, {}, False, None),
}


# -- rank bodies -----------------------------------------------------------------------------------


def _learner(model, layout_kw: dict, seed: int, distributed_optimizer: bool = False):
    """A learner of `model` (a MODELS name or a ModelConfig) seeded everywhere with `seed`."""
    from megatron.core import tensor_parallel

    from megatron_vespo.learner.learner import Learner, LossSettings, OptimConfig
    from megatron_vespo.parallel.layout import ParallelLayout

    layout = ParallelLayout(**layout_kw)
    groups = layout.initialize()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    optim = OptimConfig(lr=1e-3, lr_warmup_steps=5, use_distributed_optimizer=distributed_optimizer)
    cfg = MODELS[model] if isinstance(model, str) else model
    return Learner(cfg, layout, groups, optim, LossSettings(loss="vespo"))


def _batches(learner, samples, pad_multiple=None):
    from megatron_vespo.algo.advantages import AdvantageConfig
    from megatron_vespo.learner.batching import rank_micro_batches, sample_advantages
    from megatron_vespo.parallel.packing import required_pad_multiple
    from megatron_vespo.parallel.step_reduce import global_denominators

    layout, groups = learner.layout, learner.groups
    batches = rank_micro_batches(
        samples, sample_advantages(samples, AdvantageConfig()), dp_rank=groups.dp_rank,
        dp_size=groups.dp_size, micro_batch_size=2, uniform_length=True,
        pad_multiple=pad_multiple or required_pad_multiple(layout.cp, layout.tp,
                                                           layout.sequence_parallel))
    return batches, global_denominators(batches, groups.dp)


def _rng_draws() -> list:
    """One draw from every stream a checkpoint restores."""
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(2).tolist()
    return [random.random(), float(np.random.rand()), torch.rand(2).tolist(), tracked]


def _schedule_state(learner) -> dict:
    return {"lr": learner.optimizer.param_groups[0]["lr"], "num_steps": learner.scheduler.num_steps}


def _resume(root, samples, model, save_kw, load_kw, distributed_optimizer, pad):
    """Train 2 steps, save, train steps 3 and 4; a learner with another seed (and possibly another
    layout) loads the checkpoint and trains steps 3 and 4 on the same data."""
    from megatron_vespo.learner.checkpoint import load_checkpoint, save_checkpoint

    load_kw = save_kw if load_kw is None else load_kw
    saver = _learner(model, save_kw, seed=0, distributed_optimizer=distributed_optimizer)
    batches, denom = _batches(saver, samples, pad)
    for _ in range(2):
        saver.train_step(batches, denom)
    path = save_checkpoint(saver, root, EXTRA)
    saved = {**_schedule_state(saver), "policy_version": saver.policy_version, "rng": _rng_draws()}
    reference = [saver.train_step(batches, denom) for _ in range(2)]

    resumed = _learner(model, load_kw, seed=1234, distributed_optimizer=distributed_optimizer)
    if load_kw != save_kw:
        batches, denom = _batches(resumed, samples, pad)
    fresh_lr = resumed.optimizer.param_groups[0]["lr"]
    extra = load_checkpoint(resumed, root)
    restored = {**_schedule_state(resumed), "policy_version": resumed.policy_version,
                "rng": _rng_draws(), "fresh_lr": fresh_lr}
    continued = [resumed.train_step(batches, denom) for _ in range(2)]
    keys = ("loss", "grad_norm", "lr")
    return {"path": str(path), "saved": saved, "restored": restored, "extra": extra,
            "reference": [{k: m[k] for k in keys} for m in reference],
            "continued": [{k: m[k] for k in keys} for m in continued]}


def _parameters(learner) -> list[torch.Tensor]:
    return [p.detach().clone() for chunk in learner.chunks for p in chunk.parameters()]


def _mismatch(root):
    """Nothing to load; then a checkpoint of a wider model into a narrower one."""
    from megatron_vespo.learner.checkpoint import load_checkpoint, save_checkpoint

    saver = _learner("dense", {}, seed=0)
    nothing = load_checkpoint(saver, root)
    save_checkpoint(saver, root, {"cursor": 0})
    learner = _learner(replace(MODELS["dense"], hidden_size=32, intermediate_size=64), {}, seed=1)
    before, version = _parameters(learner), learner.policy_version
    try:
        load_checkpoint(learner, root)
        message = None
    except ValueError as e:
        message = str(e)
    untouched = all(torch.equal(a, b) for a, b in zip(before, _parameters(learner)))
    return {"nothing": nothing, "message": message, "untouched": untouched,
            "version_kept": learner.policy_version == version}


def _crash(root, samples):
    """A save that dies after megatron wrote its files, then the complete saves after it."""
    from megatron.core import dist_checkpointing

    from megatron_vespo.learner.checkpoint import LATEST, load_checkpoint, save_checkpoint

    root = Path(root)
    learner = _learner("dense", {}, seed=0)
    batches, denom = _batches(learner, samples)
    learner.train_step(batches, denom)
    save_checkpoint(learner, root, {"cursor": 1})
    learner.train_step(batches, denom)

    real_save = dist_checkpointing.save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise RuntimeError("simulated crash after the shards were written")

    dist_checkpointing.save = save_then_die
    try:
        save_checkpoint(learner, root, {"cursor": 2})
        crashed = False
    except RuntimeError:
        crashed = True
    finally:
        dist_checkpointing.save = real_save
    after_crash = {"listing": sorted(os.listdir(root)),
                   "latest": (root / LATEST).read_text().strip()}
    probe = _learner("dense", {}, seed=5)
    after_crash["extra"] = load_checkpoint(probe, root)
    after_crash["policy_version"] = probe.policy_version

    save_checkpoint(learner, root, {"cursor": 2})  # the same step again, now complete
    save_checkpoint(learner, root, {"cursor": 3})  # and once more over a complete one
    probe = _learner("dense", {}, seed=6)
    after = {"listing": sorted(os.listdir(root)), "latest": (root / LATEST).read_text().strip(),
             "extra": load_checkpoint(probe, root), "policy_version": probe.policy_version}
    return {"crashed": crashed, "after_crash": after_crash, "after": after}


def world2_body(rank, world_size, root, samples):
    root = Path(root)
    out = {name: _resume(str(root / name), samples, *case) for name, case in RESUME_CASES.items()}
    out["mismatch"] = _mismatch(str(root / "mismatch"))
    out["crash"] = _crash(str(root / "crash"), samples)
    return out


# -- tests -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    """Every two-rank scenario in one spawn (each spawn costs seconds of imports)."""
    return run_ranks(world2_body, 2, str(tmp_path_factory.mktemp("ckpt")), make_samples())


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_continues_the_run_exactly(world2, case):
    _, save_kw, load_kw, _, _ = RESUME_CASES[case]
    same_layout = load_kw is None or load_kw == save_kw
    for rank, results in enumerate(world2):
        r = results[case]
        assert Path(r["path"]).name == "step_00000002"
        assert r["extra"] == EXTRA
        assert r["restored"]["policy_version"] == r["saved"]["policy_version"] == 2
        assert r["restored"]["num_steps"] == r["saved"]["num_steps"] == 2
        assert r["restored"]["lr"] == r["saved"]["lr"] != r["restored"]["fresh_lr"]
        if same_layout:  # per-rank RNG streams come back only on the same ranks
            assert r["restored"]["rng"] == r["saved"]["rng"]
        for step, (want, got) in enumerate(zip(r["reference"], r["continued"]), 3):
            for key in ("loss", "grad_norm", "lr"):
                # Same layout: the identical computation. Other layout: megatron's layouts agree
                # to float32 reduction-order noise (as in test_learner's invariance test).
                ok = (abs(got[key] - want[key]) <= 1e-6 if same_layout else
                      math.isclose(got[key], want[key], rel_tol=2e-5, abs_tol=1e-6))
                assert ok, f"rank {rank} {case} step {step} {key}: {got[key]} != {want[key]}"


@pytest.mark.slow
def test_checkpoint_of_another_model_shape_is_refused_untouched(world2):
    for results in world2:
        r = results["mismatch"]
        assert r["nothing"] is None
        assert r["message"] is not None
        assert "step_00000000 was saved for" in r["message"]
        assert "hidden_size=64" in r["message"] and "hidden_size=32" in r["message"]
        assert "intermediate_size=128" in r["message"] and "intermediate_size=64" in r["message"]
        assert "num_hidden_layers" not in r["message"]  # only the differing fields
        assert r["untouched"] and r["version_kept"]


@pytest.mark.slow
def test_a_save_that_dies_is_never_picked_up(world2):
    for results in world2:
        r = results["crash"]
        assert r["crashed"]
        crash = r["after_crash"]
        assert crash["latest"] == "step_00000001"
        assert "step_00000002" not in crash["listing"]  # only a hidden temporary directory
        assert crash["extra"] == {"cursor": 1} and crash["policy_version"] == 1
        after = r["after"]
        assert after["latest"] == "step_00000002"
        assert after["extra"] == {"cursor": 3} and after["policy_version"] == 2
        assert after["listing"] == ["latest", "step_00000001", "step_00000002"]


def test_config_mismatches_names_architecture_fields_only():
    saved = {**MODELS["dense"].__dict__, "hidden_size": 128, "spec": "te",
             "moe_token_dispatcher": "allgather"}
    assert config_mismatches(saved, MODELS["dense"]) == [("hidden_size", 128, 64)]
    assert config_mismatches({**MODELS["dense"].__dict__}, MODELS["dense"]) == []


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "latest").write_text("step_00000007\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000007"
    (tmp_path / "latest").write_text(".tmp_step_00000008")
    with pytest.raises(ValueError, match="names no checkpoint"):
        latest_checkpoint(tmp_path)
