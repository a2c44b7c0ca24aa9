"""THD packing of variable-length sequences and the per-sequence zigzag context-parallel split.

Position t of a packed sequence feeds token t and predicts token t+1, so per-position tensors hold the
*target* of each position: a response token y_k of sequence i is scored at the position before it.
Each sequence is padded to a multiple of `pad_multiple` (2*cp for the zigzag split, times tp under
sequence parallelism) so every CP rank gets two equal chunks of every sequence: chunks r and 2cp-1-r
of 2cp, which balances causal-attention work (the layout TransformerEngine's THD attention expects).
`pad_rows` (BSHD) and `pad_tail` (THD) grow a micro-batch to a given activation shape with positions
that hold no response token (the interleaved pipeline schedule needs one shape per step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch
from torch import Tensor


def required_pad_multiple(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """Per-sequence padding multiple: 2*cp for the zigzag split, and under sequence parallelism
    cp*tp, so that each CP rank's share of every sequence splits evenly across its TP ranks."""
    multiple = 2 * cp if cp > 1 else 1
    return math.lcm(multiple, cp * tp) if sequence_parallel else multiple


@dataclass(frozen=True)
class PackedBatch:
    """A micro-batch of S sequences packed along one token axis of length T (padded).

    Per-position [T]: input_ids, target_ids, loss_mask (the target is a response token), old_logp and
    engine_logp (log-prob of the target under the old policy / the rollout engine; 0 off the mask),
    position_ids (restart at 0 per sequence), seq_index (sequence of the position).
    Per-sequence, global over CP ranks: cu_seqlens [S+1] (real lengths), cu_seqlens_padded [S+1],
    response_lengths [S], advantages [S]. After `cp_shard` the per-position tensors hold one rank's
    tokens while the per-sequence ones are unchanged.
    """

    input_ids: Tensor
    target_ids: Tensor
    loss_mask: Tensor
    old_logp: Tensor
    engine_logp: Optional[Tensor]
    position_ids: Tensor
    seq_index: Tensor
    cu_seqlens: Tensor
    cu_seqlens_padded: Tensor
    response_lengths: Tensor
    advantages: Tensor
    cp_size: int = 1  # > 1 after `cp_shard`: the per-position tensors hold 1/cp of every sequence
    # MoE: the rollout engine's expert ids per position [T, num_moe_layers, top_k] int16, -1 where
    # the engine routed nothing (each sequence's last token, padding); R3 replays them and the
    # routing metrics compare them (`moe.replay.attach_engine_routes`)
    engine_routes: Optional[Tensor] = None
    # MoE R2: the old-policy forward's top-k ids, [chunk][router] int16 [N, k] in this rank's router
    # order, recorded by `Learner.recompute_old_logprobs` and replayed in every training forward
    old_routes: Optional[list] = None

    PER_POSITION = ("input_ids", "target_ids", "loss_mask", "old_logp", "engine_logp",
                    "position_ids", "seq_index")

    @property
    def num_seqs(self) -> int:
        return self.advantages.shape[0]

    @property
    def num_positions(self) -> int:
        return self.input_ids.shape[0]

    @property
    def real_positions(self) -> Tensor:
        """[T] bool: the position holds a token of its sequence (not padding)."""
        real_lengths = torch.diff(self.cu_seqlens).to(self.position_ids.device)
        return self.position_ids < real_lengths[self.seq_index]

    @property
    def local_seq_lengths(self) -> Tensor:
        """[S] int64 positions of each sequence held here (contiguous, in sequence order)."""
        return torch.diff(self.cu_seqlens_padded).long() // self.cp_size

    def to(self, device) -> "PackedBatch":
        """Every tensor on `device` (a no-op for tensors already there)."""
        return replace(self, **{
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in fields(self) if isinstance(getattr(self, f.name), Tensor)
        })

    def map_positions(self, fn) -> "PackedBatch":
        """Apply `fn` to every per-position tensor (engine_logp may be None)."""
        return replace(self, **{
            name: None if getattr(self, name) is None else fn(getattr(self, name))
            for name in self.PER_POSITION
        })


def pack_sequences(
    tokens: Sequence[Tensor],
    prompt_lengths: Sequence[int],
    advantages: Tensor,
    old_logp: Sequence[Tensor],
    engine_logp: Optional[Sequence[Tensor]] = None,
    *,
    pad_multiple: int = 1,
) -> PackedBatch:
    """Pack prompt+response sequences into one THD micro-batch.

    Args:
        tokens: S tensors [L_i] of prompt followed by response ids.
        prompt_lengths: S ints P_i >= 1 (the first response token needs a position to be scored at).
        advantages: [S].
        old_logp, engine_logp: S tensors [L_i - P_i], one log-prob per response token.
        pad_multiple: each sequence's length is padded up to a multiple of this.
    """
    n = len(tokens)
    if not (len(prompt_lengths) == len(old_logp) == n and advantages.shape == (n,)):
        raise ValueError(
            f"pack_sequences got {n} token sequences, {len(prompt_lengths)} prompt lengths, "
            f"{len(old_logp)} old_logp and advantages of shape {tuple(advantages.shape)}"
        )
    if engine_logp is not None and len(engine_logp) != n:
        raise ValueError(f"engine_logp has {len(engine_logp)} sequences, expected {n}")
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    columns: dict[str, list[Tensor]] = {name: [] for name in PackedBatch.PER_POSITION}
    lengths, padded, responses = [], [], []
    for i, (seq, p) in enumerate(zip(tokens, prompt_lengths)):
        length = seq.shape[0]
        response = length - p
        if seq.dim() != 1 or not 1 <= p <= length:
            raise ValueError(f"sequence {i}: prompt length {p} does not fit its {length} tokens")
        for name, lp in (("old_logp", old_logp), ("engine_logp", engine_logp)):
            if lp is not None and lp[i].shape != (response,):
                raise ValueError(f"sequence {i}: {name} has shape {tuple(lp[i].shape)}, "
                                 f"expected ({response},) response log-probs")
        total = -(-length // pad_multiple) * pad_multiple
        pad = total - length
        zeros_long = torch.zeros(pad + 1, dtype=torch.long)
        scored = torch.zeros(total, dtype=torch.bool)
        scored[p - 1:length - 1] = True  # position t scores token t+1

        def per_response(values: Tensor) -> Tensor:
            out = torch.zeros(total, dtype=torch.float32)
            out[p - 1:length - 1] = values.float()
            return out

        columns["input_ids"].append(torch.cat([seq.long(), zeros_long[:pad]]))
        columns["target_ids"].append(torch.cat([seq[1:].long(), zeros_long]))
        columns["loss_mask"].append(scored)
        columns["old_logp"].append(per_response(old_logp[i]))
        if engine_logp is not None:
            columns["engine_logp"].append(per_response(engine_logp[i]))
        columns["position_ids"].append(torch.arange(total))
        columns["seq_index"].append(torch.full((total,), i, dtype=torch.long))
        lengths.append(length)
        padded.append(total)
        responses.append(response)

    def cumulative(values: list[int]) -> Tensor:
        return torch.tensor([0] + values, dtype=torch.int32).cumsum(0, dtype=torch.int32)

    cat = {k: (torch.cat(v) if v else None) for k, v in columns.items()}
    if n == 0:
        raise ValueError("pack_sequences needs at least one sequence")
    return PackedBatch(
        **cat,
        cu_seqlens=cumulative(lengths),
        cu_seqlens_padded=cumulative(padded),
        response_lengths=torch.tensor(responses, dtype=torch.long),
        advantages=advantages.float(),
    )


def zigzag_index(cu_seqlens_padded: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """Packed positions held by `cp_rank`: for each sequence, chunk r then chunk 2cp-1-r of 2cp.

    Args:
        cu_seqlens_padded: [S+1] cumulative padded lengths, each divisible by 2*cp_size.
    Returns:
        [T / cp_size] int64 indices into the packed token axis, in local order.
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} out of range for cp_size {cp_size}")
    starts = cu_seqlens_padded[:-1].long()
    lengths = cu_seqlens_padded[1:].long() - starts
    if cp_size == 1:
        return torch.arange(int(cu_seqlens_padded[-1]))
    if bool((lengths % (2 * cp_size)).any()):
        raise ValueError(f"every padded sequence length must be divisible by 2*cp = {2 * cp_size}; "
                         f"pack with pad_multiple=required_pad_multiple(cp)")
    chunk = lengths // (2 * cp_size)
    local_len = 2 * chunk
    seq = torch.repeat_interleave(torch.arange(len(starts)), local_len)
    local_start = torch.cumsum(local_len, 0) - local_len
    j = torch.arange(int(local_len.sum())) - local_start[seq]  # position within the local sequence
    c = chunk[seq]
    first = j < c
    chunk_id = torch.where(first, cp_rank, 2 * cp_size - 1 - cp_rank)
    return starts[seq] + chunk_id * c + torch.where(first, j, j - c)


def cp_shard(batch: PackedBatch, cp_size: int, cp_rank: int) -> PackedBatch:
    """This CP rank's tokens of a packed micro-batch (per-sequence fields unchanged)."""
    if batch.cp_size != 1:
        raise ValueError("cp_shard needs the whole micro-batch, got one already sharded")
    index = zigzag_index(batch.cu_seqlens_padded, cp_size, cp_rank)
    return replace(batch.map_positions(lambda t: t.index_select(0, index)), cp_size=cp_size)


def cp_unshard(shards: Sequence[Tensor], cu_seqlens_padded: Tensor) -> Tensor:
    """Inverse of the zigzag split: reassemble [T, ...] from every CP rank's [T / cp, ...] shard."""
    cp_size = len(shards)
    out = shards[0].new_empty((int(cu_seqlens_padded[-1]),) + tuple(shards[0].shape[1:]))
    for rank, shard in enumerate(shards):
        out[zigzag_index(cu_seqlens_padded, cp_size, rank)] = shard
    return out


def _empty_sequences(batch: PackedBatch, count: int, cu_seqlens_padded: Tensor) -> dict:
    """Per-sequence fields of `batch` with `count` sequences appended that hold no token (real
    length 0, no response, advantage 0), laid out by the new `cu_seqlens_padded` [S+count+1].
    Such sequences are invalid to every loss and metric (`SequenceStats.valid` needs a response
    token) and count in no denominator (`global_denominators` counts responses)."""
    return dict(
        cu_seqlens=torch.cat([batch.cu_seqlens, batch.cu_seqlens[-1:].repeat(count)]),
        cu_seqlens_padded=cu_seqlens_padded.to(batch.cu_seqlens_padded.dtype),
        response_lengths=torch.cat([batch.response_lengths,
                                    batch.response_lengths.new_zeros(count)]),
        advantages=torch.cat([batch.advantages, batch.advantages.new_zeros(count)]),
    )


def pad_rows(batch: PackedBatch, rows: int, length: int) -> tuple[PackedBatch, Tensor]:
    """A BSHD micro-batch (S sequences, each padded to one length L) as `rows` x `length`: every
    row right-padded to `length`, then `rows - S` rows holding no sequence appended.

    Padding positions hold token 0, loss_mask False and log-probs 0; under a causal mask no real
    token attends to them (right padding), so the real positions' outputs are unchanged.

    Returns:
        (padded, kept): `padded` has rows * length positions; kept [S * L] int64 indexes the
        positions of `padded` that hold `batch`'s, in `batch`'s order.
    """
    seqs = batch.num_seqs
    if batch.cp_size != 1 or bool((torch.diff(batch.cu_seqlens_padded) * seqs
                                   != batch.num_positions).any()):
        raise ValueError("pad_rows needs an unsharded batch of equal-length rows "
                         "(pack with uniform_length)")
    old = batch.num_positions // seqs
    if rows < seqs or length < old:
        raise ValueError(f"cannot pad a {seqs} x {old} batch to {rows} x {length}")
    kept = (torch.arange(seqs)[:, None] * length + torch.arange(old)).reshape(-1)

    def spread(values: Tensor) -> Tensor:
        return values.new_zeros(rows * length).index_copy_(0, kept, values)

    padded = batch.map_positions(spread)
    return replace(
        padded,
        position_ids=torch.arange(length).repeat(rows),
        seq_index=torch.arange(rows).repeat_interleave(length),
        **_empty_sequences(batch, rows - seqs, torch.arange(rows + 1) * length),
    ), kept


def pad_tail(batch: PackedBatch, positions: int, cp_rank: int = 0) -> tuple[PackedBatch, Tensor]:
    """A THD micro-batch (this CP rank's shard, or the whole batch) grown to `positions` local
    positions by one appended sequence that holds no token, so its own attention segment keeps
    the padding away from every real token.

    Every CP rank must pad the same micro-batch to the same `positions`: the appended sequence
    has (positions - T) * cp positions over all CP ranks, of which this rank holds the zigzag
    chunks `cp_rank` and 2cp-1-cp_rank (so each local T must be a multiple of 2 under CP, which
    `required_pad_multiple` packing guarantees).

    Returns:
        (padded, kept): kept [T] int64 = arange(T), the positions holding `batch`'s.
    """
    extra = positions - batch.num_positions
    if extra < 0:
        raise ValueError(f"cannot pad {batch.num_positions} positions to {positions}")
    kept = torch.arange(batch.num_positions)
    if extra == 0:
        return batch, kept
    total = extra * batch.cp_size
    padded = batch.map_positions(lambda t: torch.cat([t, t.new_zeros(extra)]))
    return replace(
        padded,
        position_ids=torch.cat([batch.position_ids, zigzag_index(
            torch.tensor([0, total]), batch.cp_size, cp_rank).to(batch.position_ids.dtype)]),
        seq_index=torch.cat([batch.seq_index, batch.seq_index.new_full((extra,), batch.num_seqs)]),
        **_empty_sequences(batch, 1, torch.cat([batch.cu_seqlens_padded,
                                                batch.cu_seqlens_padded[-1:] + total])),
    ), kept


def split_evenly(num_items: int, parts: int) -> list[range]:
    """Contiguous ranges covering range(num_items) in `parts` pieces whose sizes differ by <= 1."""
    if parts < 1 or num_items < parts:
        raise ValueError(f"cannot split {num_items} items into {parts} non-empty parts")
    base, extra = divmod(num_items, parts)
    bounds = [0]
    for k in range(parts):
        bounds.append(bounds[-1] + base + (1 if k < extra else 0))
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]
