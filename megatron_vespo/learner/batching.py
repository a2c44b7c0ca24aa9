"""Samples -> this rank's packed micro-batches for one optimizer step.

Two layouts of the same `PackedBatch`: THD (sequences packed end to end, for TransformerEngine's
packed attention, CP-split zigzag) and BSHD (every sequence right-padded to one length L, for the
local spec, whose attention has no packed-sequence support: with right padding and a causal mask no
real token ever attends to padding, so no attention mask is needed). Both flatten to the same
per-position tensors, so the loss path is identical.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..algo.advantages import AdvantageConfig, group_relative_advantages
from ..parallel.packing import PackedBatch, cp_shard, pack_sequences, split_evenly
from .samples import Sample


def sample_advantages(samples: Sequence[Sample], cfg: AdvantageConfig) -> torch.Tensor:
    """[B] group-relative advantages of a rollout batch (groups by `group_id`)."""
    ids = {g: k for k, g in enumerate(dict.fromkeys(s.group_id for s in samples))}
    return group_relative_advantages(
        torch.tensor([s.reward for s in samples], dtype=torch.float64),
        torch.tensor([ids[s.group_id] for s in samples]),
        scale_by_std=cfg.scale_by_std, eps=cfg.eps,
    )


def pack_micro_batch(samples: Sequence[Sample], advantages: torch.Tensor, *, pad_multiple: int,
                     uniform_length: bool) -> PackedBatch:
    """Pack samples; old log-probs start as the engine's (replaced if the trainer recomputes them)."""
    if uniform_length:
        longest = max(s.num_tokens for s in samples)
        pad_multiple = -(-longest // pad_multiple) * pad_multiple
    engine = [torch.tensor(s.engine_logprobs, dtype=torch.float32) for s in samples]
    return pack_sequences(
        [torch.tensor(s.prompt_ids + s.response_ids) for s in samples],
        [len(s.prompt_ids) for s in samples],
        advantages,
        engine,
        engine,
        pad_multiple=pad_multiple,
    )


def rank_micro_batches(
    samples: Sequence[Sample],
    advantages: torch.Tensor,
    *,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    pad_multiple: int,
    uniform_length: bool,
    cp_size: int = 1,
    cp_rank: int = 0,
) -> list[PackedBatch]:
    """This DP rank's contiguous share of a mini-batch, cut into micro-batches of at most
    `micro_batch_size` sequences, packed, and CP-sharded."""
    if len(samples) < dp_size:
        raise ValueError(f"a mini-batch of {len(samples)} samples cannot feed {dp_size} DP ranks")
    mine = split_evenly(len(samples), dp_size)[dp_rank]
    count = -(-len(mine) // micro_batch_size)
    out = []
    for part in split_evenly(len(mine), count):
        index = [mine[k] for k in part]
        batch = pack_micro_batch([samples[i] for i in index], advantages[index],
                                 pad_multiple=pad_multiple, uniform_length=uniform_length)
        out.append(cp_shard(batch, cp_size, cp_rank) if cp_size > 1 else batch)
    return out
