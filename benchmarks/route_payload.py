"""The routed experts of one sample from the engine's answer to the learner's per-position tensor,
at the paper's shape, against the former path (nested Python lists) in the same run.

One Qwen3-30B-A3B sample: 512 prompt + 4096 response tokens, 48 MoE layers x top-8 of 128
experts, as SGLang sends them (base64 of int32). Each path: decode the payload into the sample
record, pickle it (what a broadcast to other ranks sends), unpickle it, and build the [T, L, k]
tensor `moe.replay.engine_position_routes` hands to routing replay. Printed per path: ms per
sample and per 1k tokens, pickled bytes, and the Python heap the held record takes (tracemalloc).

    python benchmarks/route_payload.py [--prompt 512 --response 4096 --layers 48 --topk 8 --experts 128]
"""

from __future__ import annotations

import argparse
import base64
import pickle
import time
import tracemalloc

import numpy as np
import torch

try:
    from common import add_repo_root
except ImportError:  # run as a module
    from benchmarks.common import add_repo_root
add_repo_root()

from benchmarks.common import human_bytes, print_table, verdict  # noqa: E402
from megatron_vespo.rollout.routed_experts import decode_routed_experts  # noqa: E402


def _lists(payload: str, tokens: int, layers: int, experts: int):
    """The former record: the decoded int32 array as nested lists."""
    flat = np.frombuffer(base64.b64decode(payload), dtype="<i4")
    return flat.reshape(tokens, layers, -1).astype(np.int32).tolist()


def _compact(payload: str, tokens: int, layers: int, experts: int):
    return decode_routed_experts(payload, tokens, layers, experts)


def measure(decode, payload: str, tokens: int, layers: int, experts: int, repeats: int) -> dict:
    best = {"decode": float("inf"), "pickle": float("inf"), "unpickle": float("inf"),
            "tensor": float("inf")}
    size = heap = 0
    for _ in range(repeats):
        tracemalloc.start()
        t0 = time.perf_counter()
        record = decode(payload, tokens, layers, experts)
        t1 = time.perf_counter()
        heap = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        wire = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        t2 = time.perf_counter()
        back = pickle.loads(wire)
        t3 = time.perf_counter()
        routes = torch.as_tensor(back).long()
        t4 = time.perf_counter()
        assert routes.shape == (tokens, layers, routes.shape[-1])
        size = len(wire)
        for key, dt in (("decode", t1 - t0), ("pickle", t2 - t1), ("unpickle", t3 - t2),
                        ("tensor", t4 - t3)):
            best[key] = min(best[key], dt)
        del record, back, wire, routes
    best["total"] = sum(best.values())
    return {**best, "bytes": size, "heap": heap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--response", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokens = args.prompt + args.response - 1
    rng = np.random.default_rng(0)
    routes = np.stack([rng.permutation(args.experts)[:args.topk]
                       for _ in range(tokens * args.layers)]).astype("<i4")
    payload = base64.b64encode(routes.tobytes()).decode()
    print(f"one sample: {tokens + 1} tokens, {args.layers} layers x top-{args.topk} of "
          f"{args.experts} experts; engine payload {human_bytes(len(payload))} (base64 int32)")
    results = {"nested lists (former)": measure(_lists, payload, tokens, args.layers, args.experts,
                                                args.repeats),
               "compact array": measure(_compact, payload, tokens, args.layers, args.experts,
                                        args.repeats)}
    rows = []
    for name, r in results.items():
        rows.append([name, f"{1e3 * r['decode']:.1f}", f"{1e3 * r['pickle']:.1f}",
                     f"{1e3 * r['unpickle']:.1f}", f"{1e3 * r['tensor']:.1f}",
                     f"{1e3 * r['total']:.1f}", f"{1e6 * r['total'] / tokens:.2f}",
                     human_bytes(r["bytes"]), human_bytes(r["heap"])])
    print_table(["path", "decode ms", "pickle ms", "unpickle ms", "tensor ms", "total ms",
                 "us/token", "pickled", "held heap"], rows)
    old, new = results["nested lists (former)"], results["compact array"]
    speedup = old["total"] / new["total"]
    print(f"RESULT compact / former: {speedup:.0f}x faster per token, "
          f"{old['bytes'] / new['bytes']:.1f}x fewer pickled bytes, "
          f"{old['heap'] / max(new['heap'], 1):.1f}x less heap (target >= 50x faster): "
          f"{verdict(speedup >= 50)}")


if __name__ == "__main__":
    main()
