"""A live (sharded) megatron model to and from HF checkpoint directories, and the bucket stream
that weight sync and export share.

The pieces live elsewhere, one job each: `hf_config` (config.json <-> ModelConfig),
`state_adapter` (names and layouts per model family), `parallel.sharded_state` (which rank holds
which slice; streaming the full tensors), `hf_files` (safetensors directories). Here they meet:

* `load_hf_into_model`: each rank reads only the tensors its parameters are sliced from.
* `hf_buckets`: the model as buckets of HF tensors on each pipeline stage's sender.
* `export_model_to_hf`: those buckets written as shard files by each sender, published atomically.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from ..parallel.agree import on_rank0, raise_everywhere
from ..parallel.layout import ParallelLayout
from ..parallel.sharded_state import StreamPlan, deliver, local_shards, plan_stream, take_slice
from .hf_config import CheckpointError, check_same_architecture
from .hf_files import FlatBucket, HFCheckpoint, ShardWriter, publish, staging_dir
from .model import ModelConfig
from .state_adapter import canonical_state, state_adapter

EXPORT_SHARD_BYTES = 2 << 30  # bytes per exported shard file, and per bucket in flight when exporting

def load_hf_into_model(path, model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig,
                       layout: ParallelLayout) -> ModelConfig:
    """Load a HF checkpoint directory into this rank's model chunks. No communication: each rank
    reads only the tensors its parameters are sliced from (its layers, its experts). The
    checkpoint's config must match `cfg` on every architecture field, and its tensor headers
    `cfg`'s names and shapes, before any parameter is written. Returns the checkpoint's config."""
    checkpoint = HFCheckpoint(path)
    check_same_architecture(checkpoint.cfg, cfg)
    adapter = state_adapter(cfg)
    shards = local_shards(model_chunks, canonical_state(cfg), layout)
    slices = []  # read and slice everything first: an I/O error leaves the model untouched
    for shard in shards:
        rule = adapter.rule_of[shard.canonical]
        full = adapter.merge(rule, checkpoint.read(rule.hf))
        slices.append(take_slice(full, shard).clone())
    with torch.no_grad():
        for shard, local in zip(shards, slices):
            shard.param.copy_(local)
    return checkpoint.cfg


class _Filling:
    """The bucket being filled on a sender: one buffer, views handed out back to back."""

    def __init__(self, flat: torch.Tensor, dtype: torch.dtype) -> None:
        self.flat = flat
        self.dtype, self.used = dtype, 0
        self.tensors: List[Tuple[str, torch.Tensor]] = []

    def fits(self, nbytes: int, dtype: torch.dtype) -> bool:
        return dtype == self.dtype and self.used + nbytes <= self.flat.numel()

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        view = self.flat[self.used:self.used + nbytes].view(dtype).view(shape)
        self.used += nbytes
        return view

    def done(self) -> FlatBucket:
        return FlatBucket(self.flat[:self.used], self.tensors)


def hf_buckets(plan: StreamPlan, cfg: ModelConfig, bucket_bytes: int) -> Iterator[FlatBucket]:
    """This rank's share of the model as buckets of HF tensors, each one buffer of at most
    `bucket_bytes` (a larger tensor travels alone) and one dtype; nothing on ranks that send
    nothing. Collective: every rank must exhaust it. A tensor kept whole in HF (copy, [gate; up]) is
    received or gathered straight into the bucket's buffer; q/k/v are reordered into it.

    Two buffers take turns (their pages stay mapped: no fresh memory per bucket), so a bucket is
    valid until the next but one is requested: a consumer may keep one bucket in flight while the
    next is filled, never two. A tensor larger than a bucket takes the idle buffer's place, so at
    most two buffers live at once, each at most max(bucket_bytes, the largest tensor)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    import torch.distributed as dist

    adapter = state_adapter(cfg)
    me = dist.get_rank()
    device = next((s.param.device for s in plan.shards.values()), torch.device("cpu"))
    sizes = {e.name: math.prod(e.shape) * e.dtype.itemsize for e in plan.entries}
    capacity = min(bucket_bytes, sum(sizes[e.name] for e in plan.entries if e.sender == me))
    buffers: List[torch.Tensor] = []  # at most two, taking turns
    last: Optional[torch.Tensor] = None  # the buffer of the bucket yielded last (maybe in flight)
    filling: Optional[_Filling] = None
    for entry in plan.entries:
        if entry.sender != me:
            deliver(plan, entry)
            continue
        nbytes = sizes[entry.name]
        if filling is not None and not filling.fits(nbytes, entry.dtype):
            last = filling.flat
            yield filling.done()
            filling = None
        if filling is None:
            if nbytes > capacity:  # a tensor larger than a bucket travels alone, in its own buffer
                buffers = [b for b in buffers if b is last]  # the idle one goes: two buffers at most
                flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
            else:
                flat = next((b for b in buffers if b is not last), None)
                if flat is None:
                    flat = torch.empty(capacity, dtype=torch.uint8, device=device)
                    buffers.append(flat)
            filling = _Filling(flat, entry.dtype)
        if adapter.rule_of[entry.name].kind == "qkv":
            full = deliver(plan, entry)
            for hf_name, part in adapter.split(entry.name, full):
                filling.tensors.append((hf_name, filling.take(part.shape, part.dtype).copy_(part)))
        else:
            full = deliver(plan, entry, into=filling.take(entry.shape, entry.dtype))
            filling.tensors += adapter.split(entry.name, full)
    if filling is not None:
        yield filling.done()


def export_model_to_hf(path, model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig,
                       layout: ParallelLayout, *, overwrite: bool = False,
                       max_shard_bytes: int = EXPORT_SHARD_BYTES,
                       on_bucket: Optional[Callable[[FlatBucket], None]] = None) -> None:
    """Write the model as a HF checkpoint directory at `path` (on a file system every sender
    shares). Collective: every rank must call it. Each pipeline stage's sender writes its buckets
    as shard files into one staging directory; global rank 0 then publishes it (index, config,
    rename). Every rank returns once the directory is in place and raises if any rank failed.
    `on_bucket(bucket)` sees every bucket on its sender before it is written (checksums)."""
    import torch.distributed as dist

    plan = plan_stream(model_chunks, canonical_state(cfg), layout)
    what = f"export to {path}"

    def make_staging() -> Path:
        if Path(path).exists() and not overwrite:
            raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
        return staging_dir(path)

    staging = on_rank0(make_staging, CheckpointError, what)

    writer = ShardWriter(staging, prefix=f"rank{dist.get_rank():05d}")
    error: Optional[BaseException] = None
    for bucket in hf_buckets(plan, cfg, max_shard_bytes):
        if error is None:  # after a failure, keep draining: the other ranks' sends need us
            try:
                if on_bucket is not None:
                    on_bucket(bucket)
                writer.write(bucket)
            except Exception as exc:  # noqa: BLE001 - reported to every rank below
                error = exc
    try:
        raise_everywhere(error, CheckpointError, what)
    except BaseException:
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    written: List = [None] * dist.get_world_size()
    dist.all_gather_object(written, (writer.files, writer.dtypes))
    on_rank0(lambda: publish(staging, path, cfg, [f for files, _ in written for f in files],
                             {d for _, dtypes in written for d in dtypes}, overwrite=overwrite),
             CheckpointError, what)
