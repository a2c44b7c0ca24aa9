"""Errors that every rank agrees on: a failure on one rank is raised on all of them, so no rank is
left waiting in the next collective of a step the others abandoned."""

from __future__ import annotations

from typing import Callable, List, Optional


def raise_everywhere(error: Optional[BaseException], failure: Callable[[str], Exception],
                     what: str) -> None:
    """Collective over the world: raise on every rank if any rank has an `error`. A rank raises its
    own exception where it has one, else `failure("{what} failed on rank r: ...")` naming the
    first rank that failed."""
    import torch.distributed as dist

    reports: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
    if failed:
        raise failure(f"{what} failed on rank {failed[0][0]}: {failed[0][1]}")


def on_rank0(call: Callable[[], object], failure: Callable[[str], Exception], what: str) -> object:
    """Collective: `call()` on global rank 0, its error raised everywhere (`raise_everywhere`), its
    result returned on every rank."""
    import torch.distributed as dist

    box, error = [None], None
    if dist.get_rank() == 0:
        try:
            box[0] = call()
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            error = exc
    raise_everywhere(error, failure, what)
    dist.broadcast_object_list(box, src=0)
    return box[0]
