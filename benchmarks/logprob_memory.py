"""Peak memory and time of per-token log-probs: chunked `vocab_parallel_logprobs` vs a baseline.

Methods (forward + backward of sum(logp), unsharded):
  baseline          logits.float().log_softmax(-1).gather(targets)  -- fp32 [T, V] over all tokens
  chunked           vocab_parallel_logprobs(logits, targets, chunk_tokens=C)
  chunked+entropy   the same with with_entropy=True and loss sum(logp) + sum(entropy)

Measurement: each method runs alone in a fresh subprocess (so one large workload at a time and no
allocator state shared between methods). The child reads its current resident set size
(/proc/self/status VmRSS) once the inputs exist, then its peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, KiB on Linux) after forward + backward. Torch's CPU
allocator hands large blocks straight to the OS (glibc mmap/munmap above 32 MiB), so RSS tracks
live tensor memory closely, and the inputs are created without large temporaries. Reported:
  peak growth      = peak RSS during fwd+bwd - RSS with the logits allocated
  beyond inputs    = peak growth - size of the logits' gradient (common to every method; for the
                     baseline, whose peak precedes the gradient's allocation, this understates it)
Timing is one fwd+bwd per fresh process (first-touch page faults included, as in real use).

Usage: python benchmarks/logprob_memory.py [--tokens 16384] [--vocab 151936] [--dtype bf16]
       [--chunk 1024] [--methods baseline,chunked,chunked+entropy]
A method whose estimated footprint exceeds 90% of MemAvailable is skipped, with the estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
METHODS = ("baseline", "chunked", "chunked+entropy")
GIB = 1024 ** 3


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _child(method: str, tokens: int, vocab: int, dtype_name: str, chunk: int) -> dict:
    import torch

    torch.manual_seed(0)
    dtype = getattr(torch, DTYPES[dtype_name])
    # Fill small row blocks in place so that creating the inputs makes no large temporary.
    logits = torch.empty(tokens, vocab, dtype=dtype)
    for start in range(0, tokens, 16):
        logits[start:start + 16].normal_(0.0, 3.0)
    targets = torch.randint(0, vocab, (tokens,))
    logits.requires_grad_()
    from megatron_vespo.parallel.logprobs import vocab_parallel_logprobs

    # Current (not peak) RSS as the base: any transient of input creation is already freed.
    base = _current_rss_bytes()
    begin = time.perf_counter()
    if method == "baseline":
        logp = logits.float().log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        loss = logp.sum()
    else:
        with_entropy = method == "chunked+entropy"
        logp, entropy = vocab_parallel_logprobs(logits, targets, chunk_tokens=chunk,
                                                with_entropy=with_entropy)
        loss = logp.sum() + (entropy.sum() if with_entropy else 0.0)
    (grad,) = torch.autograd.grad(loss, logits)
    seconds = time.perf_counter() - begin
    peak = _peak_rss_bytes()
    return {"method": method, "seconds": seconds, "growth": peak - base,
            "grad_bytes": grad.numel() * grad.element_size(), "checksum": float(logp.sum())}


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _estimate(method: str, tokens: int, vocab: int, dtype_name: str, chunk: int) -> int:
    """Rough total footprint, from measurements at small T, plus 0.5 GiB of runtime."""
    elems = tokens * vocab
    logits = elems * BYTES[dtype_name]
    if method == "baseline":
        # Peak in backward, before the logits' grad exists: the saved fp32 log_softmax output,
        # gather's fp32 [T, V] grad and log_softmax's fp32 [T, V] grad.
        return logits + 3 * 4 * elems + GIB // 2
    # Logits, their grad, and at most two fp32 chunks.
    return 2 * logits + 2 * 4 * min(chunk, tokens) * vocab + GIB // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--chunk", type=int, default=1024, help="chunk_tokens of the chunked method")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(_child(args.child, args.tokens, args.vocab, args.dtype, args.chunk)))
        return

    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    logits_gib = args.tokens * args.vocab * BYTES[args.dtype] / GIB
    print(f"T={args.tokens} V={args.vocab} dtype={args.dtype} chunk_tokens={args.chunk} "
          f"threads={os.cpu_count()}; logits {logits_gib:.2f} GiB, their grad {logits_gib:.2f} GiB")
    print("memory: peak RSS growth of a fresh process per method over its RSS with the inputs "
          "allocated (ru_maxrss)")
    rows = {}
    header = f"{'method':<17}{'time s':>9}{'peak growth GiB':>17}{'beyond inputs GiB':>19}"
    print(header)
    print("-" * len(header))
    for method in methods:
        need, avail = _estimate(method, args.tokens, args.vocab, args.dtype, args.chunk), \
            _mem_available()
        if need > 0.9 * avail:
            print(f"{method:<17}  skipped: needs ~{need / GIB:.1f} GiB, "
                  f"{avail / GIB:.1f} GiB available")
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--child", method,
               "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--dtype", args.dtype,
               "--chunk", str(args.chunk)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{method:<17}  failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["beyond"] = res["growth"] - res["grad_bytes"]
        rows[method] = res
        print(f"{method:<17}{res['seconds']:>9.2f}{res['growth'] / GIB:>17.2f}"
              f"{res['beyond'] / GIB:>19.2f}")
    if "baseline" in rows:
        base = rows["baseline"]
        for method in ("chunked", "chunked+entropy"):
            if method in rows:
                res = rows[method]
                print(f"{method}/baseline: beyond-inputs memory {res['beyond'] / base['beyond']:.3f}"
                      f" (target <= 0.25), peak growth {res['growth'] / base['growth']:.3f}, "
                      f"time {res['seconds'] / base['seconds']:.2f}")
                if abs(res["checksum"] - base["checksum"]) > 1e-3 * abs(base["checksum"]):
                    print(f"  WARNING: sum(logp) differs: {res['checksum']} vs {base['checksum']}")


if __name__ == "__main__":
    main()
