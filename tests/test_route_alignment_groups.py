"""Engine routes reach the token each CP / SP rank actually holds, checked on real process groups:
every rank aligns its own shard, the shards are all-gathered over the real group, and the
reassembled routes must equal the unsharded ones, position by position."""

import pytest
import torch

from megatron_vespo.learner.samples import Sample
from tests.distributed import run_ranks

LAYERS, TOP_K = 2, 2


def position_coded_samples(n=5, seed=0) -> list[Sample]:
    """Routes that encode where they belong: row t of sample i is [[1000*i + t, 7], [3, 1000*i + t]]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        total = int(torch.randint(5, 14, (1,), generator=g))
        ids = torch.randint(0, 50, (total,), generator=g).tolist()
        routes = [[[1000 * i + t, 7], [3, 1000 * i + t]] for t in range(total - 1)]
        out.append(Sample(f"s{i}", i, ids[:2], ids[2:], 1.0, [-1.0] * (total - 2),
                          routed_experts=routes))
    return out


def gather_cp_shards(rank, world_size, samples):
    import torch.distributed as dist

    from megatron_vespo.learner.batching import pack_micro_batch
    from megatron_vespo.moe.replay import micro_batch_engine_routes
    from megatron_vespo.parallel.layout import ParallelLayout
    from megatron_vespo.parallel.packing import cp_shard, cp_unshard, required_pad_multiple

    groups = ParallelLayout(cp=world_size).initialize()
    full = pack_micro_batch(samples, torch.zeros(len(samples)),
                            pad_multiple=required_pad_multiple(world_size), uniform_length=False)
    shard = cp_shard(full, world_size, groups.cp_rank)
    local = micro_batch_engine_routes(samples, shard, groups.cp_rank).long()  # gloo: no int16
    pieces = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(pieces, local, group=groups.cp)
    # Each local row must sit where its own position says: route code == 1000 * seq + position.
    held = torch.where(local[:, 0, 0] >= 0)[0]
    expected = 1000 * shard.seq_index[held] + shard.position_ids[held]
    return (torch.equal(local[held, 0, 0], expected),
            torch.equal(cp_unshard(pieces, full.cu_seqlens_padded),
                        micro_batch_engine_routes(samples, full).long()))


def gather_sp_slices(rank, world_size, samples):
    import torch.distributed as dist

    from megatron_vespo.learner.batching import pack_micro_batch
    from megatron_vespo.moe.replay import align_to_router_order, micro_batch_engine_routes
    from megatron_vespo.parallel.layout import ParallelLayout

    groups = ParallelLayout(tp=world_size, sequence_parallel=True).initialize()
    batch = pack_micro_batch(samples, torch.zeros(len(samples)), pad_multiple=world_size,
                             uniform_length=True)
    routes = micro_batch_engine_routes(samples, batch).long()  # gloo gathers no int16
    kw = dict(rows=batch.num_seqs, sequence_parallel=True)
    mine = align_to_router_order(routes, tp_size=world_size, tp_rank=groups.tp_rank, **kw)
    pieces = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(pieces, mine, group=groups.tp)
    # The TP ranks' slices, concatenated, are the whole router-order sequence [s, b] flattened.
    return torch.equal(torch.cat(pieces), align_to_router_order(routes, **{**kw, "sequence_parallel": False}))


@pytest.mark.slow
def test_engine_routes_follow_real_cp_and_sp_groups():
    samples = position_coded_samples()
    for placed, reassembled in run_ranks(gather_cp_shards, 2, samples):
        assert placed and reassembled
    assert all(run_ranks(gather_sp_slices, 2, samples))
