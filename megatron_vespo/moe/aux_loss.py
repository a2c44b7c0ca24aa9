"""The routers' load-balancing loss, per sequence and normalised over the whole optimizer step.

megatron-core's `aux_loss` is Switch's E * sum_e f_e P_e over one micro-batch's routed positions,
padding included, averaged over micro-batches: what the model trains on then depends on how a
step is cut into micro-batches and on how much padding the layout adds (measured on the tiny
MoE with coefficient 0.001: TP2+SP vs TP1 losses 3.7-4.9% apart, 8 vs 5 sequences per
micro-batch up to 37%). Here the same Switch term is taken per sequence s over its real tokens
and weighted by the sequence's share of the step's real tokens, for every router layer:

    L_aux = coeff * sum_s (n_s / N) * E * sum_e f_se * P_se
          = coeff * E / (k * N) * sum_s (1 / n_s) * sum_e c_se * sum_{t in s} p_te

with c_se the tokens of s whose top-k holds expert e (f_se = c_se / (k n_s)), p_te the router's
softmax over all E experts (P_se its mean over s), n_s the real tokens of s and N those of the
step (`Denominators.input_tokens`). Each token's term needs only its own sequence's counts, so
the loss and its gradient are sums over tokens with one global denominator, like the policy
loss's: identical for any DP / TP / SP / EP / PP / CP layout, micro-batch split and padding.
Only c_se [S, E] crosses ranks (one all-reduce over the ranks that hold slices of the same
sequences: TP under sequence parallelism, and CP); f is detached, as in megatron.

The loss is attached to the router's output with megatron's `MoEAuxLossAutoScaler`, scaled as
the policy loss is (`megatron_scaling.loss_scale_factor`), so every pipeline stage back-propagates
its own layers' share. `moe/load_balancing_loss` is L_aux / coeff averaged over layers: 1 for
perfectly balanced routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..parallel.packing import PackedBatch
from .replay import _in_backward, moe_routers


@dataclass(frozen=True)
class _MicroBatch:
    """What every router of one training forward needs: per router token (router order) its
    sequence [N] and whether it is a real token [N], and per sequence its real tokens [S]."""

    seq: Tensor
    real: Tensor
    seq_tokens: Tensor
    scale: float  # coeff * E / (k * N): the step's normaliser
    grad_factor: float  # what megatron's own scaling of the attached loss must be undone by


class _SequenceWeightedSum(torch.autograd.Function):
    """sum_t real_t * sum_e scores[t, e] * weight[seq_t, e] for scores [N, E], weight [S, E],
    seq [N], real [N]. Backward saves only weight, seq and real (not an [N, E] per-token weight per
    layer: 384 MB at 16k tokens and 48 layers) and rebuilds the per-token rows when needed."""

    @staticmethod
    def forward(ctx, scores: Tensor, weight: Tensor, seq: Tensor, real: Tensor) -> Tensor:
        ctx.save_for_backward(weight, seq, real)
        return (scores * weight[seq]).sum(dim=1).mul_(real).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, seq, real = ctx.saved_tensors
        return weight[seq].mul_(real.unsqueeze(1)).mul_(grad), None, None, None


class SequenceAuxLoss:
    """Forward hooks on the routers of `chunks` that attach L_aux during training forwards.

    `micro_batch(batch, ...)` is called before each micro-batch's forward; `step_value(groups)`
    after the step returns the reduced `moe/load_balancing_loss` and resets the sums.
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], *, coeff: float, num_experts: int,
                 topk: int, router_order: Callable[[Tensor, PackedBatch], Tensor],
                 count_groups: Sequence[dist.ProcessGroup], device: torch.device) -> None:
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        self._attach = MoEAuxLossAutoScaler.apply
        self.coeff, self.num_experts, self.topk = coeff, num_experts, topk
        self.router_order, self.count_groups = router_order, list(count_groups)
        self.routers = [r for chunk in chunks for r in moe_routers(chunk)]
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]
        self._current: Optional[_MicroBatch] = None
        # L_aux of this rank's layers and tokens so far in the step (no host sync per layer)
        self._value = torch.zeros((), dtype=torch.float64, device=device)

    def micro_batch(self, batch: PackedBatch, input_tokens: float, grad_factor: float) -> None:
        """Set the micro-batch the next router forwards belong to (`batch` as the model runs it,
        on the model's device)."""
        real = batch.real_positions
        self._current = _MicroBatch(
            seq=self.router_order(batch.seq_index, batch), real=self.router_order(real, batch),
            seq_tokens=torch.diff(batch.cu_seqlens).to(torch.float64),
            scale=self.coeff * self.num_experts / (self.topk * input_tokens),
            grad_factor=grad_factor)

    def _hook(self, module, args, output):
        current = self._current
        if current is None or not module.training or not torch.is_grad_enabled() or _in_backward():
            return None
        probs, routing_map = output
        scores = torch.softmax(module.gating(args[0]).reshape(-1, self.num_experts).float(), dim=-1)
        if scores.shape[0] != current.seq.shape[0]:
            raise RuntimeError(f"the router saw {scores.shape[0]} tokens, the micro-batch has "
                               f"{current.seq.shape[0]} in router order")
        real, seq = current.real, current.seq
        top = scores.detach().topk(self.topk, dim=-1).indices  # [N, k]
        counts = torch.zeros(current.seq_tokens.shape[0], self.num_experts, dtype=torch.float64,
                             device=scores.device)
        counts.index_put_((seq[real].unsqueeze(1).expand(-1, self.topk), top[real]),
                          torch.ones((), dtype=torch.float64, device=scores.device),
                          accumulate=True)
        for group in self.count_groups:
            if dist.get_world_size(group) > 1:
                dist.all_reduce(counts, group=group)
        # c_se / n_s: each token of sequence s weighs expert e's probability by this (0 for padding)
        weight = (counts / current.seq_tokens.to(counts.device).clamp(min=1).unsqueeze(1))
        local = _SequenceWeightedSum.apply(scores, weight.to(scores.dtype), seq,
                                           real.to(scores.dtype)) * current.scale
        self._value += local.detach()
        return self._attach(probs, local * current.grad_factor), routing_map

    def end(self) -> None:
        """No micro-batch: forwards outside a training step attach nothing."""
        self._current = None

    def step_value(self, groups: Sequence[dist.ProcessGroup], num_layers: int) -> float:
        """sum over the step's layers and tokens of L_aux / coeff, reduced over `groups` (the
        ranks holding other tokens or other layers), averaged over layers; resets the sums."""
        total = self._value.clone()
        self._value.zero_()
        for group in groups:
            if dist.get_world_size(group) > 1:
                dist.all_reduce(total, group=group)
        return float(total) / (self.coeff * num_layers)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
