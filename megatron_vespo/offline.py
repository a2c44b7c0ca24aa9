"""Offline training from recorded rollouts: `megatron-vespo train CONFIG --rollouts FILE`.

`FileSource` hands the file's samples to the trainer (`trainer.py`) in rollout batches of
`train.rollout_batch_size` consecutive samples (one behaviour policy each), for `train.epochs`
passes; every batch is trained exactly like a synchronous rollout batch, as N = `train.staleness`
steps. Rank 0 reads the file lazily (`learner.sample_files`: JSONL or Parquet), one prompt group
(a run of samples with one group id) at a time, as the trainer streams it to its DP rank; its
cursor (epoch, next batch) is the source's checkpoint state.
"""

from __future__ import annotations

import sys
from typing import Iterator, Optional

from .config import Config
from .learner.learner import Learner
from .learner.sample_files import open_rollout_file
from .learner.samples import RolloutBatch, Sample
from .trainer import build_learner, train_rank


def count_batches(rollouts, path: str, size: int) -> tuple[int, int]:
    """(full rollout batches of `size` samples, trailing samples left over) of an opened rollout
    file; fewer samples than one batch is an error naming the file."""
    batches, leftover = divmod(rollouts.num_samples, size)
    if not batches:
        raise ValueError(f"{path} has {rollouts.num_samples} samples, fewer than one rollout batch "
                         f"(train.rollout_batch_size={size})")
    return batches, leftover


def file_groups(samples: Iterator[Sample], size: int, mini: int) -> Iterator[tuple[int, list[Sample]]]:
    """(offset, samples) of each run of one group id among a batch's `size` samples. A run longer
    than a mini-batch of `mini` samples is an error: its advantages would span several steps and
    rank 0 would hold it whole."""
    run: list[Sample] = []
    for i, sample in enumerate(samples):
        if run and sample.group_id != run[-1].group_id:
            yield i - len(run), run
            run = []
        run.append(sample)
        if len(run) > mini:
            raise ValueError(f"group {sample.group_id} has more than the {mini} samples of one "
                             f"mini-batch in a row (sample {sample.sample_id!r}); a group's "
                             f"responses must be consecutive and fit one step")
    if run:
        yield size - len(run), run


class FileSource:
    """Rollout batches from a recorded file (`trainer.SampleSource`)."""

    def __init__(self, config: Config, rollouts: str, rank: int) -> None:
        self.steps_per_batch = config.train.staleness
        self.epochs = config.train.epochs
        self.size = config.train.rollout_batch_size
        self.cursor = {"epoch": 0, "rollout_batch": 0}
        self.file, self.num_batches = None, 0
        if rank == 0:
            self.file = open_rollout_file(rollouts, vocab_size=config.model.vocab_size,
                                          num_experts=config.model.num_experts or None)
            self.num_batches, leftover = count_batches(self.file, rollouts, self.size)
            if leftover:
                print(f"[megatron-vespo] {leftover} trailing samples do not fill a rollout batch "
                      f"and are not trained on", file=sys.stderr)

    def start(self, learner: Learner) -> None:
        pass

    def next_batch(self) -> Optional[RolloutBatch]:
        epoch, index = self.cursor["epoch"], self.cursor["rollout_batch"]
        if index >= self.num_batches:
            epoch, index = epoch + 1, 0
        if epoch >= self.epochs:
            return None
        self.cursor = {"epoch": epoch, "rollout_batch": index + 1}
        start = index * self.size
        groups = file_groups(self.file.samples(start, start + self.size), self.size,
                             self.size // self.steps_per_batch)
        metrics = {"data/epoch": float(epoch), "data/rollout_batch": float(index)}
        return RolloutBatch(self.size, groups, lambda: metrics)

    def after_batch(self, learner: Learner) -> None:
        pass

    def evaluate(self, step: int) -> None:
        pass

    def evaluations(self, wait: bool = False) -> list:
        return []

    def state_dict(self) -> dict:
        return dict(self.cursor)

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state:
            self.cursor = dict(state)

    def close(self) -> None:
        pass


def train_offline_rank(rank: int, world_size: int, config: Config, rollouts: str, resume: bool) -> dict:
    """One rank of offline training; returns the last step's metrics."""
    learner = build_learner(config)
    return train_rank(rank, config, learner, FileSource(config, rollouts, rank), resume)
