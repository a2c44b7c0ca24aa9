"""Shims for upstream packages (imported as `megatron_vespo.patches`).

`apply_cpu_patches()` makes megatron-core 0.16.1 train a local-spec (non-TransformerEngine)
`GPTModel`, dense or MoE, on CPU over gloo. Call it once per process, first thing: before
`torch.distributed.init_process_group`, before `parallel_state.initialize_model_parallel`,
`model_parallel_cuda_manual_seed` and any model/optimizer construction. It is a no-op when CUDA is
available, and idempotent. The individual patches, each with a probe for its upstream gap, are
`megatron_core_cpu.PATCHES`; README.md in this directory documents them.
"""

from __future__ import annotations

import torch

from .megatron_core_cpu import PATCHES, UPSTREAM_VERSION, Patch

__all__ = ["PATCHES", "Patch", "UPSTREAM_VERSION", "apply_cpu_patches"]


def apply_cpu_patches() -> None:
    """Apply every megatron-core CPU patch if this process has no CUDA device; else do nothing."""
    if torch.cuda.is_available():
        return
    from .megatron_core_cpu import apply_all

    apply_all()
