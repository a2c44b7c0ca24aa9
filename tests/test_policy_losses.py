"""Each policy loss against its hand-derived gradient, plus guards and bad input."""

import math
from dataclasses import replace

import pytest
import torch

from megatron_vespo.algo.kernel import vespo_phi
from megatron_vespo.algo.metrics import mismatch_metrics
from megatron_vespo.algo.policy_losses import (POLICY_LOSSES, BapoParams, CispoParams, ClipParams,
                                               Denominators, PolicyLossInput, bapo_bounds,
                                               get_policy_loss)
from megatron_vespo.parallel.packing import pack_sequences
from megatron_vespo.parallel.policy_objective import shard_policy_loss
from megatron_vespo.parallel.step_reduce import global_denominators


def make(seed=0, num_seqs=12, spread=0.3, nan_seq=None):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 30, (num_seqs,), generator=g).tolist()
    prompts = [int(torch.randint(1, 4, (1,), generator=g)) for _ in lengths]
    tokens = [torch.randint(0, 50, (n,), generator=g) for n in lengths]
    old = [-torch.rand(n - p, generator=g) * 3 for n, p in zip(lengths, prompts)]
    if nan_seq is not None:
        old[nan_seq][0] = float("nan")
    adv = torch.randn(num_seqs, generator=g)
    batch = pack_sequences(tokens, prompts, adv, old, old)
    logp = (batch.old_logp + spread * torch.randn(batch.num_positions, generator=g) / 5)
    return batch, logp.requires_grad_()


def run(name, batch, logp, params=None, **kw):
    denom = global_denominators([batch], None)
    out = shard_policy_loss(logp, batch, denom, get_policy_loss(name), params, **kw)
    (grad,) = torch.autograd.grad(out.loss, logp)
    return out, grad, denom


def per_sequence(batch, logp):
    """log W_i = sum_t (logp - old) and each token's sequence, computed the slow, obvious way."""
    m = batch.loss_mask
    log_w = torch.stack([((logp - batch.old_logp)[m & (batch.seq_index == i)]).sum()
                         for i in range(batch.num_seqs)])
    return log_w.detach()


def test_registry_holds_the_eight_losses_and_names_them_on_error():
    assert sorted(POLICY_LOSSES) == ["bapo", "cispo", "grpo", "gspo", "sapo", "seq_is", "topr", "vespo"]
    with pytest.raises(ValueError, match="'ppo' is unknown; choose one of"):
        get_policy_loss("ppo")


def test_vespo_gradient_is_reinforce_weighted_by_detached_phi():
    batch, logp = make()
    out, grad, denom = run("vespo", batch, logp)
    phi = vespo_phi(per_sequence(batch, logp), batch.advantages)
    expected = torch.where(batch.loss_mask, -(phi * batch.advantages)[batch.seq_index] / denom.tokens, 0.0)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)
    assert denom.tokens == batch.loss_mask.sum().item()


def test_sequence_weight_is_the_full_product_never_length_normalised():
    batch, logp = make()
    out, _, _ = run("vespo", batch, logp)
    log_w = per_sequence(batch, logp)
    assert math.isclose(out.metrics.finalize()["is/log_w_max"], log_w.max().item(), rel_tol=1e-5)
    assert math.isclose(out.metrics.finalize()["is/log_w_mean"], log_w.mean().item(), rel_tol=1e-5, abs_tol=1e-6)


def test_seq_is_gradient_uses_w_itself():
    batch, logp = make()
    _, grad, denom = run("seq_is", batch, logp)
    w = per_sequence(batch, logp).exp()
    expected = torch.where(batch.loss_mask, -(w * batch.advantages)[batch.seq_index] / denom.tokens, 0.0)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)


def test_grpo_gradient_vanishes_exactly_where_the_clip_is_active():
    batch, logp = make(spread=2.0)
    _, grad, denom = run("grpo", batch, logp)
    rho = (logp - batch.old_logp).detach().exp()
    a = batch.advantages[batch.seq_index]
    clipped = ((a > 0) & (rho > 1.28)) | ((a < 0) & (rho < 0.8))
    assert clipped[batch.loss_mask].any() and (~clipped)[batch.loss_mask].any()
    expected = torch.where(batch.loss_mask & ~clipped, -rho * a / denom.tokens, 0.0)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)


def test_cispo_gradient_is_reinforce_with_clipped_detached_token_weight():
    batch, logp = make(spread=2.0)
    _, grad, denom = run("cispo", batch, logp, CispoParams(eps_low=None, eps_high=0.28))
    rho = (logp - batch.old_logp).detach().exp()
    a = batch.advantages[batch.seq_index]
    expected = torch.where(batch.loss_mask, -rho.clamp(max=1.28) * a / denom.tokens, 0.0)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)


def test_gspo_matches_its_sequence_level_objective():
    batch, logp = make(spread=0.02)
    out, grad, denom = run("gspo", batch, logp, ClipParams(eps_low=0.01, eps_high=0.01))
    terms = []
    for i in range(batch.num_seqs):
        sel = batch.loss_mask & (batch.seq_index == i)
        s = (logp - batch.old_logp)[sel].mean().exp()
        a = batch.advantages[i]
        terms.append(torch.minimum(s * a, s.clamp(0.99, 1.01) * a))
    objective = -torch.stack(terms).sum() / denom.sequences
    (expected,) = torch.autograd.grad(objective, logp)
    torch.testing.assert_close(out.loss, objective.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)


def test_sapo_matches_its_soft_gate_objective():
    batch, logp = make(spread=1.0)
    out, grad, denom = run("sapo", batch, logp)
    terms = []
    for i in range(batch.num_seqs):
        sel = batch.loss_mask & (batch.seq_index == i)
        a = batch.advantages[i]
        tau = 1.0 if a > 0 else 1.05
        rho = (logp - batch.old_logp)[sel].exp()
        terms.append((torch.sigmoid(tau * (rho - 1)) * 4 / tau * a).mean())
    objective = -torch.stack(terms).sum() / denom.sequences
    (expected,) = torch.autograd.grad(objective, logp)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)


def test_topr_is_plain_reinforce_for_positives_and_truncated_w_for_negatives():
    batch, logp = make(spread=2.0)
    _, grad, denom = run("topr", batch, logp)
    w = per_sequence(batch, logp).exp()
    a = batch.advantages
    weight = torch.where(a >= 0, 1.0, w.clamp(max=1.0))
    assert ((a < 0) & (w > 1)).any() and ((a < 0) & (w < 1)).any()  # both sides of the truncation
    expected = torch.where(batch.loss_mask, -(weight * a)[batch.seq_index] / denom.tokens, 0.0)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)


def test_bapo_bounds_by_hand():
    """Four tokens: positives (rho, A) = (1.5, 1), (1.1, 1); negatives (0.7, -1), (1.0, -2).
    At (0.6, 1.2): live positive 1.1, live negative 0.7 + 2.0 = 2.7 -> 0.41. Raising c_lo to 0.75
    silences the 0.7 token: 1.1 / 2.0 = 0.55, short of the default target 1; c_lo stops at 0.8,
    then c_hi = 1.5 lets the 1.5 token through: 2.6 / 2.0 = 1.3."""
    rho = torch.tensor([1.5, 1.1, 0.7, 1.0])
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    keep = torch.ones(4, dtype=torch.bool)
    c_lo, c_hi = bapo_bounds(rho, adv, keep, BapoParams())
    assert c_lo == pytest.approx(0.8) and c_hi == pytest.approx(1.5)
    assert bapo_bounds(rho, adv, keep, BapoParams(target=0.4)) == pytest.approx((0.6, 1.2))  # 0.41
    assert bapo_bounds(rho, adv, keep, BapoParams(target=0.5)) == pytest.approx((0.75, 1.2))  # 0.55
    assert bapo_bounds(rho, adv, keep, BapoParams(target=10.0)) == pytest.approx((0.8, 2.0))  # capped
    with pytest.raises(ValueError, match="bapo needs"):
        BapoParams(low_max=1.2)


def test_bapo_gradient_is_the_clip_at_its_chosen_bounds():
    batch, logp = make(spread=2.0)
    out, grad, denom = run("bapo", batch, logp)
    m = out.metrics.finalize()
    c_lo, c_hi = m["loss/bapo_c_low"], m["loss/bapo_c_high"]
    rho = (logp - batch.old_logp).detach().exp()
    a = batch.advantages[batch.seq_index]
    assert (c_lo, c_hi) == bapo_bounds(rho, a, batch.loss_mask, BapoParams())
    clipped = ((a > 0) & (rho > c_hi)) | ((a < 0) & (rho < c_lo))
    expected = torch.where(batch.loss_mask & ~clipped, -rho * a / denom.tokens, 0.0)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_nonfinite_log_probs_zero_the_sequence_and_are_counted(name):
    batch, logp = make(nan_seq=3)
    with torch.no_grad():
        logp[(batch.seq_index == 5).nonzero()[2]] = float("inf")
    out, grad, _ = run(name, batch, logp)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert grad[batch.seq_index == 3].eq(0).all() and grad[batch.seq_index == 5].eq(0).all()
    assert out.metrics.finalize()["is/nonfinite_seqs_zeroed"] == 2


def test_variance_bound_holds_and_is_reported():
    batch, logp = make(spread=3.0)
    m = run("vespo", batch, logp)[0].metrics.finalize()
    for sign in ("pos", "neg"):
        assert 0 < m[f"phi/bound_ratio_{sign}"] <= 1 + 1e-9
        assert math.isclose(m[f"phi/sq_mean_{sign}"] / m[f"phi/bound_{sign}"], m[f"phi/bound_ratio_{sign}"])
    assert 0 < m["phi/ess"] <= 1


def test_mismatch_fold_and_metrics():
    batch, logp = make()
    engine = batch.old_logp + 0.1 * torch.randn(batch.num_positions)
    batch = replace(batch, engine_logp=torch.where(batch.loss_mask, engine, 0.0))
    folded, grad_folded, _ = run("vespo", batch, logp, correct_mismatch=True)
    plain, grad_plain, _ = run("vespo", batch, logp, correct_mismatch=False)
    assert not torch.allclose(grad_folded, grad_plain)
    m = plain.metrics.finalize()
    assert m["mismatch/k3_kl"] > 0 and m["mismatch/max_abs_delta"] > 0
    delta = (batch.old_logp - batch.engine_logp)[batch.loss_mask].double()
    assert math.isclose(m["mismatch/k3_kl"], (delta.exp() - 1 - delta).mean().item(), rel_tol=1e-9)
    assert math.isclose(m["mismatch/max_abs_delta"], delta.abs().max().item(), rel_tol=1e-9)
    strict = mismatch_metrics(batch.old_logp, batch.engine_logp, batch.loss_mask, 0.05).finalize()
    assert strict["mismatch/extreme_frac"] == pytest.approx((delta.abs() > 0.05).double().mean().item())


def test_bad_input_gets_a_clear_error():
    batch, logp = make()
    denom = global_denominators([batch], None)
    loss = get_policy_loss("vespo")
    stats, local = _stats(batch, logp)
    with pytest.raises(ValueError, match="no response tokens"):
        Denominators(tokens=0.0, sequences=0.0)
    with pytest.raises(ValueError, match="behaviour_logp has shape"):
        loss(PolicyLossInput(logp, batch.old_logp[:-1], batch.loss_mask, batch.seq_index,
                             batch.advantages, stats, local, denom))
    with pytest.raises(ValueError, match="advantages has shape"):
        loss(PolicyLossInput(logp, batch.old_logp, batch.loss_mask, batch.seq_index,
                             batch.advantages[:-1], stats, local, denom))
    with pytest.raises(ValueError, match="correct_mismatch needs engine"):
        shard_policy_loss(logp, replace(batch, engine_logp=None), denom, loss, correct_mismatch=True)


def _stats(batch, logp):
    from megatron_vespo.parallel.sequence_reduce import sequence_stats

    return sequence_stats(logp, batch.old_logp, batch.loss_mask, batch.local_seq_lengths)
