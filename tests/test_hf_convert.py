"""HF <-> megatron-core weight conversion for qwen2 / qwen3 / qwen3_moe / qwen2_moe.

Tiny models are built locally with transformers (random weights, fp32), saved with
`save_pretrained`, and then:

* converted to the canonical megatron state and back bit-exactly, and written back as a checkpoint
  that transformers loads with the same logits (no processes spawned);
* loaded into real megatron GPTModel chunks at TP=1, TP=2 (MoE: with sequence parallelism and
  expert TP 2), EP=2, PP=2 and PP=2 x VPP=2 (one spawn of two ranks for all of them), and TP x EP x
  PP combinations (one spawn of four ranks), whose logits must match the transformers forward;
  then gathered and exported again, bit-exactly, and the export reloaded by transformers;
* fed bad input: config/tensor mismatches and missing tensors must raise naming the field or the
  tensor and shapes, leave the model untouched, and a failed export must leave nothing behind.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_vespo.learner.hf_config import (
    CheckpointError,
    check_same_architecture,
    hf_config_from_model,
    model_config_from_hf,
)
from megatron_vespo.learner.hf_files import load_hf_checkpoint, save_hf_checkpoint
from megatron_vespo.learner.state_adapter import (
    hf_tensor_shapes,
    hf_to_megatron,
    megatron_tensor_shapes,
    megatron_to_hf,
)
from megatron_vespo.learner.model import ModelConfig
from tests.distributed import run_ranks

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

FAMILIES = ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe")
BATCH, SEQ = 2, 8
LOGIT_TOL = 1e-5


def hf_config(family: str, **changes):
    common = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rms_norm_eps=1e-6,
                  max_position_embeddings=256,
                  rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    per_family = {
        "qwen2": (transformers.Qwen2Config, dict(intermediate_size=96)),
        "qwen3": (transformers.Qwen3Config, dict(intermediate_size=96)),
        # Qwen3-MoE checkpoints renormalise the top-k weights; Qwen1.5-MoE (qwen2_moe) does not.
        "qwen3_moe": (transformers.Qwen3MoeConfig, dict(moe, norm_topk_prob=True)),
        "qwen2_moe": (transformers.Qwen2MoeConfig,
                      dict(moe, norm_topk_prob=False, shared_expert_intermediate_size=48)),
    }
    cls, extra = per_family[family]
    return cls(**{**common, **extra, **changes})


def make_checkpoint(directory, family: str, seed: int, **changes):
    """A randomly initialised tiny transformers model saved in fp32; returns the model."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **changes),
                                                          dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm scales near 1, not all equal
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=g))
            else:  # biases and matrices; the routers must not tie (HF initialises them to 0)
                param.copy_(0.08 * torch.randn(param.shape, generator=g))
    model.eval()
    model.save_pretrained(directory)
    return model


def input_ids(vocab: int = 160) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(1234))


def hf_logits(model_or_dir) -> torch.Tensor:
    model = model_or_dir
    if not isinstance(model, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids(model.config.vocab_size)).logits.float()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family (and a few variants) -> (checkpoint dir, reference logits from transformers)."""
    root = tmp_path_factory.mktemp("hf")
    specs = {family: (family, {}) for family in FAMILIES}
    specs["qwen3_4layers"] = ("qwen3", dict(num_hidden_layers=4))  # for PP x VPP
    specs["qwen2_tied"] = ("qwen2", dict(tie_word_embeddings=True))
    specs["qwen3_moe_wide"] = ("qwen3_moe", dict(hidden_size=128))  # a mismatching checkpoint
    out = {}
    for seed, (name, (family, changes)) in enumerate(specs.items()):
        model = make_checkpoint(root / name, family, seed, **changes)
        out[name] = (str(root / name), hf_logits(model))
    return out


# ------------------------------------------------------------------------------------------------
# Without megatron processes: config, conversion, directories, bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trip(family, checkpoints):
    directory, _ = checkpoints[family]
    saved = json.loads(open(os.path.join(directory, "config.json")).read())
    cfg = model_config_from_hf(saved)
    expect = dict(family=family, vocab_size=160, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
                  rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=False,
                  params_dtype="float32")
    if family.endswith("_moe"):
        expect.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=family == "qwen3_moe",
                      shared_expert_intermediate_size=48 if family == "qwen2_moe" else 0)
    else:
        expect["intermediate_size"] = 96
    assert {k: getattr(cfg, k) for k in expect} == expect
    # ours -> dict -> ModelConfig is the identity, and transformers reads our dict the same way.
    written = hf_config_from_model(cfg)
    assert model_config_from_hf(written) == cfg
    hf_cfg = transformers.AutoConfig.for_model(**written)
    assert type(hf_cfg).__name__ == type(hf_config(family)).__name__
    assert model_config_from_hf(hf_cfg.to_dict()) == cfg
    assert model_config_from_hf(saved, spec="local", params_dtype="bfloat16").params_dtype == "bfloat16"


def test_unsupported_config_fields_are_named():
    base = hf_config_from_model(ModelConfig(family="qwen3"))
    for change, field in [({"hidden_act": "gelu"}, "hidden_act"),
                          ({"use_sliding_window": True}, "use_sliding_window"),
                          ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
                          ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "model_type")]:
        with pytest.raises(CheckpointError, match=field):
            model_config_from_hf({**base, **change})
    missing = dict(base)
    del missing["hidden_size"]
    with pytest.raises(CheckpointError, match="hidden_size"):
        model_config_from_hf(missing)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_state_round_trip_and_layout(family, checkpoints):
    directory, _ = checkpoints[family]
    cfg, hf_state = load_hf_checkpoint(directory)
    full = hf_to_megatron(hf_state, cfg)
    assert {n: tuple(t.shape) for n, t in full.items()} == megatron_tensor_shapes(cfg)
    back = megatron_to_hf(full, cfg)
    assert list(back) == list(hf_tensor_shapes(cfg)) and set(back) == set(hf_state)
    assert all(torch.equal(back[n], hf_state[n]) for n in hf_state)

    # Megatron's fused QKV: per query group, that group's query heads, then its key, then its value.
    d, groups, per_group = cfg.head_dim, cfg.num_key_value_heads, cfg.num_attention_heads // 2
    attn = "model.layers.1.self_attn."
    qkv = full["decoder.layers.1.self_attention.linear_qkv.weight"].reshape(groups, per_group + 2, d, -1)
    q = hf_state[attn + "q_proj.weight"].reshape(groups, per_group, d, -1)
    assert torch.equal(qkv[:, :per_group], q)
    assert torch.equal(qkv[:, per_group], hf_state[attn + "k_proj.weight"].reshape(groups, d, -1))
    assert torch.equal(qkv[:, per_group + 1], hf_state[attn + "v_proj.weight"].reshape(groups, d, -1))
    if cfg.qkv_bias:
        bias = full["decoder.layers.1.self_attention.linear_qkv.bias"].reshape(groups, per_group + 2, d)
        assert torch.equal(bias[:, per_group], hf_state[attn + "k_proj.bias"].reshape(groups, d))
    mlp = "model.layers.0.mlp." + ("experts.3." if cfg.is_moe else "")
    expert = "experts.local_experts.3." if cfg.is_moe else ""
    fc1 = full[f"decoder.layers.0.mlp.{expert}linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([hf_state[mlp + "gate_proj.weight"], hf_state[mlp + "up_proj.weight"]]))
    if cfg.is_moe:
        assert torch.equal(full["decoder.layers.0.mlp.router.weight"],
                           hf_state["model.layers.0.mlp.gate.weight"])


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_loads_in_transformers(family, checkpoints, tmp_path):
    directory, reference = checkpoints[family]
    cfg, hf_state = load_hf_checkpoint(directory)
    out = save_hf_checkpoint(tmp_path / "out", cfg, megatron_to_hf(hf_to_megatron(hf_state, cfg), cfg))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert torch.equal(hf_logits(model), reference)


def test_sharded_index_round_trip(checkpoints, tmp_path):
    directory, reference = checkpoints["qwen3_moe"]
    cfg, hf_state = load_hf_checkpoint(directory)
    out = save_hf_checkpoint(tmp_path / "sharded", cfg, hf_state, max_shard_bytes=64 * 1024)
    shards = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in os.listdir(out)
    cfg2, state2 = load_hf_checkpoint(out)
    assert cfg2 == cfg and all(torch.equal(state2[n], hf_state[n]) for n in hf_state)
    assert torch.equal(hf_logits(str(out)), reference)
    # An index that points at a shard file that is not there.
    os.remove(out / sorted(shards)[0])
    with pytest.raises(CheckpointError, match="shard files that do not exist"):
        load_hf_checkpoint(out)


def test_tied_embeddings(checkpoints, tmp_path):
    directory, reference = checkpoints["qwen2_tied"]
    cfg, hf_state = load_hf_checkpoint(directory)
    assert cfg.tie_word_embeddings and "lm_head.weight" not in hf_state
    full = hf_to_megatron(hf_state, cfg)
    assert "output_layer.weight" not in full
    out = save_hf_checkpoint(tmp_path / "tied", cfg, megatron_to_hf(full, cfg))
    assert torch.equal(hf_logits(str(out)), reference)


def test_local_and_transformer_engine_names():
    """Both megatron specs map onto the same canonical names (layer and expert offsets applied)."""
    from megatron_vespo.parallel.sharded_state import canonical_name

    cfg = ModelConfig(family="qwen3_moe", num_experts=8)
    for local, canonical in [
            ("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
             "decoder.layers.5.input_layernorm.weight"),
            ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
             "decoder.layers.4.pre_mlp_layernorm.weight"),
            ("decoder.layers.0.pre_mlp_layernorm.weight", "decoder.layers.4.pre_mlp_layernorm.weight"),
            ("decoder.layers.1.mlp.experts.linear_fc1.weight3",
             "decoder.layers.5.mlp.experts.local_experts.7.linear_fc1.weight"),
            ("decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight",
             "decoder.layers.5.mlp.experts.local_experts.7.linear_fc2.weight"),
            ("decoder.final_layernorm.weight", "decoder.final_layernorm.weight"),
            ("output_layer.weight", "output_layer.weight")]:
        assert canonical_name(local, 4, 4, cfg.tie_word_embeddings) == canonical
    assert canonical_name("output_layer.weight", 0, 0, True) == "embedding.word_embeddings.weight"


def test_checkpoint_config_tensor_mismatch_names_tensor(checkpoints, tmp_path):
    """config.json edited to a different hidden size: the error names tensors and both shapes."""
    directory, _ = checkpoints["qwen3"]
    bad = tmp_path / "bad"
    bad.mkdir()
    os.link(os.path.join(directory, "model.safetensors"), bad / "model.safetensors")
    config = json.loads(open(os.path.join(directory, "config.json")).read())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(bad)
    assert "model.embed_tokens.weight: expected shape (160, 128), found (160, 64)" in str(err.value)


def test_missing_and_unexpected_tensors_are_named(checkpoints, tmp_path):
    directory, _ = checkpoints["qwen2_moe"]
    cfg, hf_state = load_hf_checkpoint(directory)
    missing = "model.layers.1.mlp.experts.2.up_proj.weight"
    broken = {n: t for n, t in hf_state.items() if n != missing}
    broken["model.layers.0.mlp.bogus.weight"] = torch.zeros(2)
    (tmp_path / "ckpt").mkdir()
    safetensors_torch.save_file(broken, str(tmp_path / "ckpt" / "model.safetensors"))
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(hf_config_from_model(cfg)))
    for call in (lambda: load_hf_checkpoint(tmp_path / "ckpt"), lambda: hf_to_megatron(broken, cfg)):
        with pytest.raises(CheckpointError) as err:
            call()
        assert f"missing tensors (1): {missing}" in str(err.value)
        assert "unexpected tensors (1): model.layers.0.mlp.bogus.weight" in str(err.value)
    wrong_full = hf_to_megatron(hf_state, cfg)
    wrong_full["decoder.layers.0.mlp.router.weight"] = torch.zeros(3, 64)
    with pytest.raises(CheckpointError, match=r"decoder.layers.0.mlp.router.weight: expected shape "
                                              r"\(4, 64\), found \(3, 64\)"):
        megatron_to_hf(wrong_full, cfg)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(hf_config_from_model(cfg)))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_checkpoint(tmp_path / "empty")


def test_architecture_mismatch_names_field(checkpoints):
    wide, _ = load_hf_checkpoint(checkpoints["qwen3_moe_wide"][0])
    model_cfg, _ = load_hf_checkpoint(checkpoints["qwen3_moe"][0])
    with pytest.raises(CheckpointError, match=r"hidden_size: checkpoint has 128, model has 64"):
        check_same_architecture(wide, model_cfg)


def test_failed_save_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    cfg, hf_state = load_hf_checkpoint(checkpoints["qwen3"][0])
    # Invalid state: rejected before anything is created.
    incomplete = dict(hf_state)
    del incomplete["model.norm.weight"]
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        save_hf_checkpoint(tmp_path / "a", cfg, incomplete)
    assert os.listdir(tmp_path) == []

    # A failure half-way through writing: no target, no temporary directory left.
    from megatron_vespo.learner.hf_files import ShardWriter

    def failing_save(self, bucket):
        with open(self.staging / "part-00000.safetensors", "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ShardWriter, "write", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(tmp_path / "b", cfg, hf_state)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    # Overwriting: a failed save keeps the previous checkpoint intact.
    save_hf_checkpoint(tmp_path / "c", cfg, hf_state)
    before = {f: open(tmp_path / "c" / f, "rb").read() for f in os.listdir(tmp_path / "c")}
    with pytest.raises(FileExistsError):
        save_hf_checkpoint(tmp_path / "c", cfg, hf_state)
    monkeypatch.setattr(ShardWriter, "write", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(tmp_path / "c", cfg, hf_state, overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c"]
    assert {f: open(tmp_path / "c" / f, "rb").read() for f in os.listdir(tmp_path / "c")} == before


# ------------------------------------------------------------------------------------------------
# Real megatron models on two ranks
# ------------------------------------------------------------------------------------------------

DENSE_LAYOUTS = {"tp1": {}, "tp2": dict(tp=2), "pp2": dict(pp=2)}
# MoE with TP: sequence parallel, experts split over TP too (etp = tp, required with ep = 1).
MOE_LAYOUTS = {"tp1": {}, "tp2": dict(tp=2, sequence_parallel=True), "ep2": dict(ep=2),
               "pp2": dict(pp=2)}
CASES = [(family, name, kw) for family in FAMILIES
         for name, kw in (MOE_LAYOUTS if family.endswith("_moe") else DENSE_LAYOUTS).items()]
CASES += [("qwen3_4layers", "pp2_vpp2", dict(pp=2, vpp=2)), ("qwen2_tied", "tp2", dict(tp=2))]
# Four ranks: every kind of group at once (TP and expert groups inside pipeline stages).
CASES_4 = [("qwen2_moe", "tp2_ep2_pp2", dict(tp=2, ep=2, etp=1, pp=2, sequence_parallel=True)),
           # ETP x EP with the alltoall dispatcher needs an uneven all-gather that gloo lacks
           # (a CPU-shim gap); the allgather dispatcher runs the same weights.
           ("qwen3_moe", "tp2_ep2_etp2", dict(tp=2, ep=2, etp=2, sequence_parallel=True,
                                               model=dict(moe_token_dispatcher="allgather"))),
           ("qwen3_4layers", "tp2_pp2_vpp2", dict(tp=2, pp=2, vpp=2))]


def _forward(chunks, cfg, layout, ids):
    """Full-vocab logits on the last pipeline stage (None elsewhere): stages run in order, the
    hidden state passed on with send/recv; TP vocab shards all-gathered."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp, pp, pp_rank = (ps.get_tensor_model_parallel_world_size(),
                       ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank())
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    seq = ids.shape[1] // tp if layout.sequence_parallel else ids.shape[1]
    out = None
    with torch.no_grad():
        for v, chunk in enumerate(chunks):
            chunk.eval()
            if not (v == 0 and pp_rank == 0):
                hidden = torch.empty(seq, ids.shape[0], cfg.hidden_size)
                dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
                chunk.set_input_tensor(hidden)
            out = chunk(ids, positions, None)
            if not (v == len(chunks) - 1 and pp_rank == pp - 1):
                dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
    if pp_rank != pp - 1:
        return None
    pieces = [torch.empty_like(out) for _ in range(tp)]
    dist.all_gather(pieces, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1)


def _build(cfg, layout):
    from megatron.core import tensor_parallel

    from megatron_vespo.learner.model import build_model_chunks

    layout.initialize()
    torch.manual_seed(7)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    return build_model_chunks(cfg, layout)


def _snapshot(chunks):
    return [p.detach().clone() for chunk in chunks for p in chunk.parameters()]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def worker(rank, world_size, cases, checkpoints, ids, out_root, error_case=None):
    import dataclasses

    import torch.distributed as dist

    from megatron_vespo.learner.hf_config import CheckpointError
    from megatron_vespo.learner.hf_convert import export_model_to_hf, hf_buckets, load_hf_into_model
    from megatron_vespo.learner.hf_files import load_hf_checkpoint
    from megatron_vespo.learner.init_weights import init_weights, initial_tensor
    from megatron_vespo.learner.state_adapter import canonical_state, hf_to_megatron, megatron_to_hf
    from megatron_vespo.parallel.layout import ParallelLayout
    from megatron_vespo.parallel.sharded_state import (ShardMismatch, gather_full_state, load_full_state,
                                                       plan_stream)

    results = {}
    for family, name, kw in cases:
        directory = checkpoints[family]
        kw = dict(kw)
        model_overrides = kw.pop("model", {})
        layout = ParallelLayout(**kw)
        cfg, hf_state = load_hf_checkpoint(directory, spec="local", **model_overrides)
        chunks = _build(cfg, layout)
        # The seeded initial model, gathered from this layout, is the canonical one.
        init_weights(chunks, cfg, layout, seed=5)
        initial = gather_full_state(chunks, canonical_state(cfg), layout)
        init_exact = None if initial is None else all(
            torch.equal(t, initial_tensor(n, tuple(t.shape), cfg, seed=5)) for n, t in initial.items())
        load_hf_into_model(directory, chunks, cfg, layout)
        logits = _forward(chunks, cfg, layout, ids)
        diff = None if logits is None else (logits - checkpoints[family + ":logits"]).abs().max().item()

        full = gather_full_state(chunks, canonical_state(cfg), layout)
        export = os.path.join(out_root, f"{family}-{name}")
        # Small shards: every sender writes several files, published with one index.
        export_model_to_hf(export, chunks, cfg, layout, max_shard_bytes=16 << 10)
        result = dict(diff=diff, init_exact=init_exact)
        if rank == 0:
            gathered = megatron_to_hf(full, cfg)
            _, exported = load_hf_checkpoint(export)
            result.update(
                gathered_exact=set(gathered) == set(hf_state)
                and all(torch.equal(gathered[n], hf_state[n]) for n in hf_state),
                exported_exact=set(exported) == set(hf_state)
                and all(torch.equal(exported[n], hf_state[n]) for n in hf_state),
                export_files=sorted(os.listdir(export)), export_dir=export)
        results[(family, name)] = result

        if (family, name) == error_case:  # bad input against a live sharded model
            before = _snapshot(chunks)
            errors = {}
            try:
                load_hf_into_model(checkpoints["qwen3_moe_wide"], chunks, cfg, layout)
            except CheckpointError as exc:
                errors["wide"] = str(exc)
            full = hf_to_megatron(hf_state, cfg)
            expert = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
            for key, state in (
                    ("missing", {n: t for n, t in full.items() if n != expert}),
                    ("shape", {**full, expert: full[expert][:-2]})):
                try:
                    load_full_state(chunks, {n: t + 1 for n, t in state.items()}, canonical_state(cfg), layout)
                except ShardMismatch as exc:
                    errors[key] = str(exc)
            # A model built for another config: the parameters that do not fit are named.
            other = dataclasses.replace(cfg, moe_intermediate_size=48)
            try:
                load_full_state(chunks, {n: torch.zeros(s) for n, s in
                                         canonical_state(other).shapes.items()}, canonical_state(other), layout)
            except ShardMismatch as exc:
                errors["model"] = str(exc)
            try:  # the same from gather_full_state: every rank raises, none is left waiting
                gather_full_state(chunks, canonical_state(other), layout)
            except ShardMismatch as exc:
                errors["gather"] = str(exc)
            # Export onto an existing directory fails on rank 0 and raises on every rank.
            try:
                export_model_to_hf(export, chunks, cfg, layout)
            except Exception as exc:  # noqa: BLE001
                errors["export"] = f"{type(exc).__name__}: {exc}"
            errors["untouched"] = _same(before, _snapshot(chunks))
            results["errors"] = errors
            # bf16 weights with fp32 norms, in buckets large enough for the whole model: one
            # bucket per dtype on each sender (the norms of every layer do not cut the bf16 ones).
            cfg16 = dataclasses.replace(cfg, params_dtype="bfloat16")
            plan = plan_stream(_build(cfg16, layout), canonical_state(cfg16), layout)
            results["bucket_dtypes"] = [b.tensors[0][1].dtype for b in hf_buckets(plan, cfg16, 1 << 30)]
        dist.barrier()
    return results


def _spawn(world_size, cases, checkpoints, out_root, error_case=None):
    paths = {name: directory for name, (directory, _) in checkpoints.items()}
    paths.update({f"{name}:logits": logits for name, (_, logits) in checkpoints.items()})
    return run_ranks(worker, world_size, cases, paths, input_ids(), str(out_root), error_case)


@pytest.fixture(scope="module")
def two_rank_results(checkpoints, tmp_path_factory):
    return _spawn(2, CASES, checkpoints, tmp_path_factory.mktemp("exported2"),
                  error_case=("qwen3_moe", "tp2"))


@pytest.fixture(scope="module")
def four_rank_results(checkpoints, tmp_path_factory):
    return _spawn(4, CASES_4, checkpoints, tmp_path_factory.mktemp("exported4"))


def _check_case(results, family, layout, checkpoints):
    diffs = [r[(family, layout)]["diff"] for r in results if r[(family, layout)]["diff"] is not None]
    assert diffs and max(diffs) <= LOGIT_TOL, f"max |logit diff| {diffs} for {family} {layout}"
    head = results[0][(family, layout)]
    assert head["gathered_exact"], "gather_full_state -> megatron_to_hf differs from the checkpoint"
    assert head["exported_exact"], "the exported checkpoint differs from the loaded one"
    shards = [f for f in head["export_files"] if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in head["export_files"], head["export_files"]
    assert not [f for f in os.listdir(os.path.dirname(head["export_dir"])) if f.startswith(".")], \
        "a staging directory was left behind"
    assert torch.equal(hf_logits(head["export_dir"]), checkpoints[family][1])


@pytest.mark.slow
@pytest.mark.parametrize("family,layout", [(f, n) for f, n, _ in CASES])
def test_megatron_logits_and_round_trip(family, layout, two_rank_results, checkpoints):
    _check_case(two_rank_results, family, layout, checkpoints)


@pytest.mark.slow
@pytest.mark.parametrize("family,layout", [(f, n) for f, n, _ in CASES_4])
def test_megatron_combined_layouts(family, layout, four_rank_results, checkpoints):
    _check_case(four_rank_results, family, layout, checkpoints)


@pytest.mark.slow
def test_seeded_initial_model_does_not_depend_on_the_layout(two_rank_results, four_rank_results):
    """One seed, one model: each layout's shards of `init_weights` gather to the canonical tensors
    drawn per name (TP, SP, EP, ETP, PP, VPP and their combinations)."""
    for results, cases in ((two_rank_results, CASES), (four_rank_results, CASES_4)):
        for family, layout, _ in cases:
            assert results[0][(family, layout)]["init_exact"], (family, layout)


@pytest.mark.slow
def test_bad_input_against_live_model(two_rank_results):
    for rank, result in enumerate(two_rank_results):
        errors = result["errors"]
        assert "hidden_size: checkpoint has 128, model has 64" in errors["wide"]
        expert = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
        assert f"missing tensor {expert}" in errors["missing"]
        assert f"{expert}: expected shape (64, 64), found (62, 64)" in errors["shape"]
        # Expert fc1 with ETP=2: the local slice is [gate_r; up_r] of 2 x 48 / 2 rows.
        assert "expected local shape (48, 64) from the config, model has (32, 64)" in errors["model"]
        assert "expected local shape (48, 64) from the config, model has (32, 64)" in errors["gather"]
        assert "exists" in errors["export"], errors["export"]
        assert errors["untouched"], f"rank {rank}: a failed load modified the model"


def test_each_dtype_streams_in_one_bucket(two_rank_results):
    sender = two_rank_results[0]["bucket_dtypes"]  # TP2: rank 0 sends the whole model
    assert sorted(map(str, sender)) == ["torch.bfloat16", "torch.float32"], sender
    assert two_rank_results[1]["bucket_dtypes"] == []
