"""`megatron-vespo` command line.

- `train CONFIG [KEY=VALUE ...]`: online RL: the SGLang fleet (started here, or attached to), the
  megatron-core learners, MLflow tracking; `--resume` continues the run; `--rollouts FILE` trains
  offline on recorded samples instead.
- `serve CONFIG`: one node's share of a fleet (SGLang server, optionally the router), for Slurm.
- `slurm submit CONFIG`: render the heterogeneous sbatch job from the config and submit it.
- `eval CONFIG --checkpoint PATH`: a checkpoint (megatron or HF) on every evaluation set of the
  config (avg@k, pass@k), printed and logged to MLflow.
- `prepare-data RECIPE INPUT OUTPUT`: a downloaded math set (DAPO-Math-17k, AIME, AMC, MATH-500)
  into the math task's prompt file.
- `tracking flush RUN_DIR`: send a run's buffered MLflow requests without a learner or a fleet.
- `demo`: the configured kernel (phi table, mode, peak, variance-bound constant K) and what it does
  to increasingly stale batches next to naive sequence importance sampling.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from .algo.kernel import (KernelConstants, kernel_mode, kernel_peak, variance_bound_constant,
                          vespo_phi)
from .config import dump_config, flatten, load_config
from .launch import dump_stacks_on_signal
from .algo.metrics import sequence_metrics
from .algo.importance import SequenceStats

TABLE_W = (0.25, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0)
CPU_SERVER_DTYPES = ("auto", "float32", "bfloat16")  # what SGLang's CPU backend runs


def _kernel_report(k: KernelConstants) -> list[str]:
    lines = ["phi(W) = W^c1 * exp(c2 * (1 - W))   [VESPO, arXiv 2602.10693, Eq. 20]", ""]
    w = torch.tensor(TABLE_W, dtype=torch.float64)
    pos = vespo_phi(w.log(), torch.ones_like(w), **k.__dict__)
    neg = vespo_phi(w.log(), -torch.ones_like(w), **k.__dict__)
    lines.append(f"{'W':>6} | {'A>=0':>8} | {'A<0':>8}")
    lines.append("-" * 28)
    lines += [f"{wi:>6.2f} | {p:>8.3f} | {n:>8.3f}" for wi, p, n in zip(TABLE_W, pos, neg)]
    lines += ["", f"{'sign':>5} | {'c1':>5} | {'c2':>5} | {'mode':>6} | {'peak':>6} | {'K=sup phi/w':>11}",
              "-" * 54]
    for sign, positive in (("A>=0", True), ("A<0", False)):
        c1, c2 = k.for_sign(positive)
        lines.append(f"{sign:>5} | {c1:>5.2f} | {c2:>5.2f} | {kernel_mode(c1, c2):>6.3f} | "
                     f"{kernel_peak(c1, c2):>6.3f} | {variance_bound_constant(c1, c2):>11.3f}")
    return lines


def _staleness_report(k: KernelConstants, num_seqs: int, seed: int) -> list[str]:
    """Sequence log-weights drawn wider and wider (a proxy for staler data): VESPO keeps the
    effective sample size up where the naive product W collapses onto a few sequences."""
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(num_seqs, generator=g)
    lines = ["", f"{num_seqs} sequences, log W ~ N(-s^2/2, s^2) (E[W] = 1): normalised ESS and E[weight^2]",
             f"{'s':>5} | {'ESS vespo':>9} | {'ESS W':>9} | {'E[phi^2]':>9} | {'E[W^2]':>9} | {'E[phi^2]/ZKC':>12}",
             "-" * 68]
    bound = (variance_bound_constant(*k.for_sign(True)), variance_bound_constant(*k.for_sign(False)))
    for s in (0.1, 0.5, 1.0, 2.0, 4.0):
        log_w = -s * s / 2 + s * torch.randn(num_seqs, generator=g)
        seq = SequenceStats(log_w, torch.ones(num_seqs), torch.zeros(num_seqs))
        phi = vespo_phi(log_w, adv, **k.__dict__)
        m = sequence_metrics(seq, adv, phi, bound).finalize()
        naive = sequence_metrics(seq, adv, log_w.clamp(-20, 20).exp(), (1.0, 1.0)).finalize()
        lines.append(f"{s:>5.1f} | {m['phi/ess']:>9.3f} | {naive['phi/ess']:>9.3f} | "
                     f"{m['phi/sq_mean']:>9.3f} | {naive['phi/sq_mean']:>9.3g} | "
                     f"{m['phi/bound_ratio_pos']:>12.3f}")
    return lines


def demo(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    k = config.algorithm.vespo
    resolved = [f"{key} = {value}" for key, value in flatten(config.algorithm, "algorithm.").items()
                if key.startswith(("algorithm.vespo.", "algorithm.loss"))]
    print("\n".join(resolved + [""] + _kernel_report(k) + _staleness_report(k, args.num_seqs, args.seed)))
    return 0


def _load(args: argparse.Namespace):
    overrides = list(args.overrides)
    if getattr(args, "run_dir", None):
        overrides.append(f"train.output_dir={args.run_dir}")
    return load_config(args.config, overrides)


def _check_online(config) -> None:
    """What every rank of an online run would otherwise find out after building the model."""
    import torch

    if config.task.name == "math":
        from .tasks.prompt_data import check_prompt_file

        eval_paths = [s.path for s in config.task.resolved_eval_sets]
        for path in dict.fromkeys([config.task.data.path, *eval_paths]):
            if path is not None:
                check_prompt_file(path, config.task.data)
    server = config.rollout.fleet.server
    if (not config.rollout.fleet.attach_router_url and not torch.cuda.is_available()
            and server.dtype not in CPU_SERVER_DTYPES):
        raise ValueError(f"rollout.fleet.server.dtype={server.dtype!r} needs a GPU; the servers "
                         f"started here run on CPU: use one of {list(CPU_SERVER_DTYPES)}")


def train(args: argparse.Namespace) -> int:
    config = _load(args)
    if not args.rollouts:
        _check_online(config)
    if config.train.init_hf_checkpoint:
        from .learner.hf_files import check_hf_checkpoint

        # Before any rank starts or anything is written: one clear error naming the field.
        check_hf_checkpoint(config.train.init_hf_checkpoint, config.model)
    if args.rollouts:
        from .learner.sample_files import open_rollout_file
        from .offline import count_batches, train_offline_rank

        # Check the file before any rank starts: one clear error, not N tracebacks (a JSONL file
        # is validated whole; a Parquet file by its schema, ids and statistics, rows as read).
        rollouts = open_rollout_file(args.rollouts, vocab_size=config.model.vocab_size,
                                     num_experts=config.model.num_experts or None)
        count_batches(rollouts, args.rollouts, config.train.rollout_batch_size)
        if config.algorithm.routing_replay == "R3" and rollouts.rows_without_routes:
            raise ValueError(f"algorithm.routing_replay=R3 replays the engine's routes, but "
                             f"{rollouts.rows_without_routes} samples of {args.rollouts} have no "
                             f"routed_experts")
        rank_fn, fn_args = train_offline_rank, (config, str(args.rollouts), args.resume)
    else:
        from .online import train_online_rank

        if config.algorithm.routing_replay == "R3" and not config.rollout.fleet.server.enable_routed_experts:
            raise ValueError("algorithm.routing_replay=R3 replays the engine's routes: set "
                             "rollout.fleet.server.enable_routed_experts=true")
        rank_fn, fn_args = train_online_rank, (config, args.resume)
    last = _run_locked(config, args.resume, rank_fn, fn_args)
    if last:
        print(f"policy version {int(last['policy_version'])}: loss {last['loss']:+.5f}, "
              f"reward {last.get('reward/mean', float('nan')):.3f}; run directory {config.train.output_dir}")
    return 0


def _run_locked(config, resume: bool, rank_fn, fn_args) -> dict:
    """Rank 0's result of `rank_fn` on every rank, the run directory locked for the run (under
    torchrun / srun only rank 0 takes the lock)."""
    from .launch import run_ranks
    from .run_lock import RunDirLock

    locked = int(os.environ.get("RANK", "0")) == 0
    with RunDirLock(config.train.output_dir) if locked else contextlib.nullcontext():
        if locked:
            _refuse_a_used_run_dir(Path(config.train.output_dir), resume)
        return run_ranks(rank_fn, config.train.world_size, *fn_args)[0]


def _refuse_a_used_run_dir(run_dir: Path, resume: bool) -> None:
    """A fresh run never writes into another run's directory (it would append to its metrics, move
    its `latest` back and open a second MLflow run)."""
    metrics = run_dir / "metrics.jsonl"
    used = (run_dir / "checkpoints" / "latest").exists() or (metrics.exists() and metrics.stat().st_size)
    if used and not resume:
        raise ValueError(f"{run_dir} already holds a run (checkpoints or metrics.jsonl): continue it "
                         f"with --resume, or train into another --run-dir")


def serve(args: argparse.Namespace) -> int:
    from .rollout.auth import run_api_key, use_api_key
    from .rollout.serve import serve_node
    from .rollout.server import seeded

    config = _load(args)
    # One serve task per server in a Slurm job: its task id is the server's index in the fleet.
    server = seeded(config.rollout.fleet.server, config.train.seed,
                    int(os.environ.get("SLURM_PROCID", "0")))
    if args.host:
        server = dataclasses.replace(server, host=args.host)
    use_api_key(run_api_key(Path(config.train.output_dir)))
    serve_node(config.model, config.train.init_hf_checkpoint, server,
               Path(config.train.output_dir), args.port, args.router_port,
               [u for u in (args.worker_urls or "").split(",") if u],
               config.rollout.fleet.max_restarts)
    return 0


def _config_paths(config) -> dict[str, Optional[str]]:
    """The paths a config names that a job's steps read."""
    return {"train.init_hf_checkpoint": config.train.init_hf_checkpoint,
            "task.tokenizer_path": config.task.tokenizer_path,
            "task.data.path": config.task.data.path, "task.data.eval_path": config.task.data.eval_path,
            **{f"task.eval_sets[{s.name}].path": s.path for s in config.task.eval_sets}}


def _check_job_paths(paths: dict[str, Optional[str]]) -> None:
    """Before queueing: every path the job reads exists from this host (a shared file system), so a
    placeholder such as /path/to/... fails now, not after hours in the queue."""
    for key, path in paths.items():
        if path is not None and not Path(path).exists():
            raise ValueError(f"{key}={path!r} does not exist on this host; the job would fail after "
                             f"queueing (pass --no-path-check if only the compute nodes see it)")


def slurm(args: argparse.Namespace) -> int:
    from .slurm.submit import slurm_submit

    config = _load(args)
    paths = _config_paths(config)
    if not args.no_path_check:
        _check_job_paths(paths)
    # The container sees each named file's directory (a checkpoint directory itself).
    mounts = [str(Path(p).resolve() if Path(p).is_dir() else Path(p).resolve().parent)
              for p in paths.values() if p is not None]
    # The job reads the resolved config (overrides included), with the world size the job has.
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, world_size=config.slurm.learner_nodes * config.slurm.nproc_per_node))
    run_dir = Path(config.train.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "config.yaml"
    resolved.write_text(dump_config(config))
    script, job_id = slurm_submit(str(resolved), config.slurm, str(run_dir), dry_run=args.dry_run,
                                  mounts=mounts)
    print(f"job script {script}" + (f"; submitted job {job_id}" if job_id else " (not submitted)"))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint

    config = _load(args)
    _check_online(config)
    evaluate_checkpoint(config, Path(args.checkpoint), new_run=args.new_run)
    return 0


def prepare_data(args: argparse.Namespace) -> int:
    from .tasks.recipes import prepare_data as prepare

    counts = prepare(args.recipe, args.input, args.output, args.limit)
    note = []
    if counts["repeats"]:
        note.append(f"{counts['repeats']} repeated problems written once")
    if counts["instruction_kept"]:
        note.append(f"{counts['instruction_kept']} rows without the published instruction, kept as is")
    print(f"{args.output}: {counts['written']} prompts from {counts['read']} rows of {args.input}"
          + (f" ({'; '.join(note)})" if note else ""))
    return 0


def tracking_flush(args: argparse.Namespace) -> int:
    """Send a run's buffered MLflow requests (an outage outlived the run) without a learner."""
    from .config import build, read_yaml
    from .tracking.mlflow_run import Tracker, TrackingConfig

    run_dir = Path(args.run_dir)
    written = run_dir / "tracking" / "config.yaml"  # the resolved config the run logged
    if not written.exists():
        raise ValueError(f"{run_dir} holds no tracking/config.yaml: not a run directory")
    # Only the tracking section: the rest of an older run's config need not validate today.
    tracking = build(TrackingConfig, (read_yaml(written) or {}).get("tracking"), "tracking")
    tracker = Tracker(tracking, run_dir)
    before = tracker.stats.buffered
    left = tracker.flush(args.wait)
    print(f"sent {before - left} tracking request(s) of {run_dir} to {tracker.uri}"
          + (f"; {left} left in {tracker.buffer_path} (store unreachable)" if left else ""))
    return 1 if left else 0


def stop(args: argparse.Namespace) -> int:
    """Ask the run's trainer to stop after its current step with a checkpoint."""
    from .stop_request import request_stop

    run_dir = Path(args.run_dir)
    if not (run_dir / ".lock").exists():
        raise ValueError(f"{run_dir} is not a run directory (no trainer ever locked it)")
    path = request_stop(run_dir, args.reason)
    print(f"wrote {path}: the trainer stops after its current step with a checkpoint")
    return 0


def main(argv: list[str] | None = None) -> int:
    dump_stacks_on_signal()
    parser = argparse.ArgumentParser(prog="megatron-vespo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="print the VESPO kernel, its constants and its effect on stale batches")
    p.add_argument("--config", help="YAML config (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. algorithm.vespo.c1_pos=2.5")
    p.add_argument("--num-seqs", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    t = sub.add_parser("train", help="train the policy: online with the SGLang fleet, or offline")
    t.add_argument("config", help="YAML config")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    t.add_argument("--rollouts", help="train offline on recorded samples instead of the fleet: a "
                                      ".jsonl or .parquet file, or a directory of .parquet files "
                                      "(see megatron_vespo/learner/sample_files.py)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the run's latest checkpoint (fresh when there is none); "
                        "without it a directory that holds a run is refused")
    t.add_argument("--run-dir", help="the run directory (overrides train.output_dir)")
    t.set_defaults(func=train)
    s = sub.add_parser("serve", help="run this node's SGLang server (and the router) of a Slurm fleet")
    s.add_argument("config", help="YAML config")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    s.add_argument("--run-dir", help="the run directory (overrides train.output_dir)")
    s.add_argument("--port", type=int, required=True, help="this server's port")
    s.add_argument("--host", help="the address to serve on (overrides rollout.fleet.server.host; a "
                   "Slurm job passes the node's address)")
    s.add_argument("--router-port", type=int, help="also run the router on this port")
    s.add_argument("--worker-urls", help="comma-separated server URLs the router fronts")
    s.set_defaults(func=serve)
    sl = sub.add_parser("slurm", help="Slurm jobs")
    slsub = sl.add_subparsers(dest="slurm_command", required=True)
    su = slsub.add_parser("submit", help="render the heterogeneous job from the config and sbatch it")
    su.add_argument("config", help="YAML config")
    su.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    su.add_argument("--run-dir", help="the run directory (overrides train.output_dir)")
    su.add_argument("--dry-run", action="store_true", help="write the job script, do not submit")
    su.add_argument("--no-path-check", action="store_true",
                    help="submit although paths the config names do not exist on this host")
    su.set_defaults(func=slurm)
    ev = sub.add_parser("eval", help="evaluate a checkpoint on the config's evaluation sets "
                        "(task.eval_sets) with a fleet of its own; log to MLflow")
    ev.add_argument("config", help="YAML config (the run's, or one that names the sets)")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    ev.add_argument("--checkpoint", required=True,
                    help="an HF directory, a megatron checkpoint (RUN_DIR/checkpoints/step_N) or "
                         "a checkpoint root (its latest)")
    ev.add_argument("--run-dir", help="the run directory whose MLflow run gets the metrics "
                                      "(overrides train.output_dir)")
    ev.add_argument("--new-run", action="store_true",
                    help="log to a new MLflow run instead of the run directory's")
    ev.set_defaults(func=evaluate)
    pd = sub.add_parser("prepare-data", help="turn a downloaded math set into the math task's "
                        "prompt file (the paper's instruction, chat messages)")
    from .tasks.recipes import RECIPES

    pd.add_argument("recipe", choices=sorted(RECIPES))
    pd.add_argument("input", help="the downloaded .parquet or .jsonl file, in its published schema")
    pd.add_argument("output", help="the .jsonl prompt file to write")
    pd.add_argument("--limit", type=int, help="write only the first LIMIT problems")
    pd.set_defaults(func=prepare_data)
    tr = sub.add_parser("tracking", help="MLflow tracking of a run")
    trsub = tr.add_subparsers(dest="tracking_command", required=True)
    fl = trsub.add_parser("flush", help="send a run's buffered tracking requests (no learner, no fleet)")
    fl.add_argument("run_dir", help="the run directory")
    fl.add_argument("--wait", type=float, default=10.0, help="seconds to retry an unreachable store")
    fl.set_defaults(func=tracking_flush)
    st = sub.add_parser("stop", help="stop a running training after its current step, with a "
                        "checkpoint (from any host that sees the run directory)")
    st.add_argument("run_dir", help="the run directory")
    st.add_argument("--reason", default="megatron-vespo stop", help="printed by the trainer")
    st.set_defaults(func=stop)
    # KEY=VALUE overrides may follow options (`train CFG --resume train.max_steps=6`), which plain
    # argparse does not allow for a positional list: collect the stragglers here.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"megatron-vespo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
