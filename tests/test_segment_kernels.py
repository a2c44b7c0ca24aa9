"""The fused per-sequence pass (numba on CPU) against its eager PyTorch reference, and its gradient."""

from __future__ import annotations

import pytest
import torch

from megatron_vespo.algo import segment_kernels
from megatron_vespo.algo.importance import local_sequence_sums


def make(num_seqs=37, seed=0, with_nonfinite=True):
    """Packed tokens with empty sequences, prompt tokens outside the mask, and NaN/inf log-probs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 40, (num_seqs,), generator=g)
    lengths[3] = 0
    total = int(lengths.sum())
    logp = -torch.rand(total, generator=g) * 8
    behaviour = logp + 0.3 * torch.randn(total, generator=g)
    behaviour[::97] -= 50.0  # beyond the +-20 clamp
    mask = torch.rand(total, generator=g) > 0.3
    if with_nonfinite:
        logp[5], behaviour[11], logp[200], behaviour[300] = float("nan"), float("-inf"), float("inf"), float("nan")
        mask[[5, 11, 200]] = True
        mask[300] = False  # outside the mask: not counted
    return logp, behaviour, mask, lengths


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernel_matches_the_eager_reference(threads):
    logp, behaviour, mask, lengths = make()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ratio, lp = segment_kernels._cpu_forward(logp, behaviour, mask, lengths)
        grad = torch.randn(lengths.shape[0], generator=torch.Generator().manual_seed(1))
        expanded = segment_kernels._cpu_expand(grad, mask, lengths)
    finally:
        torch.set_num_threads(before)
    ref_ratio, ref_lp = segment_kernels._torch_forward(logp, behaviour, mask, lengths)
    assert ratio.dtype == torch.float64 and lp.dtype == torch.float32
    torch.testing.assert_close(ratio, ref_ratio, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-6, atol=1e-5, equal_nan=True)
    assert torch.equal(expanded, segment_kernels._torch_expand(grad, mask, lengths))
    assert int(ratio[:, 2].sum()) == 3 and float(ratio[3].abs().sum()) == 0.0


def test_gradient_is_the_per_sequence_coefficient_on_response_tokens():
    logp, behaviour, mask, lengths = make(with_nonfinite=False)
    leaf = logp.clone().requires_grad_()
    ratio, local = local_sequence_sums(leaf, behaviour, mask, lengths)
    coef = torch.linspace(-1, 1, lengths.shape[0])
    (coef * local.logp_sum).sum().backward()
    seq_of_token = torch.arange(lengths.shape[0]).repeat_interleave(lengths)
    assert torch.equal(leaf.grad, torch.where(mask, coef[seq_of_token], 0.0))
    assert not ratio.requires_grad and torch.equal(local.num_tokens, ratio[:, 1])
    # The log pi sums are those of the response tokens only.
    ref = torch.zeros(lengths.shape[0]).index_add_(0, seq_of_token, torch.where(mask, logp, 0.0))
    torch.testing.assert_close(local.logp_sum, ref, rtol=1e-6, atol=1e-5)


def test_lengths_that_do_not_cover_the_tokens_are_refused():
    logp, behaviour, mask, lengths = make()
    with pytest.raises(ValueError, match="seq_lengths must be >= 0 and sum to"):
        segment_kernels.forward_sums(logp, behaviour, mask, lengths[:-1])
