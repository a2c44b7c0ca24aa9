"""Samples -> this rank's packed micro-batches for one optimizer step.

Two layouts of the same `PackedBatch`: THD (sequences packed end to end, for TransformerEngine's
packed attention, CP-split zigzag) and BSHD (every sequence right-padded to one length L, for the
local spec, whose attention has no packed-sequence support: with right padding and a causal mask no
real token ever attends to padding, so no attention mask is needed). Both flatten to the same
per-position tensors, so the loss path is identical.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

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
    engine = [torch.as_tensor(s.engine_logprobs).float() for s in samples]
    return pack_sequences(
        [torch.cat([torch.as_tensor(s.prompt_ids), torch.as_tensor(s.response_ids)]).long()
         for s in samples],
        [len(s.prompt_ids) for s in samples],
        advantages,
        engine,
        engine,
        pad_multiple=pad_multiple,
    )


class GroupAssigner:
    """Which DP rank trains each prompt group of a rollout batch, decided as the groups stream in
    (`rollout_batch.stream_groups`), so that no rank ever holds the batch to sort it. A group (one
    prompt's responses, or its part in one step) goes whole to the rank with the fewest response
    tokens in that step so far: group statistics never cross ranks, and each rank's token load
    ends within one group of the others'. A rank with nothing yet is always the least loaded, so
    every rank gets a group while there are at least as many groups as ranks."""

    def __init__(self, num_steps: int, dp_size: int) -> None:
        self.dp_size = dp_size
        self.tokens = [[0] * dp_size for _ in range(num_steps)]
        self.groups = [[0] * dp_size for _ in range(num_steps)]

    def assign(self, step: int, response_tokens: int) -> int:
        load = self.tokens[step]
        rank = min(range(self.dp_size), key=lambda d: (load[d], self.groups[step][d], d))
        load[rank] += response_tokens
        self.groups[step][rank] += 1
        return rank

    def check(self) -> None:
        """Every step fed every rank (a rank without sequences cannot take part in the step)."""
        for step, counts in enumerate(self.groups):
            if min(counts) == 0:
                raise ValueError(f"step {step} of the rollout batch has {sum(counts)} prompt "
                                 f"groups, which cannot feed {self.dp_size} DP ranks (a group's "
                                 f"responses stay on one rank): give each optimizer step at least "
                                 f"{self.dp_size} prompts")


def micro_batch_cost(lengths: Sequence[int], *, pad_multiple: int, uniform_length: bool) -> int:
    """Positions a micro-batch of sequences of `lengths` tokens occupies once packed: the sum of
    the padded lengths (THD), or rows x the longest padded length (BSHD, `uniform_length`)."""
    padded = [-(-n // pad_multiple) * pad_multiple for n in lengths]
    return len(padded) * max(padded) if uniform_length else sum(padded)


def micro_batch_plan(
    lengths: Sequence[int],
    *,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    max_tokens: Optional[int] = None,
    pad_multiple: int = 1,
    uniform_length: bool = False,
    dp_group=None,
    count_multiple: int = 1,
) -> list[list[int]]:
    """Indices into a mini-batch of sequences of `lengths` tokens: this DP rank's contiguous
    share, cut into micro-batches.

    Without `max_tokens`: at most `micro_batch_size` sequences each. With it (the token budget,
    `train.max_tokens_per_micro_batch`): consecutive sequences while the packed positions
    (`micro_batch_cost`) stay within the budget; a sequence that alone exceeds it is an error
    naming both numbers. Either way the number of micro-batches is then agreed over `dp_group`
    (the largest, rounded up to `count_multiple`: the pipeline size under VPP), so that every rank
    runs the same number of forwards (the EP all-to-all of each forward spans DP ranks); a rank
    that needs fewer splits its largest micro-batches. Any cut gives the same loss and gradients (global
    denominators), so the budget only bounds activation memory.
    """
    if len(lengths) < dp_size:
        raise ValueError(f"a mini-batch of {len(lengths)} samples cannot feed {dp_size} DP ranks")
    mine = list(split_evenly(len(lengths), dp_size)[dp_rank])

    def cost(part: list[int]) -> int:
        if max_tokens is None:
            return len(part)
        return micro_batch_cost([lengths[i] for i in part], pad_multiple=pad_multiple,
                                uniform_length=uniform_length)

    if max_tokens is None:
        count = -(-len(mine) // micro_batch_size)
        parts = [[mine[k] for k in part] for part in split_evenly(len(mine), count)]
    else:
        parts = []
        for i in mine:
            if cost([i]) > max_tokens:
                raise ValueError(f"train.max_tokens_per_micro_batch={max_tokens} is smaller than "
                                 f"one sequence of the batch: {lengths[i]} tokens ({cost([i])} "
                                 f"positions packed); raise the budget to at least {cost([i])}")
            if parts and cost(parts[-1] + [i]) <= max_tokens:
                parts[-1].append(i)
            else:
                parts.append([i])
    count = len(parts)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        agreed = torch.tensor([count])
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=dp_group)
        count = int(agreed)
    count = -(-count // count_multiple) * count_multiple
    while len(parts) < count:
        splittable = [p for p in parts if len(p) > 1]
        if not splittable:
            raise ValueError(f"this rank's {len(mine)} sequences cannot fill the {count} "
                             f"micro-batches the other ranks (or the pipeline) need")
        widest = max(splittable, key=cost)
        k = parts.index(widest)
        parts[k:k + 1] = [widest[:len(widest) // 2], widest[len(widest) // 2:]]
    return parts


def pack_plan(samples: Sequence[Sample], advantages: torch.Tensor, plan: Sequence[Sequence[int]], *,
              pad_multiple: int, uniform_length: bool, cp_size: int = 1,
              cp_rank: int = 0) -> list[PackedBatch]:
    """The micro-batches of `plan` (indices into `samples` and `advantages`), packed and CP-sharded."""
    out = []
    for index in plan:
        batch = pack_micro_batch([samples[i] for i in index], advantages[list(index)],
                                 pad_multiple=pad_multiple, uniform_length=uniform_length)
        out.append(cp_shard(batch, cp_size, cp_rank) if cp_size > 1 else batch)
    return out


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
    max_tokens: Optional[int] = None,
    dp_group=None,
    count_multiple: int = 1,
) -> list[PackedBatch]:
    """This DP rank's share of a mini-batch as packed, CP-sharded micro-batches
    (`micro_batch_plan` then `pack_plan`)."""
    plan = micro_batch_plan([s.num_tokens for s in samples], dp_rank=dp_rank, dp_size=dp_size,
                            micro_batch_size=micro_batch_size, max_tokens=max_tokens,
                            pad_multiple=pad_multiple, uniform_length=uniform_length,
                            dp_group=dp_group, count_multiple=count_multiple)
    return pack_plan(samples, advantages, plan, pad_multiple=pad_multiple,
                     uniform_length=uniform_length, cp_size=cp_size, cp_rank=cp_rank)
