"""The VESPO gamma kernel phi(W) = W^c1 * exp(c2 * (1 - W)) and its constants (arXiv 2602.10693).

Everything here is evaluated in log space: log phi = c1 * log W + c2 * (1 - W), exponentiated once,
so a sequence log-weight of +-20 never overflows. phi(1) = 1: on-policy samples keep unit weight.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

# Guard from the reference implementation (not in the paper's formula): per-token log-ratios and the
# summed sequence log-weight are clamped to this range before the kernel is applied.
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class KernelConstants:
    """(c1, c2) per advantage sign; the paper's defaults are (2, 3) for A >= 0 and (3, 2) for A < 0."""

    c1_pos: float = 2.0
    c2_pos: float = 3.0
    c1_neg: float = 3.0
    c2_neg: float = 2.0

    def __post_init__(self) -> None:
        for sign in ("pos", "neg"):
            c1, c2 = getattr(self, f"c1_{sign}"), getattr(self, f"c2_{sign}")
            if not (math.isfinite(c1) and c1 >= 0):
                raise ValueError(f"kernel c1_{sign} must be finite and >= 0, got {c1}")
            if not (math.isfinite(c2) and c2 > 0):
                raise ValueError(f"kernel c2_{sign} must be finite and > 0 (phi unbounded), got {c2}")
            if c1 < 1:
                warnings.warn(
                    f"kernel c1_{sign}={c1} < 1: sup phi(w)/w is infinite, so the variance bound "
                    "E[phi^2] <= Z*K*C is vacuous for this sign",
                    stacklevel=3,
                )

    def for_sign(self, positive: bool) -> tuple[float, float]:
        return (self.c1_pos, self.c2_pos) if positive else (self.c1_neg, self.c2_neg)


def log_phi(log_w: Tensor, c1: Tensor | float, c2: Tensor | float) -> Tensor:
    """log phi(W) = c1 * log W + c2 * (1 - W), elementwise; no clamping."""
    return c1 * log_w + c2 * (1.0 - torch.exp(log_w))


@torch.no_grad()
def vespo_phi(
    log_w: Tensor,
    advantages: Tensor,
    *,
    c1_pos: float = 2.0,
    c2_pos: float = 3.0,
    c1_neg: float = 3.0,
    c2_neg: float = 2.0,
) -> Tensor:
    """Per-sequence VESPO weight phi(W), detached (Eq. 20).

    Args:
        log_w: [S] sequence log-weights sum_t (log pi_t - log mu_t), never length-normalised.
        advantages: [S] sequence advantages; A >= 0 selects (c1_pos, c2_pos), A < 0 (c1_neg, c2_neg).
    Returns:
        [S] float32 phi. log W is clamped to [-20, 20]; a non-finite log W gives phi = 0 (the caller
        counts these through `nonfinite_mask`).
    """
    if log_w.shape != advantages.shape:
        raise ValueError(f"log_w {tuple(log_w.shape)} and advantages {tuple(advantages.shape)} differ")
    constants = KernelConstants(c1_pos, c2_pos, c1_neg, c2_neg)
    log_w = log_w.float()
    positive = advantages >= 0
    c1 = torch.where(positive, constants.c1_pos, constants.c1_neg)
    c2 = torch.where(positive, constants.c2_pos, constants.c2_neg)
    finite = torch.isfinite(log_w)
    clamped = torch.where(finite, log_w, 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    phi = torch.exp(log_phi(clamped, c1, c2))
    return torch.where(finite, phi, 0.0)


def kernel_mode(c1: float, c2: float) -> float:
    """argmax_W phi(W) = c1 / c2."""
    return c1 / c2


def kernel_peak(c1: float, c2: float) -> float:
    """max_W phi(W) = (c1/c2)^c1 * e^(c2 - c1)."""
    return (c1 / c2) ** c1 * math.exp(c2 - c1)


def variance_bound_constant(c1: float, c2: float) -> float:
    """K = sup_w phi(w) / w (Prop. 3.1), so that E_mu[phi^2] <= Z * K * C.

    ((c1-1)/c2)^(c1-1) * e^(c2-c1+1) for c1 > 1, e^c2 for c1 = 1, infinite for c1 < 1.
    """
    if c1 > 1:
        return ((c1 - 1) / c2) ** (c1 - 1) * math.exp(c2 - c1 + 1)
    if c1 == 1:
        return math.exp(c2)
    return math.inf


def implied_surrogate(w: Tensor, c1: float, c2: float) -> Tensor:
    """f(W) = e^c2 * c2^(-c1) * gamma_lower(c1, c2 W), the objective E_mu[f(W) A] whose gradient
    VESPO follows: W f'(W) = phi(W). Differentiable in W; needs c1 > 0.
    """
    if c1 <= 0:
        raise ValueError(f"implied_surrogate needs c1 > 0, got {c1}")
    w = w.double() if w.dtype != torch.float64 else w
    c1_t = torch.tensor(c1, dtype=w.dtype)
    log_scale = c2 - c1 * math.log(c2) + math.lgamma(c1)  # Gamma(c1) un-regularises gammainc
    return torch.exp(log_scale + torch.log(torch.special.gammainc(c1_t, c2 * w)))
