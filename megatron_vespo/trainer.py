"""The one trainer loop, for every source of samples: a recorded file (`offline.FileSource`), the
synchronous fleet and the fully asynchronous fleet (`online.FleetSource`).

Every learner rank runs `train_rank`. Rank 0 takes each rollout batch from the source and streams
its prompt groups, as they arrive, to the DP ranks that train them (whole groups, balanced by
response tokens, advantages over each group), as columns of bytes (`parallel.transport`: to the DP
rank's first rank, which passes them to its TP / CP / PP peers), so no rank holds more than its own
share of the batch plus one group in transit; every rank prepares its share
(`rollout_batch`: its micro-batches, the old log-probs recomputed once) and trains the batch's steps; the source then
does what follows a batch (a weight sync to the fleet when due). Evaluation (when the source has
one) every `train.eval_interval` steps, logged in a row of its own at the step it judged when it
is done (it may run while training goes on); checkpoints every `train.save_interval` steps, also inside
a rollout batch: each rank's prepared share of the batch is then persisted in the run's rollout
bank first, and `--resume` continues at the exact next step without regenerating or recomputing
anything. SIGINT/SIGTERM (Ctrl-C) and the run's stop file (`RUN_DIR/stop_request`: written by
`megatron-vespo stop RUN_DIR`, or by a Slurm job's batch script when its time limit is near) stop
the run after the current step with a checkpoint.

The checkpoint cursor (`extra_state`): {"source": the source's own state, "kernel": the adapted
kernel constants, "bank": {"key", "next_step"} when the checkpoint falls inside a batch}.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist

from .config import Config
from .learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .launch import PARENT_DEATH_SIGNAL
from .learner.learner import Learner
from .parallel.transport import ShardStream
from .learner.samples import RolloutBatch
from .rollout_batch import (BatchTally, PreparedBatch, RankShare, kernel_state,
                            prepare_rollout_batch, restore_kernel, stream_groups,
                            train_prepared_step)
from .stop_request import STOP_FILE, take_stop_request
from .tracking.sinks import RunSinks


def build_learner(config: Config) -> Learner:
    """Process groups, model chunks, optimizer; initial weights from the HF checkpoint if set, else
    the seeded initial model (`learner.init_weights`: the same for every parallel layout)."""
    from megatron.core import tensor_parallel

    layout = config.parallel
    groups = layout.initialize()
    torch.manual_seed(config.train.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(config.train.seed)
    learner = Learner(config.model, layout, groups, config.optim, config.loss_settings)
    chunks = [c.module for c in learner.chunks]
    if config.train.init_hf_checkpoint:
        from .learner.hf_convert import load_hf_into_model

        load_hf_into_model(config.train.init_hf_checkpoint, chunks, config.model, layout)
    else:
        from .learner.init_weights import init_weights

        init_weights(chunks, config.model, layout, config.train.seed)
    learner.optimizer.reload_model_params()  # fp32 main copies follow the loaded weights
    return learner


class SampleSource(Protocol):
    """What the trainer needs from a source of samples. Methods marked collective run on every
    rank; the others only on rank 0 (`is_rank0`)."""

    steps_per_batch: int  # optimizer steps per rollout batch (N for a synchronous batch)

    def start(self, learner: Learner) -> None:
        """Collective: ready to hand out batches for the learner's current weights."""

    def next_batch(self) -> Optional[RolloutBatch]:
        """Rank 0: the next rollout batch (its groups streamed as they come), or None when there
        is none."""

    def after_batch(self, learner: Learner) -> None:
        """Collective: the learners trained a batch (weights to the fleet when due)."""

    def evaluate(self, step: int) -> None:
        """Rank 0: start judging the current weights (those of `step`) on the held-out sets (a
        no-op without any); it may run while training goes on."""

    def evaluations(self, wait: bool = False) -> list[tuple[int, dict]]:
        """Rank 0: (step, metrics) of the evaluations finished since the last call (`wait`: the
        running one included)."""

    def state_dict(self) -> dict:
        """Rank 0: JSON-able state that a resumed run continues from."""

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Rank 0: continue from `state_dict()`'s (None: a fresh start)."""

    def close(self) -> None:
        """Every rank, not collective (it also runs on a rank that failed alone): stop what the
        source started."""


class StopRequest:
    """SIGINT/SIGTERM set a flag instead of raising, so the loop can stop between steps; a second
    one raises KeyboardInterrupt at once. The launcher's death (`launch.PARENT_DEATH_SIGNAL`, which
    may arrive several times for one death) only sets the flag. `stop_file` (rank 0's, None on the
    others) sets it too, and is removed once seen: the request is answered."""

    def __init__(self, stop_file: Optional[Path] = None) -> None:
        self.requested = False
        self.stop_file = stop_file
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        signal.signal(PARENT_DEATH_SIGNAL, self._orphaned)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"[megatron-vespo] {signal.Signals(signum).name}: stopping after this step with a "
              f"checkpoint (again to abort)", file=sys.stderr, flush=True)

    def _orphaned(self, signum, frame) -> None:
        if not self.requested:
            self.requested = True
            print("[megatron-vespo] the launcher died: stopping after this step with a checkpoint",
                  file=sys.stderr, flush=True)

    def pending(self, group) -> bool:
        """Collective over `group`: whether any rank was asked to stop."""
        reason = take_stop_request(self.stop_file) if self.stop_file and not self.requested else None
        if reason is not None:
            self.requested = True
            print(f"[megatron-vespo] {self.stop_file} ({reason}): stopping after this step with a "
                  f"checkpoint", file=sys.stderr, flush=True)
        flag = torch.tensor([1.0 if self.requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())


def broadcast_object(obj: Any, group) -> Any:
    """Rank 0's `obj` on every rank (pickled over the gloo control group)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class RolloutBank:
    """This rank's prepared share of the rollout batch in training, persisted in
    `root/rank_XXXXX_vYYYYYYYY.pt` (key Y: the policy version the batch started at), so that a
    checkpoint can fall inside the batch. Written before the checkpoint that names it; older keys
    are pruned only after a newer checkpoint is in place."""

    def __init__(self, root: Path, rank: int) -> None:
        self.root, self.rank = Path(root), rank

    def _path(self, key: int) -> Path:
        return self.root / f"rank_{self.rank:05d}_v{key:08d}.pt"

    def save(self, key: int, prepared: PreparedBatch, learner: Learner, info: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        caches = [learner.batch_caches(batches) for batches in prepared.steps]
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"prepared": prepared, "caches": caches, "info": info}, tmp)
        os.replace(tmp, path)

    def load(self, key: int, learner: Learner) -> tuple[PreparedBatch, Any]:
        path = self._path(key)
        if not path.exists():
            raise FileNotFoundError(f"the checkpoint continues inside the rollout batch that started "
                                    f"at policy version {key}, but {path} is missing")
        saved = torch.load(path, weights_only=False)
        for batches, caches in zip(saved["prepared"].steps, saved["caches"]):
            learner.restore_batch_caches(batches, caches)
        return saved["prepared"], saved["info"]

    def prune(self, keep: Optional[int] = None) -> None:
        """Remove this rank's banked batches other than `keep`."""
        for path in self.root.glob(f"rank_{self.rank:05d}_v*.pt"):
            if keep is None or path != self._path(keep):
                path.unlink(missing_ok=True)


def _receive_batch(stream: ShardStream, got: Optional[RolloutBatch], config: Config,
                   staleness: int, control) -> tuple[RankShare, dict]:
    """This rank's share of the batch that rank 0 streams from its source (`got`; None on the
    other ranks), and the batch's head: its few scalars, plus on rank 0 the ids trained per step.
    A failure on rank 0 while streaming (a dead fleet, a bad file) still ends the stream, and
    every rank raises it."""
    tally, error = None, None

    def messages():
        nonlocal error
        try:
            yield from stream_groups(got, tally, config.algorithm.advantage)
        except Exception as e:  # noqa: BLE001 - re-raised below, once every rank has it
            error = e

    if got is not None:
        tally = BatchTally(got.size, staleness, stream.dp_size)
    share = RankShare.from_messages(stream.stream(messages() if got is not None else None))
    head = None
    if got is not None:
        try:
            head = tally.head(got.metrics()) if error is None \
                else {"error": f"{type(error).__name__}: {error}"}
        except ValueError as e:
            error, head = e, {"error": f"{type(e).__name__}: {e}"}
    head = broadcast_object(head, control)
    if "error" in head:
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 failed while streaming the rollout batch: {head['error']}")
    return share, {**head, "sample_ids": tally.sample_ids if tally is not None else None}


def train_rank(rank: int, config: Config, learner: Learner, source: SampleSource,
               resume: bool) -> dict:
    """One rank of training from `source`; returns the last step's metrics."""
    cfg = config.train
    run_dir = Path(cfg.output_dir)
    ckpt_root = run_dir / "checkpoints"
    control = dist.new_group(backend="gloo")  # object broadcasts and flags, on CPU even with NCCL
    stop = StopRequest(run_dir / STOP_FILE if rank == 0 else None)
    cursor = (load_checkpoint(learner, ckpt_root) if resume else None) or {}
    if rank == 0 and resume:
        print(f"[megatron-vespo] resumed at step {learner.policy_version} from "
              f"{latest_checkpoint(ckpt_root)}" if cursor else
              f"[megatron-vespo] --resume: no checkpoint in {ckpt_root}; starting fresh",
              file=sys.stderr, flush=True)
    restore_kernel(learner, cursor.get("kernel"))
    bank = RolloutBank(run_dir / "rollout_bank", rank)
    stream = ShardStream(learner.groups.dp_rank, control)
    banked = cursor.get("bank")
    resumed = None  # (prepared batch, its key, rank 0's info, the step to continue at)
    if banked:
        prepared, info = bank.load(banked["key"], learner)
        resumed = (prepared, banked["key"], info, banked["next_step"])
    sinks = None
    if rank == 0:
        # Checkpoints written before this loop kept the source's keys at the top level.
        legacy = {k: v for k, v in cursor.items() if k != "kernel"} or None
        source.load_state_dict(cursor["source"] if "source" in cursor else legacy)
        sinks = RunSinks(config, run_dir, resume, learner.policy_version)

    def checkpoint(bank_cursor: Optional[dict] = None) -> None:
        state = broadcast_object(source.state_dict() if rank == 0 else None, control)
        save_checkpoint(learner, ckpt_root, {"source": state, "kernel": kernel_state(learner),
                                             "bank": bank_cursor}, keep=cfg.keep_checkpoints)
        bank.prune(keep=bank_cursor["key"] if bank_cursor else None)

    def done() -> bool:
        return bool(cfg.max_steps) and learner.policy_version >= cfg.max_steps

    last: dict = {}
    since_save = 0
    status = "FAILED"
    try:
        source.start(learner)
        status = "FINISHED"  # unless a stop request ends the loop first (or an exception)
        while not done():
            if resumed is not None:
                prepared, key, info, first = resumed
                resumed = None
            else:
                got = source.next_batch() if rank == 0 else None
                # Everyone learns whether there is a batch; each rank then receives only its own
                # share of it as the groups stream in, as bytes (`parallel.transport`).
                if not broadcast_object(got is not None, control):
                    break
                key, first = learner.policy_version, 0
                share, info = _receive_batch(stream, got, config, source.steps_per_batch, control)
                prepared = prepare_rollout_batch(learner, config, share, source.steps_per_batch,
                                                 info["reward"])
            in_bank = first > 0
            halted = None  # the run's status when it ends inside this batch
            for k in range(first, prepared.num_steps):
                metrics = train_prepared_step(learner, config, prepared, k)
                version = learner.policy_version
                metrics.update(info["rollout"])
                metrics["staleness/sample_lag_mean"] = version - 1 - info["behaviour_version"]
                last = metrics
                since_save += 1
                if sinks:
                    sinks.step_done(version, learner, info["sample_ids"][k])
                    if k + 1 < prepared.num_steps:  # the batch's last step is logged with its evaluation
                        sinks.log(version, metrics)
                if k + 1 == prepared.num_steps:
                    break
                stopping = stop.pending(control)
                if stopping or done() or (cfg.save_interval and since_save >= cfg.save_interval):
                    if not in_bank:  # each rank's share of the batch, once, before it is named
                        bank.save(key, prepared, learner, info)
                        in_bank = True
                    checkpoint({"key": key, "next_step": k + 1})
                    since_save = 0
                if stopping or done():
                    halted = "FINISHED" if done() else "KILLED"
                    break
            if halted:
                status = halted
                break
            source.after_batch(learner)
            version = learner.policy_version
            if sinks:
                sinks.log(version, last)
                for step, metrics in source.evaluations():
                    sinks.log_evaluation(step, metrics)
                # due when a multiple of eval_interval lies in the batch's steps (key: its start)
                if cfg.eval_interval and version // cfg.eval_interval > key // cfg.eval_interval:
                    source.evaluate(version)
            stopping = stop.pending(control)
            if stopping or (cfg.save_interval and since_save >= cfg.save_interval):
                checkpoint()
                since_save = 0
            if stopping:
                status = "FINISHED" if done() else "KILLED"
                break
        if since_save:
            checkpoint()
        if sinks:  # the last evaluation is waited for, unless the run was asked to stop
            for step, metrics in source.evaluations(wait=status != "KILLED"):
                sinks.log_evaluation(step, metrics)
    except BaseException:
        status = "FAILED"
        raise
    finally:
        with contextlib.suppress(Exception):
            source.close()
        if sinks:
            sinks.close(status)
    if rank == 0 and status == "KILLED":
        print(f"[megatron-vespo] stopped at step {learner.policy_version} with a checkpoint in "
              f"{ckpt_root}: continue with --resume", file=sys.stderr, flush=True)
    return last
