"""Push the learner's weights to every SGLang server of a fleet.

Two transports behind one call, `sync(model_chunks, cfg, layout, urls, version)`, made on every
learner rank (the gathers are collective; only global rank 0 talks to the servers):

* `DiskWeightSync`: the learner exports a HF checkpoint (`export_model_to_hf`), each server reloads
  it with `/update_weights_from_disk`. Simple and stateless; costs a write and a read of the model.
* `DistributedWeightSync`: rank 0 gathers the full HF-named state and broadcasts it, bucket by
  bucket, into a process group it shares with the servers (`/init_weights_update_group`, made once
  and reused; `close()` tears it down).

Both do the same dance around the update: `/pause_generation` (retract: in-flight requests go back to
the queue and are recomputed with the new weights), `/flush_cache`, update, check that every server
reports the new weight version (`/model_info`), `/continue_generation`. A failed update raises on
every rank and leaves the servers paused: serving a partial update would produce samples from
weights nobody can name.
"""

from __future__ import annotations

import datetime
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import requests
import torch
import torch.distributed as dist

from ..learner.hf_convert import export_model_to_hf, gather_full_state, megatron_to_hf
from ..learner.model import ModelConfig
from ..parallel.layout import ParallelLayout
from ..ports import free_ports
from .auth import auth_headers
from .server import ServerError, get_json, post_json, weight_version

GROUP_NAME = "megatron_vespo_weight_update"


class WeightSync(Protocol):
    """How new weights reach the servers. `sync` and `close` are called on every learner rank.
    `fresh`: those of `urls` (re)started since the last sync; a restarted server keeps its URL but
    none of the state a sync left on it."""

    def sync(self, model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig, layout: ParallelLayout,
             urls: Sequence[str], version: int, fresh: Sequence[str] = ()) -> None: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------
# The steps around every update (rank 0)
# ------------------------------------------------------------------------------------------------


def _each(urls: Sequence[str], call: Callable[[str], object]) -> List[object]:
    """`call(url)` for every server at once; the first failure is raised after all have answered."""
    with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
        futures = [pool.submit(call, url) for url in urls]
    return [f.result() for f in futures]


def flush_cache(url: str, timeout: float = 60.0) -> None:
    """`/flush_cache` answers plain text, not JSON; HTTP 400 means requests were still running."""
    try:
        r = requests.post(url + "/flush_cache", timeout=timeout, headers=auth_headers())
    except requests.RequestException as e:
        raise ServerError(f"POST {url}/flush_cache: {e}") from None
    if r.status_code != 200:
        raise ServerError(f"POST {url}/flush_cache: HTTP {r.status_code}: {r.text[:300]}")


def check_versions(urls: Sequence[str], version: int) -> None:
    """Raise naming every server whose `/model_info` weight_version is not `version`."""
    reported = dict(zip(urls, _each(urls, weight_version)))
    wrong = {url: v for url, v in reported.items() if v != str(version)}
    if wrong:
        raise ServerError(f"after the weight update to version {version} these servers report "
                          f"another weight_version: {wrong}")


def name_version(urls: Sequence[str], version: int) -> None:
    """Servers started from the learner's weights serve them as `version` (SGLang names weights
    loaded at start-up "default"; a resumed run's staleness would read them as version 0)."""
    if urls:
        _each(urls, lambda url: post_json(url, "/update_weight_version",
                                          {"new_version": str(version), "abort_all_requests": False}))
        check_versions(urls, version)


def paused_update(urls: Sequence[str], version: int, update: Callable[[], None],
                  pause_mode: str = "retract") -> None:
    """Pause every server, flush its cache, run `update`, check the version, resume.
    On failure the servers stay paused (see the module docstring)."""
    _each(urls, lambda url: post_json(url, "/pause_generation", {"mode": pause_mode}))
    _each(urls, flush_cache)
    update()
    check_versions(urls, version)
    _each(urls, lambda url: post_json(url, "/continue_generation", {}))


def _raise_everywhere(error: Optional[BaseException]) -> None:
    """Collective: rank 0's error (or None) is raised on every rank, so no rank carries on alone."""
    report = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(report, src=0)
    if error is not None:
        raise error
    if report[0] is not None:
        raise ServerError(f"weight sync failed on rank 0: {report[0]}")


# ------------------------------------------------------------------------------------------------
# Disk
# ------------------------------------------------------------------------------------------------


@dataclass
class DiskWeightSync:
    """Export to `export_dir` (replaced atomically each sync), then `/update_weights_from_disk`.
    The directory must be readable by every server under the same path (shared file system)."""

    export_dir: Path
    pause_mode: str = "retract"

    def sync(self, model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig, layout: ParallelLayout,
             urls: Sequence[str], version: int, fresh: Sequence[str] = ()) -> None:
        path = Path(self.export_dir)
        export_model_to_hf(path, model_chunks, cfg, layout, overwrite=True)  # collective
        error = None
        if dist.get_rank() == 0:
            payload = {"model_path": str(path.resolve()), "weight_version": str(version)}
            try:
                paused_update(urls, version, lambda: _each(
                    urls, lambda url: post_json(url, "/update_weights_from_disk", payload)),
                    self.pause_mode)
            except Exception as exc:  # noqa: BLE001 - raised on every rank below
                error = exc
        _raise_everywhere(error)

    def close(self) -> None:
        """Nothing to tear down: the servers keep no state of ours."""


# ------------------------------------------------------------------------------------------------
# Distributed (bucketed broadcast)
# ------------------------------------------------------------------------------------------------


def buckets(state: Dict[str, torch.Tensor], bucket_bytes: int) -> List[List[Tuple[str, torch.Tensor]]]:
    """Split a named state into broadcast buckets of at most `bucket_bytes` (a larger tensor travels
    alone), one dtype per bucket: the server cuts its flat byte buffer at each tensor's offset and
    needs every offset aligned to the tensor's element size. Order within a dtype is kept."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    by_dtype: Dict[torch.dtype, List[List[Tuple[str, torch.Tensor]]]] = {}
    size: Dict[torch.dtype, int] = {}
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        groups = by_dtype.setdefault(tensor.dtype, [[]])
        if groups[-1] and size[tensor.dtype] + nbytes > bucket_bytes:
            groups.append([])
            size[tensor.dtype] = 0
        groups[-1].append((name, tensor))
        size[tensor.dtype] = size.get(tensor.dtype, 0) + nbytes
    return [bucket for groups in by_dtype.values() for bucket in groups]


def flatten_bucket(bucket: Sequence[Tuple[str, torch.Tensor]]) -> Tuple[torch.Tensor, dict]:
    """One uint8 buffer [sum of bytes] of the bucket's tensors back to back, and the
    `/update_weights_from_distributed` fields describing it (load_format "flattened_bucket")."""
    flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in bucket])
    meta = {"names": [n for n, _ in bucket],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "load_format": "flattened_bucket"}
    return flat, meta


def _server_tp(url: str) -> int:
    """Ranks a server brings to the update group: one per tensor-parallel GPU."""
    return int(get_json(url, "/server_info")["tp_size"])


def _join_group(host: str, port: int, world_size: int, backend: str,
                timeout: datetime.timedelta) -> dist.ProcessGroup:
    """Rank 0 of a process group outside the learner's world, built the way sglang's servers build
    their side: the rendezvous store (we host it) wrapped in PrefixStore(group name), then torch's
    own group constructor, which adds its per-group and per-device prefixes on both sides alike.
    torch has no public API for a group that is not a subgroup of the default world, hence the
    private helper."""
    from torch.distributed import distributed_c10d as c10d

    store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout)
    group, _ = c10d._new_process_group_helper(
        world_size, 0, [], dist.Backend(backend), dist.PrefixStore(GROUP_NAME, store),
        group_name=GROUP_NAME, timeout=timeout)
    # broadcast/destroy look the group's rank map up here; our global rank 0 is its rank 0.
    c10d._world.pg_group_ranks[group] = {r: r for r in range(world_size)}
    return group


@dataclass
class _Group:
    urls: Tuple[str, ...]
    group: dist.ProcessGroup


class DistributedWeightSync:
    """Bucketed broadcast from learner rank 0 into the servers' weight-update group.

    bucket_bytes: bytes per broadcast (and per server-side receive buffer). timeout_s: limit on every
    collective of the group and on each HTTP call. backend: "gloo" on CPU, "nccl" with GPUs (None
    picks by device). master_address: the address servers reach learner rank 0 at (None: this
    host's name resolved). The group is made on the first sync and reused while the fleet's URLs stay
    the same; `close()` (every rank) destroys it on both sides.
    """

    def __init__(self, bucket_bytes: int = 512 << 20, timeout_s: float = 300.0,
                 backend: Optional[str] = None, master_address: Optional[str] = None,
                 pause_mode: str = "retract") -> None:
        if bucket_bytes < 1 or timeout_s <= 0:
            raise ValueError(f"bucket_bytes ({bucket_bytes}) and timeout_s ({timeout_s}) must be > 0")
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.master_address = master_address or socket.gethostbyname(socket.gethostname())
        self.pause_mode = pause_mode
        self._group: Optional[_Group] = None

    # -- group life cycle (rank 0) ----------------------------------------------------------------

    def _open(self, urls: Tuple[str, ...]) -> _Group:
        """Ranks: learner 0, then each server's TP ranks in URL order. The servers join while we
        host the rendezvous, so their HTTP calls run alongside our own join."""
        sizes = _each(urls, _server_tp)
        offsets = [1 + sum(sizes[:i]) for i in range(len(urls))]
        world = 1 + sum(sizes)
        port = free_ports(1, self.master_address)[0]
        timeout = datetime.timedelta(seconds=self.timeout_s)
        with ThreadPoolExecutor(max_workers=len(urls)) as pool:
            joins = [pool.submit(post_json, url, "/init_weights_update_group", {
                "master_address": self.master_address, "master_port": port, "rank_offset": offset,
                "world_size": world, "group_name": GROUP_NAME, "backend": self.backend},
                self.timeout_s) for url, offset in zip(urls, offsets)]
            try:
                group = _join_group(self.master_address, port, world, self.backend, timeout)
            except Exception as exc:
                errors = [str(f.exception()) for f in joins if f.exception() is not None]
                raise ServerError(f"weight-update group of {world} ranks did not form: {exc}; "
                                  f"server answers: {errors or 'none failed'}") from exc
            try:
                for f in joins:
                    f.result()
            except Exception:
                dist.destroy_process_group(group)  # a server failed to join: no half-made group
                raise
        return _Group(urls, group)

    def _close_group(self, members: Sequence[str]) -> None:
        """Destroy the group here and on those of its servers still in `members` (the others are
        dead, or restarted without it)."""
        if self._group is None:
            return
        old, self._group = self._group, None
        dist.destroy_process_group(old.group)
        _each([u for u in old.urls if u in members],
              lambda url: post_json(url, "/destroy_weights_update_group", {"group_name": GROUP_NAME},
                                    self.timeout_s))

    def close(self) -> None:
        """Destroy the update group on rank 0 and on its servers. Collective over the learner."""
        error = None
        if dist.get_rank() == 0:
            try:
                self._close_group(self._group.urls if self._group else ())
            except Exception as exc:  # noqa: BLE001 - raised on every rank below
                error = exc
        _raise_everywhere(error)

    # -- one sync ---------------------------------------------------------------------------------

    def _broadcast(self, urls: Sequence[str], flat: torch.Tensor, fields: dict) -> None:
        """One bucket: every server posts its receive (which blocks in the broadcast), we send.
        A server that refuses the call never enters the broadcast, so we watch the answers while
        it runs and fail at once instead of after the group timeout; the group is then dropped
        (its pending broadcast can never finish)."""
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else "cpu"
        flat = flat.to(device)
        with ThreadPoolExecutor(max_workers=len(urls)) as pool:
            receives: List[Future] = [pool.submit(post_json, url, "/update_weights_from_distributed",
                                                  fields, self.timeout_s) for url in urls]
            work = dist.broadcast(flat, group=self._group.group, group_src=0, async_op=True)
            while not work.is_completed():
                refused = [f.exception() for f in receives if f.done() and f.exception()]
                if refused:
                    self._group = None
                    raise ServerError(f"a server refused a bucket of {len(fields['names'])} tensors "
                                      f"during the broadcast: {refused[0]}")
                time.sleep(0.005)
            work.wait()  # raises if the group timed out
            for f in receives:
                f.result()

    def _update(self, urls: Sequence[str], hf_state: Dict[str, torch.Tensor], version: int) -> None:
        _each(urls, lambda url: post_json(url, "/begin_weight_update", {}, self.timeout_s))
        for bucket in buckets(hf_state, self.bucket_bytes):
            flat, fields = flatten_bucket(bucket)
            # The version is recorded with each bucket; only the last one's matters.
            self._broadcast(urls, flat, {**fields, "group_name": GROUP_NAME,
                                         "weight_version": str(version)})
        _each(urls, lambda url: post_json(url, "/end_weight_update", {}, self.timeout_s))

    def sync(self, model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig, layout: ParallelLayout,
             urls: Sequence[str], version: int, fresh: Sequence[str] = ()) -> None:
        full = gather_full_state(model_chunks, cfg, layout)  # collective; the full state on rank 0
        error = None
        if dist.get_rank() == 0:
            try:
                urls = tuple(urls)
                if not urls:
                    raise ValueError("no server URLs to sync")
                if self._group is not None and (self._group.urls != urls or fresh):
                    # the fleet changed: a new group with the new members
                    self._close_group([u for u in urls if u not in fresh])
                if self._group is None:
                    self._group = self._open(urls)
                hf_state = megatron_to_hf(full, cfg)
                paused_update(urls, version, lambda: self._update(urls, hf_state, version),
                              self.pause_mode)
            except Exception as exc:  # noqa: BLE001 - raised on every rank below
                error = exc
        _raise_everywhere(error)


__all__ = ["DiskWeightSync", "DistributedWeightSync", "WeightSync", "buckets", "check_versions",
           "flatten_bucket", "flush_cache", "paused_update"]
