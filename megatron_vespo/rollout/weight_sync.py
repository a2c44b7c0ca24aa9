"""Push the learner's weights to every SGLang server of a fleet.

Two transports behind one call, `sync(model_chunks, cfg, layout, urls, version)`, made on every
learner rank. Neither ever has the whole model on one host: the model streams bucket by bucket from
one sender per pipeline stage (`learner.hf_convert.hf_buckets`), each rank holding its own shards
plus at most two buckets.

* `DiskWeightSync`: the senders export a sharded HF checkpoint (`export_model_to_hf`), each server
  reloads it with `/update_weights_from_disk`. Simple and stateless; costs a write and a read.
* `DistributedWeightSync`: each sender broadcasts its buckets into a process group it shares with
  the servers (`/init_weights_update_group`, one group per sender, made once and reused; `close()`
  tears them down). Stages stream in parallel; a sender gathers its next bucket while the previous
  one is on the wire.

Both do the same dance around the update, from global rank 0: `/pause_generation` (retract:
in-flight requests go back to the queue and are recomputed with the new weights), `/flush_cache`,
update, check that every server reports the new weight version (`/model_info`) and, with
`check=True`, holds the learner's bytes (`weight_check`), `/continue_generation`. A failed update
raises on every rank and leaves the servers paused: serving a partial update would produce samples
from weights nobody can name.
"""

from __future__ import annotations

import datetime
import logging
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import requests
import torch
import torch.distributed as dist

from ..learner.hf_convert import EXPORT_SHARD_BYTES, export_model_to_hf, hf_buckets
from ..learner.hf_files import FlatBucket
from ..learner.model import ModelConfig
from ..learner.state_adapter import canonical_state
from ..parallel.agree import on_rank0, raise_everywhere
from ..parallel.layout import ParallelLayout
from ..parallel.sharded_state import plan_stream
from ..patches.torch_external_group import external_process_group
from ..ports import free_ports
from .auth import auth_headers
from .server import ServerError, get_json, post_json, weight_version
from .weight_check import StreamChecksums, check_servers, refuse_unsupported

logger = logging.getLogger(__name__)

GROUP_NAME = "megatron_vespo_weight_update"
# How often a sender looks at its broadcast and the servers' answers: half of it is lost per bucket
# on average (at the paper's size, ~120 buckets of 512 MiB a sync).
_POLL_S = 0.001


class WeightSync(Protocol):
    """How new weights reach the servers. `sync` is collective: called on every learner rank.
    `fresh`: those of `urls` (re)started since the last sync; a restarted server keeps its URL but
    none of the state a sync left on it. `close` is called on every rank but is not collective: it
    also runs when the run fails on one rank while the others wait in some other collective."""

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


def pause_servers(urls: Sequence[str], pause_mode: str = "retract") -> None:
    """Stop generation on every server and drop its KV cache, before an update."""
    _each(urls, lambda url: post_json(url, "/pause_generation", {"mode": pause_mode}))
    _each(urls, flush_cache)


def resume_servers(urls: Sequence[str], version: int,
                   expected: Optional[Tuple[Dict[str, str], Dict[str, List[str]]]] = None) -> None:
    """Check the version (and, with `expected` checksums, the bytes) every server now serves, then
    let them generate again. On failure the servers stay paused (see the module docstring)."""
    check_versions(urls, version)
    if expected is not None:
        check_servers(urls, *expected)
    _each(urls, lambda url: post_json(url, "/continue_generation", {}))


def _raise_everywhere(error: Optional[BaseException]) -> None:
    raise_everywhere(error, ServerError, "weight sync")


def _on_rank0(call: Callable[[], object]) -> object:
    return on_rank0(call, ServerError, "weight sync")


class _Check:
    """The update-equality check across a sync: each sender's running checksums, then rank 0
    compares all of them with every server's."""

    def __init__(self, cfg: ModelConfig, enabled: bool) -> None:
        self.sums = StreamChecksums(cfg) if enabled else None

    def add(self, bucket: FlatBucket) -> None:
        if self.sums is not None:
            self.sums.add(bucket)

    def gathered(self) -> Optional[Tuple[Dict[str, str], Dict[str, List[str]]]]:
        """Collective: every sender's (digests, parts) merged, on rank 0."""
        if self.sums is None:
            return None
        everyone: List = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (self.sums.digests(), self.sums.parts))
        return ({k: v for digests, _ in everyone for k, v in digests.items()},
                {k: v for _, parts in everyone for k, v in parts.items()})


# ------------------------------------------------------------------------------------------------
# Disk
# ------------------------------------------------------------------------------------------------


@dataclass
class DiskWeightSync:
    """Export to `export_dir` (replaced atomically each sync), then `/update_weights_from_disk`.
    The directory must be readable by every server under the same path (shared file system).
    shard_bytes: bytes per shard file (and per bucket a sender holds). check: compare every
    server's checksums with the learner's after each update."""

    export_dir: Path
    pause_mode: str = "retract"
    check: bool = False
    shard_bytes: int = EXPORT_SHARD_BYTES

    def sync(self, model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig, layout: ParallelLayout,
             urls: Sequence[str], version: int, fresh: Sequence[str] = ()) -> None:
        path = Path(self.export_dir)
        if self.check:
            _on_rank0(lambda: refuse_unsupported(urls))
        check = _Check(cfg, self.check)
        export_model_to_hf(path, model_chunks, cfg, layout, overwrite=True,
                           max_shard_bytes=self.shard_bytes, on_bucket=check.add)
        expected = check.gathered()
        payload = {"model_path": str(path.resolve()), "weight_version": str(version)}

        def update() -> None:
            pause_servers(urls, self.pause_mode)
            _each(urls, lambda url: post_json(url, "/update_weights_from_disk", payload))
            resume_servers(urls, version, expected)

        _on_rank0(update)

    def close(self) -> None:
        """Nothing to tear down: the servers keep no state of ours."""


# ------------------------------------------------------------------------------------------------
# Distributed (bucketed broadcast, one sender per pipeline stage)
# ------------------------------------------------------------------------------------------------


def _server_tp(url: str) -> int:
    """Ranks a server brings to an update group: one per tensor-parallel GPU."""
    return int(get_json(url, "/server_info")["tp_size"])


@dataclass
class _Group:
    name: str
    group: dist.ProcessGroup


@dataclass
class _InFlight:
    """A bucket on the wire: our broadcast and every server's receive call."""

    work: dist.Work
    receives: List[Future]
    flat: torch.Tensor
    tensors: int


class DistributedWeightSync:
    """Bucketed broadcasts from each pipeline stage's sender into its own weight-update group with
    the servers.

    bucket_bytes: bytes per broadcast (and per server-side receive buffer). timeout_s: limit on every
    collective of the groups and on each HTTP call. backend: "gloo" on CPU, "nccl" with GPUs (None
    picks by device). master_address: the address servers reach the senders on global rank 0's
    host at (None: the host's name resolved; senders on other hosts always use their own name).
    check: compare every server's checksums with the learner's after each update. The groups are
    made on the first sync and reused while the fleet's URLs stay the same; `close()` (every rank,
    not collective) destroys them on both sides.
    """

    def __init__(self, bucket_bytes: int = 512 << 20, timeout_s: float = 300.0,
                 backend: Optional[str] = None, master_address: Optional[str] = None,
                 pause_mode: str = "retract", check: bool = False) -> None:
        if bucket_bytes < 1 or timeout_s <= 0:
            raise ValueError(f"bucket_bytes ({bucket_bytes}) and timeout_s ({timeout_s}) must be > 0")
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.master_address = master_address
        self.pause_mode = pause_mode
        self.check = check
        self._group: Optional[_Group] = None  # this rank's group, when it is a sender
        self._urls: Tuple[str, ...] = ()  # the servers the groups were made with (every rank)
        self._stale = True  # the groups must be made (again) before the next broadcast

    # -- group life cycle (each sender) -------------------------------------------------------------

    def _address(self, rank0_host: str) -> str:
        host = socket.gethostname()
        if self.master_address and host == rank0_host:
            return self.master_address
        return socket.gethostbyname(host)

    def _open(self, urls: Tuple[str, ...], sizes: Sequence[int], address: str) -> _Group:
        """Ranks: this sender, then each server's TP ranks in URL order. The servers join while we
        host the rendezvous, so their HTTP calls run alongside our own join."""
        name = f"{GROUP_NAME}_{dist.get_rank()}"
        offsets = [1 + sum(sizes[:i]) for i in range(len(urls))]
        world = 1 + sum(sizes)
        port = free_ports(1, address)[0]
        timeout = datetime.timedelta(seconds=self.timeout_s)
        with ThreadPoolExecutor(max_workers=len(urls)) as pool:
            joins = [pool.submit(post_json, url, "/init_weights_update_group", {
                "master_address": address, "master_port": port, "rank_offset": offset,
                "world_size": world, "group_name": name, "backend": self.backend},
                self.timeout_s) for url, offset in zip(urls, offsets)]
            try:
                group = external_process_group(address, port, world, 0, self.backend, name, timeout)
            except Exception as exc:
                errors = [str(f.exception()) for f in joins if f.exception() is not None]
                raise ServerError(f"weight-update group {name} of {world} ranks did not form: {exc}; "
                                  f"server answers: {errors or 'none failed'}") from exc
            try:
                for f in joins:
                    f.result()
            except Exception:
                dist.destroy_process_group(group)  # a server failed to join: no half-made group
                raise
        return _Group(name, group)

    def _close_group(self, members: Sequence[str]) -> None:
        """Destroy this sender's group here and on `members` (its servers still alive and not
        restarted since: the others no longer have it)."""
        if self._group is None:
            return
        old, self._group = self._group, None
        dist.destroy_process_group(old.group)
        _each(members, lambda url: post_json(url, "/destroy_weights_update_group",
                                             {"group_name": old.name}, self.timeout_s))

    def close(self) -> None:
        """Destroy this sender's update group here and on its servers. Not collective (see
        `WeightSync`): a collective here made a rank whose run failed wait forever for peers that
        were elsewhere, instead of exiting with its error. A server that cannot be told is only
        logged: it is being stopped, or it is attached and keeps a group nobody uses again."""
        try:
            self._close_group(self._urls)
        except Exception as exc:  # noqa: BLE001 - the run is ending; its own error matters more
            logger.warning("weight sync: could not destroy the update group on the servers: %s", exc)
        finally:
            self._stale = True

    # -- one sync ---------------------------------------------------------------------------------

    def _start(self, pool: ThreadPoolExecutor, urls: Sequence[str], flat: torch.Tensor,
               fields: dict) -> _InFlight:
        """Every server posts its receive (which blocks in the broadcast); we broadcast."""
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else "cpu"
        flat = flat.to(device)
        receives = [pool.submit(post_json, url, "/update_weights_from_distributed", fields,
                                self.timeout_s) for url in urls]
        work = dist.broadcast(flat, group=self._group.group, group_src=0, async_op=True)
        return _InFlight(work, receives, flat, len(fields["names"]))

    def _wait(self, bucket: _InFlight) -> None:
        """A server that refuses the call never enters the broadcast, so we watch the answers while
        it runs and fail at once instead of after the group timeout; the group is then dropped
        (its pending broadcast can never finish)."""
        while not bucket.work.is_completed():
            refused = [f.exception() for f in bucket.receives if f.done() and f.exception()]
            if refused:
                self._group = None
                raise ServerError(f"a server refused a bucket of {bucket.tensors} tensors during "
                                  f"the broadcast: {refused[0]}")
            time.sleep(_POLL_S)
        bucket.work.wait()  # raises if the group timed out
        for f in bucket.receives:
            f.result()

    def _send(self, buckets: Iterator[FlatBucket], urls: Sequence[str], version: int,
              check: _Check) -> None:
        """Broadcast this sender's buckets, gathering the next while the previous is on the wire
        (two buckets held: the one in flight and the one being filled). The server cuts each
        buffer at the tensors' offsets ("flattened_bucket"; one dtype per bucket keeps them aligned)."""
        extra = {"group_name": self._group.name, "weight_version": str(version)}
        in_flight: Optional[_InFlight] = None
        with ThreadPoolExecutor(max_workers=len(urls)) as pool:
            for bucket in buckets:
                check.add(bucket)
                if in_flight is not None:
                    self._wait(in_flight)
                in_flight = self._start(pool, urls, bucket.flat, {**bucket.fields(), **extra})
                del bucket
            if in_flight is not None:
                self._wait(in_flight)

    def sync(self, model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig, layout: ParallelLayout,
             urls: Sequence[str], version: int, fresh: Sequence[str] = ()) -> None:
        plan = plan_stream(model_chunks, canonical_state(cfg), layout)  # collective
        is_sender = dist.get_rank() in plan.senders

        def decide():
            members = tuple(urls)
            if not members:
                raise ValueError("no server URLs to sync")
            if self.check:
                refuse_unsupported(members)
            if not (self._stale or self._urls != members or fresh):
                return members, None
            keep = [u for u in self._urls if u in members and u not in fresh]
            return members, (keep, _each(members, _server_tp), socket.gethostname())

        members, reopen = _on_rank0(decide)
        if reopen is not None:  # the fleet changed (or a sync failed): new groups with the members
            keep, sizes, rank0_host = reopen
            self._urls = members
            # One sender at a time: a server joins one group per call and blocks in it until the
            # group forms, so two senders reaching the servers in different orders would deadlock.
            for sender in sorted(plan.senders):
                error = None
                if dist.get_rank() == sender:
                    try:
                        self._close_group(keep)
                        self._group = self._open(members, sizes, self._address(rank0_host))
                    except Exception as exc:  # noqa: BLE001 - raised on every rank below
                        error = exc
                _raise_everywhere(error)
            self._stale = False
        try:
            _on_rank0(lambda: (pause_servers(members, self.pause_mode), _each(
                members, lambda url: post_json(url, "/begin_weight_update", {}, self.timeout_s))))
            check, error = _Check(cfg, self.check), None
            buckets = hf_buckets(plan, cfg, self.bucket_bytes)
            try:
                if is_sender:
                    self._send(buckets, members, version, check)
            except Exception as exc:  # noqa: BLE001 - raised on every rank below
                error = exc
            for _ in buckets:  # the rest of the stream (all of it on non-senders): peers send to us
                pass
            _raise_everywhere(error)
            expected = check.gathered()
            _on_rank0(lambda: (_each(members, lambda url: post_json(
                url, "/end_weight_update", {}, self.timeout_s)), resume_servers(members, version, expected)))
        except Exception:
            self._stale = True
            raise


__all__ = ["DiskWeightSync", "DistributedWeightSync", "WeightSync", "check_versions",
           "flush_cache", "name_version", "pause_servers", "resume_servers"]
