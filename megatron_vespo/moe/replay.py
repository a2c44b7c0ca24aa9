"""Routing replay for MoE policy updates, on top of megatron-core's own `RouterReplay`.

Modes (`LossSettings.routing_replay`):
  off  the router picks its top-k freely in every forward (megatron's default path, nothing added).
  R2   the old-policy forward of a rollout batch (`Learner.recompute_old_logprobs`) RECORDs each MoE
       layer's top-k indices per micro-batch; every training forward of those micro-batches (and the
       forward recomputed in backward under activation recompute) REPLAYs them, so the updated policy
       is scored with the routes the old policy took.
  R3   the rollout engine's routes (`Sample.routed_experts`) are replayed in the old-policy forward
       and in every training forward.

Token order. A router sees hidden states [s, b, h] and flattens them s-major: router token n is
(s = n // b, b = n % b). On CPU (local spec) micro-batches are BSHD, model input [rows, L] with every
sequence right-padded to L, so b = rows and s = L; with THD packing (TransformerEngine) b = 1 and s is
this CP rank's packed positions in zigzag order (`zigzag_index`). Under sequence parallelism a TP rank
routes only its contiguous 1/tp slice of s. `align_to_router_order` maps per-position tensors of a
`PackedBatch` ([T_local, ...], the order of `input_ids`) to that router order. R2 recordings are
already in router order of this rank and are replayed as they were recorded.

Bookkeeping. Recorded routes travel inside the batches `recompute_old_logprobs` returns
(`PackedBatch.old_routes`, int16), so a rollout batch's N mini-batches are all recorded before any
is trained on and a banked batch keeps them. In a forward step the micro-batch's index and the model chunk
pick the tensors to feed: `set_target_indices` right before that chunk's forward of that micro-batch
(REPLAY_FORWARD), while megatron's per-router FIFO (`replay_backward_list`) serves the forwards
recomputed in backward (REPLAY_BACKWARD): a forward pre-hook on each router selects the action by
whether autograd is running a backward pass. Per model chunk, forwards and backwards both run
micro-batches in order in megatron's no-pipelining, 1F1B and interleaved schedules, so this holds
for no-PP, PP and VPP layouts.

Assumptions: every transformer layer is an MoE layer (Qwen2/Qwen3-MoE; a router's layer_number - 1
is its index in the engine's [.., num_moe_layers, top_k] rows); the sinkhorn router is not used.
Positions without engine routes (the last token of each sequence, padding) are replayed with experts
0..k-1: their outputs reach neither the loss nor any real token (causal attention, right padding).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..learner.samples import Sample
from ..parallel.packing import PackedBatch, zigzag_index

REPLAY_MODES = ("off", "R2", "R3")


def check_replay_mode(mode: str) -> str:
    if mode not in REPLAY_MODES:
        raise ValueError(f"routing_replay={mode!r}; allowed: {list(REPLAY_MODES)}")
    return mode


def moe_routers(chunk: torch.nn.Module) -> list:
    """The top-k routers of a model chunk, in module order (= layer order)."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in chunk.modules() if isinstance(m, TopKRouter)]


# -- engine routes -> per-position tensors -> router order ----------------------------------------

def engine_position_routes(sample: Sample, padded_length: int) -> Tensor:
    """[padded_length, L, k] int16 routes of one sample by packed position; -1 where there are none
    (int16, not int64: a paper-size share carries its routes through N steps).

    SGLang's `routed_experts` row t is the routing of input token t for t < num_tokens - 1 (the last
    token is never fed to the engine's model)."""
    if sample.routed_experts is None:
        raise ValueError(f"sample {sample.sample_id!r} has no routed_experts: routing_replay=R3 needs "
                         "the rollout engine's routes for every sample")
    routes = torch.as_tensor(sample.routed_experts)
    if routes.numel() and int(routes.max()) > torch.iinfo(torch.int16).max:
        raise ValueError(f"sample {sample.sample_id!r}: expert id {int(routes.max())} does not fit "
                         f"the int16 routes a micro-batch carries")
    routes = routes.to(torch.int16)
    fed = sample.num_tokens - 1
    if routes.dim() != 3 or routes.shape[0] != fed:
        raise ValueError(f"sample {sample.sample_id!r}: routed_experts has shape {tuple(routes.shape)}, "
                         f"expected [{fed}, num_moe_layers, top_k] (prompt + response - 1 rows)")
    if padded_length < sample.num_tokens:
        raise ValueError(f"sample {sample.sample_id!r}: padded length {padded_length} < "
                         f"{sample.num_tokens} tokens")
    out = torch.full((padded_length,) + tuple(routes.shape[1:]), -1, dtype=torch.int16)
    out[:fed] = routes
    return out


def micro_batch_engine_routes(samples: Sequence[Sample], batch: PackedBatch, cp_rank: int = 0) -> Tensor:
    """[T_local, L, k] engine routes aligned with `batch`'s per-position tensors (CP zigzag shard of
    this `cp_rank` when the batch is CP-sharded). `samples` are the batch's sequences, in order."""
    if len(samples) != batch.num_seqs:
        raise ValueError(f"{len(samples)} samples for a micro-batch of {batch.num_seqs} sequences")
    lengths = torch.diff(batch.cu_seqlens).tolist()
    padded = torch.diff(batch.cu_seqlens_padded).tolist()
    parts = []
    for sample, length, total in zip(samples, lengths, padded):
        if sample.num_tokens != length:
            raise ValueError(f"sample {sample.sample_id!r} has {sample.num_tokens} tokens but its "
                             f"micro-batch sequence has {length}: samples do not match the batch")
        parts.append(engine_position_routes(sample, total))
    routes = torch.cat(parts)
    if batch.cp_size > 1:
        routes = routes.index_select(0, zigzag_index(batch.cu_seqlens_padded, batch.cp_size, cp_rank))
    if routes.shape[0] != batch.num_positions:
        raise ValueError(f"routes cover {routes.shape[0]} positions, the batch has {batch.num_positions}")
    return routes


def attach_engine_routes(samples: Sequence[Sample], batches: Sequence[PackedBatch],
                         plan: Sequence[Sequence[int]], cp_rank: int = 0) -> list[PackedBatch]:
    """The micro-batches `batches` packed from `plan` (indices into `samples` per micro-batch,
    `batching.micro_batch_plan`), each carrying its engine routes (`PackedBatch.engine_routes`)."""
    if len(plan) != len(batches):
        raise ValueError(f"{len(batches)} micro-batches, but the plan has {len(plan)}")
    return [replace(batch, engine_routes=micro_batch_engine_routes(
                [samples[i] for i in part], batch, cp_rank)) for part, batch in zip(plan, batches)]


def carried_routes(batches: Sequence[PackedBatch]) -> Optional[list[Tensor]]:
    """The engine routes the micro-batches carry, or None unless every one carries them."""
    routes = [b.engine_routes for b in batches]
    return None if any(r is None for r in routes) else routes


def align_to_router_order(values: Tensor, *, rows: Optional[int], tp_size: int = 1, tp_rank: int = 0,
                          sequence_parallel: bool = False) -> Tensor:
    """Per-position [T_local, ...] (a `PackedBatch`'s order) -> [N, ...] in the order this rank's
    routers flatten their input: s-major over [s, b]; BSHD `rows` sequences (b = rows) or THD
    (`rows=None`, b = 1); under sequence parallelism only TP rank `tp_rank`'s slice of s."""
    rest = tuple(values.shape[1:])
    x = values.view(rows, -1, *rest).transpose(0, 1) if rows else values.unsqueeze(1)  # [s, b, ...]
    if sequence_parallel and tp_size > 1:
        s = x.shape[0]
        if s % tp_size:
            raise ValueError(f"sequence length {s} is not divisible by tp={tp_size} (sequence parallel)")
        step = s // tp_size
        x = x[tp_rank * step:(tp_rank + 1) * step]
    return x.reshape((-1,) + rest)


def router_token_positions(num_positions: int, **kw) -> Tensor:
    """[N] packed position (index into the batch's per-position tensors) of each router token of this
    rank; `kw` as for `align_to_router_order`."""
    return align_to_router_order(torch.arange(num_positions), **kw)


def router_order_to_positions(values: Tensor, num_positions: int, fill=0, **kw) -> Tensor:
    """Inverse of `align_to_router_order` on this rank's router tokens: [N, ...] -> [T_local, ...],
    positions this TP rank does not route (other SP slices) set to `fill`."""
    out = values.new_full((num_positions,) + tuple(values.shape[1:]), fill)
    out[router_token_positions(num_positions, **kw)] = values
    return out


def fill_missing_routes(routes: Tensor) -> Tensor:
    """Rows holding -1 (no engine route) replaced by experts 0..k-1 so that every index is valid."""
    k = routes.shape[-1]
    missing = (routes < 0).any(-1, keepdim=True)
    default = torch.arange(k, dtype=routes.dtype).expand_as(routes)
    return torch.where(missing, default, routes)


# -- the replay driver ----------------------------------------------------------------------------

def _in_backward() -> bool:
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class RoutingReplay:
    """Drives the `RouterReplay` of this rank's routers for one Learner (see the module docstring).

    `phase(...)` returns the (before, after) callbacks the learner's forward step calls around each
    model-chunk forward with (chunk index, micro-batch index); `end()` resets every router."""

    def __init__(self, mode: str, chunks: Sequence[torch.nn.Module], *, thd: bool, tp_size: int,
                 tp_rank: int, sequence_parallel: bool, cp_rank: int, num_layers: int) -> None:
        self.mode = check_replay_mode(mode)
        self.routers = [moe_routers(chunk) for chunk in chunks]
        if not any(self.routers):
            raise ValueError("routing_replay needs an MoE model")
        for routers in self.routers:
            for r in routers:
                if r.router_replay is None:
                    raise ValueError("routers were built without moe_enable_routing_replay=True")
        self.thd, self.tp_size, self.tp_rank = thd, tp_size, tp_rank
        self.sequence_parallel, self.cp_rank, self.num_layers = sequence_parallel, cp_rank, num_layers
        self._pending: dict[int, list] = {}
        self._replaying = False
        for routers in self.routers:
            for r in routers:
                r.register_forward_pre_hook(self._pre_hook)

    # router-side ------------------------------------------------------------------------------

    def _pre_hook(self, module, args) -> None:
        if self._replaying:
            from megatron.core.transformer.moe.router_replay import RouterReplayAction as A

            module.router_replay.set_router_replay_action(
                A.REPLAY_BACKWARD if _in_backward() else A.REPLAY_FORWARD)

    def _all(self):
        return [r.router_replay for routers in self.routers for r in routers]

    def end(self) -> None:
        self._replaying = False
        self._pending = {}
        for rr in self._all():
            rr.clear_router_replay_action()
            rr.clear_indices()

    # learner-side -----------------------------------------------------------------------------

    def aligned(self, routes: Tensor, batch: PackedBatch) -> Tensor:
        """Per-position engine routes [T_local, L, k] -> [N, L, k] in this rank's router order."""
        if routes.dim() != 3 or routes.shape[0] != batch.num_positions:
            raise ValueError(f"routes of shape {tuple(routes.shape)} for a micro-batch of "
                             f"{batch.num_positions} positions; expected [T, num_moe_layers, top_k]")
        if routes.shape[1] != self.num_layers:
            raise ValueError(f"routes have {routes.shape[1]} MoE layers, the model {self.num_layers}")
        return align_to_router_order(
            fill_missing_routes(routes.long()), rows=None if self.thd else batch.num_seqs,
            tp_size=self.tp_size, tp_rank=self.tp_rank, sequence_parallel=self.sequence_parallel)

    def _engine_targets(self, batches, routes) -> Callable[[int, int], list[Tensor]]:
        if routes is None or len(routes) != len(batches):
            raise ValueError("routing_replay=R3: every micro-batch must carry its engine routes "
                             "(moe.replay.attach_engine_routes)")
        cache: dict[int, Tensor] = {}

        def targets(chunk: int, mb: int) -> list[Tensor]:
            if mb not in cache:
                cache[mb] = self.aligned(routes[mb], batches[mb])
            return [cache[mb][:, r.layer_number - 1].contiguous() for r in self.routers[chunk]]

        return targets

    def _recorded_targets(self, batches) -> Callable[[int, int], list[Tensor]]:
        for i, b in enumerate(batches):
            if b.old_routes is None:
                raise ValueError(f"routing_replay=R2: micro-batch {i} has no recorded routes; train "
                                 "on the batches recompute_old_logprobs returned")
        return lambda chunk, mb: [t.long() for t in batches[mb].old_routes[chunk]]

    def phase(self, batches: Sequence[PackedBatch], routes, *, old_policy: bool):
        """Set up one schedule run; returns (before, after) callbacks."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction as A

        self.end()
        if self.mode == "R2" and old_policy:
            for rr in self._all():
                rr.set_router_replay_action(A.RECORD)

            def after(chunk: int, mb: int) -> None:
                self._pending.setdefault(mb, [None] * len(self.routers))[chunk] = [
                    r.router_replay.get_recorded_indices().detach() for r in self.routers[chunk]]

            return (lambda chunk, mb: None), after
        targets = (self._recorded_targets(batches) if self.mode == "R2"
                   else self._engine_targets(batches, routes))
        self._replaying = True
        for rr in self._all():
            rr.set_router_replay_action(A.REPLAY_FORWARD)

        def before(chunk: int, mb: int) -> None:
            for r, t in zip(self.routers[chunk], targets(chunk, mb)):
                r.router_replay.set_target_indices(t)

        return before, (lambda chunk, mb: None)

    def with_recorded(self, batches: Sequence[PackedBatch]) -> list[PackedBatch]:
        """After an R2 old-policy run: the batches carrying the routes it recorded."""
        if self.mode != "R2":
            return list(batches)
        out = []
        for mb, batch in enumerate(batches):
            per_chunk = self._pending.get(mb)
            if per_chunk is None or any(c is None for c in per_chunk):
                raise RuntimeError(f"routing replay recorded nothing for micro-batch {mb}")
            out.append(replace(batch, old_routes=[[t.to(torch.int16) for t in chunk]
                                                  for chunk in per_chunk]))
        return out
