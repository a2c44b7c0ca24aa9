"""The VESPO kernel against the paper's closed forms and the reference table (vespo-math.md)."""

import math

import pytest
import torch

from megatron_vespo.algo.kernel import (KernelConstants, implied_surrogate, kernel_mode, kernel_peak,
                                        variance_bound_constant, vespo_phi)

W = torch.tensor([0.5, 0.8, 1.2, 1.5, 2.0, 3.0])
TABLE_POS = [1.120, 1.166, 0.790, 0.502, 0.199, 0.022]
TABLE_NEG = [0.340, 0.764, 1.158, 1.242, 1.083, 0.495]


def test_reference_table_for_both_advantage_signs():
    pos = vespo_phi(W.log(), torch.ones(6))
    neg = vespo_phi(W.log(), -torch.ones(6))
    torch.testing.assert_close(pos, torch.tensor(TABLE_POS), atol=6e-4, rtol=0)
    torch.testing.assert_close(neg, torch.tensor(TABLE_NEG), atol=6e-4, rtol=0)


def test_on_policy_weight_is_one_and_zero_advantage_uses_positive_constants():
    phi = vespo_phi(torch.zeros(3), torch.tensor([1.0, 0.0, -1.0]))
    torch.testing.assert_close(phi, torch.ones(3))
    w = torch.tensor([2.0]).log()
    assert vespo_phi(w, torch.zeros(1)) == vespo_phi(w, torch.ones(1))


@pytest.mark.parametrize("c1,c2", [(2.0, 3.0), (3.0, 2.0), (1.0, 1.5), (4.0, 4.0)])
def test_mode_peak_and_bound_constant_match_a_dense_grid(c1, c2):
    w = torch.linspace(1e-7, 12.0, 400_001, dtype=torch.float64)
    phi = torch.exp(c1 * w.log() + c2 * (1 - w))
    assert abs(w[phi.argmax()].item() - kernel_mode(c1, c2)) < 1e-3
    assert math.isclose(phi.max().item(), kernel_peak(c1, c2), rel_tol=1e-6)
    assert math.isclose((phi / w).max().item(), variance_bound_constant(c1, c2), rel_tol=1e-4)


def test_bound_constants_of_the_paper_defaults():
    assert math.isclose(variance_bound_constant(2, 3), math.e ** 2 / 3, rel_tol=1e-12)
    assert variance_bound_constant(3, 2) == pytest.approx(1.0)
    assert variance_bound_constant(1, 2) == pytest.approx(math.e ** 2)
    assert variance_bound_constant(0.5, 2) == math.inf


@pytest.mark.parametrize("c1,c2", [(2.0, 3.0), (3.0, 2.0), (1.0, 1.0), (0.5, 2.0), (2.5, 0.7)])
def test_phi_is_w_times_derivative_of_implied_surrogate(c1, c2):
    w = torch.linspace(0.05, 4.0, 80, dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(implied_surrogate(w, c1, c2).sum(), w)
    expected = torch.exp(c1 * w.detach().log() + c2 * (1 - w.detach()))
    torch.testing.assert_close(w.detach() * grad, expected, rtol=1e-9, atol=1e-12)


def test_phi_is_detached_and_guarded():
    log_w = torch.tensor([0.3, 50.0, -50.0, float("nan"), float("inf"), -float("inf")],
                         requires_grad=True)
    phi = vespo_phi(log_w, torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0]))
    assert not phi.requires_grad
    assert torch.isfinite(phi).all()
    clamped = vespo_phi(torch.tensor([20.0, -20.0]), torch.tensor([-1.0, -1.0]))
    torch.testing.assert_close(phi[1:3], clamped)  # |log W| clamped to 20
    assert phi[3:].eq(0).all()  # non-finite log W: weight 0


def test_invalid_constants_are_rejected_or_warned():
    with pytest.warns(UserWarning, match="vacuous"):
        vespo_phi(torch.zeros(2), torch.ones(2), c1_pos=0.5)
    with pytest.raises(ValueError, match="c2_neg"):
        KernelConstants(c2_neg=0.0)
    with pytest.raises(ValueError, match="c1_pos"):
        KernelConstants(c1_pos=-1.0)
    with pytest.raises(ValueError, match="differ"):
        vespo_phi(torch.zeros(3), torch.ones(2))
