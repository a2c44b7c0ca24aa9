"""THD packing and the zigzag context-parallel split."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_vespo.parallel.packing import (cp_shard, cp_unshard, pack_sequences, pad_rows,
                                             pad_tail, required_pad_multiple, split_evenly,
                                             zigzag_index)


def _pack(lengths, prompts, pad):
    tokens = [torch.arange(100 * i, 100 * i + n) for i, n in enumerate(lengths)]
    old = [-torch.arange(1, n - p + 1).float() for n, p in zip(lengths, prompts)]
    return tokens, pack_sequences(tokens, prompts, torch.arange(len(lengths)).float(), old,
                                  pad_multiple=pad)


def test_each_response_token_is_scored_at_the_position_before_it():
    tokens, b = _pack([5, 3], [2, 1], 4)
    assert b.cu_seqlens.tolist() == [0, 5, 8] and b.cu_seqlens_padded.tolist() == [0, 8, 12]
    mask = b.loss_mask
    assert mask.nonzero().squeeze(1).tolist() == [1, 2, 3, 8, 9]
    assert b.target_ids[mask].tolist() == [2, 3, 4, 101, 102]
    assert b.old_logp[mask].tolist() == [-1.0, -2.0, -3.0, -1.0, -2.0]
    assert b.position_ids.tolist() == list(range(8)) + list(range(4))
    assert b.seq_index.tolist() == [0] * 8 + [1] * 4
    assert b.response_lengths.tolist() == [3, 2]


def test_zigzag_gives_rank_r_chunks_r_and_mirror():
    cu = torch.tensor([0, 8, 24])  # two sequences, chunk sizes 2 and 4 at cp=2
    assert zigzag_index(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23]
    assert zigzag_index(cu, 2, 1).tolist() == [2, 3, 4, 5, 12, 13, 14, 15, 16, 17, 18, 19]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(2, 40), min_size=1, max_size=6),
       cp=st.sampled_from([1, 2, 4, 8]), tp=st.sampled_from([1, 2, 4]), sp=st.booleans())
def test_cp_split_partitions_every_position_and_inverts(lengths, cp, tp, sp):
    if sp and tp == 1:
        sp = False
    pad = required_pad_multiple(cp, tp, sp)
    _, b = _pack(lengths, [1] * len(lengths), pad)
    assert (torch.diff(b.cu_seqlens_padded) % pad == 0).all()
    shards = [cp_shard(b, cp, r) for r in range(cp)]
    index = torch.cat([zigzag_index(b.cu_seqlens_padded, cp, r) for r in range(cp)])
    assert sorted(index.tolist()) == list(range(b.num_positions))
    assert all(s.num_positions == b.num_positions // cp for s in shards)
    if sp:
        assert all(s.num_positions % tp == 0 for s in shards)
    for name in ("input_ids", "loss_mask", "old_logp", "seq_index"):
        restored = cp_unshard([getattr(s, name) for s in shards], b.cu_seqlens_padded)
        assert torch.equal(restored, getattr(b, name))
    # each rank's tokens of a sequence stay grouped under that sequence's index
    for s in shards:
        assert torch.equal(s.seq_index, torch.sort(s.seq_index).values)


def test_bad_packing_inputs_name_the_problem():
    with pytest.raises(ValueError, match="prompt length"):
        pack_sequences([torch.arange(3)], [0], torch.zeros(1), [torch.zeros(3)])
    with pytest.raises(ValueError, match="old_logp"):
        pack_sequences([torch.arange(3)], [1], torch.zeros(1), [torch.zeros(5)])
    with pytest.raises(ValueError, match="advantages"):
        pack_sequences([torch.arange(3)], [1], torch.zeros(2), [torch.zeros(2)])
    _, b = _pack([5], [1], 1)
    with pytest.raises(ValueError, match="divisible by 2\\*cp"):
        zigzag_index(b.cu_seqlens_padded, 2, 0)


def _engine_pack(lengths, prompts, pad):
    """`_pack` with engine log-probs (the mismatch metrics read them) and mixed-sign advantages."""
    tokens = [torch.arange(100 * i, 100 * i + n) for i, n in enumerate(lengths)]
    old = [-torch.arange(1, n - p + 1).float() / 4 for n, p in zip(lengths, prompts)]
    engine = [o - 0.1 for o in old]
    adv = torch.tensor([(-1.0) ** i for i in range(len(lengths))])
    return pack_sequences(tokens, prompts, adv, old, engine, pad_multiple=pad)


def _loss_and_metrics(batch, logp):
    from megatron_vespo.algo.policy_losses import Denominators, get_policy_loss
    from megatron_vespo.parallel.policy_objective import shard_policy_loss

    out = shard_policy_loss(logp, batch, Denominators(tokens=7.0, sequences=2.0),
                            get_policy_loss("vespo"))
    return out.loss, out.metrics.finalize(), out.seq_coef


def test_row_padding_changes_no_loss_metric_or_position():
    b = _engine_pack([5, 7], [2, 3], 8)  # BSHD: two rows of 8
    padded, kept = pad_rows(b, rows=3, length=10)
    assert padded.num_positions == 30 and padded.num_seqs == 3
    assert padded.cu_seqlens_padded.tolist() == [0, 10, 20, 30]
    assert padded.cu_seqlens.tolist() == [0, 5, 12, 12]
    assert padded.response_lengths.tolist() == [3, 4, 0] and padded.advantages[2] == 0
    assert padded.position_ids.tolist() == list(range(10)) * 3
    assert padded.seq_index.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    for name in b.PER_POSITION:
        assert torch.equal(getattr(padded, name)[kept], getattr(b, name)), name
    off = torch.ones(30, dtype=torch.bool).index_fill_(0, kept, False)
    assert not padded.loss_mask[off].any() and not padded.input_ids[off].any()

    logp = (-torch.rand(b.num_positions) - 0.5).requires_grad_()
    noise = -5 * torch.rand(30)  # whatever the model computes at padding positions
    logp_padded = noise.index_copy(0, kept, logp.detach()).requires_grad_()
    want, got = _loss_and_metrics(b, logp), _loss_and_metrics(padded, logp_padded)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    want[0].backward()
    got[0].backward()
    assert torch.equal(logp_padded.grad[kept], logp.grad) and not logp_padded.grad[off].any()
    assert got[1].keys() == want[1].keys()
    for key, value in want[1].items():
        assert got[1][key] == value or (value != value and got[1][key] != got[1][key]), key
    with pytest.raises(ValueError, match="equal-length rows"):
        pad_rows(_engine_pack([5, 7], [2, 3], 1), rows=2, length=8)
    with pytest.raises(ValueError, match="cannot pad a 2 x 8 batch to 1 x 8"):
        pad_rows(b, rows=1, length=8)


@pytest.mark.parametrize("cp", [1, 2])
def test_tail_padding_appends_one_empty_sequence_on_every_cp_rank(cp):
    b = _engine_pack([5, 7], [2, 3], required_pad_multiple(cp))
    shards = [cp_shard(b, cp, r) if cp > 1 else b for r in range(cp)]
    local = b.num_positions // cp
    pairs = [pad_tail(s, local + 4, r) for r, s in enumerate(shards)]
    padded = pairs[0][0]
    extra = 4 * cp
    grown = b.cu_seqlens_padded.tolist() + [b.num_positions + extra]
    assert padded.cu_seqlens_padded.tolist() == grown
    assert padded.cu_seqlens.tolist() == b.cu_seqlens.tolist() + [b.cu_seqlens[-1]]
    assert padded.response_lengths.tolist() == b.response_lengths.tolist() + [0]
    for (p, kept), s in zip(pairs, shards):
        assert torch.equal(kept, torch.arange(local)) and p.num_positions == local + 4
        for name in b.PER_POSITION:
            assert torch.equal(getattr(p, name)[kept], getattr(s, name)), name
    # Reassembled over CP ranks: the original batch, then one sequence of `extra` padding positions.
    whole = {name: cp_unshard([getattr(p, name) for p, _ in pairs], padded.cu_seqlens_padded)
             for name in ("position_ids", "seq_index", "loss_mask")}
    assert whole["position_ids"][b.num_positions:].tolist() == list(range(extra))
    assert whole["seq_index"][b.num_positions:].tolist() == [2] * extra
    assert not whole["loss_mask"][b.num_positions:].any()
    assert pad_tail(shards[0], local)[0] is shards[0]
    with pytest.raises(ValueError, match="cannot pad"):
        pad_tail(shards[0], local - 1)


def test_split_evenly():
    assert [list(r) for r in split_evenly(7, 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError):
        split_evenly(2, 3)


def test_token_budget_micro_batch_plan():
    from megatron_vespo.learner.batching import micro_batch_cost, micro_batch_plan

    lengths = [5, 9, 3, 7, 8, 2]
    # THD: padded lengths (multiple 2) 6, 10, 4, 8, 8, 2 cut in order within 16 positions
    assert micro_batch_plan(lengths, dp_rank=0, dp_size=1, micro_batch_size=99, max_tokens=14,
                            pad_multiple=2) == [[0], [1, 2], [3], [4, 5]]
    assert micro_batch_plan(lengths, dp_rank=0, dp_size=1, micro_batch_size=99, max_tokens=16,
                            pad_multiple=2) == [[0, 1], [2, 3], [4, 5]]
    # BSHD: rows x the longest padded row
    assert micro_batch_cost([5, 9, 3], pad_multiple=2, uniform_length=True) == 30
    plan = micro_batch_plan(lengths, dp_rank=0, dp_size=1, micro_batch_size=99, max_tokens=20,
                            pad_multiple=2, uniform_length=True)
    assert plan == [[0, 1], [2, 3], [4, 5]]  # 2 x 10, 2 x 8, 2 x 8
    assert all(micro_batch_cost([lengths[i] for i in p], pad_multiple=2, uniform_length=True) <= 20
               for p in plan)
    # a count the pipeline needs (a multiple of 4 here) splits the widest micro-batches
    plan = micro_batch_plan(lengths, dp_rank=0, dp_size=1, micro_batch_size=99, max_tokens=100,
                            count_multiple=4)
    assert len(plan) == 4 and sorted(i for p in plan for i in p) == list(range(6))
    # the second DP rank's share only
    assert micro_batch_plan(lengths, dp_rank=1, dp_size=2, micro_batch_size=99,
                            max_tokens=100) == [[3, 4, 5]]
    with pytest.raises(ValueError, match=r"train\.max_tokens_per_micro_batch=8 is smaller than one "
                                         r"sequence of the batch: 9 tokens \(10 positions packed\)"):
        micro_batch_plan(lengths, dp_rank=0, dp_size=1, micro_batch_size=99, max_tokens=8,
                         pad_multiple=2)
    with pytest.raises(ValueError, match="cannot fill the 8 micro-batches"):
        micro_batch_plan(lengths, dp_rank=0, dp_size=1, micro_batch_size=99, max_tokens=100,
                         count_multiple=8)
