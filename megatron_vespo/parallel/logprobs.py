"""Per-token log-probabilities and entropy from (vocab-parallel) logits, in token chunks.

`vocab_parallel_logprobs(logits, targets)` returns log softmax(z)[t, targets[t]] and, optionally,
the entropy of softmax(z)[t], where z is the full-vocabulary logits row divided by the sampling
temperature (z = logits / T: the distribution the engine sampled from and reports log-probs of). Under tensor parallelism
rank r of the group holds vocab columns [r * V_local, (r + 1) * V_local) (megatron's
`VocabUtility` layout); the full row is never gathered.

Memory: the fp32 working set is one chunk of `chunk_tokens` rows (two with entropy) at a time, in
forward and in backward; the row maxima come from one pass over the logits in their own dtype.
float64 logits are accepted but computed in fp32 like the rest. Backward saves only the logits (alive in the graph anyway) and [T]-sized statistics,
recomputes the chunk's softmax, and writes the logits' gradient chunk by chunk into one
preallocated tensor of the logits' dtype. The caller's logits are never modified in place.

Communication (forward only): one all-reduce MAX of the row maxima [T] and one all-reduce SUM of
the stacked per-row partial sums [2 or 3, T], independent of the number of chunks.

Why backward needs no communication: every output is replicated across the TP group and the loss
built on it is replicated too, so each rank receives the same upstream gradient g. The gradient
for a column j that rank r owns, g_logp * (1[j == target] - p_j) - g_H * p_j * (H + log p_j),
needs only z_j (local), the row's global log-sum-exp and entropy (saved, already reduced in
forward) and g (replicated). Each rank therefore computes its own columns' exact gradient alone.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = ["vocab_parallel_logprobs"]

_F32 = torch.float32
# exp(x) is exactly 0 in fp32 for x below about -104, so flooring log-probabilities at -1e4 after
# p = exp(log p) is taken changes no product p * (...) yet turns 0 * -inf (masked logits, -inf)
# into 0 instead of nan; -1e4 rather than fp32's minimum so that scaling by a gradient cannot
# overflow to -inf either.
_LOG_FLOOR = -1.0e4


def _group_size_rank(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 1, 0
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("tp_group was given but torch.distributed is not initialised")
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _chunk_bounds(num_tokens: int, chunk_tokens: int):
    for start in range(0, num_tokens, chunk_tokens):
        yield start, min(start + chunk_tokens, num_tokens)


def _fp32_copy(chunk: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """The chunk's z = logits / T in fp32. Always a fresh tensor (even for fp32 input, where
    .float() would alias the caller's logits), so every later step can work in place on this one
    chunk-sized buffer; the temperature is applied there, so it costs no [T, V] copy."""
    copy = chunk.to(_F32, copy=True)
    return copy if inv_temp == 1.0 else copy.mul_(inv_temp)


def _forward_chunk(chunk, local_targets, row_max, partial, inv_temp) -> None:
    """Fill `partial` [2 or 3, rows] with this rank's partial sums for one chunk of rows.

    partial[0] = sum_j exp(z_j - m); partial[1] = z_target (0 where another rank owns it);
    partial[2] (entropy only) = sum_j exp(z_j - m) (z_j - m). Temporaries die on return.
    """
    owned = local_targets >= 0
    target_logit = chunk.gather(1, local_targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    partial[1] = torch.where(owned, target_logit.to(_F32) * inv_temp, 0.0)
    shifted = _fp32_copy(chunk, inv_temp).sub_(row_max.unsqueeze(1))
    if partial.shape[0] == 3:
        exp_shifted = shifted.exp()
        partial[0] = exp_shifted.sum(dim=-1)
        partial[2] = shifted.clamp_(min=_LOG_FLOOR).mul_(exp_shifted).sum(dim=-1)
    else:
        partial[0] = shifted.exp_().sum(dim=-1)


def _backward_chunk(chunk, local_targets, row_max, log_sum_exp, entropy, grad_logp, grad_entropy,
                    inv_temp):
    """fp32 gradient [rows, V_local] of grad_logp . logp + grad_entropy . H for one chunk, with
    respect to the logits (the gradient with respect to z = logits / T, times 1 / T).

    Either upstream gradient may be None (that output got none). Temporaries die on return.
    """
    # log p = (z - m) - log sum exp(z - m) from the saved global statistics; kept as two
    # subtractions because folding m + log S into one fp32 log Z rounds at |m|'s scale.
    grad = _fp32_copy(chunk, inv_temp).sub_(row_max.unsqueeze(1)).sub_(log_sum_exp.unsqueeze(1))
    if grad_entropy is None:
        # d logp / dz_j = 1[j == t] - p_j; the one-hot part is added below.
        grad.exp_().mul_(-grad_logp.unsqueeze(1))
    else:
        # d H / dz_j = p_j (E_p[z] - z_j) = -p_j (H + log p_j); with logp: -p_j (... + g_logp).
        p = grad.exp()
        grad.clamp_(min=_LOG_FLOOR).add_(entropy.unsqueeze(1)).mul_(grad_entropy.unsqueeze(1))
        if grad_logp is not None:
            grad.add_(grad_logp.unsqueeze(1))
        grad.mul_(p).neg_()
    if grad_logp is not None:
        # One-hot term, only on the rank (and column) that owns the target.
        owned = local_targets >= 0
        onehot = torch.where(owned, grad_logp.to(_F32), 0.0)
        grad.scatter_add_(1, local_targets.clamp(min=0).unsqueeze(1), onehot.unsqueeze(1))
    return grad if inv_temp == 1.0 else grad.mul_(inv_temp)


class _VocabParallelLogprobs(torch.autograd.Function):
    """Autograd wrapper; see `vocab_parallel_logprobs` for the contract."""

    @staticmethod
    def forward(ctx, logits, targets, tp_group, tp_size, tp_rank, chunk_tokens, with_entropy,
                inv_temp):
        num_tokens, v_local = logits.shape
        device = logits.device
        # Local column of each target; -1 marks rows whose target another rank owns.
        local_targets = targets - tp_rank * v_local
        owned = (local_targets >= 0) & (local_targets < v_local)
        local_targets = torch.where(owned, local_targets, torch.full_like(local_targets, -1))

        # Row maxima in the logits' own dtype (max is exact in any dtype, and no fp32 copy of
        # [T, V_local] is made), then the global maximum over the group, for all chunks at once;
        # max(z / T) = max(z) / T for T > 0.
        row_max = logits.amax(dim=-1).to(_F32).mul_(inv_temp) if num_tokens \
            else logits.new_empty(0, dtype=_F32)
        if tp_size > 1 and num_tokens:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)

        # Per-row partial sums, reduced over the group once after the chunk loop:
        # [0] sum_j exp(z_j - m), [1] the target logit z_t (0 on ranks that do not own it),
        # [2] sum_j exp(z_j - m) * (z_j - m), for the entropy.
        partial = torch.zeros(3 if with_entropy else 2, num_tokens, dtype=_F32, device=device)
        for start, end in _chunk_bounds(num_tokens, chunk_tokens):
            _forward_chunk(logits[start:end], local_targets[start:end], row_max[start:end],
                           partial[:, start:end], inv_temp)

        if tp_size > 1 and num_tokens:
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=tp_group)

        log_sum_exp = partial[0].log()
        logp = partial[1] - row_max - log_sum_exp
        if with_entropy:
            # H = log Z - E_p[z] = log sum exp(z - m) - sum exp(z - m) (z - m) / sum exp(z - m)
            entropy = log_sum_exp - partial[2] / partial[0]
            ctx.save_for_backward(logits, local_targets, row_max, log_sum_exp, entropy)
        else:
            entropy = None
            ctx.save_for_backward(logits, local_targets, row_max, log_sum_exp)
        ctx.chunk_tokens = chunk_tokens
        ctx.with_entropy = with_entropy
        ctx.inv_temp = inv_temp
        ctx.set_materialize_grads(False)  # None for an output that got no gradient: skip its term
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        if ctx.with_entropy:
            logits, local_targets, row_max, log_sum_exp, entropy = ctx.saved_tensors
        else:
            logits, local_targets, row_max, log_sum_exp = ctx.saved_tensors
            entropy = None
        if (grad_logp is None and grad_entropy is None) or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None, None

        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for start, end in _chunk_bounds(logits.shape[0], ctx.chunk_tokens):
            rows = slice(start, end)
            grad_logits[rows].copy_(_backward_chunk(
                logits[rows], local_targets[rows], row_max[rows], log_sum_exp[rows],
                None if entropy is None else entropy[rows],
                None if grad_logp is None else grad_logp[rows],
                None if grad_entropy is None else grad_entropy[rows], ctx.inv_temp))
        return grad_logits, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group=None,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probability of each target token, and optionally the entropy, from sharded logits.

    Args:
        logits: [T, V_local], any float dtype. Under tensor parallelism rank r of `tp_group`
            holds vocab columns [r * V_local, (r + 1) * V_local). Never modified.
        targets: [T] integer global vocab ids in [0, V_local * tp_size), identical on every rank.
        tp_group: the tensor-parallel process group; None (or a group of size 1) = unsharded.
        chunk_tokens: rows upcast to fp32 at a time; bounds the working memory to about
            chunk_tokens * V_local * 4 bytes (twice that with entropy).
        with_entropy: also return the entropy of the full-vocabulary distribution.
        temperature: T > 0; log-probs and entropy are those of softmax(logits / T), the
            distribution a sampler at temperature T draws from (SGLang's log-probs at T are
            these, over the full vocabulary: top-k / top-p do not renormalise them).

    Returns:
        (logp, entropy): logp [T] float32 = log softmax(logits / T)[t, targets[t]]; entropy [T] float32
        or None. Both identical on every rank of `tp_group` and differentiable w.r.t. `logits`
        (the gradient is [T, V_local] in logits' dtype, each rank's own columns).

    Raises:
        ValueError: on non-float logits, non-integer targets, mismatched shapes or devices,
            targets outside [0, V_local * tp_size), chunk_tokens < 1, or temperature <= 0.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        dtype = logits.dtype if isinstance(logits, torch.Tensor) else type(logits)
        raise ValueError(f"logits must be a floating-point tensor, got {dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, V_local], got shape {tuple(logits.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool:
        dtype = targets.dtype if isinstance(targets, torch.Tensor) else type(targets)
        raise ValueError(f"targets must be an integer tensor, got {dtype}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets must be [T] with T = logits.shape[0] = {logits.shape[0]}, "
                         f"got shape {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"targets on {targets.device} but logits on {logits.device}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    v_local = logits.shape[1]
    if v_local < 1:
        raise ValueError("logits has an empty vocab dimension (V_local = 0)")

    tp_size, tp_rank = _group_size_rank(tp_group)
    vocab = v_local * tp_size
    targets = targets.long()
    if targets.numel():
        low, high = torch.stack(targets.aminmax()).tolist()  # one host sync, for a clear error
        if low < 0 or high >= vocab:
            raise ValueError(f"targets must lie in [0, {vocab}) (V_local {v_local} x tp {tp_size}), "
                             f"got values in [{low}, {high}]")

    out = _VocabParallelLogprobs.apply(logits, targets, tp_group, tp_size, tp_rank, chunk_tokens,
                                       bool(with_entropy), 1.0 / float(temperature))
    if with_entropy:
        return out[0], out[1]
    return out, None
