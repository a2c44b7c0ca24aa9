"""Online training: `megatron-vespo train CONFIG`. Rollout fleet and learners in one loop.

Every learner rank runs `train_online_rank`. Rank 0 also owns the rollout side (the fleet, the task,
the tracker); what it generates is broadcast to the other ranks over a gloo group, so every rank
sees the same samples and takes part in every collective (training, weight export, checkpoints).

One iteration:
  sync mode   rank 0 generates a rollout batch of N x mini-batch samples with the current weights;
              all ranks train it as N steps; weights go to the fleet (one version per rollout batch).
  async mode  rank 0 takes one mini-batch from the staleness buffer (the producer keeps generating);
              all ranks train one step; every `rollout.sync_interval` steps weights go to the fleet.
Then: held-out evaluation every `train.eval_interval` steps, a checkpoint every `train.save_interval`
steps. SIGINT/SIGTERM (Ctrl-C, scancel, a Slurm time limit) stop the loop at the next iteration
boundary with a checkpoint, so `--resume` continues exactly there.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from .config import Config
from .learner.checkpoint import load_checkpoint, save_checkpoint
from .learner.hf_convert import export_model_to_hf
from .learner.learner import Learner
from .offline import build_learner
from .rollout.client import RolloutClient
from .rollout.fleet import Fleet
from .rollout.source import RolloutSource
from .rollout.weight_sync import DiskWeightSync, DistributedWeightSync
from .rollout_batch import kernel_state, restore_kernel, train_rollout_batch
from .tasks import build_task, load_tokenizer
from .tracking.heatmap import write_load_heatmap
from .tracking.jsonl import JsonlMetrics
from .tracking.mlflow_run import start_tracker


class StopRequest:
    """SIGINT/SIGTERM set a flag instead of raising, so the loop can stop between iterations; a
    second signal raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"[megatron-vespo] {signal.Signals(signum).name}: stopping after this iteration "
              f"with a checkpoint (again to abort)", file=sys.stderr, flush=True)


def _broadcast(obj: Any, group) -> Any:
    """Rank 0's `obj` on every rank (pickled over the gloo control group)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _any_rank(flag: bool, group) -> bool:
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _weight_sync(config: Config, run_dir: Path):
    r = config.rollout
    if r.weight_sync == "disk":
        return DiskWeightSync(run_dir / "weights")
    return DistributedWeightSync(bucket_bytes=r.weight_bucket_mb << 20)


# Parameter-name fragments -> histogram panel; the first match wins.
_WEIGHT_GROUPS = (("router", "router"), ("experts", "experts"), ("embedding", "embedding"),
                  ("output_layer", "output layer"), ("norm", "norms"), ("self_attention", "attention"),
                  ("mlp", "mlp"))


def weight_histogram_values(chunks) -> dict[str, torch.Tensor]:
    """This rank's parameters, flattened per group (its shard of each; rank 0 logs them)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            group = next((g for key, g in _WEIGHT_GROUPS if key in name), "other")
            groups.setdefault(group, []).append(param.detach().float().flatten().cpu())
    return {f"weights/{g}": torch.cat(v) for g, v in groups.items()}


def _progress_fields(m: dict) -> dict:
    return {"reward": f"{m.get('reward/mean', float('nan')):.3f}",
            "phi": f"{m.get('phi/mean', float('nan')):.3f}",
            "stale": f"{m.get('staleness/sample_lag_mean', 0.0):.1f}",
            "tok/s": f"{m.get('rollout/tokens_per_s', float('nan')):.0f}"}


class _RankZero:
    """What only rank 0 does: fleet, task, rollout source, metrics sinks."""

    def __init__(self, config: Config, run_dir: Path, learner: Learner, model_path: str,
                 resume: bool, task_state: Optional[dict]):
        r, cfg = config.rollout, config.train
        tokenizer = load_tokenizer(config.task, config.train.init_hf_checkpoint)
        self.task = build_task(config.task, tokenizer)
        if task_state:
            self.task.load_state_dict(task_state)
        if r.fleet.attach_router_url:
            self.fleet = Fleet.attach(r.fleet)
        else:
            self.fleet = Fleet.launch(model_path, r.fleet, run_dir / "fleet", seed=cfg.seed)
        client = RolloutClient(self.fleet, r.sampling, n=r.n_samples_per_prompt,
                               return_routed_experts=r.fleet.server.enable_routed_experts,
                               num_moe_layers=config.model.num_hidden_layers if config.model.is_moe else 0,
                               num_experts=config.model.num_experts or None,
                               max_in_flight=r.max_in_flight, on_invalid=r.on_invalid)
        groups_per_step = cfg.mini_batch_size // r.n_samples_per_prompt
        self.source = RolloutSource(r, client, self.task.train_prompts(), self.task.reward, groups_per_step)
        self.eval_prompts = self.task.eval_prompts()
        self.jsonl = JsonlMetrics(run_dir / "metrics.jsonl")
        self.bar = tqdm(total=cfg.max_steps or None, initial=learner.policy_version, unit="step",
                        desc="train", dynamic_ncols=True)
        self.tracker = start_tracker(config.tracking, run_dir, config, resume=resume)

    def log(self, step: int, metrics: dict) -> None:
        self.jsonl.log(step, metrics)
        self.tracker.log_metrics(step, metrics)
        if "loss" in metrics:  # a training step (evaluations log separately)
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(_progress_fields(metrics), refresh=True)

    def close(self, status: str) -> None:
        self.bar.close()
        self.source.stop()
        self.fleet.shutdown()
        self.jsonl.close()
        self.tracker.close(status)


def train_online_rank(rank: int, world_size: int, config: Config, resume: bool) -> dict:
    """One learner rank of online training; returns the last step's metrics."""
    cfg, r = config.train, config.rollout
    run_dir = Path(cfg.output_dir)
    stop = StopRequest()
    control = dist.new_group(backend="gloo")  # object broadcasts and flags, on CPU even with NCCL
    learner = build_learner(config)
    cursor: dict = {"task": None}
    if resume:
        cursor = load_checkpoint(learner, run_dir / "checkpoints") or cursor
        restore_kernel(learner, cursor.get("kernel"))
    # The fleet starts from an HF directory: the initial checkpoint, or this learner's weights.
    model_path = cfg.init_hf_checkpoint
    if model_path is None or learner.policy_version > 0:
        model_path = str(run_dir / "weights" / "initial")
        export_model_to_hf(model_path, [c.module for c in learner.chunks], config.model, config.parallel)
    top = _RankZero(config, run_dir, learner, model_path, resume, cursor.get("task")) if rank == 0 else None
    weights = _weight_sync(config, run_dir)
    urls = _broadcast(top.fleet.worker_urls if top else None, control)
    if r.fleet.attach_router_url or r.weight_sync == "distributed":
        # Attached servers run whatever they started with; the distributed path names its version.
        weights.sync([c.module for c in learner.chunks], config.model, config.parallel, urls,
                     learner.policy_version)
    if top and r.mode == "async":
        top.source.start(learner.policy_version)

    def checkpoint() -> None:
        # The prompt cursor lives on rank 0; every rank saves (the save is collective).
        task_state = _broadcast(top.task.state_dict() if top else None, control)
        save_checkpoint(learner, run_dir / "checkpoints",
                        {"task": task_state, "kernel": kernel_state(learner)})

    last: dict = {}
    since_save = since_sync = 0
    status = "FAILED"
    try:
        while not (cfg.max_steps and learner.policy_version >= cfg.max_steps):
            batch, rollout_metrics = None, {}
            if top:
                if r.mode == "sync":
                    batch, rollout_metrics = top.source.rollout_batch(cfg.rollout_batch_size // r.n_samples_per_prompt)
                else:
                    batch, rollout_metrics = top.source.take()
            batch = _broadcast(batch, control)

            def after_step(k: int, metrics: dict) -> None:
                nonlocal last, since_save
                version = learner.policy_version
                metrics.update(rollout_metrics)
                metrics["staleness/sample_lag_mean"] = sum(version - 1 - s.policy_version
                                                           for s in batch) / len(batch)
                if top:
                    if cfg.heatmap_interval and version % cfg.heatmap_interval == 0 \
                            and learner.last_routing_load is not None:
                        path = run_dir / "routing" / f"step_{version:08d}.png"
                        write_load_heatmap(learner.last_routing_load, path, title=f"expert load, step {version}")
                        top.tracker.log_artifact(path, "routing")
                    if cfg.histogram_interval and version % cfg.histogram_interval == 0:
                        values = weight_histogram_values(learner.chunks)
                        if learner.last_seq_coef is not None:
                            values["phi (rank 0 sequences)"] = learner.last_seq_coef
                        top.tracker.log_histograms(version, values)
                    if k + 1 < staleness:  # the batch's last step is logged with its evaluation
                        top.log(version, metrics)
                last = metrics
                since_save += 1

            staleness = cfg.staleness if r.mode == "sync" else 1
            train_rollout_batch(learner, config, batch, staleness, after_step)
            if top and r.mode == "async":
                top.source.advance()
            since_sync += staleness
            if r.mode == "sync" or since_sync >= r.sync_interval:
                weights.sync([c.module for c in learner.chunks], config.model, config.parallel, urls,
                             learner.policy_version)
                since_sync = 0
            version = learner.policy_version
            if top:  # one row per step: the last step's metrics with the evaluation due after it
                due = cfg.eval_interval and \
                    version // cfg.eval_interval > (version - staleness) // cfg.eval_interval
                top.log(version, {**last, **(top.source.evaluate(top.eval_prompts) if due else {})})
            stopping = _any_rank(stop.requested, control)
            if stopping or (cfg.save_interval and since_save >= cfg.save_interval):
                checkpoint()
                since_save = 0
            if stopping:
                status = "KILLED"
                break
        else:
            status = "FINISHED"
        if since_save:
            checkpoint()
    finally:
        with contextlib.suppress(Exception):
            weights.close()
        if top:
            top.close(status)
    return last
