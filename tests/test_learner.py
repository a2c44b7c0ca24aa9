"""The Megatron learner: the whole VESPO train step is invariant to the parallel layout, and
training moves log-likelihoods in the direction of the advantages."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_vespo.learner.model import ModelConfig
from megatron_vespo.learner.samples import Sample
from tests.distributed import run_ranks

MOE = ModelConfig(family="qwen3_moe", num_experts=4, num_experts_per_tok=2, spec="local")
# The router load-balancing loss on, large enough that its gradient moves the second step.
MOE_AUX = dataclasses.replace(MOE, router_aux_loss_coef=0.1)
# megatron's allgather dispatcher under EP all-gathers equal token counts: micro-batches of
# different lengths on the two DP ranks are padded to one shape across the EP group.
MOE_ALLGATHER = dataclasses.replace(MOE_AUX, moe_token_dispatcher="allgather")
DENSE = ModelConfig(family="qwen3", spec="local")
DEEP = ModelConfig(family="qwen3", num_hidden_layers=4, spec="local")  # for PP2 x VPP2
MODELS = {"moe": MOE, "moe_aux": MOE_AUX, "moe_allgather": MOE_ALLGATHER, "dense": DENSE,
          "deep": DEEP}


def make_samples(n=16, vocab=256, seed=0) -> list[Sample]:
    """n responses to n/4 prompts; rewards 1 for half of each group; engine log-probs around -4."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(0, vocab, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g)
        response = torch.randint(0, vocab, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g)
        engine = -5.5 + torch.rand(len(response), generator=g)
        out.append(Sample(f"s{i}", i // 4, prompt.tolist(), response.tolist(), float(i % 2),
                          engine.tolist()))
    return out


def full_state(cfg: ModelConfig, seed=0) -> dict:
    """Random canonical megatron weights (norms near 1), the same for every layout."""
    from megatron_vespo.learner.state_adapter import megatron_tensor_shapes

    g = torch.Generator().manual_seed(seed)
    return {name: (1 + 0.1 * torch.randn(shape, generator=g)) if "norm" in name
            else 0.08 * torch.randn(shape, generator=g)
            for name, shape in megatron_tensor_shapes(cfg).items()}


def make_learner(cfg, layout, state, lr=1e-3, distributed_optimizer=False):
    from megatron.core import tensor_parallel

    from megatron_vespo.learner.state_adapter import canonical_state
    from megatron_vespo.parallel.sharded_state import load_full_state
    from megatron_vespo.learner.learner import Learner, LossSettings, OptimConfig

    groups = layout.initialize()
    torch.manual_seed(1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    learner = Learner(cfg, layout, groups,
                      OptimConfig(lr=lr, use_distributed_optimizer=distributed_optimizer),
                      LossSettings(loss="vespo"))
    load_full_state(learner.chunks, state, canonical_state(cfg), layout)
    learner.optimizer.reload_model_params()
    return learner


def micro_batches(learner, samples, per_rank_micro_batches):
    """This rank's share of `samples` in `per_rank_micro_batches` micro-batches of sizes differing by
    at most one (16 samples in 6: 3, 3, 3, 3, 2, 2), each padded to its own longest sequence; or,
    given as "t<N>", cut by a token budget of N packed positions per micro-batch."""
    from megatron_vespo.algo.advantages import AdvantageConfig
    from megatron_vespo.learner.batching import rank_micro_batches, sample_advantages
    from megatron_vespo.parallel.packing import required_pad_multiple

    layout, groups = learner.layout, learner.groups
    per_rank = len(samples) // groups.dp_size
    budget = None
    if isinstance(per_rank_micro_batches, str):
        budget, per_rank_micro_batches = int(per_rank_micro_batches[1:]), 1
    return rank_micro_batches(
        samples, sample_advantages(samples, AdvantageConfig()), dp_rank=groups.dp_rank,
        dp_size=groups.dp_size, micro_batch_size=-(-per_rank // per_rank_micro_batches),
        pad_multiple=required_pad_multiple(layout.cp, layout.tp, layout.sequence_parallel),
        uniform_length=True, max_tokens=budget, dp_group=groups.dp,
        count_multiple=layout.pp if layout.vpp else 1)


KEYS = ("loss", "grad_norm", "phi/mean", "is/log_w_mean", "is/log_w_max", "tokens")
AUX_KEYS = KEYS + ("moe/load_balancing_loss",)


def _keys(model_name: str) -> tuple:
    return AUX_KEYS if MODELS[model_name].router_aux_loss_coef else KEYS


def train_two_steps(rank, world_size, cases, samples, states):
    """For each (model, layout kwargs, micro-batches per rank): two VESPO steps on the same batch
    (behaviour = the engine's log-probs), returning the compared metrics of both."""
    from megatron_vespo.parallel.layout import ParallelLayout
    from megatron_vespo.parallel.step_reduce import global_denominators

    out = {}
    for model_name, layout_kw, per_rank_mb in cases:
        cfg = MODELS[model_name]
        kw = dict(layout_kw)
        distributed_optimizer = kw.pop("distributed_optimizer", False)
        learner = make_learner(cfg, ParallelLayout(**kw), states[model_name],
                               distributed_optimizer=distributed_optimizer)
        batches = micro_batches(learner, samples, per_rank_mb)
        denom = global_denominators(batches, learner.groups.dp)
        steps = [learner.train_step(batches, denom) for _ in range(2)]
        out[(model_name, tuple(sorted(layout_kw.items())), per_rank_mb)] = [
            {k: s[k] for k in _keys(model_name)} for s in steps]
    return out


# Micro-batches of one step differ in length (each is padded to its own longest sequence), and with
# 6 per rank also in rows, so VPP (one activation shape per step) pads both. With the router loss
# on, every split and layout pads differently and routes other micro-batches together. "t<N>": a
# token budget of N positions per micro-batch (ranks agree on the count, VPP rounds it to pp).
LAYOUTS = {
    1: [("moe", {}, 1), ("moe", {}, 4), ("dense", {}, 1), ("dense", {}, 4), ("moe_aux", {}, 3),
        ("moe_aux", {}, 4), ("moe_aux", {}, "t48"), ("dense", {}, "t40")],
    2: [("moe", {"tp": 2, "sequence_parallel": True}, 1), ("moe", {"ep": 2}, 2), ("moe", {"pp": 2}, 4),
        ("moe_aux", {"tp": 2, "sequence_parallel": True}, 1), ("moe_aux", {"ep": 2}, 2),
        ("moe_aux", {"pp": 2}, 3), ("moe_allgather", {"ep": 2}, 2), ("moe_aux", {"ep": 2}, "t48"),
        ("deep", {"pp": 2, "vpp": 2}, "t48"),
        ("moe", {}, 2), ("moe", {"distributed_optimizer": True}, 1),
        ("dense", {"tp": 2, "sequence_parallel": True}, 2), ("dense", {"pp": 2}, 1),
        ("dense", {}, 1), ("deep", {"pp": 2, "vpp": 2}, 2), ("deep", {"pp": 2, "vpp": 2}, 4),
        ("deep", {"pp": 2, "vpp": 2}, 6)],
    4: [("moe", {"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True}, 1), ("dense", {"tp": 2, "pp": 2}, 2),
        ("moe_aux", {"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True}, 2),
        ("moe_aux", {"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True}, "t64"),
        ("deep", {"pp": 2}, 4), ("deep", {"pp": 2, "vpp": 2}, 4),
        ("deep", {"tp": 2, "pp": 2, "vpp": 2, "sequence_parallel": True}, 2),
        ("deep", {"tp": 2, "pp": 2, "vpp": 2, "sequence_parallel": True}, 6)],
}


@pytest.fixture(scope="module")
def reference():
    samples = make_samples()
    states = {name: full_state(cfg) for name, cfg in MODELS.items()}
    ref = run_ranks(train_two_steps, 1, [(name, {}, 1) for name in MODELS], samples, states)[0]
    return samples, states, {name: ref[(name, (), 1)] for name in MODELS}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_train_step_is_invariant_to_the_parallel_layout(world_size, reference):
    samples, states, ref = reference
    per_rank = run_ranks(train_two_steps, world_size, LAYOUTS[world_size], samples, states)
    for rank, results in enumerate(per_rank):
        for (model, layout, mb), steps in results.items():
            for step, (got, want) in enumerate(zip(steps, ref[model]), 1):
                for key in _keys(model):
                    assert math.isclose(got[key], want[key], rel_tol=2e-5, abs_tol=1e-6), (
                        f"rank {rank} {model} {dict(layout)} micro-batches/rank={mb} step {step} "
                        f"{key}: {got[key]} != {want[key]}")
    assert ref["moe"][0]["loss"] != ref["moe"][1]["loss"]  # the first step changed the policy
    # the router loss is on, near 1 (balanced routing), and its gradient changed the update
    assert 0.9 < ref["moe_aux"][0]["moe/load_balancing_loss"] < 2
    assert ref["moe_aux"][1]["grad_norm"] != ref["moe"][1]["grad_norm"]


def recomputed_old_logprobs(rank, world_size, layout_kw, per_rank_mb, samples, state):
    """The old-policy log-probs of the response tokens, in sample order, that
    `recompute_old_logprobs` gives on the last pipeline stage (None on the others, which get the
    batches back unchanged)."""
    from megatron.core import parallel_state as ps

    from megatron_vespo.parallel.layout import ParallelLayout

    learner = make_learner(DEEP, ParallelLayout(**layout_kw), state)
    fresh = learner.recompute_old_logprobs(micro_batches(learner, samples, per_rank_mb))
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat([b.old_logp[b.loss_mask] for b in fresh])


@pytest.mark.slow
def test_old_logprob_recompute_under_vpp_matches_one_rank():
    samples, state = make_samples(), full_state(DEEP)
    want = run_ranks(recomputed_old_logprobs, 1, {}, 1, samples, state)[0]
    got = [g for g in run_ranks(recomputed_old_logprobs, 2, {"pp": 2, "vpp": 2}, 6, samples, state)
           if g is not None]
    assert len(got) == 1 and got[0].shape == want.shape == (104,) and bool((want < 0).all())
    torch.testing.assert_close(got[0], want, rtol=2e-5, atol=1e-6)


def test_vpp_refuses_micro_batch_counts_the_interleaved_schedule_cannot_run():
    from megatron_vespo.learner.learner import check_interleaved_microbatches

    for ok in (2, 4, 6):
        check_interleaved_microbatches(ok, pp=2, group=2)
    check_interleaved_microbatches(5, pp=2, group=3)  # groups of 3, 2: the last one still >= pp
    for bad, group in ((1, 2), (3, 2), (4, 3), (5, 4)):
        message = (rf"parallel\.vpp: a micro-batch count per rank and step of {bad} "
                   rf".*microbatch_group_size_per_vp_stage={group} .*train\.micro_batch_size")
        with pytest.raises(ValueError, match=message):
            check_interleaved_microbatches(bad, pp=2, group=group)


def test_vpp_settings_the_learner_refuses():
    from megatron_vespo.learner.learner import LossSettings, check_learner_settings
    from megatron_vespo.parallel.layout import ParallelLayout

    vpp = ParallelLayout(pp=2, vpp=2)
    check_learner_settings(DEEP, vpp, LossSettings())
    with pytest.raises(ValueError, match=r"model\.num_hidden_layers \(2\) must be divisible by "
                                         r"parallel\.pp \* parallel\.vpp \(4\)"):
        check_learner_settings(DENSE, vpp, LossSettings())
    moe = ModelConfig(family="qwen3_moe", num_experts=4, num_hidden_layers=4, spec="local")
    with pytest.raises(ValueError, match=r"routing_replay='R2' is not supported with parallel\.vpp"):
        check_learner_settings(moe, vpp, LossSettings(routing_replay="R2"))


def likelihood_shift(rank, world_size, samples, state, steps):
    """Per-sequence log-likelihood before and after `steps` VESPO updates on one recorded batch."""
    from megatron_vespo.parallel.layout import ParallelLayout
    from megatron_vespo.parallel.step_reduce import global_denominators

    learner = make_learner(MOE, ParallelLayout(), state, lr=3e-3)
    batches = micro_batches(learner, samples, 2)

    def loglik():
        fresh = learner.recompute_old_logprobs(batches)
        return torch.cat([torch.zeros(b.num_seqs).index_add_(0, b.seq_index, b.old_logp) for b in fresh])

    before = loglik()
    batches = learner.recompute_old_logprobs(batches)
    denom = global_denominators(batches, learner.groups.dp)
    for _ in range(steps):
        learner.train_step(batches, denom)
    advantages = torch.cat([b.advantages for b in batches])
    return before, loglik(), advantages


@pytest.mark.slow
def test_offline_vespo_moves_loglik_with_the_advantage():
    samples = make_samples()
    before, after, adv = run_ranks(likelihood_shift, 1, samples, full_state(MOE), 4)[0]
    delta = after - before
    assert delta[adv > 0].min() > 0, delta
    assert delta[adv < 0].max() < 0, delta


def te_matches_local(rank, world_size, samples, state):
    """The same VESPO step through the TransformerEngine spec (packed THD) and the local spec (BSHD)."""
    import dataclasses

    from megatron_vespo.parallel.layout import ParallelLayout
    from megatron_vespo.parallel.step_reduce import global_denominators

    out = {}
    for spec in ("local", "te"):
        cfg = dataclasses.replace(MOE, spec=spec)
        learner = make_learner(cfg, ParallelLayout(), state)
        batches = micro_batches(learner, samples, 2)
        if learner.thd:  # repack without uniform padding: THD packs sequences end to end
            from megatron_vespo.algo.advantages import AdvantageConfig
            from megatron_vespo.learner.batching import rank_micro_batches, sample_advantages

            batches = rank_micro_batches(samples, sample_advantages(samples, AdvantageConfig()),
                                         dp_rank=0, dp_size=1, micro_batch_size=len(samples) // 2,
                                         pad_multiple=1, uniform_length=False)
        out[spec] = learner.train_step(batches, global_denominators(batches, learner.groups.dp))
    return out


@pytest.mark.gpu
@pytest.mark.slow
def test_transformer_engine_thd_step_matches_the_local_spec():
    from tests.conftest import needs_transformer_engine

    needs_transformer_engine()
    out = run_ranks(te_matches_local, 1, make_samples(), full_state(MOE))[0]
    for key in ("loss", "grad_norm", "phi/mean"):
        assert math.isclose(out["te"][key], out["local"][key], rel_tol=1e-3), key
