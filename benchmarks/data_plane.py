"""A rollout mini-batch from the engine's answers to every rank's packed micro-batches, on local gloo
ranks (DP), against the former path in the same run.

Synthetic paper-shape samples: 512-token prompts, response lengths drawn with mean 4k and max 15k,
routes of 48 layers x top-8 of 128 experts arriving as SGLang's base64 int32 payloads, in groups
of 8 responses. Rank 0 decodes each group's answers into samples as they arrive, then:

  current   streams each group at once to the DP rank with the fewest response tokens so far, as
            column bytes (`rollout_batch.stream_groups`, `parallel.transport`): no rank, rank 0
            included, holds more than its share plus the group in transit;
  former    kept routes as nested lists, held the whole batch on rank 0, broadcast it pickled to
            every rank, and each rank took its contiguous share.

Each rank then packs its micro-batches (`learner.batching`, token budget 16k). Printed per path:
seconds per mini-batch and per 1M tokens (the time rank 0 spends making the synthetic answers is
left out), bytes rank 0 sent, per rank its response tokens (the balance) and the peak RSS above
the process's baseline next to the raw bytes of its share. The former path runs on a fraction of the
sequences (it costs ~1 s per 4.6k-token sample), reported per token.

    python benchmarks/data_plane.py [--sequences 2048 --former-sequences 8 --ranks 4]
"""

from __future__ import annotations

import argparse
import base64
import pickle
import resource
import time

import numpy as np
import torch

try:
    from common import add_repo_root
except ImportError:  # run as a module
    from benchmarks.common import add_repo_root
add_repo_root()

from benchmarks.common import human_bytes, print_table, verdict  # noqa: E402

LAYERS, TOPK, EXPERTS, GROUP = 48, 8, 128, 8


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _answers(count: int, prompt: int, mean: int, longest: int, seed: int, layers: int):
    """One engine answer at a time: (prompt ids, response ids, log-probs, routes payload)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        n = int(min(longest, max(1, rng.exponential(mean))))
        tokens = prompt + n
        routes = rng.integers(0, EXPERTS, (tokens - 1) * layers * TOPK, dtype=np.int32)
        yield (rng.integers(0, 151_000, prompt).tolist(), rng.integers(0, 151_000, n).tolist(),
               (-rng.random(n)).tolist(), base64.b64encode(routes.tobytes()).decode())


def _sample(i, answer, layers, former: bool):
    from megatron_vespo.learner.samples import Sample
    from megatron_vespo.rollout.routed_experts import decode_routed_experts

    prompt, response, logprobs, payload = answer
    tokens = len(prompt) + len(response) - 1
    if former:  # nested lists, as `rollout.source.to_samples` built them before
        routes = np.frombuffer(base64.b64decode(payload), dtype="<i4").reshape(
            tokens, layers, -1).tolist()
        return Sample(f"s{i}", i // GROUP, prompt, response, float(i % 2), logprobs, 0, routes)
    return Sample(f"s{i}", i // GROUP, np.asarray(prompt, np.int32), np.asarray(response, np.int32),
                  float(i % 2), np.asarray(logprobs, np.float64), 0,
                  decode_routed_experts(payload, tokens, layers, EXPERTS))


def _raw_bytes(samples, layers: int) -> int:
    """ids int32 + log-probs float32 + routes uint8: what a share is worth."""
    return sum(s.num_tokens * 4 + len(s.response_ids) * 4 + (s.num_tokens - 1) * layers * TOPK
               for s in samples)


def rank_body(rank, world_size, path, args):
    import torch.distributed as dist

    from megatron_vespo.algo.advantages import AdvantageConfig
    from megatron_vespo.learner.batching import micro_batch_plan, pack_plan, sample_advantages
    from megatron_vespo.learner.samples import RolloutBatch
    from megatron_vespo.parallel.packing import split_evenly
    from megatron_vespo.parallel.transport import ShardStream
    from megatron_vespo.rollout_batch import BatchTally, RankShare, stream_groups

    former = path == "former"
    count = args.former_sequences if former else args.sequences
    stream = None if former else ShardStream(rank)  # DP only: every rank is its own DP index
    dist.barrier()
    baseline = _rss()
    timing = {"decode": 0.0, "make": 0.0}  # rank 0: decoding answers; making the synthetic ones
    answers = _answers(count, args.prompt, args.mean, args.longest, 0, args.layers)

    def groups():
        """Rank 0: each group's answers decoded into samples as they arrive."""
        for first in range(0, count, GROUP):
            t = time.perf_counter()
            raw = [next(answers) for _ in range(min(GROUP, count - first))]
            t1 = time.perf_counter()
            group = [_sample(first + j, a, args.layers, former) for j, a in enumerate(raw)]
            timing["make"] += t1 - t
            timing["decode"] += time.perf_counter() - t1
            yield first, group

    sent = 0
    if former:  # rank 0 held the whole batch, then broadcast it pickled to every rank
        batch = [s for _, g in groups() for s in g] if rank == 0 else None
        dist.barrier()
        start = time.perf_counter()
        box = [batch]
        dist.broadcast_object_list(box, src=0)
        everything = box[0]
        mine = split_evenly(len(everything), world_size)[rank]
        share = RankShare([everything[i] for i in mine],
                          sample_advantages(everything, AdvantageConfig())[list(mine)],
                          torch.zeros(len(mine), dtype=torch.int64))
        if rank == 0:  # what went on the wire from rank 0 (measured outside the timed part)
            sent = len(pickle.dumps(batch)) * (world_size - 1)
        moved = time.perf_counter()
    else:  # groups stream to their DP ranks as they are decoded; nobody holds the batch
        dist.barrier()
        start = time.perf_counter()
        messages = None
        if rank == 0:
            messages = stream_groups(RolloutBatch(count, groups()),
                                     BatchTally(count, 1, world_size), AdvantageConfig())
        share = RankShare.from_messages(stream.stream(messages))
        moved = time.perf_counter()
        sent = stream.sent_bytes
    plan = micro_batch_plan([s.num_tokens for s in share.samples], dp_rank=0, dp_size=1,
                            micro_batch_size=1, max_tokens=args.budget)
    packed = pack_plan(share.samples, share.advantages, plan, pad_multiple=1,
                       uniform_length=False)
    done = time.perf_counter()
    shared = torch.tensor([timing["make"], timing["decode"]], dtype=torch.float64)
    dist.broadcast(shared, src=0)  # everyone waited while rank 0 made the synthetic answers
    make = 0.0 if former else float(shared[0])
    decode = float(shared[1])
    tokens = torch.tensor([sum(s.num_tokens for s in share.samples)], dtype=torch.float64)
    dist.all_reduce(tokens)
    response = sum(len(s.response_ids) for s in share.samples)
    return {"decode_s": decode, "move_s": moved - start - make - (0.0 if former else decode),
            "pack_s": done - moved, "total_s": (decode if former else 0.0) + done - start - make,
            "sent": sent, "peak_extra": _rss() - baseline,
            "share_raw": _raw_bytes(share.samples, args.layers), "tokens": float(tokens),
            "response_tokens": response, "micro_batches": len(packed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=2048)
    parser.add_argument("--former-sequences", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--mean", type=int, default=4096)
    parser.add_argument("--longest", type=int, default=15 * 1024)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--budget", type=int, default=16 * 1024)
    args = parser.parse_args()
    from megatron_vespo.launch import run_ranks

    results = {path: run_ranks(rank_body, args.ranks, path, args) for path in ("current", "former")}
    rows, per_mtok, moved_per_mtok = [], {}, {}
    for path, ranks in results.items():
        tokens = ranks[0]["tokens"]
        total = max(r["total_s"] for r in ranks)
        per_mtok[path] = total / tokens * 1e6
        moved_per_mtok[path] = max(r["move_s"] + r["pack_s"] for r in ranks) / tokens * 1e6
        for rank, r in enumerate(ranks):
            rows.append([f"{path} rank {rank}", f"{r['decode_s']:.2f}", f"{r['move_s']:.2f}",
                         f"{r['pack_s']:.2f}", f"{r['total_s']:.2f}", f"{per_mtok[path]:.1f}",
                         human_bytes(r["sent"]), f"{r['response_tokens']:,}",
                         human_bytes(r["share_raw"]),
                         human_bytes(r["peak_extra"]),
                         f"{r['peak_extra'] / max(r['share_raw'], 1):.2f}"])
    print(f"{args.sequences} sequences (former path: {args.former_sequences}), {args.prompt}-token "
          f"prompts, responses mean {args.mean} max {args.longest}, {args.layers} x top-{TOPK} of "
          f"{EXPERTS} experts, DP {args.ranks}")
    print_table(["path / rank", "decode s", "move s", "pack s", "total s", "s per 1M tok",
                 "rank 0 sent", "response tok", "share raw", "peak RSS +", "RSS / share"], rows)
    speedup = per_mtok["former"] / per_mtok["current"]
    print(f"after the decode (which overlaps generation on rank 0): move + pack "
          f"{moved_per_mtok['current']:.2f} vs {moved_per_mtok['former']:.1f} s per 1M tokens = "
          f"{moved_per_mtok['former'] / moved_per_mtok['current']:.0f}x")
    loads = [r["response_tokens"] for r in results["current"]]
    print(f"response tokens per rank: max / mean = {max(loads) / (sum(loads) / len(loads)):.3f}")
    worst = max(r["peak_extra"] / max(r["share_raw"], 1) for r in results["current"])
    print(f"RESULT current / former per token: {speedup:.0f}x faster (target >= 50x): "
          f"{verdict(speedup >= 50)}; peak RSS above baseline on every rank, rank 0 included, "
          f"<= {worst:.2f}x its share (target <= 1.5x): {verdict(worst <= 1.5)}")


if __name__ == "__main__":
    main()
