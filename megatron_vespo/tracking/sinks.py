"""Rank 0's outputs of a training run, the same for every source of samples: one row per step in
`metrics.jsonl`, the sample ids of every step in `samples_consumed.jsonl` (both flushed per line,
so a killed run keeps the record of every step it finished), the MLflow run, the expert-load
heat-maps and weight/phi histograms when due, and a progress bar."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .heatmap import write_load_heatmap
from .jsonl import JsonlMetrics
from .mlflow_run import start_tracker

# Parameter-name fragments -> histogram panel; the first match wins.
_WEIGHT_GROUPS = (("router", "router"), ("experts", "experts"), ("embedding", "embedding"),
                  ("output_layer", "output layer"), ("norm", "norms"), ("self_attention", "attention"),
                  ("mlp", "mlp"))


def weight_histogram_values(chunks) -> dict[str, torch.Tensor]:
    """This rank's parameters, flattened per group (its shard of each; rank 0 logs them)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            group = next((g for key, g in _WEIGHT_GROUPS if key in name), "other")
            groups.setdefault(group, []).append(param.detach().float().flatten().cpu())
    return {f"weights/{g}": torch.cat(v) for g, v in groups.items()}


def _progress_fields(m: dict) -> dict:
    return {"reward": f"{m.get('reward/mean', float('nan')):.3f}",
            "phi": f"{m.get('phi/mean', float('nan')):.3f}",
            "stale": f"{m.get('staleness/sample_lag_mean', 0.0):.1f}",
            "grad": f"{m.get('grad_norm', float('nan')):.3g}"}


def rewind(path: Path, step: int) -> int:
    """Drop the rows of a per-step JSONL file after `step` (rewritten atomically); returns how many
    steps were dropped. A run resumed from step N trains steps N+1.. again, so its history keeps
    each step once: the one that led to the weights it continues from."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


class RunSinks:
    """Everything rank 0 writes about the steps of a run (`config`: the resolved `Config`). A
    resumed run's JSONL files are first rewound to its checkpoint's step (`rewind`)."""

    def __init__(self, config: Any, run_dir: Path, resume: bool, start_step: int) -> None:
        self.config, self.run_dir = config, Path(run_dir)
        if resume:
            dropped = max(rewind(self.run_dir / name, start_step)
                          for name in ("metrics.jsonl", "samples_consumed.jsonl"))
            if dropped:
                print(f"[megatron-vespo] dropped {dropped} logged step(s) after step {start_step} "
                      f"from {self.run_dir}'s history: they are trained again", file=sys.stderr,
                      flush=True)
        self.jsonl = JsonlMetrics(self.run_dir / "metrics.jsonl")
        self._consumed = open(self.run_dir / "samples_consumed.jsonl", "a")
        self.tracker = start_tracker(config.tracking, self.run_dir, config, resume=resume,
                                     resume_step=start_step)
        # Into a job's log file (not a terminal) the bar writes a line every 30 s, not every step.
        self.bar = tqdm(total=config.train.max_steps or None, initial=start_step, unit="step",
                        desc="train", dynamic_ncols=True,
                        mininterval=0.1 if sys.stderr.isatty() else 30.0)

    def step_done(self, step: int, learner, sample_ids: list[str]) -> None:
        """After optimizer step `step`: its sample ids, and the heat-map and histograms when due
        (while the learner still holds that step's routing load and phi)."""
        self._consumed.write(json.dumps({"step": step, "sample_ids": sample_ids}) + "\n")
        self._consumed.flush()
        cfg = self.config.train
        load = learner.routing.last_load if learner.routing is not None else None
        if cfg.heatmap_interval and step % cfg.heatmap_interval == 0 and load is not None:
            path = self.run_dir / "routing" / f"step_{step:08d}.png"
            write_load_heatmap(load, path, title=f"expert load, step {step}")
            self.tracker.log_artifact(path, "routing")
        if cfg.histogram_interval and step % cfg.histogram_interval == 0:
            values = weight_histogram_values(learner.chunks)
            if learner.last_seq_coef is not None:
                values["phi (rank 0 sequences)"] = learner.last_seq_coef
            self.tracker.log_histograms(step, values)

    def log(self, step: int, metrics: dict) -> None:
        """One step's row."""
        self.jsonl.log(step, metrics)
        self.tracker.log_metrics(step, metrics)
        # The fields first, then the count: update() redraws at most every mininterval.
        self.bar.set_postfix(_progress_fields(metrics), refresh=False)
        self.bar.update(step - self.bar.n)

    def log_evaluation(self, step: int, metrics: dict) -> None:
        """An evaluation of the weights of `step`, in a row of its own (it may finish steps later)."""
        self.jsonl.log(step, metrics)
        self.tracker.log_metrics(step, metrics)

    def close(self, status: str) -> None:
        self.bar.close()
        self.jsonl.close()
        self._consumed.close()
        self.tracker.close(status)
