"""Token log-ratios and per-sequence importance statistics.

The sequence log-weight is log W = sum_t r_t with r_t = log pi_t - log mu_t over response tokens,
the full product and never divided by the length. Tokens may be spread over context-parallel ranks:
`local_sequence_sums` sums a rank's own tokens per sequence and the parallel layer adds the ranks'
sums (one all-reduce of [S, 3] scalars) before `SequenceStats.from_sums` finishes the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

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


@torch.no_grad()
def local_sequence_sums(r: Tensor, finite: Tensor, mask: Tensor, seq_lengths: Tensor) -> Tensor:
    """Sum this rank's tokens per sequence.

    Args:
        r, finite, mask: [T] (mask: response tokens that count).
        seq_lengths: [S] int64, positions of each sequence on this rank; a sequence's positions are
            contiguous and the lengths sum to T (the packed layout guarantees both).
    Returns:
        [S, 3] float64: (sum of r, response-token count, non-finite token count). Segments are
        summed in fp32 (a contiguous segment reduction, the fast path on every device); the [S, 3]
        result is float64 so the cross-rank sum adds no rounding of its own.
    """
    m = mask.bool()
    cols = torch.stack([torch.where(m, r.detach().float(), 0.0), m.float(), (m & ~finite).float()], 1)
    return torch.segment_reduce(cols, "sum", lengths=seq_lengths, axis=0).double()


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
