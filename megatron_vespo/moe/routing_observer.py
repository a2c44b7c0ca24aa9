"""The MoE routing metrics of the learner's steps (`algorithm.routing_metrics`).

The observer watches two forwards of the same micro-batches: the old-policy forward (its routes
are kept per batch object, with their agreement with the engine routes the batches carry), and a
train step's forward (its routes are compared with the kept ones). A step's statistics are
`algo.routing.RoutingSums`, tensors of [layers] and [layers, experts], reduced over the ranks that
hold different tokens in one collective each for sums and maxima, then named as the README's
metric reference lists them; the step's [layers, experts] load shares are kept for the heat-map.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..algo.routing import (RoutingSums, expert_load, finalize_routing, load_matrix,
                            route_agreement, router_drift)
from ..parallel.packing import PackedBatch
from ..parallel.step_reduce import all_reduce_over
from .per_batch import PerBatch
from .replay import carried_routes

RouterOrder = Callable[[torch.Tensor, PackedBatch], torch.Tensor]


class RoutingObserver:
    """`router_order` maps a batch's per-position tensor to this rank's router order;
    `token_groups`: the groups whose ranks route different tokens of the same layers; `device`:
    where this rank's collectives run."""

    def __init__(self, num_experts: int, router_order: RouterOrder, token_groups: list,
                 device: torch.device) -> None:
        self.num_experts, self.router_order, self.token_groups = num_experts, router_order, token_groups
        self.device = device
        # batch -> (old ids [N, L, k], old scores [N, L, E], engine agreement sums or None)
        self._old = PerBatch()
        self.last_load: Optional[torch.Tensor] = None  # [L, E] expert shares of the last step

    def keep_old(self, batches: Sequence[PackedBatch], cap) -> None:
        """After the old-policy forward of `batches` (captured by `cap`, a `RouterCapture`)."""
        routes = carried_routes(batches)
        for mb, batch in enumerate(batches):
            ids, scores, _ = cap.stacked(mb)
            engine = None
            if routes is not None:
                r = routes[mb]
                if r.dim() != 3 or r.shape[0] != batch.num_positions or r.shape[1:] != ids.shape[1:]:
                    raise ValueError(f"engine routes of shape {tuple(r.shape)} for micro-batch {mb}: "
                                     f"expected [{batch.num_positions}, {ids.shape[1]}, {ids.shape[2]}]")
                aligned = self.router_order(r.long().to(ids.device), batch)
                engine = route_agreement(aligned, ids, self.router_order(
                    batch.loss_mask, batch).to(ids.device), prefix="moe/route")
            self._old.put(batch, (ids, scores, engine))

    def cache(self, batch: PackedBatch):
        """What `keep_old` kept for `batch` (saved with a banked rollout batch), or None."""
        return self._old.get(batch)

    def restore(self, batch: PackedBatch, kept) -> None:
        if kept is not None:
            self._old.put(batch, kept)

    def _sums(self, batches: Sequence[PackedBatch], cap) -> RoutingSums:
        old = [self._old.get(b) for b in batches]
        have_old = all(o is not None for o in old)
        have_engine = have_old and all(o[2] is not None for o in old)
        # Every rank must hold the same statistics: agree on what is available.
        flags = torch.tensor([int(have_old), int(have_engine)], device=self.device)
        all_reduce_over(self.token_groups, dist.ReduceOp.MIN)(flags)
        have_old, have_engine = bool(flags[0]), bool(flags[1])
        total = RoutingSums()
        for mb, batch in enumerate(batches):
            ids, scores, _ = cap.stacked(mb)
            mask = self.router_order(batch.loss_mask, batch).to(ids.device)
            sums = expert_load(ids, mask, self.num_experts, probs_full=scores)
            if have_old:
                old_ids, old_scores, engine = old[mb]
                sums = sums.merge(route_agreement(old_ids, ids, mask, prefix="moe/drift"))
                sums = sums.merge(router_drift(old_scores, scores, old_ids, ids, mask))
                if have_engine:
                    sums = sums.merge(engine)
            total = total.merge(sums)
        return total

    def step_metrics(self, batches: Sequence[PackedBatch], cap) -> dict[str, float]:
        """The `moe/...` routing metrics of a train step's forward of `batches` (captured by
        `cap`), identical on every rank."""
        reduced = self._sums(batches, cap).reduce(
            all_reduce_over(self.token_groups, dist.ReduceOp.SUM),
            all_reduce_over(self.token_groups, dist.ReduceOp.MAX)).cpu()
        self.last_load = load_matrix(reduced)
        return finalize_routing(reduced)
