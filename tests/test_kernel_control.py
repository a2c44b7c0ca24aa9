"""The c2 dual controller moves c2 the right way, stays in bounds and rests on the budget."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_vespo.algo.kernel import KernelConstants, vespo_phi
from megatron_vespo.algo.kernel_control import (
    AdaptiveC2,
    KernelControlConfig,
    dual_step,
    proposal_mean_w,
)


def _eq_w(log_w: torch.Tensor, positive: bool, c1: float, c2: float) -> float:
    adv = torch.full_like(log_w, 1.0 if positive else -1.0)
    phi = vespo_phi(log_w, adv, c1_pos=c1, c2_pos=c2, c1_neg=c1, c2_neg=c2)
    return proposal_mean_w(phi, log_w, torch.ones_like(log_w, dtype=torch.bool))


@pytest.mark.parametrize("positive,c1,c2", [(True, 2.0, 3.0), (False, 3.0, 2.0)])
def test_over_budget_raises_c2_and_lowers_the_next_estimate(positive, c1, c2):
    log_w = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.8
    eq_w = _eq_w(log_w, positive, c1, c2)
    cfg = KernelControlConfig(budget=0.5 * eq_w, step_size=0.5)
    new_c2 = dual_step(cfg, c2, eq_w)
    assert new_c2 > c2
    assert _eq_w(log_w, positive, c1, new_c2) < eq_w  # same sample, larger c2


def test_under_budget_lowers_c2():
    cfg = KernelControlConfig(budget=2.0, step_size=0.5)
    assert dual_step(cfg, 3.0, 1.0) == pytest.approx(2.5)


def test_fixed_point_on_budget():
    cfg = KernelControlConfig(budget=1.3)
    assert dual_step(cfg, 2.7, 1.3) == 2.7


def test_on_policy_batch_is_on_the_default_budget():
    """W = 1 everywhere gives E_Q[W] = 1, the default C, so on-policy steps leave c2 alone."""
    log_w = torch.zeros(16)
    state = AdaptiveC2()
    eq = _eq_w(log_w, True, 2.0, 3.0)
    assert eq == pytest.approx(1.0)
    assert state.update(KernelControlConfig(), eq, eq) == state


@pytest.mark.parametrize("eq_w", [0.0, 1e-6, 50.0, 1e9])
def test_stays_within_bounds(eq_w):
    cfg = KernelControlConfig(budget=1.0, step_size=10.0, c2_min=0.5, c2_max=6.0)
    c2 = 3.0
    for _ in range(20):
        c2 = dual_step(cfg, c2, eq_w)
        assert cfg.c2_min <= c2 <= cfg.c2_max


def test_missing_sign_keeps_c2():
    cfg = KernelControlConfig()
    state = AdaptiveC2(KernelConstants(c2_pos=3.0, c2_neg=2.0))
    new = state.update(cfg, math.nan, 2.0)
    assert new.constants.c2_pos == 3.0 and new.constants.c2_neg == pytest.approx(3.0)
    assert new.constants.c1_pos == 2.0 and new.constants.c1_neg == 3.0  # c1 is never adapted


def test_estimate_is_selfnormalised_and_nan_without_mass():
    phi = torch.tensor([1.0, 3.0, 0.0, 5.0])
    log_w = torch.log(torch.tensor([2.0, 4.0, 100.0, 7.0]))
    select = torch.tensor([True, True, True, False])
    assert proposal_mean_w(phi, log_w, select) == pytest.approx((2.0 + 12.0) / 4.0)
    assert math.isnan(proposal_mean_w(phi, log_w, torch.zeros(4, dtype=torch.bool)))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="budget"):
        KernelControlConfig(budget=0.0)
    with pytest.raises(ValueError, match="c2_min"):
        KernelControlConfig(c2_min=0.0)
    with pytest.raises(ValueError, match="step_size"):
        KernelControlConfig(step_size=-1.0)
