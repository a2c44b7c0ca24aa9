"""Step time of the VESPO loss vs a plain GRPO loss on the same tiny MoE model and batch.

One megatron learner (configs/tiny_moe_cpu.yaml by default: Qwen3-MoE shape, local spec) on
`--world-size` spawned ranks trains on one fixed batch of synthetic samples; the policy loss is
switched between vespo and grpo every step (interleaved, so machine-load drift hits both), after
`--warmup` untimed steps of each. Reported: median and best step time per loss, tokens/s per rank
(all packed positions of the rank's micro-batches / step time), and the ratio vespo / grpo.
Target: VESPO within 2% of GRPO (ratio <= 1.02).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, verdict  # noqa: E402


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
    batches = learner.recompute_old_logprobs(batches)
    denom = global_denominators(batches, groups.dp)
    times = {"vespo": [], "grpo": []}
    for step in range(warmup + repeats):
        for name in times:
            learner.loss = replace(learner.loss, loss=name, params=None)
            metrics = learner.train_step(batches, denom)
            if step >= warmup:
                times[name].append((metrics["perf/step_time_s"], metrics["perf/tokens_per_s_per_rank"]))
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
    p.add_argument("--target", type=float, default=1.02)
    args = p.parse_args()
    config = load_config(args.config, [f"train.world_size={args.world_size}",
                                       f"train.micro_batch_size={args.micro_batch_size}"])
    samples = synthetic_samples(args.samples, config.model.vocab_size, args.min_len, args.max_len, 0)
    times = run_ranks(rank_main, args.world_size, config, samples, args.warmup, args.repeats)[0]
    rows, medians = [], {}
    for name, runs in times.items():
        step = [t for t, _ in runs]
        medians[name] = statistics.median(step)
        rows.append([name, f"{medians[name] * 1e3:.1f}", f"{min(step) * 1e3:.1f}",
                     f"{statistics.median(tps for _, tps in runs):,.0f}"])
    print(f"train step on {config.model.family} ({config.model.num_experts} experts), "
          f"world size {args.world_size}, {args.samples} sequences of {args.min_len}-{args.max_len} "
          f"tokens, {args.repeats} interleaved steps per loss after {args.warmup} warm-up")
    print_table(["loss", "median ms", "best ms", "tokens/s/rank"], rows)
    ratio = medians["vespo"] / medians["grpo"]
    print(f"RESULT vespo / grpo median step time = {ratio:.4f} (target <= {args.target}): "
          f"{verdict(ratio <= args.target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
