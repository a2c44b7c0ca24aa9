"""The megatron-core CPU shim (patches/): every gap is real upstream, every patch bridges it, and a
local-spec GPTModel (dense and MoE) trains on CPU over gloo under TP+SP, EP and PP.

The shim is process-global, so nothing here applies it in the pytest process: the probes run in a
fresh interpreter, the training in spawned gloo ranks (`run_ranks` applies it in each child).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
import torch

from tests.distributed import run_ranks

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU shim is a no-op where CUDA is available"
)

ROOT = Path(__file__).resolve().parents[1]

# Order matches megatron_core_cpu.PATCHES; the test below checks that it stays in sync.
PATCH_NAMES = (
    "current_device",
    "streams",
    "rng_tracker",
    "norm_sequence_parallel",
    "router_te_general_gemm",
    "alltoall_split_sizes",
    "cuda_literals",
    "tensor_type_checks",
    "uneven_all_gather",
)

# ---------------------------------------------------------------------------------------------
# (a) probes, in a fresh interpreter
# ---------------------------------------------------------------------------------------------

_PROBE_SCRIPT = textwrap.dedent(
    r'''
    import importlib, json, sys, traceback, warnings
    warnings.simplefilter("ignore")
    import numpy as np
    import torch
    from megatron_vespo import patches
    from megatron_vespo.patches import megatron_core_cpu as shim

    def probes():
        return {p.name: p.probe() for p in shim.PATCHES}

    report = {"names": [p.name for p in shim.PATCHES], "upstream": shim.UPSTREAM_VERSION}
    import megatron.core
    report["installed"] = megatron.core.__version__

    # A CUDA machine: apply_cpu_patches() must leave everything alone.
    real_is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    patches.apply_cpu_patches()
    torch.cuda.is_available = real_is_available
    report["with_cuda"] = probes()

    # Upstream as installed, then one patch at a time: each closes exactly its own gap.
    report["before"] = probes()
    report["steps"] = []
    for patch in shim.PATCHES:
        patch.apply()
        report["steps"].append(probes())

    def patched_objects():
        from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
        from megatron.core.tensor_parallel import random
        from megatron.core.transformer.moe import moe_utils, token_dispatcher
        from megatron.core.transformer.torch_norm import WrappedTorchNorm
        objs = [torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.Stream,
                random.CudaRNGStatesTracker, random._get_cuda_rng_state,
                WrappedTorchNorm.__dict__["__new__"], moe_utils.te_general_gemm,
                token_dispatcher.maybe_move_tensor_to_cpu,
                distrib_optimizer.DistributedOptimizer.__dict__[
                    "_build_model_and_main_param_groups"].__func__,
                optimizer.Float16OptimizerWithFloat16Params.__init__,
                clip_grads.clip_grad_by_total_norm_fp32, optimizer.clip_grad_by_total_norm_fp32]
        from megatron.core.tensor_parallel import mappings
        objs.append(mappings._gather_along_first_dim)
        objs += [importlib.import_module(n).torch for n, _ in shim.CUDA_LITERAL_MODULES]
        return [id(o) for o in objs]

    # Idempotent: applying everything again (twice) replaces nothing.
    first = patched_objects()
    patches.apply_cpu_patches()
    patches.apply_cpu_patches()
    report["idempotent"] = patched_objects() == first
    report["after"] = probes()

    # What each probe stands for now works as upstream intends (not only "does not raise").
    def check_current_device():
        t = torch.zeros(2, device=torch.cuda.current_device())
        assert t.device.type == "cpu"
        assert torch.ones(1).to(torch.cuda.current_device()).device.type == "cpu"

    def check_streams():
        side = torch.cuda.Stream()
        assert torch.cuda.current_stream() != side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            x = torch.ones(3) * 2
        side.record_event().synchronize()
        torch.cuda.synchronize()
        assert x.sum().item() == 6

    def check_rng_tracker():
        from megatron.core import tensor_parallel
        from megatron.core.tensor_parallel import random

        def draws(tp_rank, ep_rank=0):
            torch.manual_seed(7)
            tensor_parallel.model_parallel_cuda_manual_seed(
                11, tp_rank=tp_rank, ep_rank=ep_rank, etp_rank=0)
            tracker = tensor_parallel.get_cuda_rng_tracker()
            default_before = torch.get_rng_state()
            with tracker.fork():
                a = torch.rand(4)
            assert torch.equal(torch.get_rng_state(), default_before), "fork leaked its state"
            with tracker.fork():
                b = torch.rand(4)
            with tracker.fork(random.get_expert_parallel_rng_tracker_name()):
                e = torch.rand(4)
            return a, b, e

        a0, b0, e0 = draws(0)
        assert not torch.equal(a0, b0), "fork must continue the tracked stream"
        a0_again, _, _ = draws(0)
        assert torch.equal(a0, a0_again), "same seed and rank must reproduce"
        a1, _, _ = draws(1)
        assert not torch.equal(a0, a1), "tensor-parallel ranks must draw differently"
        _, _, e1 = draws(0, ep_rank=1)
        assert not torch.equal(e0, e1), "expert-parallel ranks must draw differently"
        # activation-recompute helpers read/write the CPU generator
        state = random._get_cuda_rng_state()
        u = torch.rand(2)
        random._set_cuda_rng_state(state)
        assert torch.equal(u, torch.rand(2))

    def check_norm_sequence_parallel():
        from megatron.core.transformer.torch_norm import WrappedTorchNorm
        sp = WrappedTorchNorm(shim._norm_probe_config(True), 8)
        plain = WrappedTorchNorm(shim._norm_probe_config(False), 8)
        assert isinstance(sp, torch.nn.LayerNorm) and isinstance(plain, torch.nn.LayerNorm)
        assert all(p.sequence_parallel for p in sp.parameters())
        assert not any(getattr(p, "sequence_parallel", False) for p in plain.parameters())

    def check_router_te_general_gemm():
        from megatron.core.transformer.moe import moe_utils
        x = torch.randn(3, 5, requires_grad=True)
        w = torch.randn(4, 5, requires_grad=True)
        out = moe_utils.router_gating_linear(x, w, None, torch.float32)
        out.square().sum().backward()
        x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        (x2 @ w2.t()).square().sum().backward()
        torch.testing.assert_close(out, x2 @ w2.t())
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(w.grad, w2.grad)

    def check_alltoall_split_sizes():
        from megatron.core.transformer.moe import token_dispatcher
        splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 5]), as_numpy=True)
        assert isinstance(splits, np.ndarray) and splits.tolist() == [3, 5]
        kept = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 5]))
        assert isinstance(kept, torch.Tensor)

    def check_cuda_literals():
        from megatron.core.transformer.utils import get_default_causal_mask
        for name, _ in shim.CUDA_LITERAL_MODULES:
            t = importlib.import_module(name).torch.tensor([1.0], device="cuda")
            assert t.device.type == "cpu"
        mask = get_default_causal_mask(4)
        assert mask.device.type == "cpu" and mask.sum().item() == 6
        assert torch.zeros(1).device.type == "cpu"
        try:
            torch.zeros(1, device="cuda")  # the real torch is untouched
        except Exception:
            pass
        else:
            raise AssertionError("device='cuda' must still fail outside the patched modules")

    def check_tensor_type_checks():
        from megatron.core.optimizer import optimizer
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.full((4,), 2.0)
        optimizer.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
        torch.testing.assert_close(p.grad, torch.full((4,), 2.0 / (4.0 + 1e-6)))
        assert torch.zeros(1).type() == "torch.FloatTensor", "type names must not leak"

    def check_uneven_all_gather():
        from megatron.core.tensor_parallel import mappings

        def on_rank(rank, group):
            # what gather_from_sequence_parallel_region(x, group=group, output_split_sizes=...)
            # runs (that wrapper needs a default process group to accept `group`)
            rows = (2, 3)[rank]
            x = torch.full((rows, 4), float(rank + 1), requires_grad=True)
            y = mappings._GatherFromSequenceParallelRegion.apply(x, group, True, [2, 3], False)
            weight = torch.arange(20.0).reshape(5, 4)
            (y * weight).sum().backward()  # backward: uneven reduce-scatter over both ranks
            return y.detach(), x.grad

        results = shim._on_two_gloo_ranks(on_rank)
        expected_y = torch.cat([torch.full((2, 4), 1.0), torch.full((3, 4), 2.0)])
        weight = torch.arange(20.0).reshape(5, 4)
        for rank, result in enumerate(results):
            assert not isinstance(result, Exception), repr(result)
            y, grad = result
            assert torch.equal(y, expected_y)
            assert torch.equal(grad, 2 * (weight[:2] if rank == 0 else weight[2:]))

    checks = {name: globals()["check_" + name] for name in report["names"]}
    report["checks"] = {}
    for name, check in checks.items():
        try:
            check()
            report["checks"][name] = None
        except Exception:
            report["checks"][name] = traceback.format_exc()

    sys.stdout.write("\n@@REPORT@@" + json.dumps(report))
    '''
)


@pytest.fixture(scope="module")
def probe_report() -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE_SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("@@REPORT@@", 1)[1])


def test_registry_and_pinned_version(probe_report):
    assert tuple(probe_report["names"]) == PATCH_NAMES
    assert probe_report["installed"] == probe_report["upstream"], (
        f"megatron-core {probe_report['installed']} is installed but the CPU shim was written "
        f"for {probe_report['upstream']}: re-check patches/README.md, then bump UPSTREAM_VERSION"
    )


def test_noop_when_cuda_is_available(probe_report):
    assert all(probe_report["with_cuda"].values()), probe_report["with_cuda"]


def test_idempotent(probe_report):
    assert probe_report["idempotent"]


def test_other_workarounds_still_have_their_gap():
    """The workarounds outside the CPU shim (checkpoint loading and saving, the weight-update
    group): each one's gap is still upstream, against the versions they were written for."""
    import megatron.core

    from megatron_vespo.patches import megatron_core_checkpoint, torch_external_group

    assert megatron.core.__version__ == megatron_core_checkpoint.UPSTREAM_VERSION
    assert {name: probe() for name, probe in megatron_core_checkpoint.PROBES.items()} == dict.fromkeys(
        megatron_core_checkpoint.PROBES, True)
    assert torch_external_group.probe()


@pytest.mark.parametrize("name", PATCH_NAMES)
def test_gap_present_upstream(probe_report, name):
    assert probe_report["before"][name], (
        f"the upstream gap behind patch {name!r} is gone: the patch is unnecessary after the "
        "upgrade; delete it (see patches/README.md)"
    )


@pytest.mark.parametrize("name", PATCH_NAMES)
def test_patch_bridges_exactly_its_gap(probe_report, name):
    index = PATCH_NAMES.index(name)
    step = probe_report["steps"][index]
    assert not step[name], f"applying {name!r} did not bridge its gap"
    # patches applied so far stay bridged; the ones not yet applied are still open
    assert [step[n] for n in PATCH_NAMES] == [i > index for i in range(len(PATCH_NAMES))], step
    assert not probe_report["after"][name]


@pytest.mark.parametrize("name", PATCH_NAMES)
def test_patched_behaviour_works(probe_report, name):
    error = probe_report["checks"][name]
    assert error is None, error


# ---------------------------------------------------------------------------------------------
# (b) training on gloo ranks (one spawn per world size, every layout of that size in it)
# ---------------------------------------------------------------------------------------------

SEED = 1234
VOCAB, HIDDEN, SEQ, MICRO_BATCH, NUM_MICROBATCHES = 128, 64, 16, 2, 2


class Layout(NamedTuple):
    world: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    sequence_parallel: bool = False
    dispatcher: Optional[str] = None  # MoE token dispatcher; None: dense model
    distributed_optimizer: bool = True
    checks: frozenset = frozenset()  # cross-rank invariants this layout can test


LAYOUTS = {
    "tp2_sp_dense": Layout(2, tp=2, sequence_parallel=True,
                           checks=frozenset({"tp_replicas_equal", "tp_shards_differ"})),
    "ep2_moe_alltoall": Layout(2, ep=2, dispatcher="alltoall",
                               checks=frozenset({"dp_replicas_equal", "ep_experts_differ"})),
    "ep2_moe_allgather": Layout(2, ep=2, dispatcher="allgather", distributed_optimizer=False,
                                checks=frozenset({"dp_replicas_equal", "ep_experts_differ"})),
    "pp2_dense": Layout(2, pp=2),
    # MoE parallel folding: attention TP2+SP, experts EP2 (expert TP1) over the same two ranks
    "tp2_sp_ep2_moe_alltoall": Layout(
        2, tp=2, ep=2, sequence_parallel=True, dispatcher="alltoall",
        checks=frozenset({"tp_replicas_equal", "tp_shards_differ", "ep_experts_differ"})),
    # Expert TP2 x EP2: the alltoall dispatcher all-gathers unequal token counts over expert TP
    "tp2_sp_ep2_etp2_moe_alltoall": Layout(
        4, tp=2, ep=2, etp=2, sequence_parallel=True, dispatcher="alltoall",
        checks=frozenset({"tp_replicas_equal", "tp_shards_differ", "dp_replicas_equal",
                          "ep_experts_differ"})),
}


def _same_across(tensors, group) -> bool:
    """Whether the concatenation of `tensors` is bitwise identical on every rank of `group`."""
    import torch.distributed as dist

    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, flat, group=group)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def _train_layout(layout: Layout) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_vespo.parallel.layout import ParallelLayout

    tp, pp, ep, etp = layout.tp, layout.pp, layout.ep, layout.etp
    ParallelLayout(tp=tp, pp=pp, ep=ep, etp=etp,
                   sequence_parallel=layout.sequence_parallel).initialize()
    torch.manual_seed(SEED)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)

    moe = layout.dispatcher is not None
    moe_kwargs = (
        dict(
            num_moe_experts=4,
            moe_router_topk=2,
            moe_token_dispatcher_type=layout.dispatcher,
            moe_aux_loss_coeff=1e-2,
            moe_grouped_gemm=False,
        )
        if moe
        else {}
    )
    config = TransformerConfig(
        num_layers=2,
        hidden_size=HIDDEN,
        ffn_hidden_size=2 * HIDDEN,
        num_attention_heads=4,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        sequence_parallel=layout.sequence_parallel,
        add_bias_linear=etp == 1,  # megatron: "Bias in Moe is only supported when ETP==1"
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **moe_kwargs,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(num_experts=4 if moe else None),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    model = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(use_distributed_optimizer=layout.distributed_optimizer),
        model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            clip_grad=1.0,
            use_distributed_optimizer=layout.distributed_optimizer,
        ),
        [model],
    )

    params = dict(model.module.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    generator = torch.Generator().manual_seed(SEED)  # same batches on every rank
    batches = iter(
        [torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator)
         for _ in range(NUM_MICROBATCHES)]
    )
    positions = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, -1)

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        per_token = chunk(batch[:, :-1], positions, None, labels=batch[:, 1:])

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"lm loss": loss.detach()}

        return per_token, loss_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[model],
        num_microbatches=NUM_MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    grads = [p.main_grad for p in params.values()]
    grads_finite = all(bool(torch.isfinite(g).all()) for g in grads)
    grads_nonzero = sum(bool(g.abs().sum() > 0) for g in grads)
    update_successful, grad_norm, _ = optimizer.step()
    unchanged = [name for name, p in params.items() if torch.equal(p.detach(), before[name])]

    # Cross-rank invariants that only hold if the shim's semantics are right.
    tp_group = ps.get_tensor_model_parallel_group()
    replicated = [p for p in params.values() if not getattr(p, "tensor_model_parallel", False)]
    sharded = [p for p in params.values()
               if getattr(p, "tensor_model_parallel", False) and p.dim() > 1]
    dense = [p for p in params.values() if getattr(p, "allreduce", True)]
    experts = [p for p in params.values() if not getattr(p, "allreduce", True)]
    checks = {}
    if tp > 1:
        # norms (sequence-parallel grads all-reduced), biases, position embeddings
        checks["tp_replicas_equal"] = _same_across(replicated, tp_group)
        # per-TP-rank init from the RNG tracker's model-parallel stream
        checks["tp_shards_differ"] = not any(_same_across([p], tp_group) for p in sharded)
    if ps.get_data_parallel_world_size() > 1:
        checks["dp_replicas_equal"] = _same_across(dense, ps.get_data_parallel_group())
    if ep > 1:
        # per-EP-rank init from the RNG tracker's expert stream
        ep_group = ps.get_expert_model_parallel_group()
        checks["ep_experts_differ"] = not _same_across(experts, ep_group)

    return {
        "losses": [float(d["lm loss"]) for d in losses],
        "last_stage": ps.is_pipeline_last_stage(),
        "grads_finite": grads_finite,
        "grads_nonzero": grads_nonzero,
        "num_params": len(params),
        "update_successful": bool(update_successful),
        "grad_norm": float(grad_norm),
        "unchanged": unchanged,
        "checks": checks,
    }


def _train_all(rank, world_size, layouts):
    return {name: _train_layout(layout) for name, layout in layouts.items()}


@pytest.fixture(scope="module")
def trained():
    """Every layout, grouped by world size: one spawn per world size."""
    results = {}
    for world in sorted({layout.world for layout in LAYOUTS.values()}):
        group = {name: layout for name, layout in LAYOUTS.items() if layout.world == world}
        per_rank = run_ranks(_train_all, world, group)
        for name in group:
            results[name] = [rank_results[name] for rank_results in per_rank]
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_local_spec_gpt_trains_on_cpu(trained, name):
    for rank, r in enumerate(trained[name]):
        where = f"{name} rank {rank}: {r}"
        if r["last_stage"]:
            assert len(r["losses"]) == NUM_MICROBATCHES, where
            assert all(math.isfinite(x) and x > 0 for x in r["losses"]), where
        else:
            assert r["losses"] == [], where
        assert r["grads_finite"], where
        assert r["grads_nonzero"] == r["num_params"], where
        assert r["update_successful"] and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["unchanged"] == [], where
        assert set(r["checks"]) == LAYOUTS[name].checks and all(r["checks"].values()), where
    # the clipped grad norm is reduced over all model-parallel ranks: one value everywhere
    norms = [r["grad_norm"] for r in trained[name]]
    assert norms == pytest.approx([norms[0]] * len(norms))
