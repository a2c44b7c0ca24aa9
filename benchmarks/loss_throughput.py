"""Throughput of the policy-loss path, as memory bandwidth against a plain copy of the same bytes.

What is timed (one step, unsharded, no process group): `shard_policy_loss(logp, batch, denom, loss)`
(token log-ratios, per-sequence log W sums, phi, the loss, its metric sums), `loss.backward()` (the
gradient w.r.t. logp) and `metrics.finalize()`, for `vespo` and `grpo`, on S sequences x L positions
(default 4096 x 2048 = 8.4M tokens). Inputs are built once as flat tensors (logp fp32 [T] with grad,
old_logp fp32 [T], loss_mask bool [T], seq_index int64 [T], advantages [S]) and wrapped in a
`PackedBatch` constructed directly (no Python loop over sequences); every sequence has a prompt of
L/8..L/4 positions outside the mask, and logp = old_logp + N(0, 0.02) on response tokens.

Bytes counted per step: the inputs read (logp 4 + old_logp 4 + mask 1 + seq_index 8 B/token) plus
the gradient written (4 B/token): 21 B/token, counted once each. The baseline copies exactly these
bytes: `Tensor.copy_` of logp, old_logp, mask and seq_index into preallocated buffers, plus one more
fp32 [T] copy standing in for the gradient, and is counted the same way (21 B/token, once each; the
copy's actual traffic is read + write). GB/s = counted bytes / best time. Copy, vespo and grpo run
interleaved in every round (so a load change on a shared machine hits all of them), the first
`--warmup` rounds are discarded and the best of `--repeats` rounds is reported.

A second table splits the vespo step into its pieces (best of the same number of rounds each): the
fused per-sequence sums (where the CP all-reduce would go), the loss function's forward (phi, loss,
metric sums), backward and finalize. `--profile` adds a torch.profiler op table.

Threads: `torch.set_num_threads(--threads)`, default all cores available to the process.
On CPU, every tensor above 32 MiB is mmap'd fresh by glibc and page-faulted on first touch;
`--reuse-freed-memory` re-runs the script with MALLOC_MMAP_MAX_=0 so freed blocks are reused
(closer to a GPU caching allocator). Target: vespo >= 50% of the copy's bandwidth.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import print_table, verdict  # noqa: E402
from megatron_vespo.algo.importance import behaviour_logprobs  # noqa: E402
from megatron_vespo.algo.policy_losses import (  # noqa: E402
    Denominators,
    PolicyLossInput,
    get_policy_loss,
)
from megatron_vespo.parallel.packing import PackedBatch  # noqa: E402
from megatron_vespo.parallel.policy_objective import shard_policy_loss  # noqa: E402
from megatron_vespo.parallel.sequence_reduce import sequence_stats  # noqa: E402

BYTES_PER_TOKEN = 4 + 4 + 1 + 8 + 4  # logp, old_logp, mask, seq_index read; grad written
_REEXEC_MARK = "MEGATRON_VESPO_BENCH_REEXEC"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, default=4096, help="sequences S (default 4096)")
    p.add_argument("--seq-len", type=int, default=2048, help="positions per sequence L (default 2048)")
    p.add_argument("--losses", default="vespo,grpo", help="comma-separated; the first is the target")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds, best reported (default 10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch.set_num_threads (default: all cores available)")
    p.add_argument("--target", type=float, default=0.5, help="required fraction of copy bandwidth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-piece table")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table for vespo")
    p.add_argument("--reuse-freed-memory", action="store_true",
                   help="re-run with MALLOC_MMAP_MAX_=0 (glibc reuses freed blocks, no page faults)")
    return p.parse_args(argv)


def make_batch(num_seqs: int, seq_len: int, seed: int) -> tuple[torch.Tensor, PackedBatch]:
    """Flat inputs and a PackedBatch over them; returns (logp [T] leaf with grad, batch)."""
    g = torch.Generator().manual_seed(seed)
    total = num_seqs * seq_len
    seq_index = torch.arange(num_seqs).repeat_interleave(seq_len)
    position = torch.arange(seq_len).repeat(num_seqs)
    prompt = torch.randint(max(seq_len // 8, 1), max(seq_len // 4, 2), (num_seqs,), generator=g)
    mask = position >= prompt[seq_index]
    del position
    old_logp = torch.empty(total).exponential_(1.0, generator=g).neg_().mul_(mask)
    logp = old_logp + torch.randn(total, generator=g).mul_(0.02).mul_(mask)
    cu = torch.arange(num_seqs + 1, dtype=torch.int32) * seq_len
    batch = PackedBatch(
        input_ids=seq_index,  # not read by the loss; aliases avoid allocating more [T] tensors
        target_ids=seq_index,
        loss_mask=mask,
        old_logp=old_logp,
        engine_logp=None,
        position_ids=seq_index,
        seq_index=seq_index,
        cu_seqlens=cu,
        cu_seqlens_padded=cu,
        response_lengths=seq_len - prompt,
        advantages=torch.randn(num_seqs, generator=g),
    )
    return logp.requires_grad_(), batch


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.reuse_freed_memory and not os.environ.get(_REEXEC_MARK):
        env = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40),
                   **{_REEXEC_MARK: "1"})
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    torch.set_num_threads(args.threads)
    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    policy = {name: get_policy_loss(name) for name in losses}

    logp, batch = make_batch(args.seqs, args.seq_len, args.seed)
    denom = Denominators(tokens=float(batch.response_lengths.sum()), sequences=float(args.seqs))
    tokens = logp.numel()
    counted = tokens * BYTES_PER_TOKEN
    sources = [logp.detach(), batch.old_logp, batch.loss_mask, batch.seq_index, logp.detach()]
    buffers = [torch.empty_like(t) for t in sources]
    for b in buffers:  # touch the buffers once so the copy measures bandwidth, not page faults
        b.zero_()
    assert sum(t.numel() * t.element_size() for t in sources) == counted

    def copy_step() -> None:
        for dst, src in zip(buffers, sources):
            dst.copy_(src)

    def loss_step(name: str) -> dict:
        logp.grad = None
        out = shard_policy_loss(logp, batch, denom, policy[name])
        out.loss.backward()
        return out.metrics.finalize()

    steps = {"copy (baseline)": copy_step, **{name: (lambda n=name: loss_step(n)) for name in losses}}
    best = {key: float("inf") for key in steps}
    for round_ in range(args.warmup + args.repeats):
        for key, fn in steps.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_ >= args.warmup:
                best[key] = min(best[key], elapsed)

    allocator = "glibc, freed blocks reused" if os.environ.get(_REEXEC_MARK) else "glibc default"
    print(f"loss path throughput: {args.seqs} seqs x {args.seq_len} positions = {tokens:,} tokens "
          f"({denom.tokens:,.0f} on the mask); threads={torch.get_num_threads()}; "
          f"allocator: {allocator}; best of {args.repeats} after {args.warmup} warm-up")
    print(f"bytes counted per step: {BYTES_PER_TOKEN} B/token x {tokens:,} = {counted / 1e6:,.1f} MB "
          "(logp, old_logp, mask, seq_index read + grad written)")
    copy_bw = counted / best["copy (baseline)"]
    rows = []
    for key, seconds in best.items():
        bw = counted / seconds
        rows.append([key, f"{seconds * 1e3:.1f}", f"{tokens / seconds / 1e6:.1f}",
                     f"{bw / 1e9:.2f}", f"{bw / copy_bw:.3f}"])
    print_table(["path", "best ms", "Mtok/s", "GB/s", "vs copy"], rows)

    if not args.no_breakdown:
        print()
        breakdown(logp, batch, denom, policy[losses[0]], losses[0], args, best[losses[0]])
    if args.profile:
        print()
        profile(lambda: loss_step(losses[0]), losses[0])

    ratio = best["copy (baseline)"] / best[losses[0]]
    print(f"\nRESULT {losses[0]} loss path / copy bandwidth = {ratio:.3f} "
          f"(target >= {args.target:.2f}): {verdict(ratio >= args.target)}")
    return 0


def breakdown(logp, batch, denom, policy_loss, name, args, end_to_end: float) -> None:
    """Best-of times of the pieces `shard_policy_loss` + backward + finalize are made of."""
    pieces = ["per-sequence sums, one fused pass (CP all-reduce point)",
              f"{name} forward (phi, loss, metric sums)", "backward", "metrics.finalize"]
    best = dict.fromkeys(pieces, float("inf"))
    for round_ in range(args.warmup + args.repeats):
        logp.grad = None
        marks = [time.perf_counter()]
        behaviour = behaviour_logprobs(batch.old_logp, batch.engine_logp, False)
        seq, local = sequence_stats(logp, behaviour, batch.loss_mask, batch.local_seq_lengths)
        marks.append(time.perf_counter())
        out = policy_loss(PolicyLossInput(logp=logp, behaviour_logp=behaviour, mask=batch.loss_mask,
                                          seq_index=batch.seq_index, advantages=batch.advantages,
                                          seq=seq, local=local, denom=denom))
        marks.append(time.perf_counter())
        out.loss.backward()
        marks.append(time.perf_counter())
        out.metrics.finalize()
        marks.append(time.perf_counter())
        del seq, local, out
        if round_ >= args.warmup:
            for piece, t0, t1 in zip(pieces, marks, marks[1:]):
                best[piece] = min(best[piece], t1 - t0)
    total = sum(best.values())
    rows = [[piece, f"{s * 1e3:.1f}", f"{100 * s / total:.0f}%"] for piece, s in best.items()]
    rows.append(["sum of pieces", f"{total * 1e3:.1f}", "100%"])
    rows.append([f"end-to-end {name} (table above)", f"{end_to_end * 1e3:.1f}", ""])
    print(f"where the {name} step's time goes (best of {args.repeats} per piece):")
    print_table(["piece", "best ms", "share"], rows)


def profile(step, name: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    print(f"torch.profiler, one {name} step (top ops by self CPU time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    sys.exit(main())
