"""Staleness study through the product: does `megatron-vespo train` keep VESPO's ordering when the
samples are N policy versions old and the engine computes in other numerics than the learner?

Each cell is one real run of `megatron-vespo train` (megatron-core learner, fp32 master weights,
local spec; MLflow tracking) on the built-in synthetic task with the tiny Qwen3-MoE of
`configs/tiny_moe_cpu.yaml`, sampling from one SGLang server that computes in bfloat16
(`--engine-dtype`), so the train/inference mismatch and the engine-vs-trainer routing mismatch are
real; each cell reports their size (`mismatch/k3_kl`, `moe/route_topk_mismatch_frac`). The
importance weight is taken against the engine's log-probs (`algorithm.correct_mismatch: true`): W
holds both the staleness and the mismatch, as in the paper.

Shared by every cell: a short supervised warm-up (`product_warmup.py`, made once), and one fleet
(server + router, started once): each cell attaches to it (`rollout.fleet.attach_router_url`) and
its first weight sync puts the warm-up weights back. Cells of one seed see the same prompts, the
same number of samples and optimizer steps and the same learning rate; only the loss, N and
routing replay differ. R3 cells (`--r3`) replay the engine's routes in training at the largest N.

Writes into --out: results.csv (a row per cell: warm-up, final and best held-out reward, mean k3
KL, route mismatch, route drift and spread of log W), steps.csv (the cells' step and evaluation
rows), curves_N{n}.png, cells/ (each cell's run directory and log; a finished cell is reused when
the study is run again with the same --out), and mlflow.db (one MLflow run per cell, as the
product logs it, plus a "summary" run holding the CSVs and PNGs). Prints a summary table; exits
non-zero if a cell failed.

    python benchmarks/staleness/product.py --quick   # vespo, grpo; N in {1, 16}; seed 0
    python benchmarks/staleness/product.py           # 4 losses x N in {1, 16} x 3 seeds, R3 cells
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, make_dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from benchmarks.common import print_table  # noqa: E402
from benchmarks.staleness.plots import curves_png  # noqa: E402
from benchmarks.staleness.product_warmup import warm_up_checkpoint  # noqa: E402
from benchmarks.staleness.sweep import (comma_list, mean_spread, resolve_sweep,  # noqa: E402
                                       sweep_parser, write_csv)
from megatron_vespo.config import load_config  # noqa: E402
from megatron_vespo.tracking.jsonl import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BASE_CONFIG = REPO / "configs" / "tiny_moe_cpu.yaml"
EXPERIMENT = "staleness-product"
EVAL_SET = "sampled"  # held-out prompts, k responses each at the training temperature
LOSSES = ("vespo", "grpo", "gspo", "sapo")
QUICK = {"losses": "vespo,grpo", "ns": "1,16", "seeds": "0", "r3": ""}
FULL = {"losses": ",".join(LOSSES), "ns": "1,16", "seeds": "0,1,2", "r3": "vespo,grpo"}
# Per-step metrics a cell's row of steps.csv keeps (the run's metrics.jsonl has them all).
STEP_KEYS = ("reward/mean", "loss", "grad_norm", "is/log_w_std", "is/log_w_mean", "phi/mean",
             "phi/ess", "mismatch/k3_kl", "mismatch/extreme_frac", "moe/route_topk_mismatch_frac",
             "moe/drift_topk_mismatch_frac", "staleness/versions_behind")


@dataclass(frozen=True)
class Cell:
    loss: str
    n: int
    seed: int
    r3: bool = False

    @property
    def method(self) -> str:
        return f"{self.loss}+R3" if self.r3 else self.loss

    @property
    def name(self) -> str:
        return f"{self.method}_N{self.n}_s{self.seed}"


def parse_args(argv=None) -> argparse.Namespace:
    p = sweep_parser(__doc__, QUICK, LOSSES)
    p.add_argument("--r3", help="comma-separated losses that also run with R3 at the largest N")
    p.add_argument("--steps", type=int, default=64, help="optimizer steps per cell")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4, help="responses per prompt")
    p.add_argument("--eval-every", type=int, default=8, help="steps between evaluations")
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--eval-k", type=int, default=4, help="responses per held-out prompt (T = 1)")
    p.add_argument("--warmup-steps", type=int, default=8, help="supervised warm-up steps")
    p.add_argument("--warmup-lr", type=float, default=3e-3)
    p.add_argument("--engine-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--out", default="runs/staleness_product", help="output directory")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.r3 = comma_list(preset["r3"] if args.r3 is None else args.r3)
    unknown = sorted(set(args.r3) - set(LOSSES))
    if unknown:
        p.error(f"--r3: unknown loss(es) {unknown}; choose from {list(LOSSES)}")
    return resolve_sweep(p, args, preset, LOSSES)


def study_cells(args: argparse.Namespace) -> list[Cell]:
    cells = []
    for seed in args.seeds:
        cells += [Cell(loss, n, seed) for loss in args.losses for n in args.ns]
        cells += [Cell(loss, max(args.ns), seed, r3=True) for loss in args.r3]
    return cells


def eval_set_override(args: argparse.Namespace) -> str:
    return (f"task.eval_sets=[{{name: {EVAL_SET}, k: {args.eval_k}, temperature: 1.0}}]")


def cell_overrides(args: argparse.Namespace, cell: Cell, warm: Path, router_url: str,
                   out: Path) -> list[str]:
    """The dotted overrides of configs/tiny_moe_cpu.yaml that make `cell`'s run."""
    mini_batch = args.prompts_per_step * args.group_size
    replay = "R3" if cell.r3 else "'off'"  # quoted: YAML reads a bare off as false
    return [
        f"algorithm.loss={cell.loss}", "algorithm.correct_mismatch=true",
        f"algorithm.routing_replay={replay}", "algorithm.routing_metrics=true",
        f"optim.lr={args.lr}",
        f"train.init_hf_checkpoint={warm}", f"train.staleness={cell.n}",
        f"train.rollout_batch_size={cell.n * mini_batch}", f"train.micro_batch_size={mini_batch}",
        f"train.max_steps={args.steps}", f"train.eval_interval={args.eval_every}",
        "train.save_interval=0", "train.heatmap_interval=0", "train.histogram_interval=0",
        f"train.seed={cell.seed}", f"task.seed={cell.seed}", f"task.eval_size={args.eval_prompts}",
        eval_set_override(args),
        f"rollout.n_samples_per_prompt={args.group_size}",
        f"rollout.fleet.attach_router_url={router_url}",
        "rollout.fleet.server.enable_routed_experts=true",
        f"tracking.uri=sqlite:///{(out / 'mlflow.db').resolve()}", f"tracking.experiment={EXPERIMENT}",
        f"tracking.run_name={cell.name}",
    ]


def make_warmup(args: argparse.Namespace, out: Path) -> Path:
    """The warm-up checkpoint, made once per --out (reused when its settings match)."""
    warm = out / "warmup"
    settings = {"steps": args.warmup_steps, "lr": args.warmup_lr}
    stamp = warm / "warmup.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return warm
    model = load_config(BASE_CONFIG).model
    losses = warm_up_checkpoint(model, warm, args.warmup_steps, args.warmup_lr)
    stamp.write_text(json.dumps(settings))
    print(f"warm-up: {args.warmup_steps} supervised steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}",
          flush=True)
    return warm


class SharedFleet:
    """One SGLang server (engine dtype of the study) and its router, started from the warm-up
    checkpoint with a study-wide API key that every cell's run gets through the environment."""

    def __init__(self, warm: Path, dtype: str, log_dir: Path) -> None:
        from megatron_vespo.rollout.auth import ENV, use_api_key
        from megatron_vespo.rollout.fleet import Fleet, FleetConfig
        from megatron_vespo.rollout.server import ServerOptions

        self.env = {**os.environ, ENV: os.environ.get(ENV) or secrets.token_urlsafe(32)}
        use_api_key(self.env[ENV])
        server = ServerOptions(dtype=dtype, enable_routed_experts=True, max_total_tokens=16384)
        self.fleet = Fleet.launch(str(warm), FleetConfig(server=server), log_dir)

    def warmup_reward(self, args: argparse.Namespace, seed: int) -> float:
        """The held-out reward of the weights the fleet holds (the warm-up's, before any cell)."""
        from megatron_vespo.rollout.evaluation import evaluate_sets
        from megatron_vespo.tasks import build_task, load_tokenizer

        config = load_config(BASE_CONFIG, [f"task.seed={seed}", f"task.eval_size={args.eval_prompts}",
                                           eval_set_override(args)])
        task = build_task(config.task, load_tokenizer(config.task, None))
        metrics = evaluate_sets(self.fleet, task.eval_sets(), task.rewards, config.rollout.sampling)
        return metrics[f"eval/{EVAL_SET}/reward"]

    def close(self) -> None:
        self.fleet.shutdown()


def run_cell(args: argparse.Namespace, cell: Cell, warm: Path, fleet: SharedFleet,
             out: Path) -> Optional[tuple[list[dict], float]]:
    """`cell`'s metrics rows and seconds: run now, or read back from an earlier study's finished run
    of the same settings; None when the run failed (its log tail is printed)."""
    run_dir = out / "cells" / cell.name
    overrides = cell_overrides(args, cell, warm.resolve(), fleet.fleet.router_url, out)
    # What the cell's result depends on: its run's config (the fleet's address aside), and what the
    # study gives every cell from outside it (the warm-up behind the fixed path, the engine's dtype).
    settings = [o for o in overrides if not o.startswith("rollout.fleet.attach_router_url=")] + [
        f"warmup_steps={args.warmup_steps}", f"warmup_lr={args.warmup_lr}",
        f"engine_dtype={args.engine_dtype}"]
    stamp = run_dir / "study_cell.json"
    if stamp.exists():
        done = json.loads(stamp.read_text())
        if done.get("settings") == settings:
            return read_metrics(run_dir / "metrics.jsonl"), done["seconds"]
    if run_dir.exists():  # unfinished, or run with other settings: the cell runs again
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "megatron_vespo.cli", "train", str(BASE_CONFIG), *overrides,
            "--run-dir", str(run_dir)]
    (run_dir / "command.txt").write_text(" ".join(argv) + "\n")
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        code = subprocess.call(argv, cwd=REPO, env=fleet.env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        tail = (run_dir / "train.log").read_text().splitlines()[-30:]
        print(f"{cell.name}: FAILED (exit {code}); log tail:\n  " + "\n  ".join(tail), flush=True)
        return None
    seconds = time.perf_counter() - start
    stamp.write_text(json.dumps({"settings": settings, "seconds": seconds}))
    return read_metrics(run_dir / "metrics.jsonl"), seconds


def cell_result(cell: Cell, rows: list[dict], warmup_reward: float, seconds: float,
                last_step: int) -> dict:
    """results.csv's row of a cell: held-out reward at the last evaluation and the best one, the
    last quarter's training reward, and means over its steps of the engine-vs-learner mismatch (k3
    KL of the log-probs, top-k route sets that differ), of the route drift within a rollout batch
    (old policy vs the one trained) and of the spread of log W. The final reward is the evaluation
    of `last_step`'s weights: NaN when that evaluation failed (the run logs eval/failed)."""
    evals = {r["step"]: r[f"eval/{EVAL_SET}/reward"] for r in rows if f"eval/{EVAL_SET}/reward" in r}
    steps = [r for r in rows if "loss" in r]
    tail = steps[-max(1, len(steps) // 4):]

    def mean(key: str, of: list[dict]) -> float:
        values = [r[key] for r in of if r.get(key) is not None]
        return float(np.mean(values)) if values else float("nan")

    return {"method": cell.method, "N": cell.n, "seed": cell.seed, "warmup_reward": warmup_reward,
            "final_reward": evals.get(last_step, float("nan")),
            "best_reward": max(evals.values(), default=float("nan")),
            "train_reward_last_quarter": mean("reward/mean", tail),
            "k3_kl": mean("mismatch/k3_kl", steps),
            "route_topk_mismatch": mean("moe/route_topk_mismatch_frac", steps),
            "route_drift": mean("moe/drift_topk_mismatch_frac", steps),
            "log_w_std": mean("is/log_w_std", steps), "steps": len(steps), "seconds": seconds}


def curve_rows(rows: list[dict], warmup_reward: float) -> list[dict]:
    """A cell's rows for `plots.curves_png`: "acc" is the held-out reward (step 0: the warm-up's)."""
    out = [{"step": 0, "acc": warmup_reward}]
    for r in rows:
        row = {"step": r["step"], **{k: r[k] for k in STEP_KEYS if r.get(k) is not None}}
        if f"eval/{EVAL_SET}/reward" in r:
            row["acc"] = r[f"eval/{EVAL_SET}/reward"]
        out.append(row)
    return out


def summarise(results: list[dict], ns: list[int]) -> list[list[object]]:
    """Rows per (method, N): mean (+- std over seeds) final and best held-out reward, the final
    reward kept relative to the same method at the smallest N, the measured mismatch and drift.
    A cell whose final evaluation failed counts in every column but the final reward's."""
    table = []
    for method in dict.fromkeys(r["method"] for r in results):
        base = [r["final_reward"] for r in results if r["method"] == method.split("+")[0]
                and r["N"] == min(ns) and np.isfinite(r["final_reward"])]
        for n in ns:
            cell = [r for r in results if r["method"] == method and r["N"] == n]
            if not cell:
                continue
            final = [r["final_reward"] for r in cell if np.isfinite(r["final_reward"])]
            kept = np.mean(final) / np.mean(base) if final and base and np.mean(base) > 0 \
                else float("nan")
            seeds = f"{len(final)}" if len(final) == len(cell) else f"{len(final)} of {len(cell)}"
            table.append([method, n, seeds, f"{np.mean([r['warmup_reward'] for r in cell]):.3f}",
                          mean_spread(final) if final else "failed",
                          mean_spread([r["best_reward"] for r in cell]), f"{kept:.2f}",
                          f"{np.mean([r['k3_kl'] for r in cell]):.2e}",
                          f"{np.mean([r['route_topk_mismatch'] for r in cell]):.4f}",
                          f"{np.mean([r['route_drift'] for r in cell]):.3f}",
                          f"{np.mean([r['log_w_std'] for r in cell]):.2f}",
                          f"{np.mean([r['seconds'] for r in cell]):.0f}"])
    return table


def log_summary(out: Path, files: list[Path], args: argparse.Namespace) -> None:
    """The study's CSVs and PNGs as artifacts of a "summary" run in the cells' MLflow store."""
    from megatron_vespo.tracking.mlflow_run import TrackingConfig, start_tracker

    settings = {k: v for k, v in vars(args).items() if k != "quick"}
    params = make_dataclass("ProductStudy", list(settings))(**settings)  # what the tracker logs
    with start_tracker(TrackingConfig(experiment=EXPERIMENT, run_name="summary"), out, params) as t:
        for path in files:
            t.log_artifact(path)


def create_experiment(out: Path) -> None:
    """The study's MLflow experiment, with its artifacts under --out (the cells name the store by
    URI, and MLflow would otherwise put a new experiment's artifacts under the working directory)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT, artifact_location=(out / "mlartifacts").resolve().as_uri())


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    warm = make_warmup(args, out)
    create_experiment(out)
    fleet = SharedFleet(warm, args.engine_dtype, out / "fleet")
    results, step_rows, curves, failed = [], [], {}, []
    try:
        warmup_rewards = {seed: fleet.warmup_reward(args, seed) for seed in args.seeds}
        print("warm-up held-out reward: " + ", ".join(f"seed {s}: {r:.3f}"
                                                      for s, r in warmup_rewards.items()), flush=True)
        for cell in study_cells(args):
            ran = run_cell(args, cell, warm, fleet, out)
            if ran is None:
                failed.append(cell.name)
                continue
            rows, seconds = ran
            result = cell_result(cell, rows, warmup_rewards[cell.seed], seconds, args.steps)
            results.append(result)
            curve = curve_rows(rows, warmup_rewards[cell.seed])
            curves[(cell.method, cell.n, cell.seed)] = curve
            step_rows += [{"method": cell.method, "N": cell.n, "seed": cell.seed, **r} for r in curve]
            print(f"{cell.name}: final {result['final_reward']:.3f} best {result['best_reward']:.3f} "
                  f"k3 {result['k3_kl']:.2e} route mismatch {result['route_topk_mismatch']:.3f} "
                  f"({seconds:.0f} s)", flush=True)
    finally:
        fleet.close()
    if results:
        files = [write_csv(out / "results.csv", results), write_csv(out / "steps.csv", step_rows)]
        files += [curves_png(curves, n, out / f"curves_N{n}.png", title="held-out reward (T = 1)")
                  for n in args.ns]
        log_summary(out, files, args)
        print()
        print_table(["method", "N", "seeds", "warm-up", "final reward", "best reward",
                     f"final / N={min(args.ns)}", "k3 KL", "route mismatch", "route drift",
                     "std log W", "s/cell"],
                    summarise(results, args.ns))
    print(f"\n{len(results)} cells in {time.perf_counter() - start:.0f} s; files in {out}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
