"""A deterministic, resumable walk over a dataset: a fresh shuffle every epoch, no repeats within one.

The order of epoch e is the permutation drawn from numpy's PCG64 seeded with (seed, e), so it is the
same on every machine and numpy version, and a run resumed from `state_dict()` serves exactly the
items the uninterrupted run would have served.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class EpochCursor:
    """Serves item indices in [0, num_items): epoch 0 in its shuffled order, then epoch 1, ...

    `served` counts every index handed out since the start (across epochs); it is a natural unique
    group id for the prompt served.
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True):
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    @property
    def served(self) -> int:
        return self.epoch * self.num_items + self.position

    def next(self) -> int:
        """The next item index; rolls over into a newly shuffled epoch after the last item."""
        if self.position == self.num_items:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        index = int(self._order[self.position])
        self.position += 1
        return index

    def state_dict(self) -> dict[str, Any]:
        return {"num_items": self.num_items, "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume; the dataset size, seed and shuffle flag must match (else the order would not)."""
        for key in ("num_items", "seed", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"cursor state has {key}={state.get(key)!r}, this dataset has "
                                 f"{getattr(self, key)!r}: resuming would serve a different order")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_items:
            raise ValueError(f"cursor state epoch={epoch}, position={position} is out of range")
        self.epoch, self.position = epoch, position
        self._order = self._epoch_order(epoch)
