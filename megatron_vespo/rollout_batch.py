"""One rollout batch -> N optimizer steps: the part of training shared by offline files, the
synchronous loop and the fully asynchronous loop.

A rollout batch holds samples of one behaviour policy (or, asynchronously, whatever the staleness
buffer handed out for one step). It gets group-relative advantages, is split into N = staleness
mini-batches, has its old log-probs recomputed once (before any of its updates), and is consumed as
N optimizer steps, the k-th of which trains on data k versions behind the current policy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from typing import Callable, Optional, Sequence

from .algo.kernel import KernelConstants
from .algo.kernel_control import AdaptiveC2
from .config import Config
from .learner.batching import micro_batch_plan, pack_plan, sample_advantages
from .learner.learner import Learner
from .learner.samples import Sample
from .moe.replay import rank_engine_routes
from .parallel.packing import required_pad_multiple
from .parallel.step_reduce import global_denominators


def mini_batches(batch: Sequence[Sample], staleness: int) -> list[Sequence[Sample]]:
    """The `staleness` equal, consecutive mini-batches of a rollout batch; the k-th trains step k."""
    if len(batch) % staleness:
        raise ValueError(f"a rollout batch of {len(batch)} samples does not split into "
                         f"{staleness} equal mini-batches")
    mini = len(batch) // staleness
    return [batch[k * mini:(k + 1) * mini] for k in range(staleness)]


def train_rollout_batch(learner: Learner, config: Config, batch: Sequence[Sample], staleness: int,
                        after_step: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """Consume `batch` as `staleness` equal mini-batches; returns each step's metrics.

    `after_step(k, metrics)` runs after the k-th step (while the learner still holds that step's
    routing load, for heat-maps)."""
    cfg, layout, groups, algo = config.train, config.parallel, learner.groups, config.algorithm
    samples_k = mini_batches(batch, staleness)
    mini = len(samples_k[0])
    pad = required_pad_multiple(layout.cp, layout.tp, layout.sequence_parallel)
    advantages = sample_advantages(batch, algo.advantage)
    shape = dict(pad_multiple=pad, uniform_length=not learner.thd)
    plans = [micro_batch_plan([x.num_tokens for x in s], dp_rank=groups.dp_rank,
                              dp_size=groups.dp_size, micro_batch_size=cfg.micro_batch_size,
                              max_tokens=cfg.max_tokens_per_micro_batch, dp_group=groups.dp,
                              count_multiple=layout.pp if layout.vpp else 1, **shape)
             for s in samples_k]
    minis = [pack_plan(s, advantages[k * mini:(k + 1) * mini], plan, cp_size=layout.cp,
                       cp_rank=groups.cp_rank, **shape)
             for k, (s, plan) in enumerate(zip(samples_k, plans))]
    routes = [None] * staleness
    # R3 replays the engine's routes; routing metrics compare them with the old-policy forward's
    # when every sample of the rollout batch carries them.
    if algo.routing_replay == "R3" or (algo.routing_metrics and cfg.old_logprobs == "recompute"
                                       and all(s.routed_experts is not None for s in batch)):
        routes = [rank_engine_routes(s, m, plan, cp_rank=groups.cp_rank)
                  for s, m, plan in zip(samples_k, minis, plans)]
    if cfg.old_logprobs == "recompute":
        minis = [learner.recompute_old_logprobs(m, r) for m, r in zip(minis, routes)]
    reward = sum(s.reward for s in batch) / len(batch)
    out = []
    for k, micro_batches in enumerate(minis):
        metrics = learner.train_step(micro_batches, global_denominators(micro_batches, groups.dp),
                                     routes[k])
        metrics.update({"reward/mean": reward, "staleness/versions_behind": float(k)})
        adapt_kernel(learner, config, metrics)
        if after_step:
            after_step(k, metrics)
        out.append(metrics)
    return out


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
