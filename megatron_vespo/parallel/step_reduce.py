"""Reductions done once per optimizer step: the global loss denominators and the step metrics."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from ..algo.metrics import MetricSums
from ..algo.policy_losses import Denominators
from .layout import ParallelGroups
from .packing import PackedBatch


def global_denominators(micro_batches: Sequence[PackedBatch], dp_group) -> Denominators:
    """Response tokens and sequences of the whole step: this rank's micro-batches, summed over DP.

    The per-sequence response lengths are global over CP (every CP rank holds the same sequences), so
    CP ranks need no reduction and one all-reduce of two numbers over the DP group suffices.
    """
    lengths = torch.cat([mb.response_lengths for mb in micro_batches])
    totals = torch.stack([lengths.sum(), (lengths > 0).sum()]).double()
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(totals, group=dp_group)
    return Denominators(tokens=totals[0].item(), sequences=totals[1].item())


def reduce_step_metrics(metrics: MetricSums, groups: ParallelGroups) -> MetricSums:
    """Three collectives per step: sequence sums over DP, token sums and maxima over DP x CP."""

    def over(group, op):
        def reduce(x):
            if dist.get_world_size(group) > 1:
                dist.all_reduce(x, op=op, group=group)
            return x

        return reduce

    return metrics.reduce(
        sum_seq=over(groups.dp, dist.ReduceOp.SUM),
        sum_tok=over(groups.dp_cp, dist.ReduceOp.SUM),
        max_all=over(groups.dp_cp, dist.ReduceOp.MAX),
    )
