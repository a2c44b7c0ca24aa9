"""The fused per-sequence pass of `segment_kernels` as Triton kernels, chosen on CUDA.

The same contract as `segment_kernels.forward_sums` / `expand`: one program per sequence walks its
contiguous positions in blocks of `BLOCK`, reading log pi, log mu and the mask once and keeping
the four per-lane partial sums in registers (fp32, reduced once per sequence, stored as float64
like the CPU kernel's); the backward writes each position's gradient once. Under Triton's
interpreter (`TRITON_INTERPRET=1`) the same kernels run on CPU tensors, which is how CI tests them
against the eager path.

The kernels are built on first use (`_kernels`), so the interpreter flag in force then decides how
they run; `triton` is imported only here.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .kernel import LOG_RATIO_CLAMP

BLOCK = 1024  # positions per step of a sequence's loop: 4 KiB of each fp32 column


def available() -> bool:
    """Whether Triton can be imported (it ships with CUDA builds of torch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """(forward, expand) kernels, built under the given interpreter setting."""
    import triton
    import triton.language as tl

    @triton.jit
    def forward(logp_ptr, mu_ptr, mask_ptr, offsets_ptr, ratio_ptr, logp_sum_ptr, clamp,
                BLOCK: tl.constexpr):
        s = tl.program_id(0)
        start = tl.load(offsets_ptr + s)
        end = tl.load(offsets_ptr + s + 1)
        r_acc = tl.zeros([BLOCK], dtype=tl.float32)
        tok_acc = tl.zeros([BLOCK], dtype=tl.float32)
        bad_acc = tl.zeros([BLOCK], dtype=tl.float32)
        lp_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for first in range(start, end, BLOCK):
            idx = first + tl.arange(0, BLOCK)
            inside = idx < end
            lp = tl.load(logp_ptr + idx, mask=inside, other=0.0)
            mu = tl.load(mu_ptr + idx, mask=inside, other=0.0)
            m = tl.load(mask_ptr + idx, mask=inside, other=0) != 0
            raw = lp - mu
            finite = (raw - raw) == 0.0  # false for NaN and +-inf
            clamped = tl.minimum(tl.maximum(raw, -clamp), clamp)
            r_acc += tl.where(m & finite, clamped, 0.0)
            tok_acc += tl.where(m, 1.0, 0.0)
            bad_acc += tl.where(m & (finite == 0), 1.0, 0.0)
            lp_acc += tl.where(m, lp, 0.0)
        tl.store(ratio_ptr + 3 * s, tl.sum(r_acc, axis=0).to(tl.float64))
        tl.store(ratio_ptr + 3 * s + 1, tl.sum(tok_acc, axis=0).to(tl.float64))
        tl.store(ratio_ptr + 3 * s + 2, tl.sum(bad_acc, axis=0).to(tl.float64))
        tl.store(logp_sum_ptr + s, tl.sum(lp_acc, axis=0))

    @triton.jit
    def expand(grad_ptr, mask_ptr, offsets_ptr, out_ptr, BLOCK: tl.constexpr):
        s = tl.program_id(0)
        start = tl.load(offsets_ptr + s)
        end = tl.load(offsets_ptr + s + 1)
        g = tl.load(grad_ptr + s)
        for first in range(start, end, BLOCK):
            idx = first + tl.arange(0, BLOCK)
            inside = idx < end
            m = tl.load(mask_ptr + idx, mask=inside, other=0) != 0
            tl.store(out_ptr + idx, tl.where(m, g, 0.0), mask=inside)

    return forward, expand


def _offsets(seq_lengths: Tensor, total: int, device) -> Tensor:
    """`segment_kernels._offsets` (the same check of the lengths), on `device`."""
    from .segment_kernels import _offsets as offsets  # that module imports this one

    return offsets(seq_lengths.cpu(), total).to(device)


def forward_sums(logp: Tensor, behaviour_logp: Tensor, mask: Tensor,
                 seq_lengths: Tensor) -> tuple[Tensor, Tensor]:
    """`segment_kernels.forward_sums` (shapes and meaning there): ratio_sums [S, 3] float64,
    logp_sums [S] float32."""
    offsets = _offsets(seq_lengths, logp.shape[0], logp.device)
    num_seqs = offsets.shape[0] - 1
    ratio = torch.empty(num_seqs, 3, dtype=torch.float64, device=logp.device)
    logp_sums = torch.empty(num_seqs, dtype=torch.float32, device=logp.device)
    if num_seqs:
        kernel, _ = _kernels(_interpreting())
        kernel[(num_seqs,)](logp.detach().float().contiguous(),
                            behaviour_logp.detach().float().contiguous(),
                            mask.contiguous().to(torch.uint8), offsets, ratio, logp_sums,
                            LOG_RATIO_CLAMP, BLOCK=BLOCK)
    return ratio, logp_sums


def expand(grad: Tensor, mask: Tensor, seq_lengths: Tensor) -> Tensor:
    """`segment_kernels.expand`: [T] float32, grad[s] on the response tokens of sequence s."""
    offsets = _offsets(seq_lengths, mask.shape[0], mask.device)
    out = torch.empty(mask.shape[0], dtype=torch.float32, device=mask.device)
    if offsets.shape[0] > 1:
        _, kernel = _kernels(_interpreting())
        kernel[(offsets.shape[0] - 1,)](grad.detach().float().contiguous(),
                                        mask.contiguous().to(torch.uint8), offsets, out,
                                        BLOCK=BLOCK)
    return out
