"""Offline training from recorded rollouts: `megatron-vespo train CONFIG --rollouts FILE`.

The file's samples are cut into rollout batches of `train.rollout_batch_size` (one behaviour policy
each). Each rollout batch gets group-relative advantages, is split into N = `train.staleness`
mini-batches, has its old log-probs recomputed once (before any of its updates), and is consumed as N
optimizer steps. Checkpoints are taken between rollout batches, where no old log-probs are in flight,
so a resumed run takes exactly the steps an uninterrupted one would.

Rank 0 appends one line per step to `metrics.jsonl` and to `samples_consumed.jsonl`
({"step": N, "sample_ids": [...]}: the samples that step trained on), both flushed per line, so a
killed run keeps the record of every step it finished.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .config import Config
from .learner.checkpoint import load_checkpoint, save_checkpoint
from .learner.learner import Learner
from .learner.samples import Sample, read_samples
from .rollout_batch import kernel_state, mini_batches, restore_kernel, train_rollout_batch
from .tracking.heatmap import write_load_heatmap
from .tracking.jsonl import JsonlMetrics


def rollout_batches(samples: list[Sample], size: int) -> tuple[list[list[Sample]], int]:
    """Consecutive full batches of `size` samples, and how many trailing samples were left over."""
    if len(samples) < size:
        raise ValueError(f"the rollout file has {len(samples)} samples, fewer than one rollout batch "
                         f"(train.rollout_batch_size={size})")
    full = len(samples) // size
    return [samples[k * size:(k + 1) * size] for k in range(full)], len(samples) - full * size


def build_learner(config: Config) -> Learner:
    """Process groups, model chunks, optimizer; initial weights from the HF checkpoint if set, else
    the seeded initial model (`learner.init_weights`: the same for every parallel layout)."""
    from megatron.core import tensor_parallel

    layout = config.parallel
    groups = layout.initialize()
    torch.manual_seed(config.train.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(config.train.seed)
    learner = Learner(config.model, layout, groups, config.optim, config.loss_settings)
    chunks = [c.module for c in learner.chunks]
    if config.train.init_hf_checkpoint:
        from .learner.hf_convert import load_hf_into_model

        load_hf_into_model(config.train.init_hf_checkpoint, chunks, config.model, layout)
    else:
        from .learner.init_weights import init_weights

        init_weights(chunks, config.model, layout, config.train.seed)
    learner.optimizer.reload_model_params()  # fp32 main copies follow the loaded weights
    return learner


def _progress(step: int, m: dict, reward: float, stale: int) -> str:
    return (f"step {step:>5} | loss {m['loss']:+.4f} | reward {reward:.3f} | phi {m.get('phi/mean', float('nan')):.3f}"
            f" | stale {stale} | grad {m['grad_norm']:.3g} | {m['perf/tokens_per_s_per_rank']:.0f} tok/s/rank")


def train_offline_rank(rank: int, world_size: int, config: Config, rollouts: str, resume: bool) -> dict:
    """One rank of offline training; returns the last step's metrics."""
    cfg = config.train
    learner = build_learner(config)
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    cursor = {"epoch": 0, "rollout_batch": 0}
    if resume:
        cursor = load_checkpoint(learner, ckpt_root) or cursor
        restore_kernel(learner, cursor.get("kernel"))
    samples = read_samples(rollouts, vocab_size=config.model.vocab_size,
                           num_experts=config.model.num_experts or None)
    batches, leftover = rollout_batches(samples, cfg.rollout_batch_size)
    sink = JsonlMetrics(out_dir / "metrics.jsonl") if rank == 0 else None
    consumed = open(out_dir / "samples_consumed.jsonl", "a") if rank == 0 else None
    if rank == 0 and leftover:
        print(f"[megatron-vespo] {leftover} trailing samples do not fill a rollout batch and are "
              f"not trained on", file=sys.stderr)
    last: dict = {}
    since_save = 0

    def done() -> bool:
        return bool(cfg.max_steps) and learner.policy_version >= cfg.max_steps

    for epoch in range(cursor["epoch"], cfg.epochs):
        first = cursor["rollout_batch"] if epoch == cursor["epoch"] else 0
        for b in range(first, len(batches)):
            if done():
                break
            batch = batches[b]
            reward = sum(s.reward for s in batch) / len(batch)

            def after_step(k: int, metrics: dict) -> None:
                nonlocal last, since_save
                metrics.update({"data/epoch": float(epoch), "data/rollout_batch": float(b)})
                heatmap_due = cfg.heatmap_interval and learner.policy_version % cfg.heatmap_interval == 0
                if rank == 0 and heatmap_due and learner.last_routing_load is not None:
                    write_load_heatmap(learner.last_routing_load, out_dir / "routing" /
                                       f"step_{learner.policy_version:08d}.png",
                                       title=f"expert load, step {learner.policy_version}")
                if sink:
                    ids = [s.sample_id for s in mini_batches(batch, cfg.staleness)[k]]
                    consumed.write(json.dumps({"step": learner.policy_version, "sample_ids": ids}) + "\n")
                    consumed.flush()
                    sink.log(learner.policy_version, metrics)
                    print(_progress(learner.policy_version, metrics, reward, k), flush=True)
                last = metrics
                since_save += 1

            # The whole rollout batch is consumed even past max_steps, so that a checkpoint never
            # falls inside one (its old log-probs would be lost).
            train_rollout_batch(learner, config, batch, cfg.staleness, after_step)
            cursor = {"epoch": epoch, "rollout_batch": b + 1}
            if cfg.save_interval and since_save >= cfg.save_interval:
                save_checkpoint(learner, ckpt_root, {**cursor, "kernel": kernel_state(learner)})
                since_save = 0
    if since_save:
        save_checkpoint(learner, ckpt_root, {**cursor, "kernel": kernel_state(learner)})
    if sink:
        sink.close()
        consumed.close()
    return last
