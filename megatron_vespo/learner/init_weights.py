"""Seeded initial weights that are the same model whatever the parallel layout.

megatron initialises each rank's shard from that rank's RNG state, so one seed gives different
models at TP1, EP2 or PP2 (measured: equal at TP1, TP2+SP and DP2, different at EP2 and PP2).
Here every canonical tensor (`state_adapter.megatron_tensor_shapes` names) is drawn in its full
shape from its own generator, seeded by (seed, name), and each rank copies only its slice, as a
checkpoint would be loaded. Memory: one full tensor at a time; time: each rank draws the tensors
it holds a slice of.

The distribution is megatron's default: normal(0, std) for every matrix, std / sqrt(2 L) for the
projections that write into the residual stream (`linear_proj`, `linear_fc2`), norm weights 1,
biases 0.
"""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import torch

from ..parallel.layout import ParallelLayout
from ..parallel.sharded_state import local_shards, take_slice
from .model import ModelConfig
from .state_adapter import canonical_state

INIT_STD = 0.02  # megatron's TransformerConfig.init_method_std


def initial_tensor(name: str, shape: tuple, cfg: ModelConfig, seed: int,
                   std: float = INIT_STD) -> torch.Tensor:
    """The canonical tensor `name` [shape] of the seeded initial model (float32)."""
    if "layernorm" in name or name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2.0 * cfg.num_hidden_layers)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator).mul_(std)


def init_weights(model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig, layout: ParallelLayout,
                 seed: int) -> None:
    """Overwrite this rank's parameters with its slices of the seeded initial model. No
    communication. Load before building the optimizer, or reload its main copies after."""
    state = canonical_state(cfg)
    with torch.no_grad():
        for shard in local_shards(model_chunks, state, layout):
            full = initial_tensor(shard.canonical, state.shapes[shard.canonical], cfg, seed)
            shard.param.copy_(take_slice(full, shard))
