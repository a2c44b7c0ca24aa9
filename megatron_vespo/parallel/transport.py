"""Stream column messages (named tensors) from the source rank to the ranks that train them, as
raw bytes rather than pickled objects.

Rank 0 produces messages one at a time, each addressed to a DP index (a prompt group as it comes
out of the engine or the file). It sends each to that DP index's first rank (point to point, over
the given gloo group), which passes it on to the other ranks of its DP index (its TP / CP / PP
peers) before taking the next; an end marker closes the stream. Rank 0 holds one message in
transit (plus its own DP index's share); every other rank holds only its own share. Bytes on rank
0's wire: each message once. A message is one header (the columns' names, dtypes and shapes, as
JSON bytes) and one flat uint8 payload; the receiver takes its columns as views of that payload,
so a share is in memory once.
"""

from __future__ import annotations

import json
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

Columns = dict[str, Tensor]


_ALIGN = 8  # every column starts at a multiple of the widest element, so it can be viewed in place


def pack_columns(columns: Columns) -> tuple[Tensor, Tensor]:
    """(header [H] uint8, payload [P] uint8) of CPU tensors, each column contiguous in the payload."""
    layout, parts, offset = [], [], 0
    for name, column in columns.items():
        data = column.detach().contiguous().cpu().view(-1).view(torch.uint8)
        layout.append([name, str(column.dtype).removeprefix("torch."), list(column.shape), offset])
        pad = -data.numel() % _ALIGN
        parts += [data, torch.zeros(pad, dtype=torch.uint8)]
        offset += data.numel() + pad
    header = torch.frombuffer(bytearray(json.dumps(layout).encode()), dtype=torch.uint8)
    payload = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return header, payload


def unpack_columns(header: Tensor, payload: Tensor) -> Columns:
    """The columns of `pack_columns`, as views of `payload`."""
    out = {}
    for name, dtype, shape, offset in json.loads(bytes(header.numpy()).decode()):
        dtype = getattr(torch, dtype)
        count = 1
        for size in shape:
            count *= size
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        out[name] = payload[offset:offset + nbytes].view(dtype).view(shape)
    return out


_END = (torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8))  # no header: the end


def _send(header: Tensor, payload: Tensor, dst: int, group) -> None:
    dist.send(torch.tensor([header.numel(), payload.numel()]), dst, group=group)
    if header.numel():
        dist.send(header, dst, group=group)
        dist.send(payload, dst, group=group)


def _recv(src: int, group) -> tuple[Tensor, Tensor]:
    sizes = torch.empty(2, dtype=torch.int64)
    dist.recv(sizes, src, group=group)
    header = torch.empty(int(sizes[0]), dtype=torch.uint8)
    payload = torch.empty(int(sizes[1]), dtype=torch.uint8)
    if header.numel():
        dist.recv(header, src, group=group)
        dist.recv(payload, src, group=group)
    return header, payload


def _broadcast(message: Optional[tuple[Tensor, Tensor]], src: int, group) -> tuple[Tensor, Tensor]:
    sizes = torch.tensor([message[0].numel(), message[1].numel()]) if message else \
        torch.empty(2, dtype=torch.int64)
    dist.broadcast(sizes, src, group=group)
    if message is None:
        message = (torch.empty(int(sizes[0]), dtype=torch.uint8),
                   torch.empty(int(sizes[1]), dtype=torch.uint8))
    if message[0].numel():
        for part in message:
            dist.broadcast(part, src, group=group)
    return message


class ShardStream:
    """The groups a stream needs, made once (collective over the world): every rank's DP index
    and, per DP index, a gloo group of its ranks (the first of them receives from rank 0).
    `control`: a gloo group of the whole world for rank 0's sends (made here when not given)."""

    def __init__(self, dp_rank: int, control=None) -> None:
        world = dist.get_world_size()
        indices: list[int] = [0] * world
        dist.all_gather_object(indices, dp_rank)
        self.dp_rank, self.dp_size = dp_rank, max(indices) + 1
        self.members = [[r for r in range(world) if indices[r] == d] for d in range(self.dp_size)]
        self.control = control if control is not None else dist.new_group(backend="gloo")
        self.peers = [dist.new_group(m, backend="gloo") for m in self.members]
        self.sent_bytes = 0  # rank 0: payload bytes sent to other DP ranks' first ranks

    def _to_peers(self, message, leader: int):
        """The DP index's first rank passes `message` on to its peers (they pass None)."""
        if len(self.members[self.dp_rank]) == 1:
            return message
        return _broadcast(message, leader, self.peers[self.dp_rank])

    def stream(self, messages: Optional[Iterable[tuple[int, Columns]]]) -> list[Columns]:
        """Rank 0 passes an iterable of (DP index, columns), consumed one at a time; the others
        pass None. Every rank returns the messages addressed to its DP index, in order."""
        me = dist.get_rank()
        leader = self.members[self.dp_rank][0]
        mine: list[Columns] = []
        if me == 0:
            for d, columns in messages:
                packed = pack_columns(columns)
                if self.members[d][0] == 0:
                    mine.append(unpack_columns(*self._to_peers(packed, 0)))
                else:
                    _send(*packed, dst=self.members[d][0], group=self.control)
                    self.sent_bytes += packed[1].numel()
            for d in range(self.dp_size):
                if self.members[d][0] != 0:
                    _send(*_END, dst=self.members[d][0], group=self.control)
            self._to_peers(_END, 0)
            return mine
        while True:
            message = _recv(0, group=self.control) if me == leader else None
            message = self._to_peers(message, leader)
            if not message[0].numel():
                return mine
            mine.append(unpack_columns(*message))
