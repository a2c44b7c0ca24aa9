"""Step time of the tiny MoE with MoE routing metrics on vs off, on the same learner and batch.

One megatron learner (configs/tiny_moe_cpu.yaml by default) on `--world-size` spawned ranks
recomputes the old policy once with routing capture on (so drift has its old routes), then trains on
that fixed batch, switching `LossSettings.routing_metrics` on and off every step (interleaved, so
machine-load drift hits both) after `--warmup` untimed steps of each. The "on" step captures every
router forward (ids, full softmax rows), computes drift, agreement and expert-load sums and reduces
them. Reported: median and best step time per setting and the ratio on / off. Target: <= 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, verdict  # noqa: E402
from benchmarks.train_step_time import synthetic_samples  # noqa: E402


def rank_main(rank, world_size, config, samples, warmup, repeats):
    from megatron_vespo.learner.batching import rank_micro_batches, sample_advantages
    from megatron_vespo.offline import build_learner
    from megatron_vespo.parallel.packing import required_pad_multiple
    from megatron_vespo.parallel.step_reduce import global_denominators

    learner = build_learner(config)
    groups, layout = learner.groups, config.parallel
    batches = rank_micro_batches(
        samples, sample_advantages(samples, config.algorithm.advantage), dp_rank=groups.dp_rank,
        dp_size=groups.dp_size, micro_batch_size=config.train.micro_batch_size,
        pad_multiple=required_pad_multiple(layout.cp, layout.tp, layout.sequence_parallel),
        uniform_length=not learner.thd)
    learner.loss = replace(learner.loss, routing_metrics=True)
    batches = learner.recompute_old_logprobs(batches)
    denom = global_denominators(batches, groups.dp)
    times = {"off": [], "on": []}
    for step in range(warmup + repeats):
        for name in times:
            learner.loss = replace(learner.loss, routing_metrics=name == "on")
            metrics = learner.train_step(batches, denom)
            if name == "on" and "moe/drift_topk_mismatch_frac" not in metrics:
                raise RuntimeError("routing metrics missing from an 'on' step")
            if step >= warmup:
                times[name].append(metrics["perf/step_time_s"])
    return times


def main() -> int:
    from megatron_vespo.config import load_config
    from megatron_vespo.launch import run_ranks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/tiny_moe_cpu.yaml"))
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--samples", type=int, default=32, help="sequences in the batch")
    p.add_argument("--min-len", type=int, default=96)
    p.add_argument("--max-len", type=int, default=160)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--target", type=float, default=1.05)
    args = p.parse_args()
    config = load_config(args.config, [f"train.world_size={args.world_size}",
                                       f"train.micro_batch_size={args.micro_batch_size}"])
    if not config.model.is_moe:
        raise SystemExit("routing metrics need an MoE model")
    samples = synthetic_samples(args.samples, config.model.vocab_size, args.min_len, args.max_len, 0)
    times = run_ranks(rank_main, args.world_size, config, samples, args.warmup, args.repeats)[0]
    rows, medians = [], {}
    for name, step in times.items():
        medians[name] = statistics.median(step)
        rows.append([name, f"{medians[name] * 1e3:.1f}", f"{min(step) * 1e3:.1f}"])
    print(f"train step on {config.model.family} ({config.model.num_experts} experts, "
          f"{config.model.num_hidden_layers} layers), world size {args.world_size}, {args.samples} "
          f"sequences of {args.min_len}-{args.max_len} tokens, {args.repeats} interleaved steps per "
          f"setting after {args.warmup} warm-up")
    print_table(["routing metrics", "median ms", "best ms"], rows)
    ratio = medians["on"] / medians["off"]
    print(f"RESULT routing metrics on / off median step time = {ratio:.4f} "
          f"(target <= {args.target}): {verdict(ratio <= args.target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
