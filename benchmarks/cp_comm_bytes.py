"""Context-parallel communication bytes per step of the loss: scalar all-reduce vs full-sequence gather.

Measured on real gloo process groups (`tests.distributed.run_ranks`, one spawned process per CP rank,
CP = 2, 4, 8 by default). Every rank packs the same batch (`pack_sequences`, S sequences of L tokens,
a prompt of L/8, padded for the zigzag split), takes its `cp_shard`, and runs twice with
`torch.distributed.all_reduce`, `all_gather` and `all_gather_into_tensor` wrapped to log each call:

  scheme    `shard_policy_loss(logp, shard, denom, loss, cp_group=<all ranks>)` + `loss.backward()`:
            this project's path, whose only CP collective is the all-reduce of the per-sequence
            [S, 3] float64 sums (sequence_reduce.py).
  baseline  what frameworks that need whole sequences on every rank do: `all_gather_into_tensor` of
            the rank's per-token log pi and old log-probs (fp32 [T/cp] each), after which every rank
            holds the full sequences (checked by reassembling them with `cp_unshard`).

Byte conventions, both applied to both schemes, per rank and per step (one micro-batch):
  payload   numel * element_size of the tensor a rank hands to the collective (all-reduce: the
            tensor; all-gather: its own shard).
  ring wire bytes a rank sends in a ring algorithm: all-reduce 2(n-1)/n * size (reduce-scatter +
            all-gather); all-gather (n-1)/n * gathered total = (n-1) * shard.
The verdict uses ring wire bytes. The baseline count is a lower bound: a differentiable gather of
log pi also reduce-scatters its gradient in backward, not counted here. Collectives common to both
(gradient all-reduce, the once-per-step metric reduction of a few dozen scalars) are excluded.

Analytic: scheme wire = 2(n-1)/n * 24 S; gather wire = (n-1)/n * 8 T (T = padded tokens of the
micro-batch), ratio = T / (6 S) = L / 6 for unpadded sequences, independent of n.
Target: the gather moves >= 100x the scheme's bytes at every CP size.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Also runs in every spawned rank (the script is re-imported there before the rank function).
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.common import print_table, verdict  # noqa: E402
from megatron_vespo.algo.policy_losses import get_policy_loss  # noqa: E402
from megatron_vespo.parallel.packing import (  # noqa: E402
    cp_shard,
    cp_unshard,
    pack_sequences,
    required_pad_multiple,
    zigzag_index,
)
from megatron_vespo.parallel.policy_objective import shard_policy_loss  # noqa: E402
from megatron_vespo.parallel.step_reduce import global_denominators  # noqa: E402

# all_gather_into_tensor is a deprecated alias of all_gather_single in recent torch (it calls it):
# both are wrapped, and a call made from inside a counted call is not counted again.
COUNTED_OPS = tuple(op for op in ("all_reduce", "all_gather", "all_gather_into_tensor",
                                  "all_gather_single") if hasattr(dist, op))
SENT_ARG = {"all_reduce": "tensor", "all_gather": "tensor", "all_gather_into_tensor": "input_tensor",
            "all_gather_single": "input_tensor"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=16384, help="tokens per sequence L (default 16384)")
    p.add_argument("--seqs", type=int, default=4, help="sequences S in the micro-batch (default 4)")
    p.add_argument("--cp", default="2,4,8", help="comma-separated CP sizes (default 2,4,8)")
    p.add_argument("--loss", default="vespo", help="policy loss run by the scheme (default vespo)")
    p.add_argument("--target", type=float, default=100.0, help="required gather/scheme byte ratio")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_batch(num_seqs: int, seq_len: int, cp: int, seed: int):
    """The packed micro-batch (identical on every rank) and log pi [T] for all of its positions."""
    g = torch.Generator().manual_seed(seed)
    prompt = max(seq_len // 8, 1)
    tokens = [torch.randint(0, 1000, (seq_len,), generator=g) for _ in range(num_seqs)]
    old_logp = [-torch.empty(seq_len - prompt).exponential_(1.0, generator=g) for _ in range(num_seqs)]
    batch = pack_sequences(tokens, [prompt] * num_seqs, torch.randn(num_seqs, generator=g), old_logp,
                           pad_multiple=required_pad_multiple(cp))
    logp = batch.old_logp + 0.02 * torch.randn(batch.num_positions, generator=g) * batch.loss_mask
    return batch, logp


def ring_wire_bytes(op: str, payload: int, n: int) -> float:
    if op == "all_reduce":
        return 2 * (n - 1) / n * payload
    return (n - 1) * payload  # all-gather: (n-1)/n of the gathered total n * payload


@contextmanager
def counting_collectives(log: list):
    """Wrap the collectives on torch.distributed (and distributed_c10d) to log what this rank sends."""
    c10d = dist.distributed_c10d
    originals = {op: getattr(dist, op) for op in COUNTED_OPS}
    depth = [0]

    def wrap(op, fn):
        signature = inspect.signature(fn)

        def counted(*args, **kwargs):
            if depth[0] == 0:
                bound = signature.bind(*args, **kwargs)
                sent = bound.arguments[SENT_ARG[op]]
                n = dist.get_world_size(bound.arguments.get("group"))
                payload = sent.numel() * sent.element_size()
                log.append(dict(op=op, shape=tuple(sent.shape), n=n, payload=payload,
                                dtype=str(sent.dtype).replace("torch.", ""),
                                wire=ring_wire_bytes(op, payload, n)))
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        return counted

    try:
        for op, fn in originals.items():
            setattr(dist, op, wrap(op, fn))
            setattr(c10d, op, getattr(dist, op))
        yield log
    finally:
        for op, fn in originals.items():
            setattr(dist, op, fn)
            setattr(c10d, op, fn)


def rank_main(rank: int, world_size: int, num_seqs: int, seq_len: int, loss_name: str, seed: int):
    batch, logp_full = build_batch(num_seqs, seq_len, world_size, seed)
    shard = cp_shard(batch, world_size, rank)
    logp = logp_full.index_select(0, zigzag_index(batch.cu_seqlens_padded, world_size, rank))
    logp.requires_grad_()
    denom = global_denominators([batch], None)  # per-sequence lengths are global: no CP reduction
    cp_group = dist.new_group(list(range(world_size)))

    with counting_collectives([]) as scheme_log:
        out = shard_policy_loss(logp, shard, denom, get_policy_loss(loss_name), cp_group=cp_group)
        out.loss.backward()

    gathered = []
    with counting_collectives([]) as baseline_log:
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        for local in (logp.detach(), shard.old_logp):
            full = local.new_empty(local.numel() * world_size)
            gather(full, local.contiguous(), group=cp_group)
            gathered.append(full)
    for full, reference in zip(gathered, (logp_full, batch.old_logp)):
        rebuilt = cp_unshard(list(full.chunk(world_size)), batch.cu_seqlens_padded)
        if not torch.equal(rebuilt, reference):
            raise AssertionError("the gathered shards do not reassemble the full sequences")
    return dict(scheme=scheme_log, baseline=baseline_log, loss=out.loss.item(),
                tokens=batch.num_positions, local_tokens=shard.num_positions)


def unsharded_loss(num_seqs: int, seq_len: int, cp: int, loss_name: str, seed: int) -> float:
    batch, logp = build_batch(num_seqs, seq_len, cp, seed)
    out = shard_policy_loss(logp, batch, global_denominators([batch], None), get_policy_loss(loss_name))
    return out.loss.item()


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_vespo.launch import run_ranks

    cps = [int(c) for c in args.cp.split(",") if c.strip()]
    measured, analytic, ratios = [], [], []
    start_all = time.perf_counter()
    for cp in cps:
        start = time.perf_counter()
        results = run_ranks(rank_main, cp, args.seqs, args.seq_len, args.loss, args.seed)
        seconds = time.perf_counter() - start
        # every rank sends the same amount; take the largest in case a rank differs
        scheme = max((r["scheme"] for r in results), key=lambda log: sum(c["wire"] for c in log))
        baseline = max((r["baseline"] for r in results), key=lambda log: sum(c["wire"] for c in log))
        same = all(r["scheme"] == results[0]["scheme"] and r["baseline"] == results[0]["baseline"]
                   for r in results)
        s_pay, s_wire = sum(c["payload"] for c in scheme), sum(c["wire"] for c in scheme)
        b_pay, b_wire = sum(c["payload"] for c in baseline), sum(c["wire"] for c in baseline)
        loss_error = abs(sum(r["loss"] for r in results)
                         - unsharded_loss(args.seqs, args.seq_len, cp, args.loss, args.seed))
        s, t = args.seqs, results[0]["tokens"]
        ratios.append((b_wire / s_wire, b_pay / s_pay))

        def describe(log):
            kinds = {}
            for c in log:
                key = f"{c['op']} {list(c['shape'])} {c['dtype']}".replace(" ", "")
                kinds[key] = kinds.get(key, 0) + 1
            return " + ".join(f"{k}x {key}" for key, k in kinds.items()) or "none"

        measured.append([cp, s, f"{t:,}", f"{results[0]['local_tokens']:,}", describe(scheme),
                         f"{s_pay:,}", f"{s_wire:,.0f}", describe(baseline), f"{b_pay:,}",
                         f"{b_wire:,.0f}", f"{b_wire / s_wire:,.1f}x",
                         f"{b_pay / s_pay:,.1f}x", "yes" if same else "NO", f"{loss_error:.1e}",
                         f"{seconds:.1f}"])
        a_scheme = 2 * (cp - 1) / cp * 24 * s
        a_gather = (cp - 1) / cp * 8 * t
        analytic.append([cp, f"2({cp}-1)/{cp} * 24 * {s} = {a_scheme:,.0f}",
                         f"({cp}-1)/{cp} * 8 * {t} = {a_gather:,.0f}", f"{t} / (6 * {s}) = "
                         f"{a_gather / a_scheme:,.1f}x",
                         "yes" if (a_scheme, a_gather) == (s_wire, b_wire) else "NO"])

    print(f"CP communication per step of the loss ({args.loss}): {args.seqs} seqs x {args.seq_len} "
          f"tokens, gloo, bytes sent per rank (payload / ring wire)")
    print_table(["cp", "S", "T", "T/rank", "scheme collectives", "scheme payload B",
                 "scheme wire B", "baseline collectives", "gather payload B", "gather wire B",
                 "wire ratio", "payload ratio", "ranks equal", "|sum loss - unsharded|", "run s"], measured)
    print()
    print("analytic ring wire bytes per rank (24 = 3 float64 per sequence; 8 = 2 fp32 per token):")
    print_table(["cp", "scheme 2(n-1)/n*24*S", "gather (n-1)/n*8*T", "ratio T/(6S)", "= measured"],
                analytic)
    worst_wire = min(r[0] for r in ratios)
    worst_payload = min(r[1] for r in ratios)
    print(f"\ntotal {time.perf_counter() - start_all:.1f} s")
    print(f"RESULT min gather/scheme ratio over CP={args.cp}: ring wire {worst_wire:,.1f}x, "
          f"payload {worst_payload:,.1f}x (target >= {args.target:g}x on wire bytes): "
          f"{verdict(worst_wire >= args.target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
