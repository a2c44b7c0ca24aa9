"""THD packing and the zigzag context-parallel split."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_vespo.parallel.packing import (cp_shard, cp_unshard, pack_sequences,
                                             required_pad_multiple, split_evenly, zigzag_index)


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


def test_split_evenly():
    assert [list(r) for r in split_evenly(7, 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError):
        split_evenly(2, 3)
