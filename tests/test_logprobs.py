"""vocab_parallel_logprobs: values and exact gradients, unsharded and over real gloo TP groups."""

from __future__ import annotations

import pytest
import torch

from megatron_vespo.parallel.logprobs import vocab_parallel_logprobs
from tests.distributed import run_ranks

ATOL = 1e-6


def _data(seed: int, tokens: int, vocab: int, scale: float = 3.0):
    """Full logits [T, V] fp32, targets [T], and upstream grads for logp and entropy ([T] each)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, vocab, generator=gen) * scale
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    grad_logp = torch.randn(tokens, generator=gen)
    grad_entropy = torch.randn(tokens, generator=gen)
    return logits, targets, grad_logp, grad_entropy


def _reference(logits, targets, grad_logp=None, grad_entropy=None, dtype=torch.float32):
    """(logp, entropy, d loss / d logits) by plain autograd on the full logits, in `dtype`."""
    z = logits.detach().to(dtype).requires_grad_()
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(1, targets.unsqueeze(1)).squeeze(1)
    entropy = torch.distributions.Categorical(logits=z).entropy()
    loss = z.new_zeros(())
    if grad_logp is not None:
        loss = loss + (logp * grad_logp).sum()
    if grad_entropy is not None:
        loss = loss + (entropy * grad_entropy).sum()
    grad = torch.autograd.grad(loss, z)[0] if loss.requires_grad else torch.zeros_like(z)
    return logp.detach().float(), entropy.detach().float(), grad.float()


def _run(logits, targets, grad_logp=None, grad_entropy=None, **kwargs):
    """Forward + backward of the function under test; returns (logp, entropy, grad)."""
    z = logits.detach().clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs(z, targets, **kwargs)
    loss = z.new_zeros((), dtype=torch.float32)
    if grad_logp is not None:
        loss = loss + (logp * grad_logp).sum()
    if grad_entropy is not None:
        loss = loss + (entropy * grad_entropy).sum()
    grad = torch.autograd.grad(loss, z)[0]
    return logp.detach(), None if entropy is None else entropy.detach(), grad


# --------------------------------------------------------------------------- unsharded


@pytest.mark.parametrize("chunk", [1, 7, 23, 64])  # T = 23: single rows, uneven, exactly T, > T
@pytest.mark.parametrize("grads", ["logp", "entropy", "both"])
def test_unsharded_values_and_grads_fp32(chunk, grads):
    logits, targets, g_logp, g_ent = _data(0, 23, 50)
    g_logp = g_logp if grads in ("logp", "both") else None
    g_ent = g_ent if grads in ("entropy", "both") else None
    logp, entropy, grad = _run(logits, targets, g_logp, g_ent, chunk_tokens=chunk,
                               with_entropy=True)
    ref_logp, ref_ent, ref_grad = _reference(logits, targets, g_logp, g_ent)
    torch.testing.assert_close(logp, ref_logp, atol=ATOL, rtol=0)
    torch.testing.assert_close(entropy, ref_ent, atol=ATOL, rtol=0)
    direct = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(entropy, direct, atol=ATOL, rtol=0)
    assert grad.dtype == torch.float32 and grad.shape == logits.shape
    torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=0)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temperature_gives_the_sampled_distribution(temperature, dtype):
    """At sampling temperature T the log-probs, entropy and gradient are those of
    log_softmax(logits / T): what SGLang reports for tokens it sampled at T."""
    logits, targets, g_logp, g_ent = _data(4, 29, 70)
    low = logits.to(dtype)
    logp, entropy, grad = _run(low, targets, g_logp, g_ent, chunk_tokens=6, with_entropy=True,
                               temperature=temperature)
    z = low.float().detach().requires_grad_()
    ref_logp, ref_ent, ref_grad_z = _reference(z / temperature, targets, g_logp, g_ent)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, ref_ent, atol=1e-5, rtol=0)
    # d/d logits = (1 / T) d/dz at z = logits / T. In float32 the reference divides by T in another
    # place than the kernel, which moves some elements by ~16 ulp (measured 1.01e-6 on a 0.52
    # gradient on one CPU): torch's float32 defaults (atol 1e-5, rtol 1.3e-6).
    tol = {} if dtype == torch.float32 else dict(atol=1e-3, rtol=1.6e-2)
    torch.testing.assert_close(grad.float(), ref_grad_z / temperature, **tol)
    # ...and not those of T = 1 (the bias the engine comparison would show otherwise)
    plain, _, _ = _run(low, targets, g_logp)
    assert (plain - logp).abs().max() > 0.1


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_unsharded_logp_only(chunk):
    logits, targets, g_logp, _ = _data(1, 23, 50)
    logp, entropy, grad = _run(logits, targets, g_logp, chunk_tokens=chunk)
    assert entropy is None and logp.dtype == torch.float32 and logp.shape == (23,)
    ref_logp, _, ref_grad = _reference(logits, targets, g_logp)
    torch.testing.assert_close(logp, ref_logp, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype):
    logits, targets, g_logp, g_ent = _data(2, 37, 300)
    low = logits.to(dtype)
    logp, entropy, grad = _run(low, targets, g_logp, g_ent, chunk_tokens=8, with_entropy=True)
    assert logp.dtype == entropy.dtype == torch.float32
    assert grad.dtype == dtype and grad.shape == low.shape
    # The math runs in fp32 on the upcast values, so it matches an fp32 reference on the same
    # (rounded) logits to fp32 accuracy; the gradient is rounded once, to the logits' dtype.
    ref_logp, ref_ent, ref_grad = _reference(low.float(), targets, g_logp, g_ent)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, ref_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad.float(), ref_grad, atol=1e-3, rtol=1.6e-2)
    # ...and stays within half-precision tolerance of the unrounded fp32 logits.
    full_logp, full_ent, _ = _reference(logits, targets)
    torch.testing.assert_close(logp, full_logp, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(entropy, full_ent, atol=5e-2, rtol=2e-2)


def test_entropy_requested_but_only_logp_used():
    logits, targets, g_logp, _ = _data(3, 10, 17)
    logp, entropy, grad = _run(logits, targets, g_logp, None, chunk_tokens=3, with_entropy=True)
    _, _, ref_grad = _reference(logits, targets, g_logp)
    torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=0)


def test_empty_input():
    logits = torch.randn(0, 11, requires_grad=True)
    logp, entropy = vocab_parallel_logprobs(logits, torch.zeros(0, dtype=torch.long),
                                            with_entropy=True)
    assert logp.shape == entropy.shape == (0,) and logp.dtype == torch.float32
    (logp.sum() + entropy.sum()).backward()
    assert logits.grad.shape == (0, 11)


def test_logits_untouched_and_stable_for_large_and_masked_values():
    logits, targets, g_logp, g_ent = _data(4, 12, 40)
    logits = logits + 1000.0  # a naive exp would overflow
    logits[:, :5] = float("-inf")  # masked columns, e.g. padded vocab
    targets = targets.clamp(min=5)
    z = logits.clone().requires_grad_()
    version = z._version
    logp, entropy = vocab_parallel_logprobs(z, targets, chunk_tokens=5, with_entropy=True)
    grad = torch.autograd.grad((logp * g_logp).sum() + (entropy * g_ent).sum(), z)[0]
    assert z._version == version and torch.equal(z.detach(), logits)
    assert torch.isfinite(grad).all() and (grad[:, :5] == 0).all()
    # fp64 reference: an fp32 log_softmax rounds log Z at |z| ~ 1000 (ulp 6e-5); this function
    # subtracts the row max first and stays at fp32 accuracy of the O(1) log-probabilities.
    # Masked columns carry no probability: the reference is the distribution over the rest.
    ref_logp, ref_ent, ref_grad = _reference(logits[:, 5:], targets - 5, g_logp, g_ent,
                                             torch.float64)
    torch.testing.assert_close(logp, ref_logp, atol=ATOL, rtol=0)
    torch.testing.assert_close(entropy, ref_ent, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad[:, 5:], ref_grad, atol=ATOL, rtol=0)


def test_non_contiguous_logits():
    logits, targets, g_logp, g_ent = _data(5, 9, 31)
    strided = logits.t().contiguous().t()  # same values, column-major
    assert not strided.is_contiguous()
    logp, entropy, grad = _run(strided, targets, g_logp, g_ent, chunk_tokens=4, with_entropy=True)
    ref_logp, ref_ent, ref_grad = _reference(logits, targets, g_logp, g_ent)
    torch.testing.assert_close(logp, ref_logp, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=0)


@pytest.mark.parametrize("logits, targets, kwargs, match", [
    (torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, dtype=torch.long), {}, "floating-point"),
    (torch.zeros(3, 5), torch.zeros(3), {}, "integer"),
    (torch.zeros(15), torch.zeros(15, dtype=torch.long), {}, r"\[T, V_local\]"),
    (torch.zeros(3, 5), torch.zeros(4, dtype=torch.long), {}, r"targets must be \[T\]"),
    (torch.zeros(3, 5), torch.zeros(3, 1, dtype=torch.long), {}, r"targets must be \[T\]"),
    (torch.zeros(3, 5), torch.tensor([0, 5, 1]), {}, r"\[0, 5\)"),
    (torch.zeros(3, 5), torch.tensor([0, -1, 1]), {}, r"\[0, 5\)"),
    (torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), {"chunk_tokens": 0}, "chunk_tokens"),
    (torch.zeros(3, 0), torch.zeros(3, dtype=torch.long), {}, "empty vocab"),
    (torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), {"temperature": 0.0}, "temperature"),
    (torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), {"temperature": float("nan")},
     "temperature"),
])
def test_bad_inputs(logits, targets, kwargs, match):
    with pytest.raises(ValueError, match=match):
        vocab_parallel_logprobs(logits, targets, **kwargs)


# --------------------------------------------------------------------------- tensor parallel

TP_TOKENS, TP_V_LOCAL, TP_CHUNK = 11, 6, 3  # uneven last chunk
TP_TEMPERATURE = 0.7


def _tp_seed(tp: int, group_index: int) -> int:
    return 100 * tp + group_index


def _tp_worker(rank, world_size):
    """On 4 ranks: TP over all 4, TP=2 over {0,1} and {2,3} (different data), TP=1 per rank."""
    import torch.distributed as dist

    assert world_size == 4
    # new_group is collective over the world: every rank creates every group, in the same order.
    groups = {4: [dist.new_group([0, 1, 2, 3])], 2: [dist.new_group([0, 1]), dist.new_group([2, 3])],
              1: [dist.new_group([r]) for r in range(world_size)]}
    out = {}
    for tp, group_list in groups.items():
        index, tp_rank = divmod(rank, tp)
        group = group_list[index]
        assert dist.get_world_size(group) == tp and dist.get_rank(group) == tp_rank
        logits, targets, g_logp, g_ent = _data(_tp_seed(tp, index), TP_TOKENS, TP_V_LOCAL * tp)
        shard = logits[:, tp_rank * TP_V_LOCAL:(tp_rank + 1) * TP_V_LOCAL]
        for mode in ("logp", "entropy", "both", "temp"):
            gl = g_logp if mode in ("logp", "both", "temp") else None
            ge = g_ent if mode in ("entropy", "both", "temp") else None
            logp, entropy, grad = _run(shard, targets, gl, ge, tp_group=group,
                                       chunk_tokens=TP_CHUNK, with_entropy=mode != "logp",
                                       temperature=TP_TEMPERATURE if mode == "temp" else 1.0)
            out[(tp, mode)] = (logp, entropy, grad)
        bf16 = _run(shard.bfloat16(), targets, g_logp, g_ent, tp_group=group,
                    chunk_tokens=TP_CHUNK, with_entropy=True)
        out[(tp, "bf16")] = bf16
        # The global vocab, not the local shard, bounds the targets; the check precedes any
        # collective, so every rank raises and none hangs.
        edge = torch.full((TP_TOKENS,), TP_V_LOCAL * tp - 1)
        vocab_parallel_logprobs(shard, edge, tp_group=group)
        try:
            vocab_parallel_logprobs(shard, edge + 1, tp_group=group)
            out[(tp, "range")] = None
        except ValueError as err:
            out[(tp, "range")] = str(err)
    return out


@pytest.mark.slow
def test_tensor_parallel_matches_single_process():
    results = run_ranks(_tp_worker, 4)
    for tp in (4, 2, 1):
        for index in range(4 // tp):
            members = range(index * tp, (index + 1) * tp)
            logits, targets, g_logp, g_ent = _data(_tp_seed(tp, index), TP_TOKENS,
                                                   TP_V_LOCAL * tp)
            for mode in ("logp", "entropy", "both", "temp"):
                gl = g_logp if mode in ("logp", "both", "temp") else None
                ge = g_ent if mode in ("entropy", "both", "temp") else None
                if mode == "temp":  # the gradient w.r.t. the logits is 1/T that w.r.t. logits/T
                    ref_logp, ref_ent, ref_grad = _reference(logits / TP_TEMPERATURE, targets, gl, ge)
                    ref_grad = ref_grad / TP_TEMPERATURE
                else:
                    ref_logp, ref_ent, ref_grad = _reference(logits, targets, gl, ge)
                outs = [results[r][(tp, mode)] for r in members]
                for logp, entropy, _ in outs:
                    # replicated outputs: bitwise identical on every rank of the group
                    assert torch.equal(logp, outs[0][0])
                    torch.testing.assert_close(logp, ref_logp, atol=ATOL, rtol=0)
                    if mode != "logp":
                        assert torch.equal(entropy, outs[0][1])
                        torch.testing.assert_close(entropy, ref_ent, atol=ATOL, rtol=0)
                grad = torch.cat([g for _, _, g in outs], dim=1)
                torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=0, msg=f"tp{tp} {mode}")
            ref_logp, ref_ent, ref_grad = _reference(logits.bfloat16(), targets, g_logp, g_ent)
            outs = [results[r][(tp, "bf16")] for r in members]
            grad = torch.cat([g for _, _, g in outs], dim=1)
            assert grad.dtype == torch.bfloat16
            torch.testing.assert_close(outs[0][0], ref_logp, atol=1e-5, rtol=0)
            torch.testing.assert_close(outs[0][1], ref_ent, atol=1e-5, rtol=0)
            torch.testing.assert_close(grad.float(), ref_grad, atol=1e-3, rtol=1.6e-2)
            for r in members:
                assert f"[0, {TP_V_LOCAL * tp})" in results[r][(tp, "range")]
