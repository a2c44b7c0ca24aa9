"""Undo megatron-core's own loss scaling, so gradients are those of the globally normalised loss.

Our per-micro-batch loss is already this rank's share of the global loss (global denominators), so
the gradient we want is the plain sum over micro-batches and DP x CP ranks. megatron-core 0.16 instead
  * with `calculate_per_token_loss=False` and a 2-tuple from the loss function, multiplies the loss by
    cp_size / num_microbatches (schedules.forward_step_calc_loss) and averages gradients over DP x CP
    (DistributedDataParallel's gradient_scaling_factor = 1 / (dp * cp)): net 1 / (M * dp);
  * with `calculate_per_token_loss=True` and a 3-tuple (loss, num_tokens, logs), leaves the loss alone,
    sums gradients, and divides them by num_tokens summed over micro-batches and DP x CP
    (finalize_model_grads).
This module returns what the loss function must hand to the schedule in either mode, and the factor
by which any other loss share attached inside the model (the MoE router loss) must be scaled.
"""

from __future__ import annotations

from torch import Tensor

from ..algo.policy_losses import Denominators


def schedule_loss_output(
    loss: Tensor,
    logs: dict,
    *,
    num_microbatches: int,
    dp_size: int,
    calculate_per_token_loss: bool,
    denom: Denominators,
    local_tokens: Tensor,
) -> tuple:
    """The tuple a megatron `loss_func` returns for this rank's share `loss` of the global loss.

    Args:
        num_microbatches: M of the schedule call. dp_size: data-parallel size without CP.
        local_tokens: this micro-batch's response tokens on this rank (int tensor); only read when
            calculate_per_token_loss is on, where megatron divides by their global sum, which equals
            denom.tokens by construction.
    """
    factor = loss_scale_factor(num_microbatches=num_microbatches, dp_size=dp_size,
                               calculate_per_token_loss=calculate_per_token_loss, denom=denom)
    if calculate_per_token_loss:
        return loss * factor, local_tokens.int(), logs
    return loss * factor, logs


def loss_scale_factor(*, num_microbatches: int, dp_size: int, calculate_per_token_loss: bool,
                      denom: Denominators) -> float:
    """What a rank's share of the global loss is multiplied by before megatron scales it: M * dp
    (megatron applies cp / M, then DDP averages over dp * cp), or the step's response tokens with
    `calculate_per_token_loss` (megatron divides the summed gradients by them). The same for the
    loss the schedule sees and for a loss attached with `MoEAuxLossAutoScaler`, whose backward
    seed megatron sets to cp / M (or 1 per token) the same way."""
    return float(denom.tokens) if calculate_per_token_loss else float(num_microbatches * dp_size)
