"""Test bodies run on real ranks through the product's own launcher (spawned gloo processes with the
CPU shim applied). `fn` must be a module-level function taking (rank, world_size, *args)."""

from megatron_vespo import launch


def run_ranks(fn, world_size: int, *args, timeout: float = 1200.0) -> list:
    """`launch.run_ranks` with a timeout suited to tests: a hung collective fails in 20 minutes."""
    return launch.run_ranks(fn, world_size, *args, timeout=timeout)
