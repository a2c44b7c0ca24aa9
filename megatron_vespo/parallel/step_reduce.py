"""Reductions done once per optimizer step: the global loss denominators and the step metrics."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..algo.metrics import MetricSums
from ..algo.policy_losses import Denominators
from .layout import ParallelGroups
from .packing import PackedBatch


def global_denominators(micro_batches: Sequence[PackedBatch], dp_group) -> Denominators:
    """Response tokens, sequences and real tokens of the whole step: this rank's micro-batches,
    summed over DP.

    The per-sequence lengths are global over CP (every CP rank holds the same sequences), so CP
    ranks need no reduction and one all-reduce of three numbers over the DP group suffices.
    """
    lengths = torch.cat([mb.response_lengths for mb in micro_batches])
    real = sum(int(mb.cu_seqlens[-1]) for mb in micro_batches)
    totals = torch.tensor([float(lengths.sum()), float((lengths > 0).sum()), float(real)],
                          dtype=torch.float64)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(totals, group=dp_group)
    tokens, sequences, input_tokens = totals.tolist()
    return Denominators(tokens=tokens, sequences=sequences, input_tokens=input_tokens)


def all_reduce_over(groups: Sequence[dist.ProcessGroup], op) -> Callable[[Tensor], Tensor]:
    """A reducer that all-reduces a tensor in place over each group in turn (skipping groups of
    one rank) and returns it; over disjoint groups this is the reduction over their product."""

    def reduce(x: Tensor) -> Tensor:
        for group in groups:
            if dist.get_world_size(group) > 1:
                dist.all_reduce(x, op=op, group=group)
        return x

    return reduce


def reduce_step_metrics(metrics: MetricSums, groups: ParallelGroups) -> MetricSums:
    """Three collectives per step: sequence sums over DP, token sums and maxima over DP x CP."""
    return metrics.reduce(
        sum_seq=all_reduce_over([groups.dp], dist.ReduceOp.SUM),
        sum_tok=all_reduce_over([groups.dp_cp], dist.ReduceOp.SUM),
        max_all=all_reduce_over([groups.dp_cp], dist.ReduceOp.MAX),
    )
