"""Per-sequence importance statistics under context parallelism: one all-reduce of scalars.

phi(W) needs the whole sequence's log W but is a detached coefficient, so no token has to move:
each CP rank sums its own tokens' log-ratios per sequence, one non-differentiable all-reduce of the
[S, 3] partial sums over the CP group makes the statistics identical on every CP rank, and each rank
then applies the loss to its local tokens only. Cost: 3 scalars per sequence instead of gathering
O(T) log-probs per sequence.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor

from ..algo.importance import LocalSequenceSums, SequenceStats, local_sequence_sums


def sequence_stats(
    logp: Tensor,
    behaviour_logp: Tensor,
    mask: Tensor,
    seq_lengths: Tensor,
    cp_group: Optional[dist.ProcessGroup] = None,
) -> tuple[SequenceStats, LocalSequenceSums]:
    """Sequence log-weights, lengths and non-finite counts over all CP ranks' tokens, and this
    rank's own per-sequence log pi sums.

    Args:
        logp, behaviour_logp, mask: [T_local] this rank's tokens (see
            `importance.local_sequence_sums`).
        seq_lengths: [S] this rank's positions per sequence; S is the same on every CP rank (every
            rank holds a slice of every sequence).
        cp_group: the context-parallel group, or None when unsharded.
    """
    sums, local = local_sequence_sums(logp, behaviour_logp, mask, seq_lengths)
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        dist.all_reduce(sums, group=cp_group)
    return SequenceStats.from_sums(sums), local
