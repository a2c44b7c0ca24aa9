"""Token log-ratios and per-sequence importance statistics.

The sequence log-weight is log W = sum_t r_t with r_t = log pi_t - log mu_t over response tokens,
the full product and never divided by the length. Tokens may be spread over context-parallel ranks:
`local_sequence_sums` sums a rank's own tokens per sequence in one fused pass, and the parallel layer
adds the ranks' sums (one all-reduce of [S, 3] scalars) before `SequenceStats.from_sums` finishes the
statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import segment_kernels
from .kernel import LOG_RATIO_CLAMP


def behaviour_logprobs(
    old_logp: Tensor, engine_logp: Optional[Tensor], correct_mismatch: bool
) -> Tensor:
    """The log-probs the importance ratio divides by.

    With the mismatch correction on, the ratio is taken against the rollout engine:
    log pi - log mu_engine = (log pi - log pi_old) + (log pi_old - log mu_engine), i.e. the old-policy
    ratio with the truncated-IS term folded in log space (vespo-math.md). Both inputs are [T].
    """
    if not correct_mismatch:
        return old_logp
    if engine_logp is None:
        raise ValueError("algorithm.correct_mismatch needs engine log-probs in the batch")
    if engine_logp.shape != old_logp.shape:
        raise ValueError(
            f"engine_logp {tuple(engine_logp.shape)} and old_logp {tuple(old_logp.shape)} differ"
        )
    return engine_logp


def token_log_ratio(logp: Tensor, behaviour_logp: Tensor) -> tuple[Tensor, Tensor]:
    """Guarded per-token log-ratio.

    Args:
        logp, behaviour_logp: [T].
    Returns:
        r: [T] float32 log pi - log mu clamped to [-20, 20], 0 where non-finite (keeps gradients
           finite: the sequence is dropped through `SequenceStats.valid`, never propagated).
        finite: [T] bool, False where either log-prob was NaN or +-inf.
    """
    raw = logp.float() - behaviour_logp.float()
    finite = torch.isfinite(raw)
    r = torch.where(finite, raw, 0.0).clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return r, finite


@dataclass(frozen=True)
class LocalSequenceSums:
    """This rank's share of each sequence, [S] each: `logp_sum`, float32 sum of log pi over its
    response tokens (differentiable w.r.t. the per-token log pi); `num_tokens`, their count."""

    logp_sum: Tensor
    num_tokens: Tensor


class _SequenceSums(torch.autograd.Function):
    """One fused pass: the detached ratio sums and the differentiable log pi sums per sequence."""

    @staticmethod
    def forward(ctx, logp, behaviour_logp, mask, seq_lengths):
        ratio_sums, logp_sums = segment_kernels.forward_sums(logp, behaviour_logp, mask, seq_lengths)
        ctx.save_for_backward(mask, seq_lengths)
        ctx.mark_non_differentiable(ratio_sums)
        return ratio_sums, logp_sums

    @staticmethod
    def backward(ctx, _grad_ratio_sums, grad_logp_sums):
        mask, seq_lengths = ctx.saved_tensors
        return segment_kernels.expand(grad_logp_sums, mask, seq_lengths), None, None, None


def local_sequence_sums(logp: Tensor, behaviour_logp: Tensor, mask: Tensor,
                        seq_lengths: Tensor) -> tuple[Tensor, LocalSequenceSums]:
    """Sum this rank's tokens per sequence in one pass over them.

    Args:
        logp: [T] log pi (with or without grad). behaviour_logp: [T] the ratio's denominator.
        mask: [T] response tokens that count.
        seq_lengths: [S] int64, positions of each sequence on this rank; a sequence's positions are
            contiguous and the lengths sum to T (the packed layout guarantees both).
    Returns:
        ratio_sums: [S, 3] float64 (sum of the guarded r_t, response-token count, non-finite r_t
            count), to be summed over CP ranks and turned into `SequenceStats.from_sums`.
        local: this rank's `LocalSequenceSums`.
    """
    ratio_sums, logp_sum = _SequenceSums.apply(logp, behaviour_logp, mask, seq_lengths)
    return ratio_sums, LocalSequenceSums(logp_sum, ratio_sums[:, 1].clone())


@dataclass(frozen=True)
class SequenceStats:
    """Per-sequence scalars, identical on every context-parallel rank once built from summed parts.

    log_w: [S] float32 clamped sequence log-weight; num_tokens: [S] response tokens of the whole
    sequence; num_nonfinite: [S] tokens whose log-ratio was NaN/inf.
    """

    log_w: Tensor
    num_tokens: Tensor
    num_nonfinite: Tensor

    @classmethod
    def from_sums(cls, sums: Tensor) -> "SequenceStats":
        """Build from the (CP-summed) [S, 3] output of `local_sequence_sums`."""
        log_w = sums[:, 0].float().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return cls(log_w=log_w, num_tokens=sums[:, 1], num_nonfinite=sums[:, 2])

    @property
    def num_seqs(self) -> int:
        return self.log_w.shape[0]

    @property
    def valid(self) -> Tensor:
        """[S] bool: the sequence has response tokens and every log-ratio of it was finite."""
        return (self.num_nonfinite == 0) & (self.num_tokens > 0)
