"""Run a function on N ranks of one machine: spawned processes joined by a gloo (CPU) or NCCL (GPU)
default process group, the way torchrun would start them.

Under torchrun or srun (RANK/WORLD_SIZE in the environment) nothing is spawned: `run_ranks` runs
`fn` in this process as the given rank. Otherwise it spawns `world_size` processes, each applying
the CPU shim for megatron-core when there is no GPU, and returns every rank's return value.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.multiprocessing as mp


def init_rank(rank: int, world_size: int, init_method: str) -> None:
    """Prepare this process as one rank: CPU shim (no GPU), one thread per rank on CPU, the default
    process group."""
    import torch.distributed as dist

    from megatron_vespo.patches import apply_cpu_patches

    apply_cpu_patches()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        backend = "nccl"
    else:
        torch.set_num_threads(1)
        backend = "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size, init_method=init_method)


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        finally:
            dist.destroy_process_group()


# What a rank gets when its launcher dies. Not SIGTERM: the kernel sends the parent-death signal
# each time a thread of the dying launcher exits (measured: twice for one kill -9), and a second
# SIGTERM means "abort now" to the trainer (`trainer.StopRequest`), which treats repeats of this
# one as the same request.
PARENT_DEATH_SIGNAL = signal.SIGUSR1


# `kill -USR2 PID` on a run that seems stuck: the launcher, every rank (under torchrun too, not
# torchrun itself) and every SGLang server process we start write the Python stacks of all their
# threads to their stderr (a server's: its log file) and run on. faulthandler writes from the signal
# handler itself, so a rank blocked inside a collective answers too.
STACKS_SIGNAL = signal.SIGUSR2


def dump_stacks_on_signal() -> None:
    """Make STACKS_SIGNAL print this process's stacks (see above) instead of ending it. To the
    process's own stderr (file descriptor 2), also when a host such as pytest swapped sys.stderr."""
    if sys.__stderr__ is not None:
        faulthandler.register(STACKS_SIGNAL, file=sys.__stderr__, all_threads=True)


def _die_with(parent: int) -> None:
    """PARENT_DEATH_SIGNAL to this rank when the launcher `parent` dies, however it dies (Linux's
    parent-death signal): the rank stops after its current step with a checkpoint, as on Ctrl-C,
    and stops what it started (the fleet) instead of training on unwatched."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, PARENT_DEATH_SIGNAL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the launcher's own cleanup is all there is
        return
    if os.getppid() != parent:  # it died before the signal was armed
        os.kill(os.getpid(), PARENT_DEATH_SIGNAL)


def _child(rank, world_size, fn, args, out_dir, parent):
    dump_stacks_on_signal()
    _die_with(parent)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        # The ranks meet in a file, not a TCP store: torch's TCPStore listens on every interface
        # without authentication, and all ranks of this launcher share one host.
        init_rank(rank, world_size, f"file://{Path(out_dir) / 'rendezvous'}")
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # every failure, assertion errors and KeyboardInterrupt included
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise SystemExit(1)
    finally:
        _shutdown()


class RankFailure(RuntimeError):
    """One or more ranks failed; the message holds each failing rank's traceback."""


def _wait(procs: list, deadline: Optional[float]) -> None:
    """Until every process has exited, one has failed (the others are then stopped by the caller:
    their collectives would wait for it forever), or `deadline` (time.monotonic) has passed."""
    pending = list(procs)
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not wait([p.sentinel for p in pending], timeout=left):
            return  # the deadline
        for p in [p for p in pending if p.exitcode is not None]:
            pending.remove(p)
            if p.exitcode != 0:
                return


def run_ranks(fn: Callable[..., Any], world_size: int, *args,
              timeout: Optional[float] = None) -> list:
    """`fn(rank, world_size, *args)` on every rank; returns the list of results indexed by rank.

    `fn` must be importable by module path (it is pickled into spawned children). The launcher
    has no time limit of its own (`timeout`, seconds for the whole run, is for tests: a hung
    collective then fails); it returns when every rank has, and fails as soon as one rank fails.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun / srun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        init_rank(rank, world, "env://")
        try:
            return [fn(rank, world, *args)]
        finally:
            _shutdown()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_child, args=(r, world_size, fn, args, out_dir, os.getpid()))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            try:
                _wait(procs, deadline)
            except KeyboardInterrupt:
                # The ranks got the same SIGINT (one process group): they stop at their next
                # iteration boundary with a checkpoint. Wait for that; a second Ctrl-C kills them.
                print("[megatron-vespo] waiting for the ranks to checkpoint and stop (Ctrl-C again "
                      "to kill them)", file=sys.stderr, flush=True)
                _wait(procs, deadline)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        reports = []
        for r in range(world_size):
            path = Path(out_dir) / f"rank{r}.pt"
            reports.append(torch.load(path, weights_only=False) if path.exists() else None)
        errors = [f"--- rank {r} ---\n{rep['error']}" for r, rep in enumerate(reports)
                  if rep is not None and not rep["ok"]]
        missing = [r for r, rep in enumerate(reports) if rep is None]
        if errors or missing:
            codes = [p.exitcode for p in procs]
            raise RankFailure(f"ranks without a report {missing} (exit codes {codes})\n" + "\n".join(errors))
        return [rep["result"] for rep in reports]
