"""One rollout batch -> N optimizer steps, for every source of samples (`trainer.py`).

A rollout batch holds samples of one behaviour policy (or, asynchronously, whatever the staleness
buffer handed out for one step). Its prompt groups stream from rank 0 to the DP ranks that train
them as they arrive (group-relative advantages, the step each sample falls in, the DP rank by
response tokens); each rank then cuts its share of every one of the N = staleness mini-batches into
micro-batches, recomputes the old log-probs once (before any of the batch's updates) and consumes
the batch as N optimizer steps, the k-th of which trains on data k versions behind the policy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Optional, Sequence

import torch

from .algo.advantages import AdvantageConfig
from .algo.kernel import KernelConstants
from .algo.kernel_control import AdaptiveC2
from .config import Config
from .learner.batching import GroupAssigner, micro_batch_plan, pack_plan, sample_advantages
from .learner.learner import Learner
from .learner.samples import RolloutBatch, Sample, columns_to_samples, samples_to_columns
from .moe.replay import attach_engine_routes
from .parallel.packing import PackedBatch, required_pad_multiple
from .parallel.step_reduce import global_denominators


class BatchTally:
    """What rank 0 keeps of a rollout batch it streams: a few sums, the ids trained in each step
    (for `samples_consumed.jsonl`) and the DP assignment (`batching.GroupAssigner`)."""

    def __init__(self, size: int, staleness: int, dp_size: int) -> None:
        if size % staleness:
            raise ValueError(f"a rollout batch of {size} samples does not split into {staleness} "
                             f"equal mini-batches")
        self.size, self.mini = size, size // staleness
        self.assigner = GroupAssigner(staleness, dp_size)
        self.sample_ids: list[list[str]] = [[] for _ in range(staleness)]
        self.count, self.reward, self.versions = 0, 0.0, 0.0

    def head(self, rollout_metrics: dict) -> dict:
        """The scalars every rank needs of the whole batch; raises if it came out incomplete."""
        if self.count != self.size:
            raise ValueError(f"the source delivered {self.count} of the rollout batch's "
                             f"{self.size} samples")
        self.assigner.check()
        return {"rollout": rollout_metrics, "reward": self.reward / self.count,
                "behaviour_version": self.versions / self.count}


def stream_groups(batch: RolloutBatch, tally: BatchTally,
                  advantage: AdvantageConfig) -> Iterator[tuple[int, dict]]:
    """Rank 0: each group of `batch` as it arrives, addressed to the DP rank that trains it, as
    the columns `parallel.transport` moves: group-relative advantages over the whole group, then
    one message per step the group falls in (a group of a file may straddle a mini-batch edge),
    to the rank `tally.assigner` picks for that step."""
    for offset, samples in batch.groups:
        if offset < 0 or offset + len(samples) > tally.size:
            raise ValueError(f"a group at offset {offset} of {len(samples)} samples lies outside "
                             f"the rollout batch of {tally.size}")
        advantages = sample_advantages(samples, advantage)
        steps = torch.arange(offset, offset + len(samples)) // tally.mini
        for k in steps.unique().tolist():
            index = (steps == k).nonzero().flatten().tolist()
            part = [samples[i] for i in index]
            tally.sample_ids[k] += [s.sample_id for s in part]
            tally.count += len(part)
            tally.reward += sum(s.reward for s in part)
            tally.versions += sum(s.policy_version for s in part)
            rank = tally.assigner.assign(k, sum(len(s.response_ids) for s in part))
            yield rank, samples_to_columns(part, advantages=advantages[index],
                                           steps=torch.full((len(part),), k, dtype=torch.int64))


@dataclass
class RankShare:
    """One DP rank's share of a rollout batch: its samples, their advantages [S] (each over its
    whole prompt group) and the step k (mini-batch) each one is trained in, [S] int64."""

    samples: list[Sample]
    advantages: torch.Tensor
    steps: torch.Tensor

    @classmethod
    def from_messages(cls, messages: Sequence[dict]) -> "RankShare":
        """The share from the column messages this rank received (samples are views of them)."""
        if not messages:
            return cls([], torch.empty(0), torch.empty(0, dtype=torch.int64))
        return cls([s for m in messages for s in columns_to_samples(m)],
                   torch.cat([m["advantages"] for m in messages]),
                   torch.cat([m["steps"] for m in messages]))


@dataclass
class PreparedBatch:
    """This rank's share of one rollout batch as it trains it: per step k, its micro-batches (old
    log-probs in place, engine routes carried when R3 or the routing metrics use them); plus the
    batch's mean reward. Everything a resumed run needs to continue inside the batch
    (`trainer.RolloutBank` persists it with the learner's per-batch routes)."""

    steps: list[list[PackedBatch]]
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
    minis = []
    # R3 replays the engine's routes; routing metrics compare them with the old-policy forward's
    # when every sample of this share carries them (the ranks agree on what they report in
    # `moe.routing_observer.RoutingObserver`).
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
        packed = pack_plan(samples, share.advantages[index], plan, cp_size=layout.cp,
                           cp_rank=groups.cp_rank, **shape)
        minis.append(attach_engine_routes(samples, packed, plan, cp_rank=groups.cp_rank)
                     if with_routes else packed)
    if cfg.old_logprobs == "recompute":
        minis = [learner.recompute_old_logprobs(m) for m in minis]
    return PreparedBatch(steps=minis, reward=reward)


def train_prepared_step(learner: Learner, config: Config, prepared: PreparedBatch, k: int) -> dict:
    """The k-th optimizer step of a prepared rollout batch (it trains on data k versions old)."""
    micro_batches = prepared.steps[k]
    metrics = learner.train_step(micro_batches, global_denominators(micro_batches, learner.groups.dp))
    metrics.update({"reward/mean": prepared.reward, "staleness/versions_behind": float(k)})
    adapt_kernel(learner, config, metrics)
    return metrics


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
