"""A process group with ranks outside the learner's world: the SGLang weight-update groups.

* **Upstream (torch 2.13):** `torch.distributed` makes groups only as subgroups of the default
  world (`new_group(ranks)`); a group of one learner rank plus the servers' ranks has no public
  constructor. SGLang's servers build their side with a copy of torch's private
  `_new_process_group_helper`, so ours must be built the same way.
* **Workaround:** host the rendezvous (`TCPStore`), wrap it in `PrefixStore(group name)`, call the
  private `distributed_c10d._new_process_group_helper` (which adds the same per-group and
  per-device prefixes on both sides), and register the group's rank map in `_world.pg_group_ranks`
  so that `broadcast(group=..., group_src=0)` and `destroy_process_group` find it.
* **Probe:** `probe()` is True while the private helper and rank map exist with the arguments used
  here; `tests/test_patches.py` fails when an upgrade changes them (rewrite this module then).
* **Delete when:** torch offers a public constructor for a group outside the default world (then
  SGLang's side will use it too).
"""

from __future__ import annotations

import datetime
import inspect

import torch.distributed as dist

_HELPER_ARGS = ("group_size", "group_rank", "global_ranks_in_group", "backend", "store",
                "group_name", "timeout")


def probe() -> bool:
    """True while the private API this module calls is there, with the arguments it passes."""
    from torch.distributed import distributed_c10d as c10d

    helper = getattr(c10d, "_new_process_group_helper", None)
    if helper is None or not hasattr(getattr(c10d, "_world", None), "pg_group_ranks"):
        return False
    return set(_HELPER_ARGS) <= set(inspect.signature(helper).parameters)


def external_process_group(host: str, port: int, world_size: int, rank: int, backend: str, name: str,
                           timeout: datetime.timedelta) -> dist.ProcessGroup:
    """This process's member (`rank`) of a `world_size`-rank group named `name` whose ranks meet at
    the store on host:port, hosted by rank 0 (a learner sender; the servers join from
    `/init_weights_update_group`, a stand-in receiver from `benchmarks/weight_sync.py`)."""
    from torch.distributed import distributed_c10d as c10d

    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    group, _ = c10d._new_process_group_helper(
        world_size, rank, [], dist.Backend(backend), dist.PrefixStore(name, store),
        group_name=name, timeout=timeout)
    # broadcast/destroy look the group's rank map up here; group ranks are their own global ranks.
    c10d._world.pg_group_ranks[group] = {r: r for r in range(world_size)}
    return group
