"""One rollout batch -> N optimizer steps, for every source of samples (`trainer.py`).

A rollout batch holds samples of one behaviour policy (or, asynchronously, whatever the staleness
buffer handed out for one step). It gets group-relative advantages, is split into N = staleness
mini-batches, has its old log-probs recomputed once (before any of its updates), and is consumed as
N optimizer steps, the k-th of which trains on data k versions behind the current policy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence

import torch

from .algo.advantages import AdvantageConfig
from .algo.kernel import KernelConstants
from .algo.kernel_control import AdaptiveC2
from .config import Config
from .learner.batching import assign_groups, micro_batch_plan, pack_plan, sample_advantages
from .learner.learner import Learner
from .learner.samples import Sample
from .moe.replay import rank_engine_routes
from .parallel.packing import PackedBatch, required_pad_multiple
from .parallel.step_reduce import global_denominators


def mini_batches(batch: Sequence[Sample], staleness: int) -> list[Sequence[Sample]]:
    """The `staleness` equal, consecutive mini-batches of a rollout batch; the k-th trains step k."""
    if len(batch) % staleness:
        raise ValueError(f"a rollout batch of {len(batch)} samples does not split into "
                         f"{staleness} equal mini-batches")
    mini = len(batch) // staleness
    return [batch[k * mini:(k + 1) * mini] for k in range(staleness)]


@dataclass
class RankShare:
    """One DP rank's share of a rollout batch: its samples, their advantages [S] (computed over
    the whole batch's groups) and the step k (mini-batch) each one is trained in, [S] int64."""

    samples: list[Sample]
    advantages: torch.Tensor
    steps: torch.Tensor


def share_rollout_batch(batch: Sequence[Sample], staleness: int, dp_size: int,
                        advantage: AdvantageConfig) -> list[RankShare]:
    """The rollout batch's N = `staleness` mini-batches split over `dp_size` DP ranks: group
    advantages over the batch, then per mini-batch whole groups balanced by response tokens
    (`batching.assign_groups`)."""
    advantages = sample_advantages(batch, advantage)
    per_rank: list[list[tuple[int, int]]] = [[] for _ in range(dp_size)]
    for k, mini in enumerate(mini_batches(range(len(batch)), staleness)):
        parts = assign_groups([len(batch[i].response_ids) for i in mini],
                              [batch[i].group_id for i in mini], dp_size)
        for d, part in enumerate(parts):
            per_rank[d] += [(k, mini[j]) for j in part]
    return [RankShare([batch[i] for _, i in pairs], advantages[[i for _, i in pairs]],
                      torch.tensor([k for k, _ in pairs], dtype=torch.int64))
            for pairs in per_rank]


@dataclass
class PreparedBatch:
    """This rank's share of one rollout batch as it trains it: per step k, its micro-batches (old
    log-probs in place) and the engine routes (R3 / routing metrics) or None; plus the batch's
    mean reward. Everything a resumed run needs to continue inside the batch (`trainer.RolloutBank`
    persists it with the learner's per-batch routes)."""

    steps: list[list[PackedBatch]]
    routes: list[Optional[list]]
    reward: float

    @property
    def num_steps(self) -> int:
        return len(self.steps)


def prepare_rollout_batch(learner: Learner, config: Config, share: RankShare, staleness: int,
                          reward: float) -> PreparedBatch:
    """This rank's share cut into micro-batches per step, and the old log-probs recomputed once,
    before any of the batch's updates. `reward`: the whole batch's mean."""
    cfg, layout, groups, algo = config.train, config.parallel, learner.groups, config.algorithm
    pad = required_pad_multiple(layout.cp, layout.tp, layout.sequence_parallel)
    shape = dict(pad_multiple=pad, uniform_length=not learner.thd)
    minis, routes = [], []
    # R3 replays the engine's routes; routing metrics compare them with the old-policy forward's
    # when every sample of this share carries them (the ranks agree on what they report in
    # `Learner._routing_sums`).
    with_routes = algo.routing_replay == "R3" or (
        algo.routing_metrics and cfg.old_logprobs == "recompute"
        and all(s.routed_experts is not None for s in share.samples))
    for k in range(staleness):
        index = (share.steps == k).nonzero().flatten().tolist()
        samples = [share.samples[i] for i in index]
        # The DP ranks agree on the micro-batch count (over groups.dp); each cuts its own share.
        plan = micro_batch_plan([s.num_tokens for s in samples], dp_rank=0, dp_size=1,
                                micro_batch_size=cfg.micro_batch_size,
                                max_tokens=cfg.max_tokens_per_micro_batch, dp_group=groups.dp,
                                count_multiple=layout.pp if layout.vpp else 1, **shape)
        minis.append(pack_plan(samples, share.advantages[index], plan, cp_size=layout.cp,
                               cp_rank=groups.cp_rank, **shape))
        routes.append(rank_engine_routes(samples, minis[-1], plan, cp_rank=groups.cp_rank)
                      if with_routes else None)
    if cfg.old_logprobs == "recompute":
        minis = [learner.recompute_old_logprobs(m, r) for m, r in zip(minis, routes)]
    return PreparedBatch(steps=minis, routes=routes, reward=reward)


def train_prepared_step(learner: Learner, config: Config, prepared: PreparedBatch, k: int) -> dict:
    """The k-th optimizer step of a prepared rollout batch (it trains on data k versions old)."""
    micro_batches = prepared.steps[k]
    metrics = learner.train_step(micro_batches, global_denominators(micro_batches, learner.groups.dp),
                                 prepared.routes[k])
    metrics.update({"reward/mean": prepared.reward, "staleness/versions_behind": float(k)})
    adapt_kernel(learner, config, metrics)
    return metrics


def train_rollout_batch(learner: Learner, config: Config, batch: Sequence[Sample],
                        staleness: int) -> list[dict]:
    """Every rank holding all of `batch`: take this rank's share, prepare it and consume it as
    `staleness` steps; returns each step's metrics."""
    share = share_rollout_batch(batch, staleness, learner.groups.dp_size,
                                config.algorithm.advantage)[learner.groups.dp_rank]
    prepared = prepare_rollout_batch(learner, config, share, staleness,
                                     sum(s.reward for s in batch) / len(batch))
    return [train_prepared_step(learner, config, prepared, k) for k in range(prepared.num_steps)]


def adapt_kernel(learner: Learner, config: Config, metrics: dict) -> None:
    """vespo with `algorithm.kernel_control` (vespo_adaptive): one projected dual step on c2 per
    advantage sign from this step's E_Q[W] (`phi/q_w_{pos,neg}`, identical on every rank), so the
    next step's kernel pulls E_Q[W] toward the budget C the variance bound assumes. Logs the c2 the
    next step uses as `kernel/c2_{pos,neg}`."""
    control = config.algorithm.kernel_control
    if control is None:
        return
    nan = math.nan
    state = AdaptiveC2(learner.loss.params).update(control, metrics.get("phi/q_w_pos", nan),
                                                   metrics.get("phi/q_w_neg", nan))
    learner.loss = replace(learner.loss, params=state.constants)
    metrics["kernel/c2_pos"] = state.constants.c2_pos
    metrics["kernel/c2_neg"] = state.constants.c2_neg


def kernel_state(learner: Learner) -> Optional[dict]:
    """The kernel constants in use (adapted ones included), for a checkpoint's extra state."""
    params = learner.loss.params
    return asdict(params) if isinstance(params, KernelConstants) else None


def restore_kernel(learner: Learner, state: Optional[dict]) -> None:
    """Put a checkpoint's kernel constants back (a resumed vespo_adaptive run continues its c2)."""
    if state is not None and isinstance(learner.loss.params, KernelConstants):
        learner.loss = replace(learner.loss, params=KernelConstants(**state))
