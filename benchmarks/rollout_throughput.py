"""Rollout throughput (generated tokens/s) with 1 vs 2 SGLang servers behind the router, one run.

A tiny dense Qwen3 (built locally) is served by a fleet of two CPU servers behind sglang-router. The
same batch (`--groups` prompts x `--n` samples x `--max-new-tokens` tokens, no stop tokens, so every
batch generates the same number of tokens) goes through the RolloutClient with both servers listed,
then with one of them taken out of the router, alternating `--repeats` times so that machine-load
drift hits both settings. Reported: median and best tokens/s per setting and the ratio 2 / 1 of the
medians. Target: > 1.0 (on a 2-core machine the servers compete for the same cores; expect modest
gains, and more on machines with a core or GPU per server).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, verdict  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=32, help="prompts per batch")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed batches per setting")
    p.add_argument("--max-in-flight", type=int, default=64)
    p.add_argument("--base-port", type=int, default=32050)
    p.add_argument("--router-port", type=int, default=32040)
    p.add_argument("--target", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="16 groups, 24 tokens, 2 repeats (~2-3 min)")
    args = p.parse_args()
    if args.quick:
        args.groups, args.max_new_tokens, args.repeats = 16, 24, 2
    return args


def build_model(directory: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   tie_word_embeddings=False, max_position_embeddings=512)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(directory)


def main() -> int:
    args = parse_args()
    from megatron_vespo.rollout.client import RolloutClient, SamplingOptions
    from megatron_vespo.tasks.base import Prompt
    from megatron_vespo.rollout.fleet import Fleet, FleetConfig
    from megatron_vespo.rollout.server import ServerOptions

    prompts = [Prompt(g, [1 + g % 100, 7, 3 + g % 11, 9], {}) for g in range(args.groups)]
    sampling = SamplingOptions(max_new_tokens=args.max_new_tokens)
    # On CPU sglang sizes its KV cache from free host memory unless told otherwise.
    cfg = FleetConfig(num_servers=2, base_port=args.base_port, router_port=args.router_port,
                      server=ServerOptions(max_total_tokens=16384))
    tokens_per_s: dict[str, list[float]] = {"1 server": [], "2 servers": []}
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp) / "model")
        with Fleet.launch(str(Path(tmp) / "model"), cfg, Path(tmp) / "logs") as fleet:
            client = RolloutClient(fleet, sampling, n=args.n, max_in_flight=args.max_in_flight)
            spare = fleet.servers[1].url
            client.generate_batch(prompts[:4], progress=False)  # first requests compile and allocate
            for _ in range(args.repeats):
                for setting in ("2 servers", "1 server"):
                    if setting == "1 server":
                        fleet.router.remove_worker(spare)
                    else:
                        if fleet.router.find(spare) is None:
                            fleet.router.add_worker(spare)
                        fleet.router.wait_workers([spare])
                    client.generate_batch(prompts, progress=False)
                    tokens_per_s[setting].append(client.stats.tokens_per_s)
    tokens = args.groups * args.n * args.max_new_tokens
    print(f"rollout of {args.groups} prompts x n={args.n} x {args.max_new_tokens} new tokens ({tokens} tokens) "
          f"on a tiny Qwen3 (CPU), {args.repeats} interleaved batches per setting after one warm-up")
    print_table(["servers behind router", "median tokens/s", "best tokens/s"],
                [[k, f"{statistics.median(v):.1f}", f"{max(v):.1f}"] for k, v in tokens_per_s.items()])
    ratio = statistics.median(tokens_per_s["2 servers"]) / statistics.median(tokens_per_s["1 server"])
    print(f"RESULT rollout tokens/s 2 servers / 1 server (median) = {ratio:.3f} "
          f"(target > {args.target}): {verdict(ratio > args.target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
