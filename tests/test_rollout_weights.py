"""Real SGLang servers serve the weights the megatron learner holds, before and after a weight sync.

Tiny Qwen3 (dense, learner TP=2) and Qwen3-MoE (learner EP=2) models are randomly initialised by
the learner and exported with `export_model_to_hf`; servers start from those directories (two for
the dense model, one for the MoE model). One spawn of two learner ranks then runs the whole story
for each model, phase by phase:

  phase 0: initial weights; 1: after one optimizer step and `DiskWeightSync`; 2 and 3: after one
  more step each and `DistributedWeightSync` (gloo; the update group made once and reused). Every
  sync runs the update-equality check (`check=True`); then one sync of each kind alters a tensor
  on its way to the servers, and the check must fail naming it and the server.

A third job syncs the dense servers from a learner at PP=2: two senders, each with its own update
group, stream their stages in parallel, and the check proves the servers hold the learner's bytes.

In every phase rank 0 samples responses from each server (`/generate` with log-probs, the MoE server
also returning routed experts) and scores the phase-0 sequences teacher-forced; the learner computes
its own log-probs of the same tokens (`recompute_old_logprobs`, routes captured with
`RouterCapture`). The tests below assert on what that run recorded.

Servers use ports 31000-31999, below the kernel's ephemeral range (32768-60999), where an outgoing
connection of another process can take a port between the check and the bind; learner process groups
and the update group take free ports.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from megatron_vespo.rollout import weight_sync
from megatron_vespo.rollout.server import (ServerError, ServerOptions, SGLangServer, post_json,
                                           weight_version)
from tests.distributed import run_ranks


# Every setting spelled out (no project YAML): the learner's defaults plus these.
COMMON = ["train.world_size=2", "train.seed=11", "optim.lr=0.01", "model.spec=local",
          "model.tie_word_embeddings=false", "model.vocab_size=256", "model.hidden_size=64",
          "model.num_hidden_layers=2", "model.num_attention_heads=4", "model.num_key_value_heads=2",
          "model.head_dim=16"]
MODELS = {
    "dense": COMMON + ["model.family=qwen3", "model.intermediate_size=128", "parallel.tp=2"],
    "moe": COMMON + ["model.family=qwen3_moe", "model.num_experts=4", "model.num_experts_per_tok=2",
                     "model.moe_intermediate_size=64", "parallel.ep=2"],
    "dense-pp2": COMMON + ["model.family=qwen3", "model.intermediate_size=128", "parallel.pp=2"],
}
SERVERS = {"dense": 2, "moe": 1}  # the dense fleet has two servers: every sync must reach both
# All three servers run at once: each caps its KV cache (sglang would size it to ~70% of free memory).
PROMPTS = [[5, 17, 33, 2, 101, 7], [250, 3, 3, 9], [64, 128, 1, 200, 45, 6, 77, 12], [8, 8, 90]]
RESPONSE_TOKENS = 6
LOGPROB_TOL = 1e-4
PHASES = ("initial", "disk", "distributed", "distributed-reused")
ALTERED = "model.layers.1.self_attn.o_proj.weight"  # the tensor the corrupted syncs change in transit
HOT = 0.7  # a sampling temperature other than 1


def _config(name: str, init_dir=None):
    from megatron_vespo.config import load_config

    extra = [f"train.init_hf_checkpoint={init_dir}"] if init_dir else []
    return load_config(None, MODELS[name] + extra)


# ------------------------------------------------------------------------------------------------
# Learner ranks
# ------------------------------------------------------------------------------------------------


def export_worker(rank, world_size, jobs):
    """Randomly initialised learners (one per model), each exported as a HF directory."""
    from megatron_vespo.learner.hf_convert import export_model_to_hf
    from megatron_vespo.trainer import build_learner

    for name, directory in jobs:
        config = _config(name)
        learner = build_learner(config)
        export_model_to_hf(directory, [c.module for c in learner.chunks], config.model,
                           config.parallel)


def _generate(url, prompt, routed, temperature=1.0):
    out = post_json(url, "/generate", {
        "input_ids": prompt, "return_logprob": True, "return_routed_experts": routed,
        "sampling_params": {"max_new_tokens": RESPONSE_TOKENS, "temperature": temperature,
                            "ignore_eos": True}})
    meta = out["meta_info"]
    return dict(response=[t for _, t, _ in meta["output_token_logprobs"]],
                logprobs=[lp for lp, _, _ in meta["output_token_logprobs"]],
                version=meta["weight_version"], routed=meta.get("routed_experts"))


def _score(url, prompt, response):
    """The served log-probs of a fixed response, teacher-forced (the prompt's tokens are input)."""
    out = post_json(url, "/generate", {
        "input_ids": prompt + response, "return_logprob": True, "logprob_start_len": len(prompt) - 1,
        "sampling_params": {"max_new_tokens": 1, "temperature": 1.0}})
    # sglang gives no log-prob (None) for the token at logprob_start_len itself: start one early.
    return [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]]


def _learner_view(learner, sequences, moe):
    """Per (prompt, response): the learner's log-probs of the response [R] and, for MoE, the
    megatron router's top-k experts of every token but the last [P + R - 1, layers, k].
    Collective; each DP rank computes its share, every rank returns all of them."""
    import torch.distributed as dist

    from megatron_vespo.learner.batching import rank_micro_batches
    from megatron_vespo.learner.samples import Sample
    from megatron_vespo.moe.capture import RouterCapture
    from megatron_vespo.parallel.packing import split_evenly

    samples = [Sample(str(i), 0, p, r, 0.0, [0.0] * len(r)) for i, (p, r) in enumerate(sequences)]
    g = learner.groups
    batches = rank_micro_batches(samples, torch.zeros(len(samples)), dp_rank=g.dp_rank,
                                 dp_size=g.dp_size, micro_batch_size=1, pad_multiple=1,
                                 uniform_length=True)
    with RouterCapture(learner.chunks) as cap:
        batches = learner.recompute_old_logprobs(batches)
    local = {}
    for j, (i, batch) in enumerate(zip(split_evenly(len(samples), g.dp_size)[g.dp_rank], batches)):
        entry = {"logprobs": batch.old_logp[batch.loss_mask].tolist()}
        if moe:  # one sequence per micro-batch: router order is position order
            entry["experts"] = cap.stacked(j)[0][:samples[i].num_tokens - 1].numpy()
        local[i] = entry
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    merged = {i: e for part in everyone for i, e in part.items()}
    return [merged[i] for i in range(len(samples))]


def _learner_view_at(learner, temperature, sequences, moe):
    """`_learner_view` with the learner's log-probs taken at a sampling temperature."""
    import dataclasses

    configured = learner.loss
    learner.loss = dataclasses.replace(configured, temperature=temperature)
    try:
        return _learner_view(learner, sequences, moe)
    finally:
        learner.loss = configured


def _train_step(learner, sequences):
    """One optimizer step on the sequences (rewards alternate, so advantages are non-zero)."""
    from megatron_vespo.learner.batching import rank_micro_batches
    from megatron_vespo.learner.samples import Sample
    from megatron_vespo.parallel.step_reduce import global_denominators

    samples = [Sample(str(i), 0, p, r, float(i % 2), [0.0] * len(r))
               for i, (p, r) in enumerate(sequences)]
    advantages = torch.tensor([1.0, -1.0] * (len(samples) // 2))
    g = learner.groups
    batches = rank_micro_batches(samples, advantages, dp_rank=g.dp_rank, dp_size=g.dp_size,
                                 micro_batch_size=1, pad_multiple=1, uniform_length=True)
    batches = learner.recompute_old_logprobs(batches)
    learner.train_step(batches, global_denominators(batches, g.dp))


def scenario_worker(rank, world_size, jobs):
    """`_scenario` (`_pp_scenario` for dense-pp2) for each (name, model dir, urls, export dir) in
    one spawn of the ranks."""
    return {job[0]: (_pp_scenario if job[0] == "dense-pp2" else _scenario)(rank, *job) for job in jobs}


def _corrupted_syncs(chunks, config, urls, disk, distributed, version):
    """One sync of each kind with ALTERED changed after the learner hashed it (on its way to the
    servers): each must fail. Returns the error messages (every rank's)."""
    from megatron_vespo.learner.hf_files import FlatBucket, ShardWriter

    def altered(bucket):
        return FlatBucket.of([(n, t + 1 if n == ALTERED else t) for n, t in bucket.tensors])

    def start_altered(self, pool, urls, flat, fields):  # one byte of ALTERED flipped on the wire
        sizes = [torch.Size(s).numel() * getattr(torch, d).itemsize
                 for d, s in zip(fields["dtypes"], fields["shapes"])]
        if ALTERED in fields["names"]:
            i = fields["names"].index(ALTERED)
            flat = flat.clone()
            flat[sum(sizes[:i])] ^= 0xFF
        return start(self, pool, urls, flat, fields)

    errors = {}
    start, write = weight_sync.DistributedWeightSync._start, ShardWriter.write
    weight_sync.DistributedWeightSync._start = start_altered
    ShardWriter.write = lambda self, bucket: write(self, altered(bucket))
    try:
        for kind, sync in (("disk", disk), ("distributed", distributed)):
            try:
                sync.sync(chunks, config.model, config.parallel, urls, version)
                errors[kind] = None
            except ServerError as exc:
                errors[kind] = str(exc)
    finally:
        weight_sync.DistributedWeightSync._start, ShardWriter.write = start, write
    return errors


def _pp_scenario(rank, name, model_dir, urls, export_dir):
    """A PP=2 learner (two senders) trains one step and syncs with the check on."""
    from megatron_vespo.rollout.weight_sync import DistributedWeightSync
    from megatron_vespo.trainer import build_learner

    config = _config(name, model_dir)
    learner = build_learner(config)
    _train_step(learner, [(p, [1, 2, 3, 4]) for p in PROMPTS])
    sync = DistributedWeightSync(bucket_bytes=16 << 10, timeout_s=120, master_address="127.0.0.1",
                                 check=True)
    sync.sync([c.module for c in learner.chunks], config.model, config.parallel, urls, 10)
    sender = sync._group is not None
    sync.close()
    return {"sender": sender, "versions": [weight_version(u) for u in urls] if rank == 0 else None}


def _scenario(rank, name, model_dir, urls, export_dir):
    """The phases of the module docstring; rank 0 returns what the servers and the learner said."""
    import torch.distributed as dist

    from megatron_vespo.trainer import build_learner
    from megatron_vespo.rollout.weight_sync import DiskWeightSync, DistributedWeightSync

    moe = name == "moe"
    config = _config(name, model_dir)
    learner = build_learner(config)
    chunks = [c.module for c in learner.chunks]
    disk = DiskWeightSync(export_dir, check=True, shard_bytes=64 << 10)  # SGLang reads shards + index
    distributed = DistributedWeightSync(bucket_bytes=64 << 10, timeout_s=120,
                                        master_address="127.0.0.1", check=True)
    phases, first, group = [], None, None
    for version in range(len(PHASES)):
        if version == 1:
            disk.sync(chunks, config.model, config.parallel, urls, version)
        elif version >= 2:
            distributed.sync(chunks, config.model, config.parallel, urls, version)
            if rank == 0:
                group = group or distributed._group.group
                assert distributed._group.group is group, "the update group was made again"
        served = None
        if rank == 0:
            served = {"versions": [weight_version(u) for u in urls],
                      "generated": [[_generate(u, p, moe) for p in PROMPTS] for u in urls]}
            fixed = first or [(p, g["response"]) for p, g in zip(PROMPTS, served["generated"][0])]
            served["scored"] = [[_score(u, p, r) for p, r in fixed] for u in urls]
            if version == 0:
                served["hot"] = [_generate(urls[0], p, moe, temperature=HOT) for p in PROMPTS]
            if version == 1:
                served["export_files"] = sorted(os.listdir(export_dir))
        box = [served]
        dist.broadcast_object_list(box, src=0)
        served = box[0]
        fresh = [(p, g["response"]) for p, g in zip(PROMPTS, served["generated"][0])]
        first = first or fresh
        # Every server's own samples, and the phase-0 sequences, through the learner.
        served["learner_generated"] = [_learner_view(learner, [(p, g["response"]) for p, g in
                                                               zip(PROMPTS, gens)], moe)
                                       for gens in served["generated"]]
        served["learner_first"] = _learner_view(learner, first, moe)
        if version == 0:  # samples drawn at a temperature other than 1, through the learner at T
            hot = [(p, g["response"]) for p, g in zip(PROMPTS, served["hot"])]
            served["learner_hot"] = {t: _learner_view_at(learner, t, hot, moe) for t in (HOT, 1.0)}
        phases.append(served)
        if version + 1 < len(PHASES):
            _train_step(learner, fresh)
    corrupted = _corrupted_syncs(chunks, config, urls, disk, distributed, len(PHASES))
    distributed.close()
    return {"phases": phases, "corrupted": corrupted}


# ------------------------------------------------------------------------------------------------
# Fixtures: the exported models, the servers, one run of the learner ranks
# ------------------------------------------------------------------------------------------------


def _free_server_ports(count):
    ports = []
    for port in range(31000, 32000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("no free ports in 31000-31999")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """name -> (model dir, [server URLs]); the servers are stopped at the end of the module."""
    pytest.importorskip("sglang")
    root = tmp_path_factory.mktemp("rollout_weights")
    dirs = {name: str(root / f"{name}-v0") for name in SERVERS}
    run_ranks(export_worker, 2, list(dirs.items()))
    ports = iter(_free_server_ports(sum(SERVERS.values())))
    servers = {name: [SGLangServer(dirs[name], next(ports),
                                   ServerOptions(enable_routed_experts=name == "moe",
                                                 max_total_tokens=4096),
                                   root / f"{name}-{k}.log")
                      for k in range(count)] for name, count in SERVERS.items()}
    try:
        for group in servers.values():
            for server in group:
                server.wait_healthy()
        yield {name: (dirs[name], [s.url for s in group]) for name, group in servers.items()}
    finally:
        for group in servers.values():
            for server in group:
                server.stop()


@pytest.fixture(scope="module")
def record(fleet, tmp_path_factory):
    """name -> what the scenario recorded (both models in one spawn of the learner ranks)."""
    jobs = [(name, model_dir, urls, str(tmp_path_factory.mktemp(f"{name}-sync") / "weights"))
            for name, (model_dir, urls) in fleet.items()]
    jobs.append(("dense-pp2", *jobs[0][1:]))  # the dense servers, now from two senders
    ranks = run_ranks(scenario_worker, 2, jobs)
    return {**ranks[0], "ranks": ranks}


def _max_diff(a, b):
    assert len(a) == len(b)
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def _served_vs_learner(phase):
    """Largest |served - learner| log-prob over every server's samples and the phase-0 scores."""
    worst = 0.0
    for gens, views in zip(phase["generated"], phase["learner_generated"]):
        for g, v in zip(gens, views):
            worst = max(worst, _max_diff(g["logprobs"], v["logprobs"]))
    for scores in phase["scored"]:
        for s, v in zip(scores, phase["learner_first"]):
            worst = max(worst, _max_diff(s, v["logprobs"]))
    return worst


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SERVERS))
def test_served_logprobs_match_learner(name, record):
    phase = record[name]["phases"][0]
    diff = _served_vs_learner(phase)
    print(f"{name}: max |served - learner| log-prob at version 0: {diff:.2e}")
    assert diff < LOGPROB_TOL
    assert {g["version"] for gens in phase["generated"] for g in gens} == set(phase["versions"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SERVERS))
def test_learner_logprobs_follow_the_sampling_temperature(name, record):
    """SGLang reports log-probs of softmax(logits / T) for samples drawn at T; the learner at
    temperature T computes the same, and at T = 1 it would not."""
    phase = record[name]["phases"][0]
    served = [g["logprobs"] for g in phase["hot"]]
    at_t = max(_max_diff(s, v["logprobs"]) for s, v in zip(served, phase["learner_hot"][HOT]))
    at_one = max(_max_diff(s, v["logprobs"]) for s, v in zip(served, phase["learner_hot"][1.0]))
    print(f"{name}: samples at T = {HOT}: max |served - learner| log-prob {at_t:.2e} with the "
          f"learner at T = {HOT}, {at_one:.2e} at T = 1")
    assert at_t < LOGPROB_TOL
    assert at_one > 100 * LOGPROB_TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SERVERS))
@pytest.mark.parametrize("version", [1, 2, 3], ids=PHASES[1:])
def test_weight_sync_serves_new_weights(name, version, record):
    """After each sync every server reports the version and serves the learner's new weights:
    its log-probs match the learner's forward and moved away from the previous version's."""
    phases = record[name]["phases"]
    phase, before = phases[version], phases[version - 1]
    assert phase["versions"] == [str(version)] * SERVERS[name]
    assert {g["version"] for gens in phase["generated"] for g in gens} == {str(version)}
    if version == 1:  # the servers loaded a sharded export: several files and the index
        assert "model.safetensors.index.json" in phase["export_files"], phase["export_files"]
        assert len([f for f in phase["export_files"] if f.endswith(".safetensors")]) > 2
    diff = _served_vs_learner(phase)
    moved = max(_max_diff(a, b) for new, old in zip(phase["scored"], before["scored"])
                for a, b in zip(new, old))
    print(f"{name} after the {PHASES[version]} sync: max |served - learner| log-prob {diff:.2e}, "
          f"served log-probs of the phase-0 sequences moved by up to {moved:.2e}")
    assert diff < LOGPROB_TOL
    assert moved > 100 * LOGPROB_TOL, f"served log-probs barely moved ({moved:.2e})"


@pytest.mark.slow
def test_routed_experts_match_megatron_router(record):
    """`return_routed_experts` gives [P + R - 1, layers, top_k] per sample; the expert sets agree
    with the megatron router's top-k on the same tokens."""
    from megatron_vespo.rollout.routed_experts import decode_routed_experts

    config = _config("moe")
    layers, k = config.model.num_hidden_layers, config.model.num_experts_per_tok
    agree = total = 0
    for phase in record["moe"]["phases"]:
        for prompt, g, view in zip(PROMPTS, phase["generated"][0], phase["learner_generated"][0]):
            assert g["routed"] is not None, "the server ignored return_routed_experts"
            tokens = len(prompt) + len(g["response"]) - 1
            served = decode_routed_experts(g["routed"], tokens, layers)
            assert served.shape == (tokens, layers, k)
            same = (np.sort(served, axis=-1) == np.sort(view["experts"], axis=-1)).all(axis=-1)
            agree += int(same.sum())
            total += same.size
    rate = agree / total
    print(f"routed experts: {agree}/{total} (token, layer) pairs agree = {rate:.4f}")
    assert rate >= 0.99


# ------------------------------------------------------------------------------------------------
# Without servers: buckets and the version check
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SERVERS))
def test_a_corrupted_update_fails_naming_the_tensor_and_the_server(name, record, fleet):
    """The check compares every server's parameters with the learner's: a tensor altered on its way
    (in the disk export, in the broadcast) fails the sync on every rank, naming the SGLang
    parameter, the HF tensor it holds and each server."""
    urls = fleet[name][1]
    for rank_result in record["ranks"]:
        for kind, message in rank_result[name]["corrupted"].items():
            assert message is not None, f"{name}: the altered {kind} sync passed the check"
            assert ALTERED in message, message
            assert all(url in message for url in urls), message


@pytest.mark.slow
def test_two_pipeline_stages_stream_in_parallel_into_the_servers(record, fleet):
    """PP=2: both stages send (one update group each), and the check finds the servers holding
    exactly the learner's parameters."""
    assert [r["dense-pp2"]["sender"] for r in record["ranks"]] == [True, True]
    assert record["dense-pp2"]["versions"] == ["10"] * SERVERS["dense"]


def test_a_flat_bucket_lays_tensors_back_to_back():
    from megatron_vespo.learner.hf_files import FlatBucket

    a, b = torch.randn(2, 2), torch.randn(3)
    bucket = FlatBucket.of([("x", a.t()), ("y", b)])
    assert bucket.flat.dtype == torch.uint8 and bucket.nbytes == 7 * 4
    assert bucket.fields() == {"names": ["x", "y"], "dtypes": ["float32", "float32"],
                               "shapes": [[2, 2], [3]], "load_format": "flattened_bucket"}
    assert torch.equal(bucket.flat.view(torch.float32)[:4].reshape(2, 2), a.t())
    assert torch.equal(bucket.flat.view(torch.float32)[4:], b)
    assert all(t.untyped_storage().data_ptr() == bucket.flat.untyped_storage().data_ptr()
               for _, t in bucket.tensors)


def test_version_check_names_the_lagging_server(monkeypatch):
    reported = {"http://a:1": "3", "http://b:2": "2"}
    monkeypatch.setattr(weight_sync, "weight_version", reported.__getitem__)
    weight_sync.check_versions(["http://a:1"], 3)
    with pytest.raises(ServerError, match=r"version 3 .*'http://b:2': '2'"):
        weight_sync.check_versions(list(reported), 3)
