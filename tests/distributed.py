"""Run a test body on N real ranks: spawned processes joined by a gloo process group.

`run_ranks(fn, world_size, *args)` returns each rank's return value (list indexed by rank) or
raises with every failing rank's traceback. `fn` must be a module-level function (it is pickled
into the spawned children) taking (rank, world_size, *args). The CPU shim for megatron-core is
applied in every child before `fn` runs, as the product does on CPU.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world_size, port, fn, args, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        from megatron_vespo.patches import apply_cpu_patches

        apply_cpu_patches()
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                init_method=f"tcp://127.0.0.1:{port}")
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # report every failure, including assertion errors, to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            try:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            finally:
                dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = _free_port()
        procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, out_dir))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
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
        if errors or hung:
            raise AssertionError(f"hung ranks {hung}\n" + "\n".join(errors))
        missing = [r for r, rep in enumerate(reports) if rep is None]
        if missing:
            raise AssertionError(f"ranks {missing} exited without a report "
                                 f"(exit codes {[p.exitcode for p in procs]})")
        return [rep["result"] for rep in reports]
