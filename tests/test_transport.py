"""A rollout batch reaches the ranks that train it as per-DP-rank shares: whole prompt groups,
balanced by response tokens, moved as bytes (rank 0 -> each DP rank's first rank -> its peers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_vespo.algo.advantages import AdvantageConfig
from megatron_vespo.learner.batching import assign_groups, sample_advantages
from megatron_vespo.learner.samples import Sample, columns_to_samples, samples_to_columns
from megatron_vespo.rollout_batch import share_rollout_batch
from tests.distributed import run_ranks


def routed_samples(n=24, layers=3, topk=2, experts=8, seed=0) -> list[Sample]:
    """n responses to n/4 prompts, responses of very different lengths, engine routes (uint8)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 64, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        response = torch.randint(0, 64, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g)
        routes = torch.randint(0, experts, (len(prompt) + len(response) - 1, layers, topk),
                               generator=g).numpy().astype(np.uint8)
        out.append(Sample(f"s{i}", i // 4, prompt.tolist(), response.tolist(), float(i % 3 == 0),
                          (-torch.rand(len(response), generator=g)).tolist(), i % 2, routes))
    return out


def test_groups_stay_together_and_ranks_balance_response_tokens():
    lengths = [30, 30, 30, 30, 1, 1, 1, 1, 10, 10, 10, 10, 9, 9, 9, 9]
    groups = [i // 4 for i in range(16)]
    parts = assign_groups(lengths, groups, 2)
    assert sorted(i for p in parts for i in p) == list(range(16))
    for part in parts:
        assert part == sorted(part) and len({groups[i] for i in part}) * 4 == len(part)
    # two groups each (equal sequence counts, so equal micro-batch counts), then tokens:
    # {120 + 4} and {40 + 36}
    assert sorted(sum(lengths[i] for i in p) for p in parts) == [76, 124]
    assert [len(p) for p in parts] == [8, 8]
    # 5 groups over 2 ranks: 3 and 2
    assert sorted(len(p) for p in assign_groups(lengths + [5] * 4, groups + [4] * 4, 2)) == [8, 12]
    with pytest.raises(ValueError, match="a mini-batch of 4 prompt groups cannot feed 5 DP ranks"):
        assign_groups(lengths, groups, 5)


def test_shares_cover_the_batch_once_with_the_batch_advantages():
    batch = routed_samples()
    shares = share_rollout_batch(batch, staleness=2, dp_size=2, advantage=AdvantageConfig())
    want = sample_advantages(batch, AdvantageConfig())
    index = {s.sample_id: i for i, s in enumerate(batch)}
    seen = []
    for share in shares:
        for sample, adv, step in zip(share.samples, share.advantages, share.steps.tolist()):
            i = index[sample.sample_id]
            assert adv == want[i] and step == i // 12  # mini-batch k = 12 consecutive samples
            seen.append(i)
    assert sorted(seen) == list(range(len(batch)))


def test_columns_round_trip_without_per_token_objects():
    batch = routed_samples(n=5)
    columns = samples_to_columns(batch, advantages=torch.arange(5.0))
    assert columns["routes"].dtype == torch.uint8 and columns["tokens"].dtype == torch.int32
    back = columns_to_samples(columns)
    assert back == batch
    assert isinstance(back[0].response_ids, np.ndarray)  # views of the columns, not lists


def scatter_body(rank, world_size, batch):
    from megatron_vespo.parallel.transport import ShardScatter

    dp_rank = rank // 2  # TP2 x DP2: ranks {0, 1} and {2, 3} hold one DP index each
    scatter = ShardScatter(dp_rank)
    shards = None
    if rank == 0:
        shares = share_rollout_batch(batch, 2, 2, AdvantageConfig())
        shards = (samples_to_columns(s.samples, advantages=s.advantages, steps=s.steps)
                  for s in shares)
    columns = scatter.scatter(shards)
    return {"ids": [s.sample_id for s in columns_to_samples(columns)],
            "samples": columns_to_samples(columns), "advantages": columns["advantages"]}


@pytest.mark.slow
def test_each_rank_receives_its_dp_share_as_bytes():
    batch = routed_samples()
    shares = share_rollout_batch(batch, 2, 2, AdvantageConfig())
    got = run_ranks(scatter_body, 4, batch)
    for rank, out in enumerate(got):
        share = shares[rank // 2]
        assert out["samples"] == share.samples, rank
        assert torch.equal(out["advantages"], share.advantages)
    assert set(got[0]["ids"]).isdisjoint(got[2]["ids"])
