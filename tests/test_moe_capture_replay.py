"""MoE route capture and routing replay (megatron_vespo.moe): capture leaves the forward unchanged,
R2 replays the old-policy routes in training (forward and recompute-in-backward), R3 replays the
rollout engine's routes, and engine routes land at the positions the router sees (BSHD, THD + CP
zigzag, TP + sequence parallelism)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_vespo.learner.samples import read_samples, write_samples
from megatron_vespo.moe.replay import (align_to_router_order, micro_batch_engine_routes,
                                       attach_engine_routes, router_order_to_positions)
from megatron_vespo.parallel.packing import cp_shard, cp_unshard, split_evenly, zigzag_index
from tests.distributed import run_ranks
from tests.test_learner import MOE, full_state, make_samples, micro_batches


def plan(samples, per_micro_batch):
    """One rank's micro-batch plan of `per_micro_batch` consecutive samples each."""
    from megatron_vespo.learner.batching import micro_batch_plan

    return micro_batch_plan([s.num_tokens for s in samples], dp_rank=0, dp_size=1,
                            micro_batch_size=per_micro_batch)

LAYERS, TOPK, EXPERTS = MOE.num_hidden_layers, MOE.num_experts_per_tok, MOE.num_experts
LR = 0.05  # large enough that one step moves many routes of the tiny model


def with_routes(samples, seed=0):
    """Samples with random engine routes: [num_tokens - 1][layers][top_k], distinct experts per row."""
    g = torch.Generator().manual_seed(seed)
    return [replace(s, routed_experts=torch.stack([
        torch.stack([torch.randperm(EXPERTS, generator=g)[:TOPK] for _ in range(LAYERS)])
        for _ in range(s.num_tokens - 1)]).tolist()) for s in samples]


def pack(samples, pad_multiple, uniform_length):
    from megatron_vespo.learner.batching import pack_micro_batch

    return pack_micro_batch(samples, torch.zeros(len(samples)), pad_multiple=pad_multiple,
                            uniform_length=uniform_length)


def expected_at(samples, batch, routes):
    """Every position of every sequence holds its sample's routes (-1 on the last token/padding)."""
    for i, s in enumerate(samples):
        start, total = int(batch.cu_seqlens_padded[i]), int(torch.diff(batch.cu_seqlens_padded)[i])
        got = routes[start:start + total]
        assert torch.equal(got[:s.num_tokens - 1], torch.tensor(s.routed_experts)), s.sample_id
        assert bool((got[s.num_tokens - 1:] == -1).all()), s.sample_id


# -- alignment (no model) -------------------------------------------------------------------------

def test_engine_routes_align_with_bshd_rows_and_the_sp_slice():
    samples = with_routes(make_samples(5))
    batch = pack(samples, pad_multiple=2, uniform_length=True)
    routes = micro_batch_engine_routes(samples, batch)
    expected_at(samples, batch, routes)
    rows = batch.num_seqs
    length = batch.num_positions // rows
    # Router order: [s, b] s-major; token n = (s, b) is position b * L + s of the packed batch.
    router = align_to_router_order(routes, rows=rows)
    for n in range(router.shape[0]):
        s, b = divmod(n, rows)
        assert torch.equal(router[n], routes[b * length + s])
        assert batch.input_ids[b * length + s] == batch.input_ids.view(rows, length).t().reshape(-1)[n]
    # Sequence parallel: TP rank r routes s in [r L/2, (r+1) L/2); the two slices make the whole.
    halves = [align_to_router_order(routes, rows=rows, tp_size=2, tp_rank=r, sequence_parallel=True)
              for r in range(2)]
    assert torch.equal(torch.cat(halves), router)
    back = [router_order_to_positions(h, batch.num_positions, fill=-7, rows=rows, tp_size=2,
                                      tp_rank=r, sequence_parallel=True) for r, h in enumerate(halves)]
    assert torch.equal(torch.where(back[0] == -7, back[1], back[0]), routes)


def test_engine_routes_follow_the_thd_cp_zigzag_split():
    samples = with_routes(make_samples(6, seed=3))
    batch = pack(samples, pad_multiple=4, uniform_length=False)  # 2 * cp for cp = 2
    full = micro_batch_engine_routes(samples, batch)
    expected_at(samples, batch, full)
    shards = []
    for rank in range(2):
        shard = cp_shard(batch, 2, rank)
        routes = micro_batch_engine_routes(samples, shard, cp_rank=rank)
        assert routes.shape[0] == shard.num_positions
        # Local position p holds the route of packed position zigzag[p], the shard's input token there.
        index = zigzag_index(batch.cu_seqlens_padded, 2, rank)
        assert torch.equal(routes, full[index])
        assert torch.equal(shard.input_ids, batch.input_ids[index])
        # THD router order is the local packed order (b = 1), SP slices it contiguously.
        assert torch.equal(align_to_router_order(routes, rows=None), routes)
        shards.append(routes)
    assert torch.equal(cp_unshard(shards, batch.cu_seqlens_padded), full)


def test_missing_or_malformed_engine_routes_name_the_sample():
    samples = with_routes(make_samples(4))
    samples[2] = replace(samples[2], routed_experts=None)
    batches = [pack(samples[:2], 1, True), pack(samples[2:], 1, True)]
    with pytest.raises(ValueError, match="sample 's2' has no routed_experts"):
        attach_engine_routes(samples, batches, plan(samples, 2))
    samples[2] = replace(samples[2], routed_experts=[[[0, 1]]])
    with pytest.raises(ValueError, match="sample 's2': routed_experts has shape"):
        attach_engine_routes(samples, batches, plan(samples, 2))


# -- on a model (spawned gloo ranks) ----------------------------------------------------------------

def build(state, routing_replay="off", layout_kw=None, **overrides):
    from megatron.core import tensor_parallel

    from megatron_vespo.learner.learner import Learner, LossSettings, OptimConfig
    from megatron_vespo.learner.state_adapter import canonical_state
    from megatron_vespo.parallel.layout import ParallelLayout
    from megatron_vespo.parallel.sharded_state import load_full_state

    layout = ParallelLayout(**(layout_kw or {}))
    groups = layout.initialize()
    torch.manual_seed(1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    learner = Learner(MOE, layout, groups, OptimConfig(lr=LR),
                      LossSettings(loss="vespo", routing_replay=routing_replay), **overrides)
    load_full_state(learner.chunks, state, canonical_state(MOE), layout)
    learner.optimizer.reload_model_params()
    return learner


def sorted_ids(t):
    return t.sort(-1).values


def mismatches(capture, reference, masks=None):
    """Tokens whose top-k set differs, summed over layers and micro-batches; reference[mb][layer];
    masks[mb] (router order) restricts the count to the tokens that have a reference route."""
    total = 0
    for mb in range(len(reference)):
        for layer in range(LAYERS):
            differ = (sorted_ids(capture.layers[layer + 1][mb].ids)
                      != sorted_ids(reference[mb][layer])).any(-1)
            total += int((differ & masks[mb]).sum() if masks is not None else differ.sum())
    return total


def engine_samples(samples, batches, capture):
    """Samples whose routed_experts are the captured routes (a stand-in for an engine's record)."""
    out = list(samples)
    parts = split_evenly(len(samples), len(batches))
    for mb, (part, batch) in enumerate(zip(parts, batches)):
        per_pos = torch.stack([router_order_to_positions(
            capture.layers[layer + 1][mb].ids, batch.num_positions, fill=-1, rows=batch.num_seqs)
            for layer in range(LAYERS)], dim=1)  # [T, L, k]
        for i, k in enumerate(part):
            start = int(batch.cu_seqlens_padded[i])
            out[k] = replace(samples[k], routed_experts=per_pos[
                start:start + samples[k].num_tokens - 1].tolist())
    return out


def seq_logp(batches):
    return torch.cat([torch.zeros(b.num_seqs, dtype=torch.float64).index_add_(
        0, b.seq_index, b.old_logp.double()) for b in batches])


def single_rank(rank, world_size, state, samples, path):
    from megatron_vespo.moe import RouterCapture
    from megatron_vespo.parallel.step_reduce import global_denominators

    res = {}
    # 1. Capture: bitwise-identical log-probs; ids/probs consistent with the full softmax row.
    off = build(state)
    batches = micro_batches(off, samples, 2)
    plain = off.recompute_old_logprobs(batches)
    with RouterCapture(off.chunks, full_scores=True) as cap0:
        captured = off.recompute_old_logprobs(batches)
    res["capture_bitwise"] = all(torch.equal(a.old_logp, b.old_logp) for a, b in zip(plain, captured))
    ok = True
    for layer, calls in cap0.layers.items():
        for c in calls:
            top = torch.topk(c.scores, TOPK, dim=-1)
            ok &= torch.equal(sorted_ids(c.ids), sorted_ids(top.indices))
            renorm = c.scores.gather(1, c.ids) / c.scores.gather(1, c.ids).sum(-1, keepdim=True)
            ok &= torch.allclose(c.probs, renorm, atol=1e-6)
    res["capture_consistent"] = bool(ok)
    res["capture_calls"] = {k: len(v) for k, v in cap0.layers.items()}
    write_samples(path, engine_samples(samples, batches, cap0))
    before = [[cap0.layers[l + 1][mb].ids for l in range(LAYERS)] for mb in range(len(batches))]
    # 2. Replay off: one step moves routes.
    denom = global_denominators(plain, off.groups.dp)
    off_steps = [off.train_step(plain, denom)]
    with RouterCapture(off.chunks) as cap1:
        off.recompute_old_logprobs(batches)
    res["off_drift"] = mismatches(cap1, before)
    off_steps.append(off.train_step(plain, denom))
    res["off_steps"] = [(s["loss"], s["grad_norm"]) for s in off_steps]
    res["tokens"] = sum(b.num_positions for b in batches) * LAYERS
    # 3. R2: recorded routes (= the free ones at these weights) replayed after the step.
    r2 = build(state, "R2")
    old = r2.recompute_old_logprobs(batches)
    res["r2_old_equal"] = all(torch.equal(a.old_logp, b.old_logp) for a, b in zip(plain, old))
    recorded = [[t.long() for t in b.old_routes[0]] for b in old]  # carried by the batches
    res["r2_record_is_free_routing"] = mismatches(cap0, recorded)
    r2_steps = [r2.train_step(old, denom)]
    with RouterCapture(r2.chunks) as cap2:
        r2_steps.append(r2.train_step(old, denom))
    res["r2_mismatch"] = mismatches(cap2, recorded)
    router_grads = [float(p.main_grad.abs().sum()) for n, p in r2.chunks[0].named_parameters()
                    if n.endswith("router.weight")]
    res["r2_router_grads"] = router_grads
    with RouterCapture(r2.chunks) as cap3:  # free routes of the updated policy (records anew)
        r2.recompute_old_logprobs(batches)
    res["r2_free_drift"] = mismatches(cap3, recorded)
    res["r2_steps"] = [(s["loss"], s["grad_norm"]) for s in r2_steps]
    # 4. R2 under full activation recompute: the backward's recomputed forwards replay too.
    rc = build(state, "R2", recompute_granularity="full", recompute_method="uniform",
               recompute_num_layers=1)
    old_rc = rc.recompute_old_logprobs(batches)
    res["r2_recompute_steps"] = [(s["loss"], s["grad_norm"]) for s in
                                 (rc.train_step(old_rc, denom), rc.train_step(old_rc, denom))]
    # 5. R3 from the recorded sample file.
    engine = read_samples(path)
    r3 = build(state, "R3")
    routed = attach_engine_routes(engine, batches, plan(engine, 8))
    routes = [b.engine_routes for b in routed]
    assert routes[0].dtype == torch.int16  # compact through the N steps
    with RouterCapture(r3.chunks) as cap4:
        old3 = r3.recompute_old_logprobs(routed)
    res["r3_old_max_diff"] = max(float((a.old_logp - b.old_logp).abs().max())
                                 for a, b in zip(plain, old3))
    # Positions without engine routes (last token, padding) replay experts 0..k-1: not compared.
    masks = [align_to_router_order((r[:, 0] >= 0).all(-1), rows=b.num_seqs)
             for r, b in zip(routes, batches)]
    res["r3_routed_tokens"] = sum(int(m.sum()) for m in masks)
    res["r3_old_mismatch"] = mismatches(cap4, before, masks)
    res["r3_old_mismatch_unrouted"] = mismatches(cap4, before)
    res["r3_seq_logp"] = seq_logp(old3)
    r3.train_step(old3, denom)  # the batches carry their engine routes through the steps
    with RouterCapture(r3.chunks) as cap5:
        r3.train_step(old3, denom)
    res["r3_train_mismatch"] = mismatches(cap5, before, masks)
    shuffled = attach_engine_routes(with_routes(samples, seed=5), batches, plan(samples, 8))
    other = build(state, "R3").recompute_old_logprobs(shuffled)
    res["r3_random_routes_diff"] = max(float((a.old_logp - b.old_logp).abs().max())
                                       for a, b in zip(plain, other))
    try:
        r3.train_step([replace(b, engine_routes=None) for b in old3], denom)
        res["r3_no_routes_error"] = None
    except ValueError as e:
        res["r3_no_routes_error"] = str(e)
    try:
        r2.train_step(batches, denom)  # not the batches its old-policy forward returned
        res["r2_unrecorded_error"] = None
    except ValueError as e:
        res["r2_unrecorded_error"] = str(e)
    return res


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe") / "samples.jsonl"
    return run_ranks(single_rank, 1, full_state(MOE), make_samples(), str(path))[0], path


@pytest.mark.slow
def test_capture_leaves_the_forward_unchanged_and_matches_the_routing(single):
    res, _ = single
    assert res["capture_bitwise"]
    assert res["capture_consistent"]
    assert res["capture_calls"] == {1: 2, 2: 2}  # per layer: one capture per micro-batch


@pytest.mark.slow
def test_r2_replays_recorded_routes_after_an_update(single):
    res, _ = single
    assert res["r2_old_equal"] and res["r2_record_is_free_routing"] == 0
    assert res["off_drift"] > 0  # without replay one step moves routes ...
    assert res["r2_free_drift"] > 0  # ... also those of the R2 learner's updated policy,
    assert res["r2_mismatch"] == 0  # but its training forward replays the recorded ones
    assert len(res["r2_router_grads"]) == LAYERS and min(res["r2_router_grads"]) > 0
    # Step 1 routes equal the free ones; step 2 differs from free routing only by the replay.
    assert res["r2_steps"][0] == pytest.approx(res["off_steps"][0], rel=1e-6)
    assert res["r2_steps"][1][1] != pytest.approx(res["off_steps"][1][1], rel=1e-6)


@pytest.mark.slow
def test_r2_replays_in_the_backward_recompute(single):
    res, _ = single
    for got, want in zip(res["r2_recompute_steps"], res["r2_steps"]):
        assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_r3_replays_engine_routes_from_a_sample_file(single):
    res, path = single
    assert all(s.routed_experts is not None for s in read_samples(path))
    assert res["r3_old_max_diff"] < 1e-5  # engine routes = this policy's routes: same log-probs
    assert res["r3_routed_tokens"] > 0
    assert res["r3_old_mismatch"] == 0 and res["r3_train_mismatch"] == 0
    assert res["r3_old_mismatch_unrouted"] > 0  # unrouted positions did get the filler experts
    assert res["r3_random_routes_diff"] > 1e-3  # other routes do change the forward
    assert "R3" in res["r3_no_routes_error"]
    assert "no recorded routes" in res["r2_unrecorded_error"]


def two_ranks(rank, world_size, state, path, samples):
    """TP2 + SP with R3, then PP2 (1F1B, 4 micro-batches) with R2 with and without recompute."""
    from megatron_vespo.parallel.step_reduce import global_denominators

    out = {"tp_sp": tp_sp_rank(rank, world_size, state, path)}
    for name, overrides in (("pp", {}), ("pp_recompute", dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1))):
        learner = build(state, "R2", {"pp": 2}, **overrides)
        old = learner.recompute_old_logprobs(micro_batches(learner, samples, 4))
        denom = global_denominators(old, learner.groups.dp)
        out[name] = [(s["loss"], s["grad_norm"]) for s in
                     (learner.train_step(old, denom), learner.train_step(old, denom))]
    return out


def tp_sp_rank(rank, world_size, state, path):
    from megatron_vespo.moe import RouterCapture

    engine = read_samples(path)
    learner = build(state, "R3", {"tp": 2, "sequence_parallel": True})
    batches = micro_batches(learner, engine, 2)
    routed = attach_engine_routes(engine, batches, plan(engine, 8))
    routes = [b.engine_routes.long() for b in routed]
    with RouterCapture(learner.chunks) as cap:
        old = learner.recompute_old_logprobs(routed)
    mismatch = 0
    for mb, (batch, r) in enumerate(zip(batches, routes)):
        kw = dict(rows=batch.num_seqs, tp_size=2, tp_rank=rank, sequence_parallel=True)
        for layer in range(LAYERS):
            want = align_to_router_order(r[:, layer], **kw)
            real = (want >= 0).all(-1)
            got = cap.layers[layer + 1][mb].ids
            mismatch += int((sorted_ids(got[real]) != sorted_ids(want[real])).any(-1).sum())
    return seq_logp(old), mismatch, sum(int((r[:, 0] >= 0).all(-1).sum()) for r in routes)


@pytest.mark.slow
def test_r3_under_tp2_sp_and_r2_under_pp2(single):
    res, path = single
    per_rank = run_ranks(two_ranks, 2, full_state(MOE), str(path), make_samples())
    for rank, out in enumerate(per_rank):
        logp, mismatch, routed = out["tp_sp"]
        assert mismatch == 0 and routed > 0
        # Same routes, same model: the TP2+SP log-likelihoods equal the single-rank R3 ones.
        torch.testing.assert_close(logp, res["r3_seq_logp"], rtol=1e-5, atol=1e-5)
        # PP2 1F1B: forwards and (recomputed) backwards of 4 micro-batches interleave; the replayed
        # routes still reproduce the single-rank R2 steps.
        for name in ("pp", "pp_recompute"):
            for got, want in zip(out[name], res["r2_steps"]):
                assert got == pytest.approx(want, rel=2e-5), (rank, name)
