"""Interleaved train-step timing of one learner under several `LossSettings` variants.

Shared by the step-time benchmarks: one megatron learner (configs/tiny_moe_cpu.yaml by default) on
`--world-size` spawned ranks recomputes the old policy once for a fixed batch of synthetic samples,
then trains on it, switching between the variants every step (interleaved, so machine-load drift
hits all of them) after `--warmup` untimed rounds. Each variant is a dict of `LossSettings` fields.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def synthetic_samples(n: int, vocab: int, min_len: int, max_len: int, seed: int):
    import torch

    from megatron_vespo.learner.samples import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        total = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        prompt = total // 4
        ids = torch.randint(0, vocab, (total,), generator=g).tolist()
        out.append(Sample(f"s{i}", i // 8, ids[:prompt], ids[prompt:], float(i % 3 == 0),
                          (-4 - torch.rand(total - prompt, generator=g)).tolist()))
    return out


def parser(description: str, target: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=str(REPO_ROOT / "configs/tiny_moe_cpu.yaml"))
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--samples", type=int, default=32, help="sequences in the batch")
    p.add_argument("--min-len", type=int, default=96)
    p.add_argument("--max-len", type=int, default=160)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--target", type=float, default=target)
    return p


def _rank_times(rank, world_size, config, samples, warmup, repeats, prepare, variants):
    from megatron_vespo.learner.batching import rank_micro_batches, sample_advantages
    from megatron_vespo.trainer import build_learner
    from megatron_vespo.parallel.packing import required_pad_multiple
    from megatron_vespo.parallel.step_reduce import global_denominators

    learner = build_learner(config)
    groups, layout = learner.groups, config.parallel
    batches = rank_micro_batches(
        samples, sample_advantages(samples, config.algorithm.advantage), dp_rank=groups.dp_rank,
        dp_size=groups.dp_size, micro_batch_size=config.train.micro_batch_size,
        pad_multiple=required_pad_multiple(layout.cp, layout.tp, layout.sequence_parallel),
        uniform_length=not learner.thd)
    learner.loss = replace(learner.loss, **prepare)
    batches = learner.recompute_old_logprobs(batches)
    denom = global_denominators(batches, groups.dp)
    times = {name: [] for name in variants}
    for step in range(warmup + repeats):
        for name, settings in variants.items():
            learner.loss = replace(learner.loss, **settings)
            metrics = learner.train_step(batches, denom)
            if step >= warmup:
                times[name].append((metrics["perf/step_time_s"], metrics["perf/tokens_per_s_per_rank"]))
    return times


def time_variants(args, variants: dict[str, dict], prepare: dict | None = None):
    """{variant: [(step seconds, tokens/s/rank), ...]} from rank 0, and the loaded config."""
    from megatron_vespo.config import load_config
    from megatron_vespo.launch import run_ranks

    config = load_config(args.config, [f"train.world_size={args.world_size}",
                                       f"train.micro_batch_size={args.micro_batch_size}"])
    samples = synthetic_samples(args.samples, config.model.vocab_size, args.min_len, args.max_len, 0)
    times = run_ranks(_rank_times, args.world_size, config, samples, args.warmup, args.repeats,
                      prepare or {}, variants)[0]
    return times, config


def summary_rows(times) -> tuple[list[list[str]], dict[str, float]]:
    """Table rows (name, median ms, best ms, median tokens/s/rank) and the median step times."""
    rows, medians = [], {}
    for name, runs in times.items():
        step = [t for t, _ in runs]
        medians[name] = statistics.median(step)
        rows.append([name, f"{medians[name] * 1e3:.1f}", f"{min(step) * 1e3:.1f}",
                     f"{statistics.median(tps for _, tps in runs):,.0f}"])
    return rows, medians
