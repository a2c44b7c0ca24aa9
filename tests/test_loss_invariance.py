"""The loss, every gradient and every metric are invariant to how a batch is sharded.

One fixed batch of packed sequences goes through a real megatron-core vocab-parallel output layer
(`ColumnParallelLinear`, wrapped in megatron's `DistributedDataParallel`), megatron's own
`get_forward_backward_func` schedule and `finalize_model_grads`, for every factorisation of
DP x CP x TP x micro-batches that fits in 4 processes, and in both of megatron's loss-scaling modes.
Each result must equal a single-process, unsharded reference to fp32 tolerance.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_vespo.algo.policy_losses import get_policy_loss
from megatron_vespo.parallel.packing import pack_sequences, required_pad_multiple
from megatron_vespo.parallel.policy_objective import shard_policy_loss
from megatron_vespo.parallel.step_reduce import global_denominators
from tests.distributed import run_ranks

VOCAB, HIDDEN, NUM_SEQS = 32, 16, 16
LOSSES = ("vespo", "grpo", "gspo", "sapo", "cispo", "seq_is")
# (loss, correct_mismatch): vespo is also checked with the engine log-probs folded in.
CASES = [(name, False) for name in LOSSES] + [("vespo", True)]


def make_batch(seed: int = 0) -> dict:
    """Sequences of varied lengths, hidden states, the head's weights and behaviour log-probs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, 23, (NUM_SEQS,), generator=g).tolist()
    prompts = [int(torch.randint(1, 5, (1,), generator=g)) for _ in lengths]
    tokens = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    hidden = [torch.randn(n, HIDDEN, generator=g) for n in lengths]
    weight = torch.randn(VOCAB, HIDDEN, generator=g) * 0.5
    old_weight = weight + 0.05 * torch.randn(VOCAB, HIDDEN, generator=g)
    engine_weight = old_weight + 0.02 * torch.randn(VOCAB, HIDDEN, generator=g)

    def response_logp(w, i):
        logp = torch.log_softmax(hidden[i] @ w.T, -1)
        p = prompts[i]
        return logp[p - 1:-1].gather(1, tokens[i][p:, None]).squeeze(1)

    advantages = torch.randn(NUM_SEQS, generator=g)
    return dict(
        tokens=tokens, prompts=prompts, hidden=hidden, weight=weight, advantages=advantages,
        old_logp=[response_logp(old_weight, i) for i in range(NUM_SEQS)],
        engine_logp=[response_logp(engine_weight, i) for i in range(NUM_SEQS)],
    )


def pack(data: dict, seqs, pad_multiple: int):
    """A packed micro-batch of sequences `seqs` plus its hidden states [T, H] in packed order."""
    seqs = list(seqs)
    batch = pack_sequences(
        [data["tokens"][i] for i in seqs], [data["prompts"][i] for i in seqs],
        data["advantages"][seqs], [data["old_logp"][i] for i in seqs],
        [data["engine_logp"][i] for i in seqs], pad_multiple=pad_multiple,
    )
    hidden = torch.zeros(batch.num_positions, HIDDEN)
    for k, i in enumerate(seqs):
        start = int(batch.cu_seqlens_padded[k])
        hidden[start:start + data["hidden"][i].shape[0]] = data["hidden"][i]
    return batch, hidden


def reference(data: dict) -> dict:
    """Single process, one micro-batch, no megatron: plain log_softmax and autograd."""
    batch, hidden = pack(data, range(NUM_SEQS), 1)
    denom = global_denominators([batch], None)
    results = {}
    for name, correct in CASES:
        weight = data["weight"].clone().requires_grad_()
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(1, batch.target_ids[:, None]).squeeze(1)
        out = shard_policy_loss(logp, batch, denom, get_policy_loss(name), correct_mismatch=correct)
        out.loss.backward()
        results[(name, correct)] = dict(loss=out.loss.item(), grad=weight.grad.clone(),
                                        metrics=out.metrics.finalize())
    return results


class VocabParallelHead(torch.nn.Module):
    """A GPT output layer alone: megatron's vocab-parallel `ColumnParallelLinear` on given hidden
    states, with the two attributes megatron's schedules look up on a model."""

    def __init__(self, config):
        from megatron.core.enums import ModelType
        from megatron.core.tensor_parallel import ColumnParallelLinear

        super().__init__()
        self.model_type = ModelType.encoder_or_decoder
        self.linear = ColumnParallelLinear(HIDDEN, VOCAB, config=config, bias=False,
                                           init_method=torch.nn.init.zeros_, gather_output=False)

    def set_input_tensor(self, tensor):  # first pipeline stage only: nothing to receive
        pass

    def forward(self, hidden):
        return self.linear(hidden)[0]

    @property
    def weight(self):
        return self.linear.weight


def sharded_run(rank, world_size, layouts, data):
    """Every (dp, cp, tp, micro-batches, per-token-loss mode) layout of `layouts` on these ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    from megatron_vespo.algo.metrics import MetricSums
    from megatron_vespo.parallel.layout import ParallelLayout
    from megatron_vespo.parallel.logprobs import vocab_parallel_logprobs
    from megatron_vespo.parallel.megatron_scaling import schedule_loss_output
    from megatron_vespo.parallel.packing import cp_shard, split_evenly, zigzag_index
    from megatron_vespo.parallel.step_reduce import reduce_step_metrics

    results = {}
    for dp, cp, tp, micro_batches, per_token in layouts:
        groups = ParallelLayout(tp=tp, cp=cp).initialize()
        assert groups.dp_size == dp
        config = TransformerConfig(
            num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, tensor_model_parallel_size=tp,
            context_parallel_size=cp, calculate_per_token_loss=per_token,
            use_cpu_initialization=True, params_dtype=torch.float32,
        )
        head = VocabParallelHead(config)
        shard_rows = slice(groups.tp_rank * VOCAB // tp, (groups.tp_rank + 1) * VOCAB // tp)
        model = DistributedDataParallel(
            config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), head
        )
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = model.no_sync

        my_seqs = list(split_evenly(NUM_SEQS, dp)[groups.dp_rank])
        pad = required_pad_multiple(cp, tp)
        mbs = []
        for part in split_evenly(len(my_seqs), micro_batches):
            batch, hidden = pack(data, [my_seqs[k] for k in part], pad)
            index = zigzag_index(batch.cu_seqlens_padded, cp, groups.cp_rank)
            mbs.append((cp_shard(batch, cp, groups.cp_rank), hidden[index]))
        denom = global_denominators([b for b, _ in mbs], groups.dp)

        for name, correct in CASES:
            with torch.no_grad():
                head.weight.copy_(data["weight"][shard_rows])
            model.zero_grad_buffer()
            metrics = []

            def forward_step(data_iterator, model_chunk):
                batch, hidden = next(data_iterator)
                logits = model_chunk(hidden)
                logp, _ = vocab_parallel_logprobs(logits, batch.target_ids, tp_group=groups.tp,
                                                  chunk_tokens=7)

                def loss_func(_output):
                    out = shard_policy_loss(logp, batch, denom, get_policy_loss(name),
                                            cp_group=groups.cp, correct_mismatch=correct)
                    metrics.append(out.metrics)
                    return schedule_loss_output(
                        out.loss, {}, num_microbatches=micro_batches, dp_size=dp,
                        calculate_per_token_loss=per_token, denom=denom,
                        local_tokens=batch.loss_mask.sum(),
                    )

                return logits, loss_func

            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(mbs), model=[model],
                num_microbatches=micro_batches, seq_length=0, micro_batch_size=1,
            )
            grad = head.weight.main_grad.clone()
            full = [torch.empty_like(grad) for _ in range(tp)]
            torch.distributed.all_gather(full, grad, group=groups.tp)
            total = metrics[0]
            for m in metrics[1:]:
                total = total.merge(m)
            final = reduce_step_metrics(total, groups).finalize()
            results[(dp, cp, tp, micro_batches, per_token, name, correct)] = dict(
                loss=final["loss"], grad=torch.cat(full), metrics=final)
        ps.destroy_model_parallel()
    return results


def layouts_for(world_size: int) -> list[tuple]:
    out = []
    for dp, cp, tp in itertools.product([1, 2, 4], repeat=3):
        if dp * cp * tp != world_size:
            continue
        for micro_batches in sorted({1, 2, 4 if dp < 4 else 2}):
            out.append((dp, cp, tp, micro_batches, micro_batches == 2))
    return out


def assert_matches(ref: dict, got: dict, where: str) -> None:
    assert math.isclose(got["loss"], ref["loss"], rel_tol=1e-5, abs_tol=1e-6), (where, got["loss"], ref["loss"])
    torch.testing.assert_close(got["grad"], ref["grad"], rtol=1e-5, atol=1e-6, msg=where)
    assert got["metrics"].keys() == ref["metrics"].keys(), where
    for key, value in ref["metrics"].items():
        assert math.isclose(got["metrics"][key], value, rel_tol=1e-5, abs_tol=1e-6) or (
            math.isnan(value) and math.isnan(got["metrics"][key])), (where, key, got["metrics"][key], value)


@pytest.fixture(scope="module")
def data():
    return make_batch()


@pytest.fixture(scope="module")
def ref(data):
    return reference(data)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_loss_grads_metrics_invariant_to_dp_cp_tp_microbatch_split(world_size, data, ref):
    layouts = layouts_for(world_size)
    per_rank = run_ranks(sharded_run, world_size, layouts, data)
    checked = 0
    for rank, results in enumerate(per_rank):
        for (dp, cp, tp, mb, per_token, name, correct), got in results.items():
            where = (f"rank {rank}: dp={dp} cp={cp} tp={tp} micro_batches={mb} "
                     f"per_token_loss={per_token} loss={name} correct_mismatch={correct}")
            assert_matches(ref[(name, correct)], got, where)
            checked += 1
    assert checked == world_size * len(layouts) * len(CASES)


def test_reference_is_not_degenerate(ref):
    """The invariance above is only meaningful if the batch exercises the kernel and the clips."""
    vespo = ref[("vespo", False)]
    assert vespo["grad"].abs().max() > 1e-3
    m = vespo["metrics"]
    assert m["is/log_w_max"] - m["is/log_w_min"] > 0.1
    assert m["phi/z_pos"] != 1.0 and m["phi/z_neg"] != 1.0
    assert ref[("grpo", False)]["metrics"]["loss/clip_high_frac"] + \
        ref[("grpo", False)]["metrics"]["loss/clip_low_frac"] > 0
    assert "mismatch/k3_kl" in ref[("vespo", True)]["metrics"]
    assert ref[("vespo", True)]["loss"] != vespo["loss"]
