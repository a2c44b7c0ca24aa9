"""The Triton kernels of the fused per-sequence pass, run by Triton's interpreter on CPU tensors,
against the eager PyTorch reference; and on CUDA where there is one.

Triton reads TRITON_INTERPRET when it is imported (its own library functions are decorated then),
so the interpreted cases run in a pytest subprocess started with it set
(`test_kernels_under_the_interpreter`); in this process they skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from megatron_vespo.algo import segment_kernels, segment_triton
from tests.test_segment_kernels import make

pytestmark = pytest.mark.skipif(not segment_triton.available(), reason="triton is not installed")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRETED_CASES = 4


@pytest.mark.skipif(INTERPRETING, reason="this is the interpreter's own run")
def test_kernels_under_the_interpreter():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "interpreter and not under_the_interpreter"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
        cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"{INTERPRETED_CASES} passed" in done.stdout, done.stdout[-2000:]


@pytest.fixture
def interpreter():
    if not INTERPRETING:
        pytest.skip("runs in test_kernels_under_the_interpreter's subprocess")
    with warnings.catch_warnings():  # numpy's note on inf - inf inside the interpreted kernel
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def check(logp, behaviour, mask, lengths, device="cpu"):
    args = [t.to(device) for t in (logp, behaviour, mask, lengths)]
    ratio, lp = segment_triton.forward_sums(*args)
    grad = torch.randn(lengths.shape[0], generator=torch.Generator().manual_seed(2))
    expanded = segment_triton.expand(grad.to(device), args[2], args[3])
    ref_ratio, ref_lp = segment_kernels._torch_forward(logp, behaviour, mask, lengths)
    assert ratio.dtype == torch.float64 and lp.dtype == torch.float32
    # fp32 sums in another order: over 40k positions they differ by a few 1e-6 relative
    torch.testing.assert_close(ratio.cpu(), ref_ratio, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(lp.cpu(), ref_lp, rtol=2e-5, atol=1e-4, equal_nan=True)
    assert torch.equal(expanded.cpu(), segment_kernels._torch_expand(grad, mask, lengths))
    return ratio.cpu()


def test_interpreter_values_nonfinite_empty_and_clamp(interpreter):
    ratio = check(*make())
    assert int(ratio[:, 2].sum()) == 3  # NaN, -inf and +inf in the mask; the NaN outside is not
    assert float(ratio[3].abs().sum()) == 0.0  # the empty sequence
    logp, behaviour, mask, lengths = make(with_nonfinite=False, seed=3)
    behaviour[:] = logp - 50.0  # every ratio beyond the clamp
    mask[:] = True
    ratio = check(logp, behaviour, mask, lengths)
    torch.testing.assert_close(ratio[:, 0], 20.0 * lengths.double())


def test_interpreter_very_long_and_many_sequences(interpreter):
    """One sequence of 40k positions (many steps of the kernel's loop) among short ones."""
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([3, 40_000, 0, 1, 1500, 7])
    total = int(lengths.sum())
    logp = -torch.rand(total, generator=g) * 5
    check(logp, logp + 0.1 * torch.randn(total, generator=g), torch.rand(total, generator=g) > 0.2,
          lengths)


def test_interpreter_gradient_through_the_loss_path_is_the_eager_one(interpreter):
    """The loss path's autograd function with the Triton kernels in place of the CPU ones."""
    from megatron_vespo.algo.importance import local_sequence_sums

    logp, behaviour, mask, lengths = make(with_nonfinite=False)
    coef = torch.linspace(-1, 1, lengths.shape[0])
    grads = []
    for forward, expand in ((segment_triton.forward_sums, segment_triton.expand),
                            (segment_kernels._torch_forward, segment_kernels._torch_expand)):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(segment_kernels, "forward_sums", forward)
            patch.setattr(segment_kernels, "expand", expand)
            leaf = logp.clone().requires_grad_()
            _, local = local_sequence_sums(leaf, behaviour, mask, lengths)
            (coef * local.logp_sum).sum().backward()
            grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


def test_interpreter_refuses_lengths_that_do_not_cover_the_tokens(interpreter):
    logp, behaviour, mask, lengths = make()
    with pytest.raises(ValueError, match="seq_lengths must be >= 0 and sum to"):
        segment_triton.forward_sums(logp, behaviour, mask, lengths[:-1])


@pytest.mark.gpu
def test_cuda_dispatches_to_the_compiled_kernels():
    logp, behaviour, mask, lengths = make()
    ratio, lp = segment_kernels.forward_sums(*(t.cuda() for t in (logp, behaviour, mask)),
                                             lengths.cuda())
    ref_ratio, ref_lp = segment_kernels._torch_forward(logp, behaviour, mask, lengths)
    torch.testing.assert_close(ratio.cpu(), ref_ratio, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lp.cpu(), ref_lp, rtol=1e-6, atol=1e-4, equal_nan=True)
    check(*make(seed=7), device="cuda")
