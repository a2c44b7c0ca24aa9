"""A dual controller for the kernel's c2: keep the proposal's E_Q[W] at a budget C.

VESPO's proposal solves min KL(Q||mu) - alpha E_Q[log W] subject to E_Q[W] <= C (Eq. 14), giving
Q proportional to mu * W^c1 * exp(-c2 W): c2 is the Lagrange multiplier of that constraint. The
paper fixes c2, so nothing enforces the constraint, and the variance bound E_mu[phi^2] <= Z K C
(Prop. 3.1) only holds with whatever C the data happens to give. Here c2 is instead a dual
variable, one per advantage sign, moved each step by projected dual ascent toward the budget:

    c2 <- clip(c2 + step_size * (E_Q[W] - C), c2_min, c2_max)

with E_Q[W] estimated on the batch by self-normalised importance sampling,
E_Q[W] = E_mu[phi W] / E_mu[phi]. The update direction is the right one because
d E_Q[W] / d c2 = -Var_Q[W] <= 0: raising c2 always lowers E_Q[W] on a fixed sample.

Everything is pure: the caller keeps the current `AdaptiveC2` and feeds it back each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .kernel import KernelConstants


@dataclass(frozen=True)
class KernelControlConfig:
    """budget: C, the target E_Q[W] (1 is the on-policy value: W = 1 gives E_Q[W] = 1).
    step_size: dual ascent step on c2 per unit of E_Q[W] - C. c2_min, c2_max: projection bounds
    (c2 > 0 keeps phi bounded)."""

    budget: float = 1.0
    step_size: float = 1.0
    c2_min: float = 0.5
    c2_max: float = 10.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.budget) and self.budget > 0):
            raise ValueError(f"kernel control budget C must be finite and > 0, got {self.budget}")
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"kernel control step_size must be finite and > 0, got {self.step_size}")
        if not (0 < self.c2_min <= self.c2_max and math.isfinite(self.c2_max)):
            raise ValueError(f"kernel control needs 0 < c2_min <= c2_max < inf, got "
                             f"c2_min={self.c2_min}, c2_max={self.c2_max}")


@dataclass(frozen=True)
class AdaptiveC2:
    """The controller's state: the kernel constants in use (c1 fixed, c2 adapted per sign)."""

    constants: KernelConstants = KernelConstants()

    def update(self, cfg: KernelControlConfig, eq_w_pos: float, eq_w_neg: float) -> "AdaptiveC2":
        """The state after one step given this step's E_Q[W] estimates (NaN: that sign had no
        sequences, or zero phi mass, so its c2 is left unchanged)."""
        c = self.constants
        return AdaptiveC2(replace(c, c2_pos=dual_step(cfg, c.c2_pos, eq_w_pos),
                                  c2_neg=dual_step(cfg, c.c2_neg, eq_w_neg)))


def dual_step(cfg: KernelControlConfig, c2: float, eq_w: float) -> float:
    """One projected dual-ascent step: clip(c2 + step_size * (eq_w - C), c2_min, c2_max).

    A non-finite estimate leaves c2 as it was (clipped into the bounds)."""
    if math.isfinite(eq_w):
        c2 = c2 + cfg.step_size * (eq_w - cfg.budget)
    return min(max(c2, cfg.c2_min), cfg.c2_max)


@torch.no_grad()
def proposal_mean_w(phi: Tensor, log_w: Tensor, select: Tensor) -> float:
    """Self-normalised estimate of E_Q[W] = sum(phi W) / sum(phi) over the selected sequences.

    Args:
        phi: [S] the kernel weights the loss applied (0 for dropped sequences).
        log_w: [S] sequence log-weights (clamped, as `SequenceStats.log_w`).
        select: [S] bool, the sequences of one advantage sign that count.
    Returns:
        The estimate, or NaN when the selection has no phi mass.
    """
    p = torch.where(select, phi.double(), 0.0)
    mass = p.sum()
    if not mass > 0:
        return math.nan
    return float((p * log_w.double().exp()).sum() / mass)
