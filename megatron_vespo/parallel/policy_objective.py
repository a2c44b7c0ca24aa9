"""The policy objective on one rank's shard of a micro-batch: from per-token log pi to the loss.

This is the whole path of a sample's tokens through the loss: choose the ratio's denominator (old
policy or engine), one fused pass for the per-sequence sums, one CP all-reduce of their scalars, then the
registered policy loss on local tokens, plus the mismatch metrics when engine log-probs are present.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist
from torch import Tensor

from ..algo.importance import behaviour_logprobs
from ..algo.metrics import mismatch_metrics
from ..algo.policy_losses import Denominators, PolicyLoss, PolicyLossInput, PolicyLossOutput
from .packing import PackedBatch
from .sequence_reduce import sequence_stats


def shard_policy_loss(
    logp: Tensor,
    batch: PackedBatch,
    denom: Denominators,
    policy_loss: PolicyLoss,
    params: Optional[Any] = None,
    *,
    cp_group: Optional[dist.ProcessGroup] = None,
    correct_mismatch: bool = False,
    mismatch_threshold: float = 1.0,
) -> PolicyLossOutput:
    """Loss share and metric sums of this rank's tokens.

    Args:
        logp: [T_local] log pi of each position's target (with grad), from `vocab_parallel_logprobs`.
        batch: this rank's CP shard of the packed micro-batch (`cp_shard`), or the whole batch.
    """
    behaviour = behaviour_logprobs(batch.old_logp, batch.engine_logp, correct_mismatch)
    seq, local = sequence_stats(logp, behaviour, batch.loss_mask, batch.local_seq_lengths, cp_group)
    out = policy_loss(
        PolicyLossInput(
            logp=logp,
            behaviour_logp=behaviour,
            mask=batch.loss_mask,
            seq_index=batch.seq_index,
            advantages=batch.advantages,
            seq=seq,
            local=local,
            denom=denom,
        ),
        params,
    )
    if batch.engine_logp is None:
        return out
    mismatch = mismatch_metrics(batch.old_logp, batch.engine_logp, batch.loss_mask, mismatch_threshold)
    return PolicyLossOutput(out.loss, out.metrics.merge(mismatch), out.seq_coef)
