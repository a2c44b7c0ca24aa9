"""A rollout batch reaches the ranks that train it as its prompt groups stream in: each whole group
to one DP rank, balanced by response tokens, moved as bytes (rank 0 -> each DP rank's first rank
-> its peers), no rank holding more than its share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_vespo.algo.advantages import AdvantageConfig
from megatron_vespo.learner.batching import GroupAssigner, sample_advantages
from megatron_vespo.learner.samples import (RolloutBatch, Sample, columns_to_samples,
                                            samples_to_columns)
from megatron_vespo.offline import file_groups
from megatron_vespo.rollout_batch import BatchTally, RankShare, stream_groups
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


def test_groups_go_whole_to_the_least_loaded_rank_of_their_step():
    assigner = GroupAssigner(num_steps=2, dp_size=2)
    # step 0: 120, 4, 40, 36 response tokens arrive in that order
    assert [assigner.assign(0, t) for t in (120, 4, 40, 36)] == [0, 1, 1, 1]
    assert assigner.tokens[0] == [120, 80]
    assert [assigner.assign(1, t) for t in (5, 5)] == [0, 1]  # steps keep their own loads
    assigner.check()
    short = GroupAssigner(num_steps=1, dp_size=3)
    short.assign(0, 10), short.assign(0, 10)
    with pytest.raises(ValueError, match="step 0 of the rollout batch has 2 prompt groups, which "
                                         "cannot feed 3 DP ranks"):
        short.check()


def _batch(samples, staleness=2) -> RolloutBatch:
    groups = list(file_groups(iter(samples), len(samples), len(samples) // staleness))
    return RolloutBatch(len(samples), iter(groups[::-1]))  # any arrival order


def test_streamed_groups_cover_the_batch_once_with_group_advantages():
    batch = routed_samples()
    tally = BatchTally(len(batch), staleness=2, dp_size=2)
    messages = list(stream_groups(_batch(batch), tally, AdvantageConfig()))
    want = sample_advantages(batch, AdvantageConfig())
    index = {s.sample_id: i for i, s in enumerate(batch)}
    seen = []
    for d, columns in messages:
        share = RankShare.from_messages([columns])
        assert len({s.group_id for s in share.samples}) == 1  # one whole group per message
        for sample, adv, step in zip(share.samples, share.advantages, share.steps.tolist()):
            i = index[sample.sample_id]
            assert sample == batch[i] and adv == want[i] and step == i // 12
            seen.append(i)
    assert sorted(seen) == list(range(len(batch)))
    head = tally.head({"rollout/x": 1.0})
    assert head["reward"] == pytest.approx(sum(s.reward for s in batch) / len(batch))
    assert sorted(tally.sample_ids[0]) == sorted(s.sample_id for s in batch[:12])


def test_a_group_across_a_step_edge_keeps_its_advantages_and_an_incomplete_batch_fails():
    batch = routed_samples(n=12)
    batch = [Sample(s.sample_id, i // 3, s.prompt_ids, s.response_ids, s.reward,
                    s.engine_logprobs) for i, s in enumerate(batch)]  # groups of 3, steps of 4
    tally = BatchTally(12, staleness=3, dp_size=1)
    parts = [RankShare.from_messages([c]) for _, c in stream_groups(_batch(batch, 3), tally,
                                                                   AdvantageConfig())]
    assert sorted(len(p.samples) for p in parts) == [1, 1, 2, 2, 3, 3]  # 3 = 1 + 2 = 2 + 1
    got = {s.sample_id: float(a) for p in parts for s, a in zip(p.samples, p.advantages)}
    want = sample_advantages(batch, AdvantageConfig())
    assert got == {s.sample_id: float(a) for s, a in zip(batch, want)}
    tally = BatchTally(12, staleness=3, dp_size=1)
    list(stream_groups(RolloutBatch(12, iter([(0, batch[:3])])), tally, AdvantageConfig()))
    with pytest.raises(ValueError, match="the source delivered 3 of the rollout batch's 12"):
        tally.head({})


def test_columns_round_trip_without_per_token_objects():
    batch = routed_samples(n=5)
    columns = samples_to_columns(batch, advantages=torch.arange(5.0))
    assert columns["routes"].dtype == torch.uint8 and columns["tokens"].dtype == torch.int32
    back = columns_to_samples(columns)
    assert back == batch
    assert isinstance(back[0].response_ids, np.ndarray)  # views of the columns, not lists


def stream_body(rank, world_size, batch, fail):
    from megatron_vespo.parallel.transport import ShardStream

    dp_rank = rank // 2  # TP2 x DP2: ranks {0, 1} and {2, 3} hold one DP index each
    stream = ShardStream(dp_rank)
    def groups():
        tally = BatchTally(len(batch), 2, 2)
        for i, item in enumerate(stream_groups(_batch(batch), tally, AdvantageConfig())):
            if fail and i == 3:
                return  # a source that stops early still ends every rank's stream
            yield item

    share = RankShare.from_messages(stream.stream(groups() if rank == 0 else None))
    return {"samples": share.samples, "advantages": share.advantages, "steps": share.steps,
            "sent": stream.sent_bytes}


@pytest.mark.slow
def test_each_rank_receives_its_dp_share_as_bytes():
    batch = routed_samples()
    got = run_ranks(stream_body, 4, batch, False)
    want = dict(zip((s.sample_id for s in batch), sample_advantages(batch, AdvantageConfig())))
    for rank, out in enumerate(got):
        peer = got[rank ^ 1]  # the other rank of the same DP index holds the same share
        assert out["samples"] == peer["samples"] and torch.equal(out["steps"], peer["steps"])
        assert [float(want[s.sample_id]) for s in out["samples"]] == out["advantages"].tolist()
    ids = [[s.sample_id for s in got[r]["samples"]] for r in (0, 2)]
    assert set(ids[0]).isdisjoint(ids[1]) and sorted(ids[0] + ids[1]) == sorted(
        s.sample_id for s in batch)
    share_bytes = sum(len(s.response_ids) * 8 for s in got[2]["samples"])
    assert got[0]["sent"] >= share_bytes  # rank 0 sent DP index 1's share, once
    partial = run_ranks(stream_body, 4, batch, True)
    assert sum(len(p["samples"]) for p in partial[::2]) < len(batch)  # ended, nobody hangs
