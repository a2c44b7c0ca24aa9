"""Capture of MoE routing per layer and token: top-k expert ids, their routing probabilities and,
optionally, the full softmax row over experts.

Forward hooks on megatron's top-k routers read the router's own outputs (probs and routing map), so
the forward result is unchanged; hooks exist only inside the `RouterCapture` context, so a disabled
capture costs nothing. The full softmax row needs the router logits, which megatron does not return:
they are recomputed from the router input with the router's own `gating` under no_grad (only when
`full_scores=True`). Forwards recomputed during backward (activation recompute) are not captured.

Token order is the router's (see `moe.replay`): s-major over [s, b], this TP rank's sequence slice
under sequence parallelism; `replay.router_order_to_positions` maps a capture back to packed
positions of the micro-batch.

    with RouterCapture(learner.chunks, full_scores=True) as cap:
        learner.recompute_old_logprobs(batches)
    cap.layers[1][0].ids   # layer 1 (megatron's 1-based layer number), micro-batch 0: [N, k]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .replay import _in_backward, moe_routers


@dataclass(frozen=True)
class RouteCapture:
    """One router call. ids [N, k] (descending probability), probs [N, k] (the routing weights the
    experts' outputs are combined with), scores [N, E] softmax over all experts (or None)."""

    ids: Tensor
    probs: Tensor
    scores: Optional[Tensor] = None


class RouterCapture:
    """Context manager: while open, every router forward of `chunks` appends a `RouteCapture` to
    `layers[layer_number]` (one entry per forward call, i.e. per micro-batch, in order)."""

    def __init__(self, chunks: Sequence[torch.nn.Module], full_scores: bool = False) -> None:
        self.routers = [r for chunk in chunks for r in moe_routers(chunk)]
        self.full_scores = full_scores
        self.layers: dict[int, list[RouteCapture]] = {}
        self._handles: list = []

    def _hook(self, module, args, output) -> None:
        if _in_backward():
            return
        probs, routing_map = output
        with torch.no_grad():
            k = module.topk
            ranked = probs.detach().float().masked_fill(~routing_map, float("-inf"))
            top_probs, ids = torch.topk(ranked, k, dim=-1)
            scores = None
            if self.full_scores:
                logits = module.gating(args[0].detach())
                scores = torch.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
        self.layers.setdefault(module.layer_number, []).append(RouteCapture(ids, top_probs, scores))

    def __enter__(self) -> "RouterCapture":
        self.layers = {}
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def stacked(self, mb: int) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """Micro-batch `mb`'s routes of every captured layer, layers in layer-number order:
        ids [N, L, k], scores [N, L, E] (None unless full_scores), probs [N, L, k]."""
        numbers = sorted(self.layers)
        if not numbers:
            raise RuntimeError("RouterCapture recorded no router forward")
        caps = []
        for n in numbers:
            if mb >= len(self.layers[n]):
                raise RuntimeError(f"RouterCapture: layer {n} has no capture of micro-batch {mb}")
            caps.append(self.layers[n][mb])
        ids = torch.stack([c.ids for c in caps], dim=1)
        probs = torch.stack([c.probs for c in caps], dim=1)
        scores = None
        if all(c.scores is not None for c in caps):
            scores = torch.stack([c.scores for c in caps], dim=1)
        return ids, scores, probs
