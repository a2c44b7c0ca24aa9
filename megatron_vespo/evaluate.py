"""`megatron-vespo eval CONFIG --checkpoint PATH`: one checkpoint on every evaluation set.

PATH is an HF directory (config.json + safetensors), a megatron checkpoint directory (`step_N`, as
training writes them) or a run's checkpoint root (its `latest`). A megatron checkpoint is first
exported to HF by the learner ranks of the config's layout (`RUN_DIR/eval/step_N/hf`); the fleet
then starts from the HF weights, the task's evaluation sets (`task.eval_sets`) are generated and
scored (rollout/evaluation.py), a table is printed and the metrics go to MLflow: into the run
directory's run at the checkpoint's step (so checkpoints of one run line up on one chart), or into a
new run with `--new-run` or when the run directory has none.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from .config import Config
from .learner.checkpoint import CONFIG_FILE, latest_checkpoint, load_checkpoint_dir
from .learner.hf_files import check_hf_checkpoint


def _export_rank(rank: int, world_size: int, config: Config, checkpoint: str, out: str) -> int:
    """One learner rank: the checkpoint's weights into an HF directory; returns its step."""
    from .learner.hf_convert import export_model_to_hf
    from .trainer import build_learner

    # The checkpoint overwrites every weight: the initial HF checkpoint need not be read first.
    learner = build_learner(replace(config, train=replace(config.train, init_hf_checkpoint=None)))
    load_checkpoint_dir(learner, checkpoint)
    export_model_to_hf(out, [c.module for c in learner.chunks], config.model, config.parallel,
                       overwrite=True)
    return learner.policy_version


def hf_weights(config: Config, checkpoint: Path, run_dir: Path) -> tuple[Path, Optional[int]]:
    """(an HF directory of the checkpoint's weights, its training step or None)."""
    from .launch import run_ranks

    if (checkpoint / "config.json").is_file():
        check_hf_checkpoint(checkpoint, config.model)
        return checkpoint, None
    if not (checkpoint / CONFIG_FILE).is_file():
        found = latest_checkpoint(checkpoint)
        if found is None:
            raise ValueError(f"--checkpoint {checkpoint}: neither an HF directory (config.json), a "
                             f"megatron checkpoint ({CONFIG_FILE}) nor a checkpoint root (latest)")
        checkpoint = found
    out = run_dir / "eval" / checkpoint.name / "hf"
    step = run_ranks(_export_rank, config.train.world_size, config, str(checkpoint), str(out))[0]
    return out, step


def format_table(metrics: dict[str, float], sets) -> str:
    """One line per set: k, avg@k, pass@k, mean reward, response tokens, truncated, prompts, s."""
    lines = [f"{'set':<16} {'k':>3} {'avg@k':>7} {'pass@k':>7} {'reward':>7} {'tokens':>7} "
             f"{'trunc':>6} {'prompts':>7} {'seconds':>8}"]
    for s in sets:
        name, k = s.config.name, s.config.k
        m = {key.split("/", 2)[2]: v for key, v in metrics.items() if key.startswith(f"eval/{name}/")}
        if f"avg@{k}" not in m:
            lines.append(f"{name:<16} {k:>3}  (no result: every group skipped)")
            continue
        lines.append(f"{name:<16} {k:>3} {m[f'avg@{k}']:>7.3f} {m[f'pass@{k}']:>7.3f} "
                     f"{m['reward']:>7.3f} {m['response_tokens']:>7.1f} {m['truncated_frac']:>6.2f} "
                     f"{m['prompts']:>7.0f} {m['seconds']:>8.1f}")
    if "eval/mean_avg" in metrics:
        lines.append(f"{'mean':<16} {'':>3} {metrics['eval/mean_avg']:>7.3f} "
                     f"{metrics['eval/mean_pass']:>7.3f}")
    return "\n".join(lines)


def log_to_mlflow(config: Config, run_dir: Path, checkpoint: Path, step: Optional[int],
                  metrics: dict[str, float], new_run: bool) -> tuple[str, str]:
    """Log the evaluation to the run directory's MLflow run at `step` (0 for an HF directory), or
    to a new run; returns (run id, "run" | "new run")."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from .config import flatten
    from .tracking.mlflow_run import Tracker, fit_param_value, metric_key

    uri = config.tracking.resolved_uri(run_dir)
    client = MlflowClient(uri)
    record = run_dir / Tracker.RUN_FILE
    stored = json.loads(record.read_text()) if record.is_file() else {}
    now = int(time.time() * 1000)
    rows = [Metric(metric_key(k), float(v), now, step or 0) for k, v in metrics.items()]
    if not new_run and stored.get("tracking_uri") == uri:
        run_id, where = stored["run_id"], "run"
    else:
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment(config.tracking.experiment))
        run = client.create_run(experiment_id, run_name=f"eval {checkpoint.name}",
                                tags={"megatron_vespo.eval_checkpoint": str(checkpoint.resolve())})
        run_id, where = run.info.run_id, "new run"
        params = [Param(metric_key(k), fit_param_value(v))
                  for k, v in flatten(config.task, "task.").items() if k.startswith("task.eval_sets")]
        client.log_batch(run_id, params=params)
    client.log_batch(run_id, metrics=rows, tags=[RunTag(f"megatron_vespo.eval.step_{step or 0}",
                                                        str(checkpoint.resolve()))])
    if where == "new run":
        client.set_terminated(run_id)
    return run_id, where


def evaluate_checkpoint(config: Config, checkpoint: Path, new_run: bool = False) -> dict[str, float]:
    """Export if needed, start a fleet on the weights, evaluate every set, print and log."""
    from .rollout.auth import run_api_key, use_api_key
    from .rollout.evaluation import evaluate_sets
    from .rollout.fleet import Fleet
    from .tasks import build_task, load_tokenizer

    r, run_dir = config.rollout, Path(config.train.output_dir)
    if r.fleet.attach_router_url:
        raise ValueError("eval starts its own fleet on the checkpoint's weights: unset "
                         "rollout.fleet.attach_router_url")
    if not config.task.resolved_eval_sets:
        raise ValueError("the config has no evaluation set: set task.eval_sets (or "
                         "task.data.eval_path with task.eval_size > 0)")
    model_path, step = hf_weights(config, Path(checkpoint), run_dir)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / srun: rank 0 alone evaluates
        return {}
    task = build_task(config.task, load_tokenizer(config.task, config.train.init_hf_checkpoint
                                                  or str(model_path)))
    use_api_key(run_api_key(run_dir))
    fleet = Fleet.launch(str(model_path), r.fleet, run_dir / "eval" / "fleet", seed=config.train.seed)
    try:
        sets = task.eval_sets()
        metrics = evaluate_sets(fleet, sets, task.rewards, r.sampling, r.max_in_flight)
    finally:
        fleet.shutdown()
        task.close()
    print(f"checkpoint {checkpoint}" + (f" (step {step})" if step is not None else ""))
    print(format_table(metrics, sets))
    if config.tracking.enabled:
        run_id, where = log_to_mlflow(config, run_dir, Path(checkpoint), step, metrics, new_run)
        print(f"logged to MLflow {where} {run_id} at step {step or 0} ({config.tracking.resolved_uri(run_dir)})")
    return metrics
