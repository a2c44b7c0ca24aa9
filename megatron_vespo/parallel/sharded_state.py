"""Where each parameter of a sharded megatron model sits in the canonical full state, and the
streams between the two.

The canonical state names an unsharded, unpipelined GPTModel's tensors (global layer and expert
indices; `learner.state_adapter` defines it per model family). A live model is split over TP/ETP
(slices), PP/VPP (layers), EP (experts) and replicated over DP/CP:

* `local_shards` maps every local parameter (local spec or TransformerEngine spec names) to its
  canonical name and slice; `take_slice` / `load_full_state` go from full tensors to the slices.
* `plan_stream` + `stream_full_tensors` go the other way, one full tensor at a time: each tensor is
  gathered from its TP/ETP group onto its lowest-ranked holder, which sends it to its pipeline
  stage's sender (the stage's lowest global rank; `one_sender` makes global rank 0 the sender of
  every stage). Stages stream in parallel, and no rank holds more than its own shards plus the
  tensor in flight: that is what lets a 30B-A3B or larger model be synced or exported without ever
  being whole on one host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from .agree import raise_everywhere
from .layout import ParallelLayout

_MAX_LISTED = 20  # problems listed in an error message

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")
# TransformerEngine spec: the norm before attention / the dense MLP is fused into the next linear.
_TE_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


class ShardMismatch(ValueError):
    """A model whose parameters do not fit the canonical state (the message names them)."""


@dataclass(frozen=True)
class Canonical:
    """What the sharding code needs of a model family's canonical state."""

    shapes: Mapping[str, Tuple[int, ...]]  # canonical name -> full shape, in canonical order
    tied_embeddings: bool
    num_experts: int  # 0 for a dense model


@dataclass
class Shard:
    """Where one local parameter sits in the canonical full state."""

    local_name: str
    canonical: str
    param: torch.nn.Parameter
    dim: Optional[int]  # split dimension, None when this rank holds the whole tensor
    size: int  # ranks the tensor is split over (TP, or ETP for experts)
    rank: int
    group: Any
    gated: bool  # linear_fc1 [gate; up]: each rank holds [gate_r; up_r]
    tied_copy: bool  # last stage's output layer under PP with tied embeddings


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def _check_layout(layout: ParallelLayout) -> None:
    from megatron.core import parallel_state as ps

    expert_tp = layout.tp if layout.etp is None else layout.etp  # etp None: the same as tp
    pairs = dict(
        tp=(layout.tp, ps.get_tensor_model_parallel_world_size()),
        pp=(layout.pp, ps.get_pipeline_model_parallel_world_size()),
        ep=(layout.ep, ps.get_expert_model_parallel_world_size()),
        etp=(expert_tp, ps.get_expert_tensor_parallel_world_size()),
        vpp=(layout.vpp, ps.get_virtual_pipeline_model_parallel_world_size()))
    wrong = [f"{k}: layout {mine}, parallel_state {theirs}" for k, (mine, theirs) in pairs.items()
             if mine != theirs]
    if wrong:
        raise ValueError("the parallel layout does not match megatron's initialised parallel_state "
                         f"(call layout.initialize() first): {'; '.join(wrong)}")


def canonical_name(name: str, layer_offset: int, expert_offset: int, tied_embeddings: bool) -> str:
    """Canonical full-state name of a local parameter name (local spec or TE spec)."""
    if name == "output_layer.weight" and tied_embeddings:
        return "embedding.word_embeddings.weight"
    match = _LAYER.match(name)
    if not match:
        return name
    layer, rest = layer_offset + int(match.group(1)), match.group(2)
    rest = _TE_NORMS.get(rest, rest)
    expert = _LOCAL_EXPERT.match(rest)
    if expert:
        rest = f"mlp.experts.local_experts.{expert_offset + int(expert.group(1))}.{expert.group(2)}"
    expert = _GROUPED_EXPERT.match(rest)
    if expert:
        rest = f"mlp.experts.local_experts.{expert_offset + int(expert.group(2))}.{expert.group(1)}.weight"
    return f"decoder.layers.{layer}.{rest}"


def _listed(problems: Sequence[str]) -> str:
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return "\n  " + "\n  ".join(problems[:_MAX_LISTED]) + more


def local_shards(model_chunks: Sequence[torch.nn.Module], state: Canonical,
                 layout: ParallelLayout) -> List[Shard]:
    """Every parameter of this rank's chunks with its canonical name and slice; unknown names and
    shapes that do not fit `state` raise `ShardMismatch` before anything is touched."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    _check_layout(layout)
    tp = (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
          ps.get_tensor_model_parallel_group())
    etp = (ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank(),
           ps.get_expert_tensor_parallel_group())
    expert_offset = 0
    if state.num_experts:
        ep_size = ps.get_expert_model_parallel_world_size()
        if state.num_experts % ep_size:
            raise ValueError(f"num_experts={state.num_experts} is not divisible by ep={ep_size}")
        expert_offset = ps.get_expert_model_parallel_rank() * (state.num_experts // ep_size)
    shards, errors = [], []
    for chunk in model_chunks:
        model = _unwrap(chunk)
        layer_offset = get_transformer_layer_offset(model.config, vp_stage=getattr(model, "vp_stage", None))
        for name, param in model.named_parameters():
            canonical = canonical_name(name, layer_offset, expert_offset, state.tied_embeddings)
            if canonical not in state.shapes:
                errors.append(f"model parameter {name} (canonical {canonical}) has no counterpart in "
                              "the checkpoint layout")
                continue
            is_expert = ".mlp.experts." in canonical
            size, rank, group = etp if is_expert else tp
            split = bool(getattr(param, "tensor_model_parallel", False)) and size > 1
            dim = int(getattr(param, "partition_dim", 0)) if split else None
            shard = Shard(name, canonical, param, dim, size if split else 1, rank if split else 0,
                          group, gated=split and dim == 0 and canonical.endswith("linear_fc1.weight"),
                          tied_copy=name == "output_layer.weight" and state.tied_embeddings)
            local_shape = list(state.shapes[canonical])
            if dim is not None:
                if local_shape[dim] % size:
                    errors.append(f"{canonical}: dimension {dim} of {tuple(local_shape)} is not "
                                  f"divisible by the {'expert ' if is_expert else ''}TP size {size}")
                    continue
                local_shape[dim] //= size
            if tuple(param.shape) != tuple(local_shape):
                where = "" if name == canonical else f" (model parameter {name})"
                errors.append(f"{canonical}{where}: expected local shape {tuple(local_shape)} from "
                              f"the config, model has {tuple(param.shape)}")
                continue
            shards.append(shard)
    if errors:
        raise ShardMismatch(f"the model does not match the model config ({len(errors)} "
                            f"parameters):{_listed(errors)}")
    return shards


def take_slice(full: torch.Tensor, shard: Shard) -> torch.Tensor:
    """This rank's slice of a full canonical tensor."""
    if shard.dim is None:
        return full
    if shard.gated:  # [gate; up] -> [gate_r; up_r]
        gate_up = full.reshape(2, shard.size, full.shape[0] // (2 * shard.size), *full.shape[1:])
        return gate_up[:, shard.rank].reshape(-1, *full.shape[1:])
    return full.chunk(shard.size, dim=shard.dim)[shard.rank]


def load_full_state(model_chunks: Sequence[torch.nn.Module], full_state: Mapping[str, torch.Tensor],
                    state: Canonical, layout: ParallelLayout) -> None:
    """Copy each local parameter's slice of the canonical `full_state` into the model chunks.

    No communication: every rank needs `full_state` (only its own slices are read). Everything is
    validated (the state's names and shapes, every local parameter's slice against the parameter)
    before the first copy. Load before building the optimizer: fp32 main copies that an optimizer
    already made are not updated.
    """
    problems = [f"missing tensor {n}" for n in state.shapes if n not in full_state]
    problems += [f"unexpected tensor {n}" for n in full_state if n not in state.shapes]
    problems += [f"{n}: expected shape {tuple(s)}, found {tuple(full_state[n].shape)}"
                 for n, s in state.shapes.items()
                 if n in full_state and tuple(full_state[n].shape) != tuple(s)]
    if problems:
        raise ShardMismatch(f"the full state does not match the model config:{_listed(problems)}")
    shards = local_shards(model_chunks, state, layout)
    with torch.no_grad():
        for shard in shards:
            shard.param.copy_(take_slice(full_state[shard.canonical], shard))


# ------------------------------------------------------------------------------------------------
# Streaming the full tensors
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One canonical tensor's way to its sender."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    owner: int  # the lowest rank holding it; it has the full tensor after the gather
    gatherers: Tuple[int, ...]  # the owner's TP/ETP group when the tensor is split, else ()
    sender: int


@dataclass
class StreamPlan:
    """The same list of entries on every rank; this rank's shards."""

    entries: List[_Entry]
    shards: Dict[str, Shard]
    senders: Tuple[int, ...]  # every sender, ascending


def plan_stream(model_chunks: Sequence[torch.nn.Module], state: Canonical, layout: ParallelLayout,
                *, one_sender: bool = False) -> StreamPlan:
    """Collective over the world: every rank must call it. Validity is agreed first, so a model
    that does not fit raises on every rank instead of leaving the others waiting."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    problem: Optional[Exception] = None
    try:
        shards = local_shards(model_chunks, state, layout)
    except ValueError as exc:
        problem = exc
    raise_everywhere(problem, ShardMismatch, "fitting the model to the config")
    held = {s.canonical: (tuple(dist.get_process_group_ranks(s.group)) if s.dim is not None else (),
                          s.param.dtype)
            for s in shards if not s.tied_copy}
    everyone: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (ps.get_pipeline_model_parallel_rank(), held))

    stage_sender: Dict[int, int] = {}
    for rank, (stage, _) in enumerate(everyone):
        stage_sender.setdefault(stage, 0 if one_sender else rank)
    owner: Dict[str, int] = {}
    for rank, (_, holdings) in enumerate(everyone):
        for name in holdings:
            owner.setdefault(name, rank)
    missing = [name for name in state.shapes if name not in owner]
    if missing:  # every rank sees the same holdings, so every rank raises
        raise ShardMismatch(f"no rank holds these tensors of the config:{_listed(missing)}")
    entries = []
    for name, shape in state.shapes.items():
        rank = owner[name]
        stage, holdings = everyone[rank]
        group, dtype = holdings[name]
        entries.append(_Entry(name, tuple(shape), dtype, rank, group, stage_sender[stage]))
    # One dtype after another (in order of first appearance), canonical order within each: a bucket
    # holds one dtype, so a model with parameters of two dtypes (the local spec keeps its norms in
    # fp32 beside bf16 weights) would otherwise cut a bucket several times a layer (27 buckets
    # instead of 6 at 128 MiB for a 4-layer 536 MiB model, each with its own HTTP call and receive
    # on every server).
    dtype_order: Dict[torch.dtype, int] = {}
    for entry in entries:
        dtype_order.setdefault(entry.dtype, len(dtype_order))
    entries.sort(key=lambda e: dtype_order[e.dtype])
    return StreamPlan(entries, {s.canonical: s for s in shards if not s.tied_copy},
                      tuple(sorted(set(stage_sender.values()))))


def _gather_to_owner(local: torch.Tensor, shard: Shard, entry: _Entry, me: int,
                     into: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The full tensor on the owner (None on its peers) from the TP/ETP slices, in `into` when
    given. Row splits land in place: each holder's row blocks (one, or two for [gate_r; up_r])
    are received straight into the full tensor, whose block j*size + r is holder r's block j.
    Column splits are joined with one copy. Peers send point to point (gloo's gather is about 4x
    slower on the same bytes)."""
    import torch.distributed as dist

    blocks = 2 if shard.gated else 1
    if me != entry.owner:
        parts = local.chunk(blocks, dim=0) if shard.dim == 0 else (local,)
        for tag, part in enumerate(parts):
            dist.send(part.contiguous(), entry.owner, tag=tag)
        return None
    if shard.dim == 0:
        full = into if into is not None else torch.empty(entry.shape, dtype=local.dtype,
                                                         device=local.device)
        targets = full.chunk(blocks * shard.size, dim=0)
        receives = [dist.irecv(targets[j * shard.size + r], peer, tag=j)
                    for r, peer in enumerate(entry.gatherers) if peer != me for j in range(blocks)]
        mine = entry.gatherers.index(me)  # our own blocks are copied while the others arrive
        for j, part in enumerate(local.chunk(blocks, dim=0)):
            targets[j * shard.size + mine].copy_(part)
        for work in receives:
            work.wait()
        return full
    pieces = [local if peer == me else torch.empty_like(local) for peer in entry.gatherers]
    for work in [dist.irecv(piece, peer) for piece, peer in zip(pieces, entry.gatherers) if peer != me]:
        work.wait()
    return torch.cat(pieces, dim=shard.dim, out=into)


def deliver(plan: StreamPlan, entry: _Entry, into: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """This rank's part in moving one canonical tensor to its sender: gather it (owner's TP/ETP
    group), send it (owner), receive it (sender). Returns the full tensor on the sender, written
    into `into` [entry.shape] when given (a slice of the sender's bucket buffer: the bytes land
    where they are sent from); None elsewhere. Every rank must call it for every entry, in order."""
    import torch.distributed as dist

    me = dist.get_rank()
    tensor = None
    if me == entry.owner or me in entry.gatherers:
        shard = plan.shards[entry.name]
        local = shard.param.detach()
        if shard.dim is not None:
            tensor = _gather_to_owner(local, shard, entry, me, into if me == entry.sender else None)
        else:
            tensor = local if into is None or me != entry.sender else into.copy_(local)
        if me != entry.owner:
            return None
        if me != entry.sender:
            dist.send(tensor.contiguous(), entry.sender)
            return None
        return tensor
    if me == entry.sender:
        device = next((s.param.device for s in plan.shards.values()), torch.device("cpu"))
        tensor = into if into is not None else torch.empty(entry.shape, dtype=entry.dtype, device=device)
        dist.recv(tensor, entry.owner)
    return tensor


def stream_full_tensors(plan: StreamPlan) -> Iterator[Tuple[str, torch.Tensor]]:
    """(canonical name, full tensor) for every tensor this rank sends, in stream order; nothing on
    the other ranks. Collective: every rank must exhaust its iterator."""
    for entry in plan.entries:
        tensor = deliver(plan, entry)
        if tensor is not None:
            yield entry.name, tensor


def gather_full_state(model_chunks: Sequence[torch.nn.Module], state: Canonical,
                      layout: ParallelLayout) -> Optional[Dict[str, torch.Tensor]]:
    """The canonical full state (CPU tensors in the parameters' dtype) on global rank 0, None on
    the other ranks. Collective. For small models and tests: the whole model on one host."""
    import torch.distributed as dist

    plan = plan_stream(model_chunks, state, layout, one_sender=True)
    full = {name: tensor.to("cpu", copy=True) for name, tensor in stream_full_tensors(plan)}
    return full if dist.get_rank() == 0 else None
