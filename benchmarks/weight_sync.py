"""Weight sync and HF export at scale: streaming from the sharded model versus the former gather
to rank 0, and a plain broadcast / plain write of the same bytes, in one run.

    python benchmarks/weight_sync.py [--layers 4 8] [--bucket-mb 128] [--link-mb-s 200]
    python benchmarks/weight_sync.py --paper-shape --layers 2 --bucket-mb 512

A synthetic Qwen3-MoE in bfloat16 (hidden 1024, 16 experts of width 1024, vocab 32k; or with
--paper-shape Qwen3-30B-A3B's layer and vocabulary: hidden 2048, 128 experts of width 768, vocab
151,936; the layer counts give the model sizes) is built as real megatron-core GPTModel chunks on
2 gloo ranks, in two layouts: TP2 (experts split by expert-TP 2) and EP2. Each rank then, in turn:

* stream sync: `DistributedWeightSync.sync` into the receiver;
* stream, no wire: the same buckets assembled on the sender (gathers, sends, reorders) and dropped;
* former sync: `gather_full_state` to rank 0, `megatron_to_hf`, the same buckets broadcast from
  there (the path this project had before);
* plain broadcast: the model's bytes, already flat in one buffer on rank 0, broadcast bucket by
  bucket through the same group (the wire's floor);
* plain relay: the bytes the stream moves between learner ranks (TP slices to their owner, EP
  experts to the sender: what each rank sent in "stream, no wire"), sent point to point in
  bucket-size pieces from one buffer to one buffer;
* stream sync @ link, former sync @ link, plain broadcast @ link: the same over a simulated
  server link (below);
* stream export: `export_model_to_hf` (each sender writes its shard files);
* plain write: the model's bytes written by rank 0 in bucket-size files.

The receiver is a stand-in for an SGLang server, said so: an HTTP process with the endpoints
`DistributedWeightSync` calls, which joins the update group as SGLang does (`patches/
torch_external_group.py`) and receives every bucket into a fresh buffer; it counts the bytes.

Per rank: seconds (the median of 3 runs for the stream and plain paths, after a first sync that
forms the update group; the former paths run once), peak RSS above the rank's RSS after building the
model (sampled every 2 ms; glibc is told to map large blocks, so freed buffers leave RSS), and
bytes this rank put on the wire (counted at the torch.distributed calls: send, broadcast).
Targets: streaming's extra peak RSS is at most two buckets on every rank at both sizes; the
receiver gets the model's bytes once; the stream sync takes at most 1.25x the plain broadcast.

On one CPU host the learner ranks' exchange (the TP gather, the EP relay) runs over the same
loopback and cores as the broadcast, so on loopback the stream sync cannot come near the plain
broadcast alone: "/ broadcast + relay" is the ratio against both plain transfers of the bytes that
must move. A GPU cluster with the servers on their own nodes is in another regime: the
servers' link (InfiniBand, ~50 GB/s a NIC) is several times slower than the stage's own exchange
(NVLink, ~450 GB/s) and copies (HBM), so a sync is as fast as the sender keeps that link busy:
gathering the next bucket while the previous one is on it, and little time between buckets. The
simulated link puts this host in that regime: the receiver answers a bucket no sooner than its
bytes would cross a link of --link-mb-s (default 200 MB/s, about a ninth of the rate this host
assembles buckets at, as InfiniBand is to NVLink). The time target is judged there;
the loopback ratios are printed beside it.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_repo_root, human_bytes, print_table, verdict  # noqa: E402

add_repo_root()

LAYOUTS = {"TP2": dict(tp=2, sequence_parallel=True), "EP2": dict(ep=2)}
SLACK = 32 << 20  # allocator and gloo buffers on top of the two buckets
TIMED_REPEATS = 3  # the paths whose seconds are compared: the median of this many runs


# ------------------------------------------------------------------------------------------------
# The stand-in receiver
# ------------------------------------------------------------------------------------------------


def _receiver(port: int, ready, parent: int) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from megatron_vespo.patches.torch_external_group import external_process_group

    groups, state = {}, {"version": "0", "bytes": 0, "link": 0.0}  # link: bytes/s, 0 = loopback
    lock = threading.Lock()  # one update at a time, as SGLang's scheduler does

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/server_info":
                self._answer({"tp_size": 1, "device": "cpu"})
            elif self.path == "/model_info":
                self._answer({"weight_version": state["version"]})
            else:
                self._answer({"bytes": state["bytes"]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            if self.path == "/init_weights_update_group":
                groups[body["group_name"]] = external_process_group(
                    body["master_address"], body["master_port"], body["world_size"],
                    body["rank_offset"], body["backend"], body["group_name"],
                    datetime.timedelta(seconds=300))
            elif self.path == "/destroy_weights_update_group":
                dist.destroy_process_group(groups.pop(body["group_name"]))
            elif self.path == "/update_weights_from_distributed":
                with lock:
                    sizes = [torch.empty(0, dtype=getattr(torch, d)).element_size() * _numel(s)
                             for d, s in zip(body["dtypes"], body["shapes"])]
                    flat = torch.empty(sum(sizes), dtype=torch.uint8)
                    start = time.perf_counter()
                    dist.broadcast(flat, group=groups[body["group_name"]], group_src=0)
                    if state["link"]:
                        time.sleep(max(0.0, start + flat.numel() / state["link"] - time.perf_counter()))
                    state["bytes"] += flat.numel()
                    state["version"] = body.get("weight_version", state["version"])
            elif self.path == "/reset":
                state["bytes"] = 0
            elif self.path == "/link":
                state["link"] = float(body["bytes_per_s"])
            self._answer({"success": True})

    def orphaned() -> None:  # the benchmark died (even by kill -9): so does its receiver
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    ready.set()
    server.serve_forever()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


class Peak:
    """Peak RSS above the RSS at entry, sampled in a thread."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()

    def __enter__(self):
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        self.extra = self.peak - self.base


class WireBytes:
    """Bytes this rank hands to torch.distributed to send."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.sent = 0
        self._dist = dist
        self._originals = {n: getattr(dist, n) for n in ("send", "broadcast")}

        def send(tensor, dst, *args, **kw):
            self.sent += tensor.numel() * tensor.element_size()
            return self._originals["send"](tensor, dst, *args, **kw)

        def broadcast(tensor, src=None, group=None, async_op=False, group_src=None):
            root = src if group_src is None else group_src
            mine = dist.get_rank(group) if group is not None else dist.get_rank()
            if root == mine:
                receivers = (dist.get_world_size(group) if group is not None else dist.get_world_size()) - 1
                self.sent += tensor.numel() * tensor.element_size() * receivers
            return self._originals["broadcast"](tensor, src=src, group=group, async_op=async_op,
                                                group_src=group_src)

        for name, fn in (("send", send), ("broadcast", broadcast)):
            setattr(dist, name, fn)

    def take(self) -> int:
        sent, self.sent = self.sent, 0
        return sent


# ------------------------------------------------------------------------------------------------
# One layout and size, on every rank
# ------------------------------------------------------------------------------------------------


# Qwen3-30B-A3B's layer and vocabulary (the model has 48 such layers): `--paper-shape`.
QWEN3_30B_A3B = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                     vocab_size=151936)


def small_shape(hidden: int, vocab: int) -> dict:
    return dict(hidden_size=hidden, num_attention_heads=8, num_key_value_heads=4,
                head_dim=hidden // 8, num_experts=16, num_experts_per_tok=4,
                moe_intermediate_size=hidden, vocab_size=vocab)


def _model_config(layers: int, shape: dict):
    from megatron_vespo.learner.model import ModelConfig

    return ModelConfig(family="qwen3_moe", num_hidden_layers=layers, params_dtype="bfloat16",
                       spec="local", tie_word_embeddings=False, **shape)


def rank_body(rank, world_size, layout_name, layers, bucket_bytes, url, out_dir, shape,
              link_bytes_per_s):
    import torch
    import torch.distributed as dist

    from megatron_vespo.learner.hf_convert import export_model_to_hf, hf_buckets
    from megatron_vespo.learner.hf_files import FlatBucket, ShardWriter
    from megatron_vespo.learner.model import build_model_chunks
    from megatron_vespo.learner.state_adapter import canonical_state, megatron_to_hf
    from megatron_vespo.parallel.layout import ParallelLayout
    from megatron_vespo.parallel.sharded_state import gather_full_state, plan_stream
    from megatron_vespo.rollout.server import post_json
    from megatron_vespo.rollout.weight_sync import DistributedWeightSync

    cfg = _model_config(layers, shape)
    layout = ParallelLayout(**LAYOUTS[layout_name])
    layout.initialize()
    with torch.no_grad():
        chunks = build_model_chunks(cfg, layout)
    own = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    plan = plan_stream(chunks, canonical_state(cfg), layout)
    model_bytes = sum(_numel(e.shape) * e.dtype.itemsize for e in plan.entries)
    wire = WireBytes()
    sync = DistributedWeightSync(bucket_bytes=bucket_bytes, timeout_s=600, master_address="127.0.0.1")
    rows = {}

    def measure(name, fn, repeats=1):
        runs = []
        for _ in range(repeats):
            dist.barrier()
            wire.take()
            with Peak() as peak:
                fn()
                dist.barrier()
            runs.append(dict(seconds=peak.seconds, extra=peak.extra, sent=wire.take()))
        rows[name] = dict(seconds=statistics.median(r["seconds"] for r in runs),
                          extra=max(r["extra"] for r in runs), sent=runs[-1]["sent"])

    sync.sync(chunks, cfg, layout, [url], 1)  # forms the group: not part of what is measured
    if rank == 0:
        post_json(url, "/reset")
    versions = itertools.count(2)

    def stream_sync():
        sync.sync(chunks, cfg, layout, [url], next(versions))

    measure("stream sync", stream_sync, TIMED_REPEATS)
    received = None
    if rank == 0:
        from megatron_vespo.rollout.server import get_json

        received = get_json(url, "/bytes")["bytes"] / TIMED_REPEATS  # per sync
    measure("stream, no wire", lambda: [None for _ in hf_buckets(plan, cfg, bucket_bytes)],
            TIMED_REPEATS)
    relayed: list = [None] * world_size
    dist.all_gather_object(relayed, rows["stream, no wire"]["sent"])

    def plain_relay():
        piece = torch.empty(min(bucket_bytes, max(relayed)), dtype=torch.uint8).fill_(1)
        for src, count in enumerate(relayed[1:], start=1):  # to rank 0, the sender
            for start in range(0, count, bucket_bytes):
                part = piece[:min(bucket_bytes, count - start)]
                if rank == src:
                    dist.send(part, 0)
                elif rank == 0:
                    dist.recv(part, src)

    measure("plain relay", plain_relay, TIMED_REPEATS)

    def former():
        full = gather_full_state(chunks, canonical_state(cfg), layout)
        if rank == 0:
            hf = megatron_to_hf(full, cfg)
            del full
            bucket, size = [], 0
            for name, tensor in hf.items():
                nbytes = tensor.numel() * tensor.element_size()
                if bucket and (size + nbytes > bucket_bytes or tensor.dtype != bucket[-1][1].dtype):
                    sync._wait(sync._start(pool, [url], *_fields(bucket, sync)))
                    bucket, size = [], 0
                bucket.append((name, tensor))
                size += nbytes
            sync._wait(sync._start(pool, [url], *_fields(bucket, sync)))

    def plain_broadcast(flat):
        if rank == 0:
            for start in range(0, model_bytes, bucket_bytes):
                piece = flat[start:start + bucket_bytes]
                fields = {"names": ["x"], "dtypes": ["uint8"], "shapes": [[piece.numel()]],
                          "load_format": "flattened_bucket", "group_name": sync._group.name}
                sync._wait(sync._start(pool, [url], piece, fields))

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        measure("former sync", former)
        flat = torch.empty(model_bytes if rank == 0 else 0, dtype=torch.uint8).fill_(1)
        measure("plain broadcast", functools.partial(plain_broadcast, flat), TIMED_REPEATS)
        if rank == 0:
            post_json(url, "/link", {"bytes_per_s": link_bytes_per_s})
        measure("stream sync @ link", stream_sync, TIMED_REPEATS)
        measure("plain broadcast @ link", functools.partial(plain_broadcast, flat), TIMED_REPEATS)
        measure("former sync @ link", former)
        if rank == 0:
            post_json(url, "/link", {"bytes_per_s": 0})
        del flat
    sync.close()

    export = os.path.join(out_dir, f"{layout_name}-{layers}")
    measure("stream export", lambda: export_model_to_hf(export, chunks, cfg, layout,
                                                        max_shard_bytes=bucket_bytes))

    def plain_write():
        if rank == 0:
            with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                writer = ShardWriter(Path(tmp))
                piece = FlatBucket.of([("x", torch.ones(bucket_bytes // 2, dtype=torch.bfloat16))])
                for _ in range(-(-model_bytes // bucket_bytes)):
                    writer.write(piece)

    measure("plain write", plain_write)
    exported = sum(f.stat().st_size for f in Path(export).glob("*.safetensors")) if rank == 0 else None
    return dict(rows=rows, own=own, model_bytes=model_bytes, received=received, exported=exported)


def _fields(bucket, sync):
    from megatron_vespo.learner.hf_files import FlatBucket

    flat = FlatBucket.of(bucket)
    return flat.flat, {**flat.fields(), "group_name": sync._group.name}


# ------------------------------------------------------------------------------------------------


def main() -> None:
    import multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--bucket-mb", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--paper-shape", action="store_true",
                        help="Qwen3-30B-A3B's layers and vocabulary (not --hidden, --vocab)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--link-mb-s", type=float, default=200.0,
                        help="the simulated server link, MB/s (see the docstring)")
    args = parser.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # the ranks inherit it
    from megatron_vespo.launch import run_ranks
    from megatron_vespo.ports import free_ports

    shape = QWEN3_30B_A3B if args.paper_shape else small_shape(args.hidden, args.vocab)
    bucket = args.bucket_mb << 20
    ctx = mp.get_context("spawn")
    port = free_ports(1, "127.0.0.1")[0]
    ready = ctx.Event()
    receiver = ctx.Process(target=_receiver, args=(port, ready, os.getpid()), daemon=True)
    receiver.start()
    ready.wait(60)
    url = f"http://127.0.0.1:{port}"
    table, checks = [], []
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            for layout_name in args.layouts:
                for layers in args.layers:
                    results = run_ranks(rank_body, 2, layout_name, layers, bucket, url, out_dir,
                                        shape, args.link_mb_s * 1e6)
                    model = results[0]["model_bytes"]
                    label = f"{layout_name} {human_bytes(model)}"
                    for path in ("stream sync", "stream, no wire", "former sync", "plain broadcast",
                                 "plain relay", "stream sync @ link", "former sync @ link",
                                 "plain broadcast @ link", "stream export", "plain write"):
                        for rank, r in enumerate(results):
                            row = r["rows"][path]
                            table.append([f"{label} {path} r{rank}", f"{row['seconds']:.2f}",
                                          human_bytes(row["extra"]), f"{row['extra'] / bucket:.2f}",
                                          human_bytes(r["own"]), human_bytes(row["sent"])])
                    seconds = {p: r["seconds"] for p, r in results[0]["rows"].items()}
                    ratios = (seconds["stream sync @ link"] / seconds["plain broadcast @ link"],
                              seconds["former sync @ link"] / seconds["plain broadcast @ link"],
                              seconds["stream sync"] / seconds["plain broadcast"],
                              seconds["stream sync"] / (seconds["plain broadcast"] + seconds["plain relay"]))
                    worst = max(r["rows"][p]["extra"] for r in results
                                for p in ("stream sync", "stream sync @ link", "stream export"))
                    checks.append((label, worst, results[0]["received"], model, ratios,
                                   results[0]["exported"]))
                    print(f"done: {label}", flush=True)
    finally:
        receiver.terminate()
    print(f"\nbucket {human_bytes(bucket)}; synthetic Qwen3-MoE bf16 (hidden {shape['hidden_size']}, "
          f"{shape['num_experts']} experts of width {shape['moe_intermediate_size']}, vocab "
          f"{shape['vocab_size']}), 2 gloo ranks; receiver: a stand-in for an SGLang server (see the "
          "docstring)")
    print_table(["layout size path rank", "seconds", "peak RSS +", "in buckets", "own shards",
                 "sent"], table)
    ok = True
    for label, worst, received, model, (link, former, loopback, host), exported in checks:
        fits = worst <= 2 * bucket + SLACK
        once = received == model
        fast = link <= 1.25
        ok &= fits and once and fast
        print(f"{label}: streaming peak RSS + {human_bytes(worst)} = {worst / bucket:.2f} buckets "
              f"(<= 2 + slack: {verdict(fits)}); receiver got {human_bytes(received)} a sync of "
              f"{human_bytes(model)} ({verdict(once)}); exported {human_bytes(exported)}; "
              f"stream sync / plain broadcast at a {args.link_mb_s:g} MB/s link = {link:.2f}x "
              f"(<= 1.25: {verdict(fast)}; the former sync {former:.2f}x); on loopback {loopback:.2f}x, "
              f"/ broadcast + relay {host:.2f}x")
    print(f"RESULT: {verdict(ok)}")


if __name__ == "__main__":
    main()
