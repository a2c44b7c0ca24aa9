"""Offline training from recorded rollouts: `megatron-vespo train CONFIG --rollouts FILE`.

`FileSource` hands the file's samples to the trainer (`trainer.py`) in rollout batches of
`train.rollout_batch_size` (one behaviour policy each), for `train.epochs` passes; every batch is
trained exactly like a synchronous rollout batch, as N = `train.staleness` steps. Rank 0 reads the
file; its cursor (epoch, next batch) is the source's checkpoint state.
"""

from __future__ import annotations

import sys
from typing import Optional

from .config import Config
from .learner.learner import Learner
from .learner.samples import Sample, read_samples
from .trainer import build_learner, train_rank


def rollout_batches(samples: list[Sample], size: int) -> tuple[list[list[Sample]], int]:
    """Consecutive full batches of `size` samples, and how many trailing samples were left over."""
    if len(samples) < size:
        raise ValueError(f"the rollout file has {len(samples)} samples, fewer than one rollout batch "
                         f"(train.rollout_batch_size={size})")
    full = len(samples) // size
    return [samples[k * size:(k + 1) * size] for k in range(full)], len(samples) - full * size


class FileSource:
    """Rollout batches from a recorded file (`trainer.SampleSource`)."""

    def __init__(self, config: Config, rollouts: str, rank: int) -> None:
        self.steps_per_batch = config.train.staleness
        self.epochs = config.train.epochs
        self.cursor = {"epoch": 0, "rollout_batch": 0}
        self.batches: list[list[Sample]] = []
        if rank == 0:
            samples = read_samples(rollouts, vocab_size=config.model.vocab_size,
                                   num_experts=config.model.num_experts or None)
            self.batches, leftover = rollout_batches(samples, config.train.rollout_batch_size)
            if leftover:
                print(f"[megatron-vespo] {leftover} trailing samples do not fill a rollout batch "
                      f"and are not trained on", file=sys.stderr)

    def start(self, learner: Learner) -> None:
        pass

    def next_batch(self) -> Optional[tuple[list[Sample], dict]]:
        epoch, index = self.cursor["epoch"], self.cursor["rollout_batch"]
        if index >= len(self.batches):
            epoch, index = epoch + 1, 0
        if epoch >= self.epochs:
            return None
        self.cursor = {"epoch": epoch, "rollout_batch": index + 1}
        return self.batches[index], {"data/epoch": float(epoch), "data/rollout_batch": float(index)}

    def after_batch(self, learner: Learner) -> None:
        pass

    def evaluate(self) -> dict:
        return {}

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
