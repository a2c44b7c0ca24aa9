"""Group-relative advantages: each response is scored against the other responses to its prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AdvantageConfig:
    """Group-relative advantages: R - mean(group), divided by the group std if `scale_by_std`."""

    scale_by_std: bool = False
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"advantage eps must be > 0, got {self.eps}")


def group_relative_advantages(
    rewards: Tensor, group_index: Tensor, *, scale_by_std: bool = False, eps: float = 1e-6
) -> Tensor:
    """A_i = R_i - mean(R of i's group), optionally divided by the group's std (unbiased) + eps.

    Args:
        rewards: [B] float. group_index: [B] int64 prompt id of each response, in [0, G).
    Returns:
        [B] float32 advantages. A group of one response gets 0; with `scale_by_std` a group whose
        rewards are all equal gets 0 (its std is 0, so only eps remains in the divisor).
    """
    if rewards.shape != group_index.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_index {tuple(group_index.shape)} must be equal 1-D"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    if rewards.numel() == 0:
        return rewards.float()
    r = rewards.double()
    groups = int(group_index.max()) + 1
    count = torch.zeros(groups, dtype=torch.float64).index_add_(0, group_index, torch.ones_like(r))
    mean = torch.zeros(groups, dtype=torch.float64).index_add_(0, group_index, r) / count
    centred = r - mean[group_index]
    if scale_by_std:
        sq = torch.zeros(groups, dtype=torch.float64).index_add_(0, group_index, centred * centred)
        std = (sq / (count - 1).clamp(min=1)).sqrt()
        centred = centred / (std[group_index] + eps)
    return centred.float()
