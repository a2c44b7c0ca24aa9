"""The Megatron learner: model chunks in megatron's DDP, its optimizer and scheduler, and the policy
update through megatron's own forward/backward schedules (pipeline schedules included).

One optimizer step = one mini-batch: this rank's micro-batches go through `get_forward_backward_func`;
the last pipeline stage turns logits into per-token log pi (vocab-parallel), the loss registry
computes the configured policy loss on its local tokens, and `schedule_loss_output` undoes megatron's
own loss scaling so gradients are those of the globally normalised loss. Under virtual pipeline
stages (interleaved schedule) the micro-batches of a step run padded to one shape.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Sequence

import torch
import torch.distributed as dist

from ..algo.metrics import MetricSums
from ..algo.policy_losses import Denominators, get_policy_loss
from ..moe.replay import carried_routes
from ..parallel.layout import ParallelGroups, ParallelLayout
from ..parallel.logprobs import vocab_parallel_logprobs
from ..parallel.megatron_scaling import loss_scale_factor, schedule_loss_output
from ..parallel.packing import PackedBatch, pad_rows, pad_tail
from ..parallel.policy_objective import shard_policy_loss
from ..parallel.step_reduce import reduce_step_metrics
from .model import ModelConfig, build_model_chunks, transformer_config, use_transformer_engine


def _device() -> torch.device:
    """Where this rank's tensors live: its CUDA device, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class OptimConfig:
    """megatron `OptimizerConfig` and `OptimizerParamScheduler` settings (Adam)."""

    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_steps: int = 0  # 0: the schedule never decays
    lr_decay_style: str = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_decay_style={self.lr_decay_style!r}; allowed: constant, linear, cosine")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0, got {self.clip_grad}")


@dataclass(frozen=True)
class LossSettings:
    """What the loss path needs from the algorithm config."""

    loss: str = "vespo"
    params: object = None
    correct_mismatch: bool = False
    mismatch_threshold: float = 1.0
    logprob_chunk_tokens: int = 1024
    # MoE routing replay (megatron_vespo.moe.replay): "off" | "R2" (replay the old-policy forward's
    # routes) | "R3" (replay the rollout engine's routes).
    routing_replay: str = "off"
    # MoE routing metrics in every train_step (drift old-policy vs current forward, engine vs
    # old-policy routes when given, expert load): megatron_vespo.algo.routing. pp == 1 only.
    routing_metrics: bool = False
    # The sampling temperature of the behaviour policy: log pi and the old log-probs are those of
    # softmax(logits / T), the distribution the engine sampled from and reports log-probs of.
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")


def check_interleaved_microbatches(num_microbatches: int, pp: int, group: int) -> None:
    """Refuse a micro-batch count megatron's interleaved (VPP) schedule cannot run.

    The schedule runs each virtual stage on groups of `group` consecutive micro-batches
    (`microbatch_group_size_per_vp_stage`, megatron's default: pp); it needs pp <= group <= M and
    a last group that is either full or at least pp long. With the default: M a multiple of pp.
    """
    rest = num_microbatches % group
    if not pp <= group <= num_microbatches or 0 < rest < pp:
        raise ValueError(
            f"parallel.vpp: a micro-batch count per rank and step of {num_microbatches} does not "
            f"fit the interleaved schedule's groups of microbatch_group_size_per_vp_stage="
            f"{group} at parallel.pp={pp} (it needs pp <= group <= micro-batches, and micro-batches % group "
            f"0 or >= pp; with the default group = pp: a multiple of pp); set "
            f"train.micro_batch_size so that each rank's share of the mini-batch "
            f"(train.rollout_batch_size / train.staleness over DP) splits into a multiple of pp")


def pipeline_p2p_settings(layout: ParallelLayout) -> dict:
    """megatron `TransformerConfig` fields for the p2p exchange between pipeline stages.

    Without VPP the stages exchange each micro-batch's activation shape first (lengths vary).
    Under VPP the last stage also sends to the first (the next model chunk), so with pp == 2 a
    rank's previous and next stage are the same peer. megatron's default batched exchange
    (`batch_p2p_comm`) then posts, in one call, an activation and a gradient to that peer in an
    order the peer does not receive them in: the two swap silently when their shapes agree
    (measured at pp=2, vpp=2 with 4 micro-batches: a wrong loss, grad norm 515 for 0.068), and
    the shape exchange before them deadlocks when they do not. With `overlap_p2p_comm` every
    call moves one direction only (Megatron-LM's own VPP default). Micro-batches get one padded
    shape (`Learner._schedule_batches`) instead of a blocking shape exchange before each call.
    """
    if layout.vpp:
        return dict(variable_seq_lengths=False, overlap_p2p_comm=True, batch_p2p_comm=False)
    return dict(variable_seq_lengths=layout.pp > 1)


def pads_across_ep(model_cfg: ModelConfig, layout: ParallelLayout) -> bool:
    """Whether micro-batches are padded to a common shape across the expert-parallel group:
    megatron's allgather token dispatcher all-gathers every rank's tokens over TP x EP, which
    needs the same token count on each (`Learner._schedule_batches`)."""
    return model_cfg.is_moe and model_cfg.moe_token_dispatcher == "allgather" and layout.ep > 1


def check_learner_settings(model_cfg: ModelConfig, layout: ParallelLayout, loss: LossSettings) -> None:
    """Refuse what the learner cannot run, before any process group or model is built."""
    get_policy_loss(loss.loss)
    if layout.vpp:
        stages = layout.pp * layout.vpp
        if model_cfg.num_hidden_layers % stages:
            raise ValueError(f"model.num_hidden_layers ({model_cfg.num_hidden_layers}) must be "
                             f"divisible by parallel.pp * parallel.vpp ({stages}): one equal share "
                             f"per model chunk")
        if loss.routing_replay != "off":
            # VPP pads every micro-batch to one shape (`Learner._schedule_batches`); the replayed
            # routes cover the unpadded micro-batches.
            raise ValueError(f"routing_replay={loss.routing_replay!r} is not supported with "
                             "parallel.vpp; use pp alone")
    if pads_across_ep(model_cfg, layout) and (loss.routing_replay != "off" or loss.routing_metrics):
        # Routes are captured and replayed per unpadded micro-batch.
        raise ValueError("algorithm.routing_replay and algorithm.routing_metrics are not "
                         "supported with model.moe_token_dispatcher=allgather and parallel.ep > 1 "
                         "(micro-batches are padded across the EP group); use "
                         "moe_token_dispatcher=alltoall")
    if loss.routing_replay != "off":
        from ..moe.replay import check_replay_mode

        check_replay_mode(loss.routing_replay)
        if not model_cfg.is_moe:
            raise ValueError(f"routing_replay={loss.routing_replay!r} needs an MoE model.family")
    if loss.routing_metrics:
        if not model_cfg.is_moe:
            raise ValueError("routing_metrics needs an MoE model.family")
        if layout.pp > 1:
            # Different stages hold different layers: the per-layer sums would need a gather
            # over PP, which is not implemented.
            raise ValueError("routing_metrics supports parallel.pp == 1 only")


class Learner:
    """Holds the model chunks, optimizer and scheduler of this rank; `policy_version` counts steps."""

    def __init__(self, model_cfg: ModelConfig, layout: ParallelLayout, groups: ParallelGroups,
                 optim: OptimConfig, loss: LossSettings, **config_overrides) -> None:
        from megatron.core.distributed import (DistributedDataParallel,
                                               DistributedDataParallelConfig, finalize_model_grads)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        check_learner_settings(model_cfg, layout, loss)
        self.model_cfg, self.layout, self.groups, self.loss = model_cfg, layout, groups, loss
        self.thd = use_transformer_engine(model_cfg)
        # MoE routing replay (optional): megatron builds its RouterReplay only when it is on.
        if loss.routing_replay != "off":
            config_overrides = {**config_overrides, "moe_enable_routing_replay": True}
        self.config = transformer_config(model_cfg, layout,
                                         **{**pipeline_p2p_settings(layout), **config_overrides})
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=optim.use_distributed_optimizer)
        self.chunks = [DistributedDataParallel(self.config, ddp_config, chunk)
                       for chunk in build_model_chunks(model_cfg, layout, self.config)]
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 \
            else self.chunks[0].no_sync
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad, bf16=model_cfg.dtype == torch.bfloat16,
            params_dtype=model_cfg.dtype, use_distributed_optimizer=optim.use_distributed_optimizer,
        ), self.chunks)
        decay = optim.lr_decay_steps or 1
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if optim.lr_warmup_steps else optim.lr, max_lr=optim.lr,
            min_lr=optim.min_lr, lr_warmup_steps=optim.lr_warmup_steps,
            lr_decay_steps=max(decay, optim.lr_warmup_steps + 1),
            lr_decay_style=optim.lr_decay_style if optim.lr_decay_steps else "constant",
            start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=1,
            wd_incr_style="constant")
        self.policy_version = 0
        self.aux_loss = None  # the routers' load-balancing loss (moe.aux_loss), when its coef > 0
        if model_cfg.is_moe and model_cfg.router_aux_loss_coef > 0:
            from ..moe.aux_loss import SequenceAuxLoss

            self.aux_loss = SequenceAuxLoss(
                self.chunks, coeff=model_cfg.router_aux_loss_coef,
                num_experts=model_cfg.num_experts, topk=model_cfg.num_experts_per_tok,
                router_order=self._router_order, count_groups=self._sequence_slice_groups(),
                device=_device())
        self.routing = None  # MoE routing metrics (megatron_vespo.moe.routing_observer)
        if loss.routing_metrics:
            from ..moe.routing_observer import RoutingObserver

            self.routing = RoutingObserver(model_cfg.num_experts, self._router_order,
                                           self._routing_groups(), _device())
        self.routing_replay = None  # MoE routing replay driver (megatron_vespo.moe.replay)
        if loss.routing_replay != "off":
            from ..moe.replay import RoutingReplay

            self.routing_replay = RoutingReplay(
                loss.routing_replay, self.chunks, thd=self.thd, tp_size=layout.tp,
                tp_rank=groups.tp_rank, sequence_parallel=layout.sequence_parallel,
                cp_rank=groups.cp_rank, num_layers=model_cfg.num_hidden_layers)

    @property
    def policy_loss(self):
        return get_policy_loss(self.loss.loss)

    # -- forward pieces -------------------------------------------------------------------------

    def _model_inputs(self, batch: PackedBatch) -> dict:
        if self.thd:
            from megatron.core.packed_seq_params import PackedSeqParams

            cu = batch.cu_seqlens_padded
            longest = int(torch.diff(cu).max())
            return dict(
                input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                attention_mask=None,
                packed_seq_params=PackedSeqParams(
                    qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                    cu_seqlens_kv_padded=cu, max_seqlen_q=longest, max_seqlen_kv=longest))
        rows = batch.num_seqs
        return dict(input_ids=batch.input_ids.view(rows, -1),
                    position_ids=batch.position_ids.view(rows, -1), attention_mask=None)

    def _logprobs(self, output: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        logits = output.reshape(-1, output.shape[-1])  # [b, s, V/tp] -> packed positions
        logp, _ = vocab_parallel_logprobs(logits, batch.target_ids, tp_group=self.groups.tp,
                                          chunk_tokens=self.loss.logprob_chunk_tokens,
                                          temperature=self.loss.temperature)
        return logp

    def _schedule_batches(self, batches: Sequence[PackedBatch]) -> tuple[list, list]:
        """The micro-batches as the schedule runs them, and per micro-batch the positions [T_i]
        of the scheduled batch that hold the given one's.

        Padded to a common activation shape where megatron needs one: under VPP every
        micro-batch of the step (megatron's interleaved schedule receives every activation into
        buffers of one [s, b, h] shape, with no shape exchange, see `pipeline_p2p_settings`);
        with the allgather token dispatcher under EP > 1, micro-batch i on every rank of the EP
        group (its all-gather over TP x EP needs equal token counts). Padding holds no response
        token and no real token, so the loss, the router loss, their gradients and every metric
        are those of the unpadded micro-batches. Otherwise the batches run as they are."""
        per_step, per_ep = bool(self.layout.vpp), pads_across_ep(self.model_cfg, self.layout)
        if not (per_step or per_ep):
            return list(batches), [torch.arange(b.num_positions) for b in batches]
        if self.thd:
            shapes = torch.tensor([[b.num_positions] for b in batches])
        else:
            shapes = torch.tensor([[b.num_seqs, b.num_positions // b.num_seqs] for b in batches])
        if per_step:
            shapes = shapes.amax(dim=0, keepdim=True).expand_as(shapes).clone()
        if per_ep:
            shapes = self._max_over_ep(shapes)
        if self.thd:
            pairs = [pad_tail(b, int(n), self.groups.cp_rank) for b, (n,) in zip(batches, shapes)]
        else:
            pairs = [pad_rows(b, int(r), int(n)) for b, (r, n) in zip(batches, shapes)]
        return [p for p, _ in pairs], [k for _, k in pairs]

    def _max_over_ep(self, shapes: torch.Tensor) -> torch.Tensor:
        """[M, d] micro-batch shapes -> their elementwise maximum over the expert-parallel group;
        every rank of it must run the same number of micro-batches."""
        from megatron.core import parallel_state as ps

        group = ps.get_expert_model_parallel_group()
        counts = torch.tensor([shapes.shape[0], -shapes.shape[0]], device=_device())
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
        if counts[0] != -counts[1]:
            raise ValueError(
                f"model.moe_token_dispatcher=allgather with parallel.ep={self.layout.ep}: the "
                f"ranks of an expert-parallel group run between {-int(counts[1])} and "
                f"{int(counts[0])} micro-batches in this step; the dispatcher's all-gather needs "
                f"the same count on every rank (use moe_token_dispatcher=alltoall)")
        shapes = shapes.to(_device())
        dist.all_reduce(shapes, op=dist.ReduceOp.MAX, group=group)
        return shapes.cpu()

    def _run_schedule(self, batches: Sequence[PackedBatch], loss_func, forward_only: bool,
                      around_forward=None, before_forward=None) -> list:
        """`batches`: as `_schedule_batches` returns them. `around_forward`: optional (before,
        after) callbacks called with (chunk index, micro-batch index) around each model-chunk
        forward (MoE routing replay). `before_forward`: optional callback with the micro-batch
        as the model runs it (on its device), before each model-chunk forward."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if self.layout.vpp:
            check_interleaved_microbatches(len(batches), self.layout.pp,
                                           self.config.microbatch_group_size_per_vp_stage)
        index = {id(b): i for i, b in reversed(list(enumerate(batches)))}
        device = _device()

        def forward_step(data_iterator, model):
            raw = next(data_iterator)
            batch = raw.to(device)
            inputs = self._model_inputs(batch)
            if before_forward is not None:
                before_forward(batch)
            if around_forward is not None:
                where = (next(k for k, c in enumerate(self.chunks) if c is model), index[id(raw)])
                around_forward[0](*where)
            output = model(inputs.pop("input_ids"), inputs.pop("position_ids"),
                           inputs.pop("attention_mask"), **inputs)
            if around_forward is not None:
                around_forward[1](*where)
            return output, partial(loss_func, batch)

        # The activation shape megatron's pipeline schedules allocate first: [s, b] = [L, rows] for
        # BSHD, [T, 1] for THD, s counted over all CP ranks (p2p then exchanges each micro-batch's;
        # under VPP every micro-batch has this one shape).
        shapes = [self._activation_shape(b) for b in batches]
        seq_length, rows = max(s for s, _ in shapes), max(r for _, r in shapes)
        chunks = len(self.chunks)
        iterator = [iter(batches) for _ in range(chunks)] if chunks > 1 else iter(batches)
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterator,
            model=self.chunks if chunks > 1 else self.chunks[0],
            num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=rows,
            forward_only=forward_only)

    def _activation_shape(self, batch: PackedBatch) -> tuple[int, int]:
        if self.thd:
            return batch.num_positions * batch.cp_size, 1
        return batch.num_positions // batch.num_seqs * batch.cp_size, batch.num_seqs

    # -- public API -----------------------------------------------------------------------------

    @torch.no_grad()
    def recompute_old_logprobs(self, batches: Sequence[PackedBatch]) -> list[PackedBatch]:
        """The batches with old_logp replaced by this policy's log-probs (last pipeline stage; other
        stages get the batches back unchanged, they never compute the loss).

        MoE routing replay: with R2 this forward's routes are recorded and attached to the returned
        batches (train on those); with R3 the engine routes the batches carry
        (`PackedBatch.engine_routes`, `moe.replay.attach_engine_routes`) are replayed.

        With `routing_metrics` this forward's routes (ids and full router rows) are kept with the
        returned batches for the drift metrics of `train_step`; when the batches carry engine routes,
        they are compared with this forward's (`moe/route_*`, reported by the batches' train_step)."""
        routes = carried_routes(batches)
        if self.routing is None:
            return self._recompute_dispatch(batches, routes)
        from ..moe.capture import RouterCapture

        with RouterCapture(self.chunks, full_scores=True) as cap:
            result = self._recompute_dispatch(batches, routes)
        self.routing.keep_old(result, cap)
        return result

    def batch_caches(self, batches: Sequence[PackedBatch]) -> list:
        """Per micro-batch, what the old-policy forward left outside the batch for the training
        forwards of the same batch objects (the routing metrics' old routes; R2's recorded routes
        travel inside the batches): saved with the batches when a checkpoint falls inside a rollout
        batch, put back by `restore_batch_caches`."""
        routing = self.routing
        return [None if routing is None else routing.cache(b) for b in batches]

    def restore_batch_caches(self, batches: Sequence[PackedBatch], caches: Sequence) -> None:
        for batch, kept in zip(batches, caches):
            if self.routing is not None:
                self.routing.restore(batch, kept)

    def _recompute_dispatch(self, batches, routes) -> list[PackedBatch]:
        if self.routing_replay is not None:
            return self._recompute_with_replay(batches, routes)
        return self._recompute_old_logprobs(batches)

    # -- MoE routing metrics --------------------------------------------------------------------

    def _router_order(self, values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        from ..moe.replay import align_to_router_order

        return align_to_router_order(
            values, rows=None if self.thd else batch.num_seqs, tp_size=self.layout.tp,
            tp_rank=self.groups.tp_rank, sequence_parallel=self.layout.sequence_parallel)

    def _routing_groups(self) -> list:
        """Groups whose ranks hold different tokens of the same layers: DP x CP, and TP under
        sequence parallelism (each TP rank routes its own sequence slice). EP ranks route all
        layers for their own tokens, so EP adds nothing."""
        if self.layout.sequence_parallel:
            return [self.groups.dp_cp, self.groups.tp]
        return [self.groups.dp_cp]

    def _sequence_slice_groups(self) -> list:
        """Groups whose ranks route different tokens of the same sequences: CP, and TP under
        sequence parallelism."""
        return [self.groups.cp] + ([self.groups.tp] if self.layout.sequence_parallel else [])

    def _recompute_with_replay(self, batches, routes) -> list[PackedBatch]:
        replay = self.routing_replay
        try:
            result = replay.with_recorded(self._recompute_old_logprobs(
                batches, around_forward=replay.phase(batches, routes, old_policy=True)))
        finally:
            replay.end()
        return result

    @torch.no_grad()
    def _recompute_old_logprobs(self, batches: Sequence[PackedBatch],
                                around_forward=None) -> list[PackedBatch]:
        for chunk in self.chunks:
            chunk.eval()

        def collect(batch, output):
            return output.new_zeros(()), {"logp": self._logprobs(output, batch).float()}

        scheduled, kept = self._schedule_batches(batches)
        outputs = self._run_schedule(scheduled, collect, forward_only=True,
                                     around_forward=around_forward)
        for chunk in self.chunks:
            chunk.train()
        if not outputs:
            return list(batches)
        return [replace(b, old_logp=torch.where(
                    b.loss_mask, o["logp"][k.to(o["logp"].device)].to(b.old_logp.device), 0.0))
                for b, o, k in zip(batches, outputs, kept)]

    def train_step(self, batches: Sequence[PackedBatch], denom: Denominators) -> dict[str, float]:
        """One optimizer step on this rank's micro-batches; returns the step metrics on every rank.
        MoE routing replay R3 replays the engine routes the batches carry."""
        start = time.perf_counter()
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        sums: list[MetricSums] = []
        coefs: list[torch.Tensor] = []
        m, dp = len(batches), self.groups.dp_size

        def loss_func(batch, output):
            out = shard_policy_loss(
                self._logprobs(output, batch), batch, denom, self.policy_loss, self.loss.params,
                cp_group=self.groups.cp, correct_mismatch=self.loss.correct_mismatch,
                mismatch_threshold=self.loss.mismatch_threshold)
            sums.append(out.metrics)
            if out.seq_coef is not None:
                coefs.append(out.seq_coef)
            return schedule_loss_output(
                out.loss, {}, num_microbatches=m, dp_size=dp,
                calculate_per_token_loss=self.config.calculate_per_token_loss, denom=denom,
                local_tokens=batch.loss_mask.sum())

        before_forward = None
        if self.aux_loss is not None:
            factor = loss_scale_factor(num_microbatches=m, dp_size=dp, denom=denom,
                                       calculate_per_token_loss=self.config.calculate_per_token_loss)
            before_forward = partial(self.aux_loss.micro_batch, input_tokens=denom.input_tokens,
                                     grad_factor=factor)

        replay = self.routing_replay
        cap = None
        if self.routing is not None:
            from ..moe.capture import RouterCapture

            cap = RouterCapture(self.chunks, full_scores=True).__enter__()  # no backward recompute
        try:
            self._run_schedule(self._schedule_batches(batches)[0], loss_func, forward_only=False,
                               around_forward=None if replay is None
                               else replay.phase(batches, carried_routes(batches),
                                                 old_policy=False),
                               before_forward=before_forward)
        finally:
            if self.aux_loss is not None:
                self.aux_loss.end()
            if replay is not None:
                replay.end()
            if cap is not None:
                cap.__exit__(None, None, None)
        routing = {} if cap is None else self.routing.step_metrics(batches, cap)
        success, grad_norm, _ = self.optimizer.step()
        if grad_norm is None:
            grad_norm = self.optimizer.get_grad_norm()
        if success:
            self.scheduler.step(increment=1)
            self.policy_version += 1
        metrics = self._gather_metrics(sums)
        # This rank's per-sequence phi (or W) of the step, for histograms (empty on other PP stages).
        self.last_seq_coef = torch.cat(coefs) if coefs else None
        elapsed = time.perf_counter() - start
        positions = sum(b.num_positions for b in batches)
        metrics.update({
            "grad_norm": float(grad_norm), "lr": self.optimizer.param_groups[0]["lr"],
            "update_skipped": float(not success), "policy_version": float(self.policy_version),
            "perf/step_time_s": elapsed, "perf/tokens_per_s_per_rank": positions / elapsed,
            **self._aux_loss_metrics(), **routing,
        })
        return metrics

    def _gather_metrics(self, sums: list[MetricSums]) -> dict[str, float]:
        """Reduce on the last pipeline stage, then share with the other stages of this pipeline."""
        from megatron.core import parallel_state as ps

        payload = [None]
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            total = sums[0]
            for s in sums[1:]:
                total = total.merge(s)
            payload = [reduce_step_metrics(total, self.groups).finalize()]
        if self.layout.pp > 1:
            dist.broadcast_object_list(payload, src=ps.get_pipeline_model_parallel_last_rank(),
                                       group=self.groups.pp)
        return dict(payload[0])

    def _aux_loss_metrics(self) -> dict[str, float]:
        """`moe/load_balancing_loss` of the step: every rank's layers and tokens, once each."""
        if self.aux_loss is None:
            return {}
        groups = [self.groups.dp_cp, self.groups.pp] + (
            [self.groups.tp] if self.layout.sequence_parallel else [])
        return {"moe/load_balancing_loss": self.aux_loss.step_value(
            groups, self.model_cfg.num_hidden_layers)}
