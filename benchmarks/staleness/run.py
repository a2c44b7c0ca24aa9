"""Staleness study: which policy loss keeps its accuracy when samples are N policy versions old?

Sweeps loss in {vespo, vespo_adaptive, grpo, gspo, sapo, topr, bapo} x staleness N in {1, 4, 16, 64}
x seeds on a digit-cipher task (`task.py`) with a tiny GRU policy sampled in-process with torch: no
SGLang, no megatron. The losses, log W, phi and metrics are the project's own (`megatron_vespo.algo` through
`parallel.policy_objective.shard_policy_loss`, unsharded). Every cell of a seed starts from the same
supervised warm-up (10-40% held-out accuracy) and sees the same prompts, total samples, learning
rate and number of optimizer steps; only the loss and N differ (see `trainer.py` for the schedule).

Writes into --out: results.csv (one row per method, N and seed: warm-up, final and best held-out
accuracy), steps.csv (per step: staleness, reward, loss metrics, phi / log W / ESS statistics),
curves_N{n}.png, and an MLflow store (mlflow.db: one run per cell with per-step metrics, plus a
"summary" run holding the CSVs and PNGs as artifacts). Prints a summary table.

    python benchmarks/staleness/run.py --quick      # 1 seed, N in {1, 64}, vespo and grpo
    python benchmarks/staleness/run.py              # the full sweep, 3 seeds (about an hour)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import print_table  # noqa: E402
from benchmarks.staleness.plots import curves_png  # noqa: E402
from benchmarks.staleness.sweep import (mean_spread, resolve_sweep, sweep_parser,  # noqa: E402
                                       write_csv)
from benchmarks.staleness.task import CipherTask  # noqa: E402
from benchmarks.staleness.trainer import LOSSES, StudyConfig, train_cell, warm_up  # noqa: E402
from megatron_vespo.tracking.mlflow_run import TrackingConfig, start_tracker  # noqa: E402

QUICK = {"losses": "vespo,grpo", "ns": "1,64", "seeds": "0"}
FULL = {"losses": ",".join(LOSSES), "ns": "1,4,16,64", "seeds": "0,1,2"}
EXPERIMENT = "staleness-study"


@dataclass(frozen=True)
class CellParams:
    """What one MLflow run of a cell records as params."""

    loss: str
    staleness: int
    seed: int
    warmup_acc: float
    study: StudyConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = sweep_parser(__doc__, QUICK, LOSSES)
    p.add_argument("--steps", type=int, default=StudyConfig.steps, help="optimizer steps per cell")
    p.add_argument("--lr", type=float, default=StudyConfig.lr)
    p.add_argument("--eval-every", type=int, default=StudyConfig.eval_every)
    p.add_argument("--prompts-per-step", type=int, default=StudyConfig.prompts_per_step)
    p.add_argument("--group-size", type=int, default=StudyConfig.group_size)
    p.add_argument("--budget", type=float, default=StudyConfig.control_budget,
                   help="vespo_adaptive: the E_Q[W] budget C")
    p.add_argument("--control-step", type=float, default=StudyConfig.control_step_size,
                   help="vespo_adaptive: the dual step on c2 per unit of E_Q[W] - C")
    p.add_argument("--out", default="runs/staleness", help="output directory")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--no-mlflow", action="store_true", help="skip MLflow logging")
    args = p.parse_args(argv)
    return resolve_sweep(p, args, QUICK if args.quick else FULL, LOSSES)


def _tracker(args: argparse.Namespace, out: Path, run_name: str, params: object):
    cfg = TrackingConfig(enabled=not args.no_mlflow, experiment=EXPERIMENT, run_name=run_name)
    return start_tracker(cfg, out, params)


def summarise(results: list[dict], losses: list[str], ns: list[int]) -> list[list[object]]:
    """Table rows per (loss, N): mean final / best accuracy over seeds (+- std when > 1 seed) and
    the final accuracy kept relative to the same loss at the smallest N."""

    table = []
    for loss in losses:
        base = [r["final_acc"] for r in results if r["method"] == loss and r["N"] == min(ns)]
        for n in ns:
            cell = [r for r in results if r["method"] == loss and r["N"] == n]
            if not cell:
                continue
            final = [r["final_acc"] for r in cell]
            kept = np.mean(final) / np.mean(base) if base and np.mean(base) > 0 else math.nan
            table.append([loss, n, len(cell), f"{np.mean([r['warmup_acc'] for r in cell]):.3f}",
                          mean_spread(final), mean_spread([r["best_acc"] for r in cell]), f"{kept:.2f}",
                          f"{np.mean([r['seconds'] for r in cell]):.0f}"])
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(StudyConfig(), steps=args.steps, lr=args.lr, eval_every=args.eval_every,
                  prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                  control_budget=args.budget, control_step_size=args.control_step)
    task = CipherTask()
    results: list[dict] = []
    step_rows: list[dict] = []
    cells: dict[tuple[str, int, int], list[dict]] = {}
    start = time.perf_counter()
    for seed in args.seeds:
        warm, warm_acc, _ = warm_up(task, cfg, seed)
        if not 0.1 <= warm_acc <= 0.4:
            print(f"warning: warm-up accuracy {warm_acc:.3f} is outside 10-40%", flush=True)
        for loss in args.losses:
            for n in args.ns:
                name = f"{loss}_N{n}_s{seed}"
                t0 = time.perf_counter()
                with _tracker(args, out, name, CellParams(loss, n, seed, warm_acc, cfg)) as tracker:
                    rows = train_cell(task, cfg, warm, loss, n, seed,
                                      on_step=lambda step, row: tracker.log_metrics(step, row))
                    accs = [r["acc"] for r in rows if "acc" in r]
                    result = {"method": loss, "N": n, "seed": seed, "warmup_acc": warm_acc,
                              "final_acc": accs[-1], "best_acc": max(accs),
                              "seconds": time.perf_counter() - t0}
                    tracker.log_metrics(cfg.steps, {"final_acc": result["final_acc"],
                                                    "best_acc": result["best_acc"]})
                cells[(loss, n, seed)] = rows
                results.append(result)
                # "method", not "loss": a step row already has "loss", the loss value.
                step_rows += [{"method": loss, "N": n, "seed": seed, **r} for r in rows]
                print(f"{name}: final {result['final_acc']:.3f} best {result['best_acc']:.3f} "
                      f"({result['seconds']:.0f} s)", flush=True)
    files = [write_csv(out / "results.csv", results), write_csv(out / "steps.csv", step_rows)]
    files += [curves_png(cells, n, out / f"curves_N{n}.png") for n in args.ns]
    table = summarise(results, args.losses, args.ns)
    with _tracker(args, out, "summary", replace(cfg)) as tracker:
        for path in files:
            tracker.log_artifact(path)
    headers = ["loss", "N", "seeds", "warm-up acc", "final acc", "best acc",
               f"final / N={min(args.ns)}", "s/cell"]
    print()
    print_table(headers, table)
    print(f"\n{len(results)} cells in {time.perf_counter() - start:.0f} s; files in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
