"""One GPU check of the product's GPU path, in minutes, on a bare CUDA machine with torch, printing
one table (`make gpu-check`; `--dry-run` on a machine without a GPU replaces the GPU parts by a
skip that says what they would run, and is tested in CI).

Sections:
  gpu tests       the `gpu`-marked tests (those that need TransformerEngine skip, saying so)
  loss path       the fused per-sequence pass on 4096 x 2048 tokens: Triton vs eager PyTorch vs a
                  device-to-device copy of the same bytes (goal: >= 70% of copy bandwidth)
  log-prob memory vocab-parallel log-probs at V = 151,936, T = 16k (bf16 logits), forward and
                  backward peak beyond the inputs: chunked vs materialised fp32
  MoE train step  a Qwen3-30B-A3B-shaped MoE (48 layers, 128 experts, top-8; hidden size reduced
                  to fit one GPU) in bf16 with the local spec through the real learner: tokens/s, MFU
  NCCL bucket     a one-rank NCCL world broadcasting flattened weight buckets (the weight-update
                  group's wire format; SGLang itself is not needed)

It installs nothing. The machine needs, besides torch with CUDA and Triton: pytest, numpy, numba,
pyyaml, requests, aiohttp, tqdm (the workplace's H200 image has them) and megatron-core 0.16.1,
carried as a wheel: on a machine with the registries,
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1
then there: pip install --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site
and from the repository root: python3 benchmarks/gpu_check.py (the project is imported from the
checkout; nothing of it needs installing).

    python benchmarks/gpu_check.py [--dry-run] [--skip SECTION ...]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import traceback

import torch

try:
    from common import add_repo_root
except ImportError:  # run as a module
    from benchmarks.common import add_repo_root
add_repo_root()

from benchmarks.common import REPO_ROOT, human_bytes, print_table  # noqa: E402

H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM (the MFU denominator)


class Skip(Exception):
    """A section that does not run here; the message says what it would do."""


def _need_gpu(dry_run: bool, would: str) -> None:
    if dry_run:
        raise Skip(f"dry run: would {would}")
    if not torch.cuda.is_available():
        raise Skip(f"no CUDA device: would {would}")


def _cuda_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


# -- sections ---------------------------------------------------------------------------------

def gpu_tests(dry_run: bool) -> str:
    args = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
            "tests"]
    if dry_run:
        args.append("--collect-only")
    elif not torch.cuda.is_available():
        raise Skip("no CUDA device: would run pytest -m gpu")
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    if dry_run:
        found = re.search(r"(\d+)/\d+ tests collected", done.stdout)
        if done.returncode not in (0, 5) or not found:
            raise RuntimeError(f"collecting the gpu tests failed:\n{done.stdout[-2000:]}")
        raise Skip(f"dry run: would run the {found.group(1)} gpu-marked tests")
    if done.returncode not in (0, 5):
        raise RuntimeError("\n".join(lines[-30:]))
    skipped = [ln.split("] ", 1)[-1] for ln in lines if ln.startswith("SKIPPED")]
    return lines[-1] + ("; skipped: " + "; ".join(sorted(set(skipped))) if skipped else "")


def loss_path(dry_run: bool, seqs: int = 4096, seq_len: int = 2048) -> str:
    from megatron_vespo.algo import segment_kernels, segment_triton

    _need_gpu(dry_run, f"time the fused pass on {seqs} x {seq_len} tokens (Triton, eager, copy)")
    tokens = seqs * seq_len
    g = torch.Generator(device="cuda").manual_seed(0)
    logp = -torch.rand(tokens, device="cuda", generator=g) * 5
    behaviour = logp + 0.1 * torch.randn(tokens, device="cuda", generator=g)
    mask = torch.rand(tokens, device="cuda", generator=g) > 0.2
    lengths = torch.full((seqs,), seq_len, device="cuda", dtype=torch.int64)
    grad = torch.randn(seqs, device="cuda", generator=g)
    # bytes one pass must move: read log pi, log mu (fp32) and the mask; write the [T] gradient
    moved = tokens * (4 + 4 + 1) + tokens * (1 + 4)
    source = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    copy_ms = _cuda_ms(lambda: target.copy_(source))  # reads and writes moved / 2 bytes each
    paths = {"triton": (segment_triton.forward_sums, segment_triton.expand),
             "eager": (segment_kernels._torch_forward, segment_kernels._torch_expand)}
    ms = {name: _cuda_ms(lambda f=f, e=e: (f(logp, behaviour, mask, lengths), e(grad, mask, lengths)))
          for name, (f, e) in paths.items()}
    ratio = copy_ms / ms["triton"]
    return (f"copy {copy_ms:.2f} ms ({moved / copy_ms / 1e9:.0f} GB/s), triton {ms['triton']:.2f} ms, "
            f"eager {ms['eager']:.2f} ms; triton at {ratio:.2f} of copy bandwidth "
            f"({'meets' if ratio >= 0.7 else 'below'} the 0.70 goal)")


def logprob_memory(dry_run: bool, tokens: int = 16384, vocab: int = 151_936) -> str:
    from megatron_vespo.parallel.logprobs import vocab_parallel_logprobs

    _need_gpu(dry_run, f"measure log-prob fwd+bwd peak at V = {vocab:,}, T = {tokens:,}")
    logits = torch.randn(tokens, vocab, device="cuda", dtype=torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device="cuda")

    def peak(fn) -> int:
        logits.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    chunked = peak(lambda: vocab_parallel_logprobs(logits, targets, chunk_tokens=1024)[0])
    full = peak(lambda: torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]))
    return (f"chunked {human_bytes(chunked)}, materialised {human_bytes(full)}: "
            f"{chunked / full:.3f}x")


MOE_SHAPE = dict(family="qwen3_moe", num_hidden_layers=48, num_experts=128, num_experts_per_tok=8,
                 hidden_size=768, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                 moe_intermediate_size=192, vocab_size=151_936, max_position_embeddings=8192,
                 spec="local", params_dtype="bfloat16")


def active_flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the parameters a token uses (attention projections, router,
    its top-k experts, the output layer) plus the causal attention scores (6 x L x s x heads x d)."""
    h, d = cfg.hidden_size, cfg.head_dim
    attention = h * d * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
    experts = cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size
    per_layer = attention + h * cfg.num_experts + experts
    params = cfg.num_hidden_layers * per_layer + h * cfg.vocab_size
    scores = 6 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * d
    return 6.0 * params + scores


def _moe_step_rank(rank, world_size, seqs, seq_len, steps):
    from megatron_vespo.config import load_config
    from megatron_vespo.learner.batching import rank_micro_batches
    from megatron_vespo.learner.samples import Sample
    from megatron_vespo.parallel.step_reduce import global_denominators
    from megatron_vespo.trainer import build_learner

    overrides = [f"model.{k}={v}" for k, v in MOE_SHAPE.items()] + ["train.world_size=1"]
    config = load_config(None, overrides)
    learner = build_learner(config)
    g = torch.Generator().manual_seed(0)
    samples = [Sample(f"s{i}", i // 4, torch.randint(0, 151_000, (256,), generator=g).numpy(),
                      torch.randint(0, 151_000, (seq_len - 256,), generator=g).numpy(),
                      float(i % 2), (-torch.rand(seq_len - 256, generator=g)).numpy())
               for i in range(seqs)]
    batches = rank_micro_batches(samples, torch.tensor([1.0, -1.0] * (seqs // 2)), dp_rank=0,
                                 dp_size=1, micro_batch_size=1, pad_multiple=1, uniform_length=True)
    denom = global_denominators(batches, learner.groups.dp)
    learner.train_step(batches, denom)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        learner.train_step(batches, denom)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated()


def moe_train_step(dry_run: bool, seqs: int = 4, seq_len: int = 4096, steps: int = 3) -> str:
    from megatron_vespo.learner.model import ModelConfig

    cfg = ModelConfig(**MOE_SHAPE)
    flops = active_flops_per_token(cfg, seq_len)
    _need_gpu(dry_run, f"train {steps} steps of {seqs} x {seq_len} tokens on {cfg.num_hidden_layers} "
                       f"layers x {cfg.num_experts} experts (top-{cfg.num_experts_per_tok}), "
                       f"hidden {cfg.hidden_size}: {flops / 1e9:.2f} GFLOP per token")
    from megatron_vespo.launch import run_ranks

    seconds, peak = run_ranks(_moe_step_rank, 1, seqs, seq_len, steps)[0]
    tokens_per_s = seqs * seq_len / seconds
    return (f"{seconds * 1e3:.0f} ms per step, {tokens_per_s:,.0f} tokens/s, MFU "
            f"{tokens_per_s * flops / H200_BF16_PEAK:.1%} (of {H200_BF16_PEAK / 1e12:.0f} TFLOP/s), "
            f"peak memory {human_bytes(peak)}")


def _bucket_rank(rank, world_size, megabytes):
    import torch.distributed as dist

    from megatron_vespo.learner.hf_files import FlatBucket

    state = [(f"layer{i}.weight", torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16))
             for i in range(megabytes // 2)]
    per_bucket = 32  # 2 MiB tensors: 64 MiB buckets
    group = dist.new_group([0], backend="nccl")
    start = time.perf_counter()
    sent = 0
    for i in range(0, len(state), per_bucket):
        bucket = FlatBucket.of(state[i:i + per_bucket])
        dist.broadcast(bucket.flat, src=0, group=group)
        sent += bucket.nbytes
        assert bucket.fields()["load_format"] == "flattened_bucket"
    torch.cuda.synchronize()
    return sent, time.perf_counter() - start


def nccl_bucket(dry_run: bool, megabytes: int = 512) -> str:
    _need_gpu(dry_run, f"broadcast {megabytes} MB of flattened bf16 buckets in a one-rank NCCL world")
    from megatron_vespo.launch import run_ranks

    sent, seconds = run_ranks(_bucket_rank, 1, megabytes)[0]
    return f"{human_bytes(sent)} in {seconds * 1e3:.0f} ms through NCCL (one rank: the code path, not a link speed)"


SECTIONS = {"gpu tests": gpu_tests, "loss path": loss_path, "log-prob memory": logprob_memory,
            "MoE train step": moe_train_step, "NCCL bucket": nccl_bucket}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="no GPU work: say what would run")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(SECTIONS))
    args = parser.parse_args()
    # the checkout for the subprocesses (pytest, spawned ranks), ahead of any carried wheels
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"gpu_check: {device}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}"
          f"{' (dry run)' if args.dry_run else ''}", flush=True)
    rows, failed = [], False
    for name, section in SECTIONS.items():
        if name in args.skip:
            rows.append([name, "skip", "--skip"])
            continue
        start = time.perf_counter()
        try:
            result, status = section(args.dry_run), "ok"
        except Skip as why:
            result, status = str(why), "skip"
        except Exception:  # noqa: BLE001 - one failing section must not hide the others
            traceback.print_exc()
            result, status, failed = traceback.format_exc().strip().splitlines()[-1], "FAIL", True
        rows.append([name, status, f"{result} [{time.perf_counter() - start:.0f} s]"])
        print(f"  {name}: {status}", flush=True)
    print_table(["section", "status", "result"], rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
