"""Fused per-sequence passes over a rank's packed tokens: the only token-sized work of the VESPO loss.

A sequence-level loss needs, per sequence, the sum of the guarded log-ratios, the response-token
and non-finite counts (all detached) and the sum of log pi over response tokens (differentiable).
`forward_sums` computes all four in one read of (log pi, log mu, mask); the gradient of the log pi
sums is one write (`expand`). Everything after that works on [S] tensors.

Three implementations of the same contract:
- CPU: numba loops over sequences (positions of a sequence are contiguous, so each sequence is one
  independent range and no two threads write the same output). One pass instead of the ~10
  elementwise and segment passes eager PyTorch would make, so the loss path runs at memory
  bandwidth. The sequences are split into `torch.get_num_threads()` ranges of about equal token
  counts; the calling thread runs one and pool threads the others (the compiled loops release the
  GIL). Plain waiting threads, unlike numba's own parallel pool or OpenMP, do not spin after the
  loop and so leave the cores to the PyTorch ops that follow. Compiled on first use and cached next
  to this file (or in numba's user cache); the sums accumulate in float64.
- CUDA: Triton kernels (`segment_triton`: one program per sequence, the same one read and one
  write), tested on CPU under Triton's interpreter.
- Other devices (or CUDA without Triton): eager PyTorch (one segment reduction of stacked
  columns), the reference both kernels are tested against.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import torch
from torch import Tensor

from . import segment_triton
from .kernel import LOG_RATIO_CLAMP


def forward_sums(logp: Tensor, behaviour_logp: Tensor, mask: Tensor,
                 seq_lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence sums of one rank's tokens.

    Args:
        logp, behaviour_logp: [T] log pi and log mu of each position's target.
        mask: [T] bool, response tokens that count.
        seq_lengths: [S] int64 positions of each sequence (contiguous, summing to T).
    Returns:
        ratio_sums: [S, 3] float64 (sum of r_t = log pi - log mu clamped to [-20, 20] with non-finite
            r_t as 0, response-token count, non-finite r_t count), over response tokens.
        logp_sums: [S] float32 sum of log pi over response tokens (NaN where a log pi is NaN).
    """
    if logp.device.type == "cpu":
        return _cpu_forward(logp, behaviour_logp, mask, seq_lengths)
    if logp.device.type == "cuda" and segment_triton.available():
        return segment_triton.forward_sums(logp, behaviour_logp, mask, seq_lengths)
    return _torch_forward(logp, behaviour_logp, mask, seq_lengths)


def expand(grad: Tensor, mask: Tensor, seq_lengths: Tensor) -> Tensor:
    """[T] float32: grad[s] on every response token of sequence s, 0 elsewhere (grad: [S])."""
    if grad.device.type == "cpu":
        return _cpu_expand(grad, mask, seq_lengths)
    if grad.device.type == "cuda" and segment_triton.available():
        return segment_triton.expand(grad, mask, seq_lengths)
    return _torch_expand(grad, mask, seq_lengths)


# -- eager PyTorch ------------------------------------------------------------------------------

def _torch_forward(logp, behaviour_logp, mask, seq_lengths):
    m = mask.bool()
    raw = logp.float() - behaviour_logp.float()
    finite = torch.isfinite(raw)
    r = torch.where(m & finite, raw, 0.0).clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    cols = torch.stack([r, m.float(), (m & ~finite).float(), torch.where(m, logp.float(), 0.0)], 1)
    sums = torch.segment_reduce(cols, "sum", lengths=seq_lengths, axis=0)
    return sums[:, :3].double(), sums[:, 3].contiguous()


def _torch_expand(grad, mask, seq_lengths):
    per_token = grad.float().repeat_interleave(seq_lengths, output_size=mask.shape[0])
    return torch.where(mask.bool(), per_token, 0.0)


# -- numba on CPU -------------------------------------------------------------------------------

def _cpu_forward(logp, behaviour_logp, mask, seq_lengths):
    offsets = _offsets(seq_lengths, logp.shape[0])
    num_seqs = offsets.shape[0] - 1
    ratio_sums = torch.empty(num_seqs, 3, dtype=torch.float64)
    logp_sums = torch.empty(num_seqs, dtype=torch.float32)
    _split_over_threads(_forward_loop, offsets, _f32(logp), _f32(behaviour_logp), _bool(mask),
                        offsets.numpy(), LOG_RATIO_CLAMP, ratio_sums.numpy(), logp_sums.numpy())
    return ratio_sums, logp_sums


def _cpu_expand(grad, mask, seq_lengths):
    offsets = _offsets(seq_lengths, mask.shape[0])
    out = torch.empty(mask.shape[0], dtype=torch.float32)
    _split_over_threads(_expand_loop, offsets, _f32(grad), _bool(mask), offsets.numpy(), out.numpy())
    return out


def _f32(x: Tensor):
    return x.detach().float().contiguous().numpy()


def _bool(x: Tensor):
    return x.bool().contiguous().numpy()


def _offsets(seq_lengths: Tensor, total: int) -> Tensor:
    """[S + 1] int64 start of each sequence; refuses lengths that do not cover the T positions."""
    lengths = seq_lengths.to(torch.int64)
    if bool((lengths < 0).any()) or int(lengths.sum()) != total:
        raise ValueError(f"seq_lengths must be >= 0 and sum to the {total} positions, "
                         f"got sum {int(lengths.sum())}")
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _split_over_threads(loop, offsets: Tensor, *args) -> None:
    """Run `loop(*args, first_seq, end_seq)` over sequence ranges of about equal token counts, one
    per torch thread: the caller runs the last range, pool threads the others."""
    num_seqs, total = offsets.shape[0] - 1, int(offsets[-1])
    parts = max(1, min(torch.get_num_threads(), num_seqs))
    cuts = torch.searchsorted(offsets, torch.linspace(0, total, parts + 1)[1:-1].to(torch.int64))
    bounds = [0, *cuts.tolist(), num_seqs]
    # One pool per process (a forked child must not reuse its parent's threads) and size.
    pool = _pools.get((os.getpid(), parts)) if parts > 1 else None
    if pool is None and parts > 1:
        pool = _pools[(os.getpid(), parts)] = ThreadPoolExecutor(parts - 1, "segment_kernels")
    futures = [pool.submit(loop, *args, a, b) for a, b in zip(bounds[:-2], bounds[1:-1])] \
        if pool is not None else []
    loop(*args, bounds[-2], bounds[-1])
    for f in futures:
        f.result()


# Inner loops index per-sequence slices from 0, so numba emits no negative-index wraparound and
# LLVM vectorises them; 'reassoc' frees the order of the sums (NaN/inf semantics stay IEEE), and
# the branch-free selects keep the loop body straight-line.
@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _forward_loop(logp, behaviour, mask, offsets, clamp, ratio_sums, logp_sums, first, end):
    for s in range(first, end):
        a, b = offsets[s], offsets[s + 1]
        lp, mu, m = logp[a:b], behaviour[a:b], mask[a:b]
        r_sum, n_tok, n_bad, lp_sum = 0.0, 0.0, 0.0, 0.0
        for t in range(lp.shape[0]):
            raw = lp[t] - mu[t]  # float32, as the eager path computes it
            finite = math.isfinite(raw)
            r_sum += min(max(raw, -clamp), clamp) if m[t] and finite else 0.0
            n_tok += 1.0 if m[t] else 0.0
            n_bad += 0.0 if finite or not m[t] else 1.0
            lp_sum += lp[t] if m[t] else 0.0
        ratio_sums[s, 0] = r_sum
        ratio_sums[s, 1] = n_tok
        ratio_sums[s, 2] = n_bad
        logp_sums[s] = lp_sum


@numba.njit(cache=True, nogil=True)
def _expand_loop(grad, mask, offsets, out, first, end):
    for s in range(first, end):
        g, a, b = grad[s], offsets[s], offsets[s + 1]
        m, o = mask[a:b], out[a:b]
        for t in range(m.shape[0]):
            o[t] = g if m[t] else 0.0
